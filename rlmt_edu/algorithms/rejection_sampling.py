"""Chapter 02: rejection sampling (§3) — sample G responses per prompt, keep the best, fine-tune on it, repeat.

§3's five steps, run for several rounds:

1. start with a prompt (``prompts_per_round`` questions drawn from the train pool: by default the same set
   every round, revisited like an epoch; ``new_prompts_each_round`` draws a fresh set each round);
2. sample G responses per prompt from the current model at ``temperature`` (``rollout.sample``);
3. rank the G responses (``ranker``):
   - ``"gold"``: a careful human who always picks the response with the best gold score (the world's hidden
     quality, ``world.preference.gold_score``); ties are broken at random;
   - ``"labeller"``: a realistic human, the noisy, length-biased ``world.preference.Labeller``, comparing the
     distinct responses two at a time in a round robin; the response with the most wins is the pick;
   - ``"preference_model"``: §3's automation, the trained preference model (``preference_model.py``) in the
     same round robin, each response scored by its summed probability of beating the others;
4. keep the top response (``keep_top`` distinct ones) and discard the rest;
5. fine-tune on (prompt, kept response) pairs with the SFT loss of Eq. (2) (``algorithms.sft.sft``).

Every round also measures what §3 point 4 warns about: the held-out gold score (greedy answers on the eval
questions) next to the **diversity** of the policy's samples — distinct responses per prompt among the G, the
entropy of that empirical answer distribution, and the policy's mean per-token entropy on its samples (§8.2,
``losses.information.entropy``). Fine-tuning on its own best samples sharpens the policy: gold rises while
diversity falls, and a biased ranker drags the policy toward what it likes (longer answers).

Shape legend: B batch (Q·G rows, question-major), Q questions, G group size, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.sft import SFTConfig, sft
from rlmt_edu.evaluation import answer
from rlmt_edu.losses._checks import masked_mean
from rlmt_edu.losses.information import entropy
from rlmt_edu.model import position_ids_from_mask
from rlmt_edu.rollout import Rollout, sample
from rlmt_edu.tokenizer import encode_prompt
from rlmt_edu.utils import History
from rlmt_edu.world.grading import grade, summarize
from rlmt_edu.world.preference import Labeller, gold_score
from rlmt_edu.world.tasks import CATEGORIES, Question, normalize

Tensor = torch.Tensor
RANKERS = ("gold", "labeller", "preference_model")


@dataclass(frozen=True)
class RejectionSamplingConfig:
    """Settings of a rejection-sampling run (defaults: about 20 seconds on a 2-core CPU)."""

    seed: int = 0  #: seeds the prompts drawn, the sampled tokens, the labeller's clicks and the SFT order
    rounds: int = 4  #: rounds of sample → rank → keep → fine-tune
    prompts_per_round: int = 64  #: Q, prompts drawn from the train pool for each round
    new_prompts_each_round: bool = False  #: False: the same Q prompts every round (a fixed prompt set); True: Q new ones
    group_size: int = 8  #: G, responses sampled per prompt (at least 2: one alone leaves nothing to reject)
    temperature: float = 1.0  #: sampling temperature of step 2 (enough randomness for a variety)
    max_new_tokens: int = 20  #: longest sampled response, in tokens
    ranker: str = "gold"  #: "gold", "labeller" or "preference_model" (see the module docstring)
    keep_top: int = 1  #: distinct top responses kept per prompt (the paper: "the top response (or top few)")
    sft_steps: int = 10  #: SFT optimiser steps per round on the kept responses (10 x 32 = 5 passes over 64)
    batch_size: int = 32  #: SFT examples per step
    learning_rate: float = 1e-4  #: peak SFT learning rate of each round
    categories: tuple[str, ...] = CATEGORIES  #: which categories of train-pool questions serve as prompts

    def __post_init__(self):
        for name in ("rounds", "prompts_per_round", "max_new_tokens", "sft_steps", "batch_size", "keep_top"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2:
            raise ValueError(
                f"group_size: expected G >= 2 responses per prompt (one alone leaves nothing to reject), "
                f"got {self.group_size!r}"
            )
        if self.keep_top >= self.group_size:
            raise ValueError(
                f"keep_top: expected fewer than group_size={self.group_size} (keeping all rejects nothing), "
                f"got {self.keep_top}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if not isinstance(self.new_prompts_each_round, bool):
            raise ValueError(f"new_prompts_each_round: expected True or False, got {self.new_prompts_each_round!r}")
        if self.ranker not in RANKERS:
            raise ValueError(f"ranker: expected one of {RANKERS}, got {self.ranker!r}")
        if (not isinstance(self.categories, tuple) or not self.categories
                or any(c not in CATEGORIES for c in self.categories)):
            raise ValueError(f"categories: expected a non-empty tuple drawn from {CATEGORIES}, got {self.categories!r}")


# ---- steps 2-4 on a batch of prompts -----------------------------------------------------------------------


def sample_groups(
    model, tokenizer, questions: Sequence[Question], *, group_size: int, temperature: float = 1.0,
    max_new_tokens: int = 20, generator: torch.Generator | None = None,
) -> tuple[Rollout, list[list[str]]]:
    """Step 2: G responses per question. Returns the rollout (Q·G rows, question-major: row q·G + g) and the
    response texts grouped per question, ``groups[q][g]``."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size: expected G >= 1 responses per question, got {group_size!r}")
    if len(questions) == 0:
        raise ValueError("questions: expected at least one question, got none")
    prompts = [encode_prompt(tokenizer, q.question) for q in questions for _ in range(group_size)]
    rollout = sample(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
    )
    texts = rollout.decode(tokenizer)  # (Q·G) strings
    return rollout, [texts[q * group_size : (q + 1) * group_size] for q in range(len(questions))]


