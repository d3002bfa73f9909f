"""Chapter 11: GRAPE, Generalized Relative Advantage Policy Evolution (§6, Eq. 15–17, Lemma 8.1).

(Not the robot-policy method of the same name.) The toy world's parts (system prompts, revision prompt,
rubrics, judges) are in ``rlmt_edu.world.rubrics``; this module is the procedure:

1. **generate** (``GrapeDrawer``): for each of Q questions, G responses from the latest policy, each either in
   system-prompt mode (``<SYSTEM> category prompt <USER> q <MODEL>``) or, with probability p, in revision mode
   (question + one of this group's system-mode responses + the critique its judges wrote → an improved
   response); optionally one of the G is the SFT answer (§6.1 "Use of SFT data");
2. **judge** (``judge_responses``): every rubric item of the question's category gives (Ψ, τ, φ);
3. **aggregate** (``grape_rewards``): φ̄ over the samples of a category (§6.1), then R by Eq. 15;
4. **update**: A = R − mean of the group (Eq. 16, the same as GRPO's Eq. 13), then Eq. 14 (``loss="eq14"``,
   token-level clipping, as the paper advises to start with) or Eq. 17 (``loss="eq17"``, one clip per
   sample). The update is chapter 09's ``grpo_step``; only the drawer and, for Eq. 17, the loss differ.

A model conditions on a system prompt only if it learnt to; the SFT model of chapter 01 never saw ``<SYSTEM>``
or ``<CRITIQUE>`` (greedy held-out gold falls from 0.83 to 0.49 under a system prompt). So GRAPE starts from
``prompt_sft``: a short SFT on the same SFT pairs in all three formats (plain, system prompt, revision): the
instruction tuning a real model's system prompt relies on. Beyond the paper: that warm-up, the revision
critique in the world's words, and the variance study outside Lemma 8.1's assumptions (``rubric_variances``).

Shape legend: Q questions, G group size, S = Q·G samples, J rubric items (padded), N response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.grpo import GRPOConfig, grpo_step
from rlmt_edu.algorithms.sft import SFTConfig, sft
from rlmt_edu.losses._checks import check_choice
from rlmt_edu.losses.grape import grape_reward, grape_sequence_loss, mean_rubric_confidence
from rlmt_edu.rl import (
    PromptSampler,
    frozen_reference,
    gold_reward,
    heldout_questions,
    heldout_report,
    prompt_pool,
    score_responses,
)
from rlmt_edu.rollout import Rollout, forced_rollout, merge_rollouts, sample
from rlmt_edu.tokenizer import EOS, encode_prompt, format_prompt, format_revision_prompt
from rlmt_edu.utils import History, seed_everything
from rlmt_edu.world.rubrics import (
    NOTHING_TO_FIX,
    REVISION_SYSTEM_PROMPT,
    SYSTEM_PROMPTS,
    Judgement,
    PreferenceJudge,
    Rubric,
    as_judgement,
)
from rlmt_edu.world.tasks import CATEGORIES, Question

Tensor = torch.Tensor
LOSSES = ("eq14", "eq17")
#: φ̄ below this flags a rubric item for manual review (§6.1.1)
REVIEW_THRESHOLD = 0.5


@dataclass(frozen=True)
class GRAPEConfig(GRPOConfig):
    """Settings of one GRAPE run: chapter 09's GRPO settings (Q, G, ε, lr, ...) plus GRAPE's own."""

    prompts: str = "train_pool"  #: the prompt pool: all three categories, as GRAPE needs
    revision_probability: float = 0.25  #: p, the chance that a response (other than the first) is a revision
    sft_in_group: bool = False  #: make the last of the G responses the SFT answer (§6.1 "Use of SFT data")
    loss: str = "eq14"  #: "eq14" (token-level clip, as GRPO) or "eq17" (sequence-level clip, Alt. GRAPE loss)
    use_confidence: bool = True  #: Eq. 15 with φ̄; False sets every φ̄ to 1 (R = Σ_j ω_j τ_j, no confidence)
    learning_rate: float = 3e-5

    def __post_init__(self):
        super().__post_init__()
        p = self.revision_probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"revision_probability: expected a number in [0, 1], got {p!r}")
        check_choice("loss", self.loss, LOSSES)
        for name in ("sft_in_group", "use_confidence"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.sft_in_group and self.group_size < 3:
            raise ValueError(f"group_size: expected >= 3 with sft_in_group (one SFT answer beside at least two "
                             f"samples), got {self.group_size}")


# ---- judging and Eq. 15 ---------------------------------------------------------------------------------------


@dataclass
class JudgedBatch:
    """Every rubric item's judgement of every sample, as the padded tensors of ``losses.grape``.

    Column j of a sample is item j of its category's rubric; ``item_names[c][j]`` names it for category c."""

    categories: list[str]  #: the category of each sample (S,)
    category_ids: Tensor  #: (S,) index into CATEGORIES
    scores: Tensor  #: (S, J) τ
    confidence: Tensor  #: (S, J) φ
    weights: Tensor  #: (S, J) ω
    item_mask: Tensor  #: (S, J) 1 where the item exists
    judgements: list[list[Judgement]]  #: (S, ρ_i) the full (reasoning, score, confidence)
    item_names: dict[str, list[str]]  #: category -> its items' names


def check_rubrics(rubrics: Mapping[str, Rubric], categories: Sequence[str]) -> None:
    """Every category in ``categories`` has a rubric, and every rubric is a ``Rubric`` of its own category."""
    if not isinstance(rubrics, Mapping):
        raise ValueError(f"rubrics: expected a mapping category -> Rubric, got {type(rubrics).__name__}")
    for category, rubric in rubrics.items():
        if not isinstance(rubric, Rubric) or rubric.category != category:
            raise ValueError(f"rubrics: expected a Rubric of category {category!r} under that key, got {rubric!r:.80}")
    for i, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(f"questions: sample {i} has an unknown category {category!r}; expected one of {CATEGORIES}")
        if category not in rubrics:
            raise ValueError(f"rubrics: expected a rubric for every category of the samples, got none for "
                             f"{category!r} (sample {i}); rubrics has {sorted(rubrics)}")


def judge_responses(rubrics: Mapping[str, Rubric], questions: Sequence[Question],
                    responses: Sequence[str]) -> JudgedBatch:
    """Run every rubric item's judge on the samples of its category (one batched call per item) and stack the
    judgements into ``JudgedBatch``. Each verdict is checked by ``world.rubrics.as_judgement``."""
    if len(questions) != len(responses) or len(questions) == 0:
        raise ValueError(f"responses: expected one per question ({len(questions)}), got {len(responses)}")
    categories = [q.category for q in questions]
    check_rubrics(rubrics, categories)
    judgements: list[list[Judgement]] = [[] for _ in questions]
    for category in sorted(set(categories)):
        rows = [i for i, c in enumerate(categories) if c == category]
        for item in rubrics[category].items:
            verdicts = item.judge([questions[i] for i in rows], [responses[i] for i in rows])
            if not isinstance(verdicts, Sequence) or len(verdicts) != len(rows):
                raise ValueError(f"judge of {category}/{item.name}: expected one judgement per response "
                                 f"({len(rows)}), got {type(verdicts).__name__} of length "
                                 f"{len(verdicts) if isinstance(verdicts, Sequence) else '?'}")
            for i, verdict in zip(rows, verdicts):
                judgements[i].append(as_judgement(verdict, f"judge of {category}/{item.name}"))
    return _stack_judgements(rubrics, questions, judgements)