def rank_groups(
    questions: Sequence[Question], groups: Sequence[Sequence[str]], ranker: str, *,
    labeller: Labeller | None = None, preference_model=None, tokenizer=None, rng: random.Random | None = None,
) -> list[list[float]]:
    """Step 3: a score per response (higher is better), ``scores[q][g]``; equal texts get equal scores.

    "gold": the gold score. "labeller" / "preference_model": a round robin among the DISTINCT responses of
    a group; a response's score is its number of wins against the labeller (one seeded click per pair), or
    Σ_j P(it beats j) under the preference model (``preference_probabilities``, symmetric).
    """
    if ranker not in RANKERS:
        raise ValueError(f"ranker: expected one of {RANKERS}, got {ranker!r}")
    if len(groups) != len(questions):
        raise ValueError(f"groups: expected one group per question ({len(questions)}), got {len(groups)}")
    if ranker == "gold":
        return [[gold_score(q, r) for r in group] for q, group in zip(questions, groups)]
    distinct = [sorted(set(group)) for group in groups]
    # the round robin: every unordered pair (a, b), a before b, of distinct responses of one group
    matches = [(qi, a, b) for qi, texts in enumerate(distinct) for a in range(len(texts)) for b in range(a + 1, len(texts))]
    wins = [[0.0] * len(texts) for texts in distinct]
    if ranker == "labeller":
        labeller = labeller or Labeller()
        rng = rng or random.Random(0)
        for qi, a, b in matches:
            first_wins = labeller.label(questions[qi], distinct[qi][a], distinct[qi][b], rng)  # hp of §3
            wins[qi][a if first_wins else b] += 1.0
    else:
        if preference_model is None or tokenizer is None:
            raise ValueError("preference_model: the 'preference_model' ranker needs a trained preference model and its tokenizer")
        from rlmt_edu.algorithms.preference_model import preference_probabilities

        if matches:
            prob_a = preference_probabilities(
                preference_model, tokenizer, [questions[qi].question for qi, _, _ in matches],
                [distinct[qi][a] for qi, a, _ in matches], [distinct[qi][b] for qi, _, b in matches],
            )  # (M,) P(a beats b); symmetric, so P(b beats a) = 1 - P(a beats b)
            for (qi, a, b), p in zip(matches, prob_a.tolist()):
                wins[qi][a] += p
                wins[qi][b] += 1.0 - p
    return [[wins[qi][texts.index(r)] for r in group] for qi, (texts, group) in enumerate(zip(distinct, groups))]


def select_top_indices(groups: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], *, keep_top: int = 1,
                       rng: random.Random | None = None) -> list[list[int]]:
    """Step 4, as positions: for each group, the index ``g`` of the sample kept for each of its ``keep_top`` best
    DISTINCT responses (best first). When several samples share the kept text, the first of them is the one
    kept; the other copies are dropped with the rejected samples. Ties are broken at random with ``rng``."""
    if len(scores) != len(groups):
        raise ValueError(f"scores: expected one list of scores per group ({len(groups)}), got {len(scores)}")
    for q, (group, group_scores) in enumerate(zip(groups, scores)):
        if len(group_scores) != len(group):
            raise ValueError(f"scores: expected {len(group)} scores for group {q}, got {len(group_scores)}")
    if not isinstance(keep_top, int) or isinstance(keep_top, bool) or keep_top < 1:
        raise ValueError(f"keep_top: expected an int >= 1, got {keep_top!r}")
    rng = rng or random.Random(0)
    kept = []
    for group, group_scores in zip(groups, scores):
        best, first = {}, {}
        for g, (text, score) in enumerate(zip(group, group_scores)):
            best[text] = max(score, best.get(text, -math.inf))
            first.setdefault(text, g)
        texts = list(best)
        rng.shuffle(texts)  # a random order first, so the stable sort below breaks ties at random
        kept.append([first[t] for t in sorted(texts, key=lambda t: -best[t])[:keep_top]])
    return kept


def select_top(groups: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], *, keep_top: int = 1,
               rng: random.Random | None = None) -> list[list[str]]:
    """Step 4: the ``keep_top`` best DISTINCT responses of each group (ties broken at random with ``rng``);
    ``select_top_indices`` gives the positions of the samples kept."""
    indices = select_top_indices(groups, scores, keep_top=keep_top, rng=rng)
    return [[group[g] for g in kept] for group, kept in zip(groups, indices)]


# ---- measurements ------------------------------------------------------------------------------------------


def distinct_responses(groups: Sequence[Sequence[str]]) -> float:
    """Mean number of distinct responses per prompt among its G samples (1 = every sample the same)."""
    return sum(len(set(normalize(r) for r in group)) for group in groups) / len(groups)


def answer_entropy(groups: Sequence[Sequence[str]]) -> float:
    """Mean over prompts of the entropy (nats, §8.2) of the empirical distribution of its G responses."""
    values = []
    for group in groups:
        counts = torch.tensor(list(Counter(normalize(r) for r in group).values()), dtype=torch.float64)  # (U,)
        # §8.2: Entropy = -Σ_x p(x) log p(x), with p the share of samples that gave response x
        values.append(float(entropy(counts / counts.sum())))
    return sum(values) / len(values)


@torch.no_grad()
def policy_token_entropy(model, rollout: Rollout) -> float:
    """Mean over response tokens of the entropy of π(· | s_t) (temperature 1), on the policy's own samples."""
    input_ids, attention_mask = rollout.sequences()  # (B, P+N) each
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits  # (B, P+N, V)
    logits = logits[:, rollout.response_slice].float()  # (B, N, V): the scores each response token was drawn from
    # §8.2: Entropy = -Σ_x π(x | s_t) log π(x | s_t), per response token
    token_entropy = entropy(logits, inputs="logits")  # (B, N)
    return float(masked_mean(token_entropy, rollout.response_mask.to(token_entropy.dtype)))


def heldout_gold(model, tokenizer, questions: Sequence[Question]) -> dict[str, float]:
    """Greedy answers to ``questions``: mean gold score, accuracy and mean length (words)."""
    responses = answer(model, tokenizer, [q.question for q in questions])
    rates = summarize(questions, responses)
    return {
        "eval/gold": sum(gold_score(q, r) for q, r in zip(questions, responses)) / len(questions),
        "eval/accuracy": rates["eval/accuracy"],
        "eval/length": sum(len(normalize(r).split()) for r in responses) / len(responses),
    }


def _group_metrics(prefix: str, questions: Sequence[Question], groups: Sequence[Sequence[str]]) -> dict[str, float]:
    rows = [(q, r) for q, group in zip(questions, groups) for r in group]
    return {
        f"{prefix}/gold": sum(gold_score(q, r) for q, r in rows) / len(rows),
        f"{prefix}/correct_share": sum(grade(q, r).correct for q, r in rows) / len(rows),
        f"{prefix}/length": sum(len(normalize(r).split()) for _, r in rows) / len(rows),
    }


# ---- the loop ------------------------------------------------------------------------------------------------