def grape_rewards(judged: JudgedBatch, *, use_confidence: bool = True) -> tuple[Tensor, Tensor]:
    """R(text_i) of Eq. 15 for every sample, and the φ̄ it used: ``(R (S,), φ̄ (S, J))``.

    φ̄_ij is the mean confidence of item j over the samples of the batch in text_i's category (§6.1, via
    ``losses.grape.mean_rubric_confidence``). A category whose items all have φ̄ = 0 has no defined R: that
    raises ``ValueError`` naming it. ``use_confidence=False`` sets φ̄ ≡ 1, so R = Σ_j ω_j τ_j."""
    mean_confidence = mean_rubric_confidence(judged.confidence, judged.category_ids, judged.item_mask)  # (S, J)
    total = (mean_confidence * judged.item_mask).sum(dim=1)  # (S,)
    if bool((total <= 0).any()):
        bad = sorted({judged.categories[i] for i in (total <= 0).nonzero().flatten().tolist()})
        raise ValueError(f"confidence: expected some confidence in each rubric, got φ̄ = 0 on every item of "
                         f"the categories {bad}: Eq. 15 divides by Σ_j φ̄_j")
    if not use_confidence:
        mean_confidence = judged.item_mask.clone()
    return grape_reward(judged.scores, mean_confidence, judged.weights, judged.item_mask), mean_confidence


def rubric_reward(rubrics: Mapping[str, Rubric], *, use_confidence: bool = True):
    """Eq. 15 as a reward function ``(questions, responses) -> R (B,)``: every response judged by its category's
    rubric (``judge_responses``), φ̄ taken over the responses of this call (``grape_rewards``). What the book's
    results table measures GRAPE by, and what TRL receives as a ``reward_funcs`` entry
    (``rlmt_edu.integrations.trl``)."""
    def reward(questions: Sequence[Question], responses: Sequence[str]) -> Tensor:
        return grape_rewards(judge_responses(rubrics, questions, responses), use_confidence=use_confidence)[0]

    return reward


def confidence_table(judged: JudgedBatch, *, threshold: float = REVIEW_THRESHOLD) -> list[dict]:
    """§6.1.1's diagnostic: per rubric item, φ̄ over its category (and the mean score τ), lowest φ̄ first,
    ``review`` True where φ̄ < ``threshold``: the items to read by hand."""
    rows = []
    for category, names in judged.item_names.items():
        members = [i for i, c in enumerate(judged.categories) if c == category]
        if not members:
            continue
        for j, name in enumerate(names):
            phi = float(judged.confidence[members, j].mean())
            rows.append({"category": category, "item": name, "phi_bar": phi,
                         "mean_score": float(judged.scores[members, j].mean()), "review": phi < threshold})
    return sorted(rows, key=lambda row: row["phi_bar"])


def confidence_table_from_history(history: History, *, threshold: float = REVIEW_THRESHOLD) -> list[dict]:
    """``confidence_table`` over a whole run: φ̄ and the mean score of each item averaged over the logged steps
    (``phi_bar/<category>/<item>``, ``score/<category>/<item>``)."""
    steps = [row for row in history if any(key.startswith("phi_bar/") for key in row)]
    if not steps:
        raise ValueError("history: expected a GRAPE history with phi_bar/... metrics, got none")
    keys = sorted({key for row in steps for key in row if key.startswith("phi_bar/")})
    rows = []
    for key in keys:
        _, category, item = key.split("/")
        phis = [row[key] for row in steps if key in row]
        scores = [row[f"score/{category}/{item}"] for row in steps if key in row]
        phi = sum(phis) / len(phis)
        rows.append({"category": category, "item": item, "phi_bar": phi, "mean_score": sum(scores) / len(scores),
                     "review": phi < threshold})
    return sorted(rows, key=lambda row: row["phi_bar"])


def critique_of(rubric: Rubric, question: Question, response: str, judgements: Sequence[Judgement],
                *, below: float = 0.5) -> str:
    """The critique revision mode reads: each failed item's (score < ``below``) critique in the world's words,
    in rubric order, without repeats; ``NOTHING_TO_FIX`` when no item failed."""
    parts: list[str] = []
    for item, judged in zip(rubric.items, judgements):
        words = item.judge.critique(question, response) if hasattr(item.judge, "critique") else ""
        if judged.score < below and words and words not in parts:
            parts.append(words)
    return " ".join(parts) if parts else NOTHING_TO_FIX


# ---- generation: system mode, revision mode, SFT answers --------------------------------------------------------


def system_prompt_text(question: Question) -> str:
    return format_prompt(question.question, system=SYSTEM_PROMPTS[question.category])


def encode_revision(tokenizer, question: Question, previous: str, critique: str, *, context: int,
                    max_new_tokens: int) -> list[int]:
    """Token ids of the revision prompt; ``ValueError`` if it and ``max_new_tokens`` do not fit ``context``."""
    text = format_revision_prompt(REVISION_SYSTEM_PROMPT, question.question, previous, critique)
    ids = encode_prompt(tokenizer, text, formatted=True)
    if len(ids) + max_new_tokens > context:
        raise ValueError(f"revision prompt: expected at most {context - max_new_tokens} tokens so that it and "
                         f"max_new_tokens = {max_new_tokens} fit the context of {context}, got {len(ids)} "
                         f"({text!r})")
    return ids


class GrapeDrawer:
    """GRAPE's batch: Q questions × G responses in consecutive rows (the interface of ``rl.BatchDrawer``), with
    their Eq. 15 rewards. Response 0 of a group is always system mode; each other one is a revision with
    probability p (of system-mode response g mod the number of them, with its critique), or the SFT answer for
    the last one when ``sft_in_group``. After a call, ``last`` holds the step's JudgedBatch, R, φ̄ and modes."""

    def __init__(self, model, tokenizer, questions: Sequence[Question], rubrics: Mapping[str, Rubric],
                 config: GRAPEConfig):
        check_rubrics(rubrics, [q.category for q in questions])
        self.draw_prompts = PromptSampler(questions, config.seed)
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.modes_generator = torch.Generator().manual_seed(config.seed + 1)
        self.model, self.tokenizer, self.rubrics, self.config = model, tokenizer, rubrics, config
        self.batch_size, self.group_size = config.questions_per_step, config.group_size
        self.context = model.config.n_positions
        self.last: dict = {}

    def _modes(self) -> list[str]:
        config, modes = self.config, []
        for _ in range(self.batch_size):
            draws = torch.rand(self.group_size, generator=self.modes_generator).tolist()
            group = ["system"] + ["revision" if u < config.revision_probability else "system" for u in draws[1:]]
            if config.sft_in_group:
                group[-1] = "sft"
            modes.extend(group)
        return modes

    def _sample(self, prompts: list[list[int]]) -> Rollout:
        return sample(self.model, prompts, max_new_tokens=self.config.max_new_tokens,
                      temperature=self.config.temperature, generator=self.generator,
                      eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id)

    def __call__(self):
        tokenizer, config = self.tokenizer, self.config
        batch = [q for q in self.draw_prompts(self.batch_size) for _ in range(self.group_size)]  # (S,)
        modes = self._modes()
        responses: list[str | None] = [None] * len(batch)
        parts: list[tuple[list[int], Rollout]] = []  # (rows, rollout) per mode

        system_rows = [i for i, m in enumerate(modes) if m == "system"]
        rollout = self._sample([encode_prompt(tokenizer, system_prompt_text(batch[i]), formatted=True)
                                for i in system_rows])
        for i, text in zip(system_rows, rollout.decode(tokenizer)):
            responses[i] = text
        parts.append((system_rows, rollout))
        first_judged = judge_responses(self.rubrics, [batch[i] for i in system_rows], [responses[i] for i in system_rows])
        judgements = dict(zip(system_rows, first_judged.judgements))

        revision_rows = [i for i, m in enumerate(modes) if m == "revision"]
        critiques: dict[int, str] = {}
        if revision_rows:
            prompts = []
            for i in revision_rows:
                group_start = i - i % self.group_size
                own = [k for k in system_rows if group_start <= k < group_start + self.group_size]
                previous = own[(i - group_start) % len(own)]
                critiques[i] = critique_of(self.rubrics[batch[i].category], batch[i], responses[previous],
                                           judgements[previous])
                prompts.append(encode_revision(tokenizer, batch[i], responses[previous], critiques[i],
                                               context=self.context, max_new_tokens=config.max_new_tokens))
            rollout = self._sample(prompts)
            for i, text in zip(revision_rows, rollout.decode(tokenizer)):
                responses[i] = text
            parts.append((revision_rows, rollout))

        sft_rows = [i for i, m in enumerate(modes) if m == "sft"]
        if sft_rows:
            prompts = [encode_prompt(tokenizer, system_prompt_text(batch[i]), formatted=True) for i in sft_rows]
            answers = [tokenizer.encode(f"{batch[i].answer} {EOS}", add_special_tokens=False) for i in sft_rows]
            rollout = forced_rollout(self.model, prompts, answers, pad_id=tokenizer.pad_token_id,
                                     temperature=config.temperature)
            for i in sft_rows:
                responses[i] = batch[i].answer
            parts.append((sft_rows, rollout))

        others = [i for i in range(len(batch)) if modes[i] != "system"]
        if others:
            later = judge_responses(self.rubrics, [batch[i] for i in others], [responses[i] for i in others])
            judgements.update(zip(others, later.judgements))
        judged = _stack_judgements(self.rubrics, batch, [judgements[i] for i in range(len(batch))])
        rewards, mean_confidence = grape_rewards(judged, use_confidence=config.use_confidence)  # (S,), (S, J)

        order = [i for rows, _ in parts for i in rows]  # merged row k holds sample order[k]
        merged = merge_rollouts([r for _, r in parts], tokenizer.pad_token_id)
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        merged = merged.select(back)  # rows in sample order again: a question's G responses consecutive
        self.last = {"judged": judged, "rewards": rewards, "mean_confidence": mean_confidence, "modes": modes,
                     "critiques": critiques, "questions": batch, "responses": responses}
        return batch, merged, list(responses), rewards.to(self.device)