def rejection_sampling(
    model,
    tokenizer,
    config: RejectionSamplingConfig = RejectionSamplingConfig(),
    *,
    prompts: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    preference_model=None,
    labeller: Labeller | None = None,
    progress: bool = True,
) -> History:
    """Run ``config.rounds`` rounds of §3's five steps, fine-tuning ``model`` in place.

    ``prompts``: the pool prompts are drawn from (default: the train pool of ``make_split(0)`` in
    ``config.categories``); ``eval_questions``: held-out questions for the greedy gold score (default: the
    committed eval set); ``preference_model``: needed when ``config.ranker == "preference_model"``.

    The history has one row per round r = 0 .. rounds, measured on the policy after r rounds of SFT (row 0 is
    the starting model): ``samples/gold``, ``samples/correct_share``, ``samples/length`` (its G·Q samples),
    ``diversity/distinct`` (distinct responses per prompt, out of G), ``diversity/answer_entropy``,
    ``diversity/token_entropy``, ``eval/gold``, ``eval/accuracy``, ``eval/length``; rows 0 .. rounds-1 also
    have the kept responses' ``winners/gold``, ``winners/correct_share``, ``winners/length`` and the round's
    final ``sft/loss``.
    """
    if not isinstance(config, RejectionSamplingConfig):
        raise ValueError(f"config: expected a RejectionSamplingConfig, got {type(config).__name__}")
    if config.ranker == "preference_model" and preference_model is None:
        raise ValueError("preference_model: ranker='preference_model' needs a trained preference model, got None")
    if prompts is None:
        from rlmt_edu.world.tasks import make_split

        prompts = [q for q in make_split(0).train_pool if q.category in config.categories]
    if len(prompts) == 0:
        raise ValueError(f"prompts: expected at least one question in categories {config.categories}, got none")
    if eval_questions is None:
        from rlmt_edu.world.data import load_questions

        eval_questions = load_questions("eval")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device.type).manual_seed(config.seed)
    rng = random.Random(config.seed)
    history = History()
    bar = tqdm(range(config.rounds + 1), desc=f"rejection sampling ({config.ranker})", disable=not progress)
    for round_ in bar:
        # 1. start with prompts
        if round_ == 0 or config.new_prompts_each_round:
            questions = rng.sample(list(prompts), min(config.prompts_per_round, len(prompts)))
        # 2. sample G responses per prompt
        rollout, groups = sample_groups(model, tokenizer, questions, group_size=config.group_size,
                                        temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                                        generator=generator)
        row = {"step": round_, "round": round_, **_group_metrics("samples", questions, groups),
               "diversity/distinct": distinct_responses(groups), "diversity/answer_entropy": answer_entropy(groups),
               "diversity/token_entropy": policy_token_entropy(model, rollout),
               **heldout_gold(model, tokenizer, eval_questions)}
        if round_ < config.rounds:
            # 3. rank them, 4. keep the top one(s)
            scores = rank_groups(questions, groups, config.ranker, labeller=labeller,
                                 preference_model=preference_model, tokenizer=tokenizer, rng=rng)
            kept = select_top(groups, scores, keep_top=config.keep_top, rng=rng)
            row.update(_group_metrics("winners", questions, kept))
            # 5. fine-tune on (prompt, kept response) as SFT data (an empty response has nothing to learn)
            pairs = [(q.question, text) for q, texts in zip(questions, kept) for text in texts if text.strip()]
            if pairs:
                sft_config = SFTConfig(seed=config.seed + round_, steps=config.sft_steps, batch_size=config.batch_size,
                                       learning_rate=config.learning_rate, warmup_steps=max(1, config.sft_steps // 10))
                row["sft/loss"] = sft(model, tokenizer, pairs, sft_config, progress=False).last("loss/sft")
        bar.set_postfix(gold=f"{row['eval/gold']:.3f}", distinct=f"{row['diversity/distinct']:.2f}")
        history.append(row)
    model.eval()
    return history


# ---- the chapter's figure -----------------------------------------------------------------------------------------

#: the panels of ``plot_rounds``: (title, history keys)
ROUND_PANELS = (
    ("held-out gold (greedy)", ("eval/gold",)),
    ("gold of the G samples", ("samples/gold",)),
    ("distinct responses per prompt (of G)", ("diversity/distinct",)),
    ("policy entropy per token (nats)", ("diversity/token_entropy",)),
)


def plot_rounds(histories: dict, panels=ROUND_PANELS, *, axes=None):
    """One panel per (title, keys) of ``panels``, one line per run of ``histories`` ({label: History}),
    against the round. Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if axes is None:
        _, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for label, history in histories.items():
            for key in keys:
                rounds, values = history.series(key)
                name = label if len(keys) == 1 else f"{label}: {key.split('/')[0]}"
                ax.plot(rounds, values, marker="o", markersize=4, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=8)
    return axes