def _stack_judgements(rubrics, questions, judgements) -> JudgedBatch:
    """A JudgedBatch from per-sample judgement lists (already checked), in the sample order given."""
    categories = [q.category for q in questions]
    width = max(len(rubrics[c].items) for c in set(categories))
    size = (len(questions), width)
    scores, confidence, weights, mask = (torch.zeros(size) for _ in range(4))
    for i, (category, row) in enumerate(zip(categories, judgements)):
        for j, (item, judged) in enumerate(zip(rubrics[category].items, row)):
            scores[i, j], confidence[i, j], weights[i, j], mask[i, j] = judged.score, judged.confidence, item.weight, 1
    category_ids = torch.tensor([CATEGORIES.index(c) for c in categories])
    return JudgedBatch(categories, category_ids, scores, confidence, weights, mask, list(judgements),
                       {c: rubrics[c].names for c in rubrics})


def eq17_loss(epsilon: float):
    """GRAPE's Eq. 17 as a ``grpo_step`` loss: one clipped ratio per sample (``losses.grape_sequence_loss``)."""
    def loss_fn(logp, logp_old, advantages, mask):
        num_samples = advantages.numel()
        loss, metrics = grape_sequence_loss(logp.reshape(num_samples, -1), logp_old.reshape(num_samples, -1),
                                            advantages.reshape(num_samples), mask.reshape(num_samples, -1),
                                            epsilon=epsilon)
        return loss, {key.replace("grape/", "grpo/"): value for key, value in metrics.items()}
    return loss_fn


# ---- the system-prompt warm-up ---------------------------------------------------------------------------------


#: the warm-up's SFT settings (about 13 s on a 2-core CPU)
PROMPT_SFT_CONFIG = SFTConfig(steps=150, batch_size=32, learning_rate=3e-5, warmup_steps=10)


def prompt_sft_pairs(model, tokenizer, rubrics: Mapping[str, Rubric], questions: Sequence[Question], *,
                     seed: int = 0, max_new_tokens: int = 16) -> list[tuple[str, str]]:
    """The warm-up's examples, three per SFT question, all with the SFT answer as the target: the plain prompt,
    the system prompt of its category, and the revision prompt over a response sampled from ``model`` with
    the critique its judges wrote (so revision mode learns to read a critique)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [encode_prompt(tokenizer, system_prompt_text(q), formatted=True) for q in questions]
    drafts = sample(model, prompts, max_new_tokens=max_new_tokens, generator=generator,
                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id).decode(tokenizer)
    judged = judge_responses(rubrics, questions, drafts)
    pairs = []
    for q, draft, row in zip(questions, drafts, judged.judgements):
        critique = critique_of(rubrics[q.category], q, draft, row)
        pairs += [(format_prompt(q.question), q.answer), (system_prompt_text(q), q.answer),
                  (format_revision_prompt(REVISION_SYSTEM_PROMPT, q.question, draft, critique), q.answer)]
    return pairs


def prompt_sft(model, tokenizer, rubrics: Mapping[str, Rubric], questions: Sequence[Question], *,
               config: SFTConfig = PROMPT_SFT_CONFIG, progress: bool = True) -> History:
    """Teach ``model`` (in place) to condition on system and revision prompts: SFT (Eq. 2) on
    ``prompt_sft_pairs``. Beyond the paper, which assumes a model that already follows system prompts."""
    pairs = prompt_sft_pairs(model, tokenizer, rubrics, questions, seed=config.seed)
    history = sft(model, tokenizer, pairs, config, progress=progress, formatted=True)
    model.eval()
    return history


def reward_model_judge(reward_model, tokenizer, policy, *, calibration: Sequence[Question] | None = None,
                       heldout_pairs=None) -> PreferenceJudge:
    """The human-preference item's judge (§6.1): the reward model of chapter 05 as a ``PreferenceJudge``.

    Its raw score r becomes τ = σ((r - centre) / scale), centre and scale being the mean and std of r over
    ``policy``'s greedy answers to ``calibration`` (default: the held-out questions), so that a typical answer
    scores about 1/2. Its stated confidence is what was measured of it: its accuracy on the held-out
    preference pairs (default: the committed ones)."""
    from rlmt_edu.algorithms.preference_data import load_preference_pairs
    from rlmt_edu.algorithms.reward_model import evaluate_reward_model, reward_model_reward
    from rlmt_edu.evaluation import answer

    reward_fn = reward_model_reward(reward_model, tokenizer)
    calibration = heldout_questions("train_pool") if calibration is None else list(calibration)
    raw = reward_fn(calibration, answer(policy, tokenizer, [q.question for q in calibration]))  # (B,)
    pairs = load_preference_pairs("heldout") if heldout_pairs is None else heldout_pairs
    accuracy = evaluate_reward_model(reward_model, tokenizer, pairs)["accuracy"]
    return PreferenceJudge(reward_fn, confidence=float(accuracy), center=float(raw.mean()),
                           scale=float(raw.std()))


# ---- the training loop --------------------------------------------------------------------------------------------


def grape(
    policy,
    tokenizer,
    rubrics: Mapping[str, Rubric],
    config: GRAPEConfig = GRAPEConfig(),
    *,
    proxy_fn=None,
    reference=None,
    questions: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    progress: bool = True,
) -> History:
    """Train ``policy`` in place with GRAPE (the module docstring's 1–4); return the History.

    Greedy held-out evaluation at the start, every ``eval_every`` steps and at the end (``rl.heldout_report``:
    gold and accuracy per category, ``eval/proxy`` = ``proxy_fn`` on the same answers (e.g. the reward model,
    to compare with GRPO on it; default: the gold score), ``eval/length``): ``eval/...`` in system-prompt mode,
    ``plain/...`` with the plain prompt ``<USER> q <MODEL>`` that every other chapter evaluates with.

    Logged every step, beside ``grpo_step``'s metrics: ``grape/R`` (mean R), ``grape/R/system|revision|sft``,
    ``grape/revision_share``, ``grape/R/<category>``, ``phi_bar/<category>/<item>`` and ``score/<category>/<item>``.
    """
    if not isinstance(config, GRAPEConfig):
        raise ValueError(f"config: expected a GRAPEConfig, got {type(config).__name__}")
    proxy_fn = gold_reward if proxy_fn is None else proxy_fn
    reference = frozen_reference(policy, tokenizer, reference)
    pool = prompt_pool(config.prompts) if questions is None else list(questions)
    eval_questions = heldout_questions(config.prompts) if eval_questions is None else list(eval_questions)
    check_rubrics(rubrics, [q.category for q in [*pool, *eval_questions]])
    seed_everything(config.seed)
    draw = GrapeDrawer(policy, tokenizer, pool, rubrics, config)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
    loss_fn = eq17_loss(config.epsilon) if config.loss == "eq17" else None
    policy.eval()
    history = History()

    def evaluate() -> dict[str, float]:
        scores = heldout_report(policy, tokenizer, proxy_fn, eval_questions, system_prompts=SYSTEM_PROMPTS)
        plain = heldout_report(policy, tokenizer, proxy_fn, eval_questions)  # the prompt every chapter uses
        return {**scores, **{key.replace("eval/", "plain/", 1): value for key, value in plain.items()}}

    if eval_questions:
        history.append({"step": -1, **evaluate()})
    bar = tqdm(range(config.steps), desc=f"grape (Q={config.questions_per_step}, G={config.group_size})",
               disable=not progress)
    for step in bar:
        row = {"step": step, **grpo_step(policy, optimizer, draw, config, reference=reference, loss_fn=loss_fn)}
        row.update(_grape_metrics(draw.last))
        if eval_questions and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
            row.update(evaluate())
        bar.set_postfix(R=f"{row['grape/R']:.2f}", gold=f"{row['reward/gold']:.2f}")
        history.append(row)
    return history


def _grape_metrics(last: Mapping) -> dict[str, float]:
    judged, rewards, modes = last["judged"], last["rewards"], last["modes"]
    row = {"grape/R": float(rewards.mean()), "grape/revision_share": modes.count("revision") / len(modes)}
    for mode in ("system", "revision", "sft"):
        rows = [i for i, m in enumerate(modes) if m == mode]
        if rows:
            row[f"grape/R/{mode}"] = float(rewards[rows].mean())
            row[f"grape/gold/{mode}"] = float(score_responses(
                gold_reward, [last["questions"][i] for i in rows], [last["responses"][i] for i in rows]).mean())
    for category, names in judged.item_names.items():
        members = [i for i, c in enumerate(judged.categories) if c == category]
        if not members:
            continue
        row[f"grape/R/{category}"] = float(rewards[members].mean())
        for j, name in enumerate(names):
            row[f"phi_bar/{category}/{name}"] = float(judged.confidence[members, j].mean())
            row[f"score/{category}/{name}"] = float(judged.scores[members, j].mean())
    return row


# ---- Lemma 8.1 and beyond its assumptions ---------------------------------------------------------------------


def effective_weights(weights: Tensor, confidence: Tensor) -> Tensor:
    """The weight Eq. 15 gives each item: a_j = ρ ω_j φ̄_j / Σ_k φ̄_k, so that R = Σ_j a_j τ_j. With all φ̄ equal
    it is ω_j; with ω_j = 1/ρ it is φ̄_j / Σ_k φ̄_k, Lemma 8.1's weighted average. Shapes (ρ,) -> (ρ,)."""
    if weights.shape != confidence.shape or weights.dim() != 1:
        raise ValueError(f"confidence: expected the shape of weights {tuple(weights.shape)}, got {tuple(confidence.shape)}")
    if not float(confidence.sum()) > 0:
        raise ValueError("confidence: expected a positive sum, got all zeros")
    return weights.numel() * weights * confidence / confidence.sum()


def rubric_variances(sigma: Tensor, confidence: Tensor, weights: Tensor | None = None,
                     correlation: float = 0.0) -> dict[str, float]:
    """Beyond the paper: Lemma 8.1's comparison for Eq. 15 in general. The judges' score noise has std σ_j and
    a common correlation ρ_c between any two items (0: independent, as the lemma assumes), covariance
    C = diag(σ)·((1-ρ_c)·I + ρ_c·11ᵀ)·diag(σ). Returned: ``plain`` = Var(Σ_j ω_j τ_j) = ωᵀCω, ``weighted`` =
    Var(Eq. 15) = aᵀCa with a = ``effective_weights``, and ``ratio`` = weighted / plain, plus the sums of the
    two weight vectors (Eq. 15's need not be 1: then R is also biased). ``weights`` default: 1/ρ each (the
    lemma). Shapes: (ρ,) each."""
    rho = sigma.numel()
    if sigma.dim() != 1 or rho == 0 or bool((sigma < 0).any()):
        raise ValueError(f"sigma: expected a non-empty 1-D tensor of stds >= 0, got {sigma!r:.60}")
    weights = torch.full_like(sigma, 1.0 / rho) if weights is None else weights
    if not -1.0 / max(rho - 1, 1) <= correlation <= 1:
        raise ValueError(f"correlation: expected a number in [-1/(ρ-1), 1] = [{-1 / max(rho - 1, 1):.3g}, 1], "
                         f"got {correlation!r}")
    a = effective_weights(weights, confidence)
    corr = (1 - correlation) * torch.eye(rho, dtype=sigma.dtype) + correlation
    covariance = sigma[:, None] * corr * sigma[None, :]  # (ρ, ρ)
    plain = float(weights @ covariance @ weights)
    weighted = float(a @ covariance @ a)
    return {"plain": plain, "weighted": weighted, "ratio": weighted / plain if plain > 0 else float("nan"),
            "plain_weight_sum": float(weights.sum()), "weighted_weight_sum": float(a.sum())}


def simulated_rubric_variances(sigma: Tensor, confidence: Tensor, weights: Tensor | None = None,
                               correlation: float = 0.0, *, n_draws: int = 20_000,
                               generator: torch.Generator) -> dict[str, float]:
    """``rubric_variances`` measured: draw correlated Normal score noise ``n_draws`` times (seeded), form both
    aggregates per draw and return their empirical variances and ratio."""
    rho = sigma.numel()
    weights = torch.full_like(sigma, 1.0 / rho) if weights is None else weights
    corr = (1 - correlation) * torch.eye(rho, dtype=sigma.dtype) + correlation
    chol = torch.linalg.cholesky(sigma[:, None] * corr * sigma[None, :] + 1e-12 * torch.eye(rho, dtype=sigma.dtype))
    noise = torch.randn((n_draws, rho), generator=generator, dtype=sigma.dtype) @ chol.T  # (n_draws, ρ)
    plain = float((noise @ weights).var())
    weighted = float((noise @ effective_weights(weights, confidence)).var())
    return {"plain": plain, "weighted": weighted, "ratio": weighted / plain if plain > 0 else float("nan")}


# ---- the chapter's plots ---------------------------------------------------------------------------------------


def plot_confidence_table(table: Sequence[Mapping], ax=None, *, threshold: float = REVIEW_THRESHOLD):
    """Horizontal bars of φ̄ per rubric item (lowest at the top), red where below ``threshold``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    rows = list(table)[::-1]
    labels = [f"{r['category']}/{r['item']}" for r in rows]
    ax.barh(labels, [r["phi_bar"] for r in rows], color=["tab:red" if r["review"] else "tab:green" for r in rows])
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"review below {threshold:g}")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("φ̄, mean stated confidence over the category")
    ax.set_title("rubric items by mean confidence (§6.1.1)")
    ax.legend(loc="lower right", fontsize=8)
    return ax


def plot_grape_runs(runs: Mapping[str, Sequence[History]], axes=None, *, categories=CATEGORIES):
    """Per configuration (label -> one History per seed), mean and min-max band over seeds of the held-out
    gold score of each category (greedy, never smoothed) and of the held-out answer length. Returns the axes."""
    from rlmt_edu.plots import panel_axes, plot_seeds

    axes = panel_axes(axes, len(categories) + 1)
    for ax, category in zip(axes, categories):
        plot_seeds(runs, f"eval/gold_score/{category}", ax=ax, smooth=1, title=f"held-out gold: {category}",
                   ylabel="gold score")
    plot_seeds(runs, "eval/length", ax=axes[-1], smooth=1, title="held-out answer length", ylabel="words")
    for ax in axes:
        ax.set_xlabel("step")
    return axes


__all__ = [
    "GRAPEConfig", "GrapeDrawer", "JudgedBatch", "PROMPT_SFT_CONFIG", "check_rubrics", "confidence_table",
    "confidence_table_from_history",
    "critique_of", "effective_weights", "reward_model_judge", "eq17_loss", "grape", "grape_rewards", "judge_responses",
    "plot_confidence_table", "plot_grape_runs", "prompt_sft", "prompt_sft_pairs", "rubric_reward", "rubric_variances",
    "simulated_rubric_variances",
]
