"""Chapter 05: a reward model trained on human preference pairs (§4.4, Eq. 5–6).

The reward model reads ONE text, ``<USER> question <MODEL> response <EOS>``, and returns a scalar R(text). Two
readouts (``RewardModelConfig.readout``):

- ``"last"``, §4.4's: the SFT model's GPT-2 trunk with a fresh linear head read at the last real token
  (``model.build_reward_model``);
- ``"likelihood"`` (the default; beyond the paper): the SFT language model kept whole, R = α · mean log π_φ of
  the response + a linear head at the last token (``model.GPT2RewardModel``). It starts as the SFT model's
  own likelihood, which already ranks most held-out pairs as gold does, where the ``"last"`` readout, trained on
  the same 2,427 pairs, stays near chance on math correctness.
Pairs only say which of two texts a human preferred, so §4.4 turns two rewards into a probability,
P(text_i) = σ(R(text_i) - R(text_j)), and trains with its negative log-likelihood: Eq. (5) with the recorded
hp, which is Eq. (6), -log σ(R(text_w) - R(text_l)), once each pair is written winner first. Both losses are
computed on every batch (``rlmt_edu.losses.preference``), so the History shows that they agree.

The labels come from simulated humans who like LONGER answers (``world.preference.Labeller``, §3's example).
``length_bias`` measures what the reward model learned from that: the slope of R against the response length in
words, fitted separately for correct and incorrect responses, next to the slope that the gold score alone
would give. Chapters 08 (PPO) and 11 (GRAPE) load the trained model from ``data/checkpoints/reward_model``.

Shape legend: B batch (texts), N pairs, T tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.preference_data import PreferencePair, preference_pairs_from
from rlmt_edu.losses.preference import reward_function_loss, reward_model_loss
from rlmt_edu.paths import REWARD_MODEL, SFT, relative_to_repo
from rlmt_edu.model import (
    GPT2RewardModel,
    build_likelihood_reward_model,
    build_reward_model,
    context_length,
    load_metadata,
    save_checkpoint,
)
from rlmt_edu.tokenizer import MODEL, encode_prompt
from rlmt_edu.utils import History, epoch_batches, seed_everything, warmup_cosine_schedule
from rlmt_edu.world.grading import grade
from rlmt_edu.world.tasks import normalize

Tensor = torch.Tensor
REWARD_MODEL_DIR = REWARD_MODEL
READOUTS = ("likelihood", "last")
_ARCHITECTURES = {"GPT2RewardModel": "likelihood", "GPT2ForSequenceClassification": "last"}


@dataclass(frozen=True)
class RewardModelConfig:
    """Settings of one reward-model run (defaults: the committed recipe, under a minute on a 2-core CPU).

    ``readout="likelihood"`` with learning rate 3e-4: the start (the SFT likelihood) is already a good ranker,
    so the learning rate is the SFT one's scale, and 200 steps (about 2.6 epochs of the pairs) suffice.
    ``readout="last"`` is §4.4's head at <EOS>: it needs a larger rate (1e-3 reaches held-out gold accuracy
    0.61, and more steps or 3e-4 for 600 steps do not lift math correctness above ~0.5).
    """

    seed: int = 0  #: seeds the order of pairs
    steps: int = 200  #: optimiser steps
    batch_size: int = 32  #: PAIRS per step (2 × batch_size texts in one forward pass)
    learning_rate: float = 3e-4  #: peak AdamW learning rate (linear warm-up, then cosine decay to 10%)
    warmup_steps: int = 10  #: linear warm-up steps
    weight_decay: float = 0.0  #: AdamW weight decay
    max_grad_norm: float = 1.0  #: gradient-norm clip
    eval_every: int = 50  #: steps between held-out evaluations (if held-out pairs are given), and at the end
    readout: str = "likelihood"  #: "likelihood" (GPT2RewardModel, beyond the paper) or "last" (§4.4's head)

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout: expected one of {READOUTS}, got {self.readout!r}")
        for name in ("seed", "steps", "batch_size", "warmup_steps", "eval_every"):
            value = getattr(self, name)
            low = 0 if name in ("seed", "warmup_steps") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay!r}")


# ----------------------------------------------------------------------------------------------------------
# The model: SFT trunk + scalar head, checked against the world's vocabulary
# ----------------------------------------------------------------------------------------------------------


def check_vocabulary(model, tokenizer, argument: str = "tokenizer") -> None:
    """Raise ``ValueError`` (naming ``argument``) unless ``tokenizer`` fits ``model`` and is the world's.

    Two checks: the tokenizer's size equals the model's vocabulary (embedding rows), and its word -> id map
    equals the toy world's tokenizer, so that the texts of the preference pairs mean what the model learned.
    """
    from rlmt_edu.world.vocab import world_tokenizer

    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) != rows:
        raise ValueError(f"{argument}: expected a tokenizer of the model's vocabulary size {rows}, got {len(tokenizer)} tokens")
    world = world_tokenizer().get_vocab()
    vocab = tokenizer.get_vocab()
    if vocab != world:
        different = sorted(set(vocab.items()) ^ set(world.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            f"{argument}: expected the toy world's vocabulary ({len(world)} tokens), got a different one "
            f"({len(vocab)} tokens; e.g. {different})"
        )
    if tokenizer.pad_token_id is None or model.config.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(
            f"{argument}: expected pad id {model.config.pad_token_id} (the model's), got {tokenizer.pad_token_id}"
        )


def reward_model_from_checkpoint(init: str | Path, *, readout: str = "likelihood", device=None):
    """(reward model, tokenizer) from a checkpoint folder: a new reward model on the SFT model (``readout``:
    "likelihood" or "last", see the module docstring), or a trained reward model saved by ``save_reward_model``
    (its own readout; ``readout`` is then ignored). Raises ``ValueError`` naming ``init`` if the checkpoint's
    tokenizer does not fit its model or is not the world's vocabulary, or if it is a critic."""
    from transformers import AutoTokenizer

    if readout not in READOUTS:
        raise ValueError(f"readout: expected one of {READOUTS}, got {readout!r}")
    folder = Path(init)
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"init: expected a checkpoint folder with a tokenizer, got {str(init)!r}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    architecture = str((config.get("architectures") or [""])[0])
    if architecture.endswith("ForTokenClassification"):  # a critic: one value per token, not one per text
        raise ValueError(f"init: expected a language model or a reward model checkpoint, got {str(init)!r}, "
                         f"which is a value model (critic, {architecture})")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    readout = _ARCHITECTURES.get(architecture, readout)  # a saved reward model keeps its readout
    if readout == "likelihood":
        model = build_likelihood_reward_model(folder, response_token_id=tokenizer.convert_tokens_to_ids(MODEL),
                                              device=device)
    else:
        model = build_reward_model(folder, device=device)
    check_vocabulary(model, tokenizer, argument="init")
    tokenizer.padding_side = "right"  # the head reads the last non-pad token: pad on the right
    return model.eval(), tokenizer


def load_reward_model(path: str | Path = REWARD_MODEL_DIR, *, device=None):
    """The trained reward model saved by ``rlmt-edu reward-model`` (default: the committed one)."""
    if load_metadata(path).get("architecture", "") not in _ARCHITECTURES:
        raise ValueError(f"path: expected a reward model saved by save_reward_model, got {str(path)!r}")
    return reward_model_from_checkpoint(path, device=device)


def save_reward_model(model, tokenizer, path: str | Path = REWARD_MODEL_DIR, *, metadata: dict | None = None) -> Path:
    """Save atomically with ``save_checkpoint`` (safetensors) and ``metadata`` in ``rlmt_edu.json``."""
    return save_checkpoint(model, tokenizer, path,
                           metadata={"architecture": type(model).__name__, **(metadata or {})})


# ----------------------------------------------------------------------------------------------------------
# Texts in, rewards out
# ----------------------------------------------------------------------------------------------------------


def encode_texts(tokenizer, questions: Sequence[str], responses: Sequence[str],
                 max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """RIGHT-padded ``<USER> q <MODEL> response <EOS>`` ids and attention mask, each (B, T).

    The <EOS> is always appended (a response cut at the sampling limit is scored as the text it is). An empty
    response is allowed: the text is then the prompt followed by <EOS>.
    """
    if len(questions) != len(responses) or len(questions) == 0:
        raise ValueError(f"responses: expected one response per question (and at least one), got "
                         f"{len(responses)} responses for {len(questions)} questions")
    rows = []
    for question, response in zip(questions, responses):
        words = tokenizer.encode(normalize(response), add_special_tokens=False) if response.strip() else []
        rows.append(encode_prompt(tokenizer, question) + words + [tokenizer.eos_token_id])
    longest = max(len(r) for r in rows)
    if max_length is not None and longest > max_length:
        raise ValueError(f"responses: expected texts of at most {max_length} tokens (the model's context), got {longest}")
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    return input_ids, attention_mask


def response_token_mask(tokenizer, questions: Sequence[str], attention_mask: Tensor) -> Tensor:
    """For ``encode_texts``' right-padded rows: 1 on the columns of ``sequence_logprobs`` (shape (B, T - 1),
    column t scores token t + 1) that score a response token or its <EOS>, 0 on the prompt and the padding."""
    prompt_length = torch.tensor([len(encode_prompt(tokenizer, q)) for q in questions])  # (B,)
    columns = torch.arange(attention_mask.shape[1] - 1)[None]  # (1, T-1)
    return ((columns >= prompt_length[:, None] - 1) & (attention_mask[:, 1:].cpu() == 1)).long()  # (B, T-1)


def rewards_of(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """R(text) for a right-padded batch, (B,), by the model's readout (see the module docstring). Gradients flow."""
    device = model.get_input_embeddings().weight.device
    length = int(attention_mask.sum(dim=1).max())  # trim the padding every row shares
    input_ids, attention_mask = input_ids[:, :length].to(device), attention_mask[:, :length].to(device)
    if isinstance(model, GPT2RewardModel):
        return model.rewards(input_ids, attention_mask)  # (B,) α·mean log π_φ + head at the last token
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # (B,) head at the last token


@torch.no_grad()
def reward_model_scores(model, tokenizer, questions: Sequence[str], responses: Sequence[str], *,
                    batch_size: int = 256) -> Tensor:
    """R(text) of each (question, response), shape (B,), on the CPU: what PPO and GRAPE use as the reward."""
    was_training = model.training
    model.eval()
    try:
        scores = []
        for start in range(0, len(questions), batch_size):
            ids, mask = encode_texts(tokenizer, questions[start: start + batch_size],
                                     responses[start: start + batch_size], context_length(model))
            scores.append(rewards_of(model, ids, mask).cpu())
        return torch.cat(scores)  # (B,)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Measuring a reward model: accuracy vs labels and vs gold, and the learned length bias
# ----------------------------------------------------------------------------------------------------------


def _as_pairs(pairs, argument: str) -> list[PreferencePair]:
    if isinstance(pairs, (str, dict)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"{argument}: expected a non-empty list of pairs, got {pairs!r:.60}")
    preference_pairs_from(pairs, argument)  # validates every item (same prompt, different responses)
    for index, item in enumerate(pairs):
        if not isinstance(item, (PreferencePair, dict)):
            raise ValueError(f"{argument}[{index}]: expected a PreferencePair or a record dict (the question's "
                             f"category and answer are needed to grade it), got a {type(item).__name__}")
    return [p if isinstance(p, PreferencePair) else PreferencePair.from_record(p) for p in pairs]


def evaluate_reward_model(model, tokenizer, pairs) -> dict[str, float]:
    """Eq. (6) loss and pairwise accuracy of ``model`` on labelled ``pairs`` (PreferencePair or records).

    - ``accuracy``: R(chosen) > R(rejected) (agreement with the labels, which are noisy and length-biased);
    - ``gold_accuracy``: agreement with the GOLD preference, on the pairs whose gold scores differ;
    - ``label_gold_agreement``: how often the labels themselves agree with gold there (a reference point).
    """
    pairs = _as_pairs(pairs, "pairs")
    return pairwise_metrics(*pair_rewards(model, tokenizer, pairs), pairs)


def pairwise_metrics(r_i: Tensor, r_j: Tensor, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """``evaluate_reward_model``'s numbers from rewards already computed: ``r_i``, ``r_j`` (N,) score the two
    responses of each of the N ``pairs``."""
    hp = torch.tensor([p.hp for p in pairs])  # (N,)
    r_w, r_l = torch.where(hp == 1, r_i, r_j), torch.where(hp == 1, r_j, r_i)  # (N,), (N,)
    loss, metrics = reward_model_loss(r_w, r_l)  # Eq. 6
    gold = [(k, p.gold_preference) for k, p in enumerate(pairs) if p.gold_preference is not None]
    out = {"loss": float(loss), "accuracy": metrics["reward_model/accuracy"]}
    if gold:
        index = torch.tensor([k for k, _ in gold])
        gold_pref = torch.tensor([g for _, g in gold])  # (N',) 1 where response_i has the higher gold score
        model_pref = (r_i[index] > r_j[index]).long()
        out["gold_accuracy"] = float((model_pref == gold_pref).float().mean())
        out["label_gold_agreement"] = float((hp[index] == gold_pref).float().mean())
        out["gold_pairs"] = len(gold)
    return out


def gold_difference_kind(pair: PreferencePair) -> str | None:
    """What separates the two responses in gold: "correctness", else "format" (complete sentence), else "other"
    (safety or conciseness); None when the gold scores tie."""
    if pair.gold_preference is None:
        return None
    grade_i, grade_j = grade(pair.question, pair.response_i), grade(pair.question, pair.response_j)
    if grade_i.correct != grade_j.correct:
        return "correctness"
    return "format" if grade_i.format_ok != grade_j.format_ok else "other"


def gold_accuracy_by_kind(rewards_i: Sequence[float], rewards_j: Sequence[float], pairs) -> dict[str, tuple[float, int]]:
    """Agreement with the gold preference per "category/kind" (see ``gold_difference_kind``): (accuracy, pairs).

    ``rewards_i[k]``, ``rewards_j[k]`` score the two responses of ``pairs[k]`` (any scorer: a reward model, a
    log-likelihood, ...), so different scorers can be compared on the same pairs.
    """
    pairs = _as_pairs(pairs, "pairs")
    if not len(rewards_i) == len(rewards_j) == len(pairs):
        raise ValueError(f"rewards_j: expected one reward per pair ({len(pairs)}), got {len(rewards_i)} and {len(rewards_j)}")
    hits: dict[str, list[bool]] = {}
    for pair, r_i, r_j in zip(pairs, rewards_i, rewards_j):
        kind = gold_difference_kind(pair)
        if kind is not None:
            hits.setdefault(f"{pair.question.category}/{kind}", []).append(bool(r_i > r_j) == (pair.gold_preference == 1))
    return {key: (float(np.mean(value)), len(value)) for key, value in sorted(hits.items())}


def pair_rewards(model, tokenizer, pairs) -> tuple[Tensor, Tensor]:
    """R(text_i) and R(text_j) of every pair, (N,) each (each distinct text scored once)."""
    pairs = _as_pairs(pairs, "pairs")
    texts = list(dict.fromkeys((p.question.question, r) for p in pairs for r in (p.response_i, p.response_j)))
    scores = reward_model_scores(model, tokenizer, [q for q, _ in texts], [r for _, r in texts])
    reward = {text: float(s) for text, s in zip(texts, scores)}
    r_i = torch.tensor([reward[(p.question.question, p.response_i)] for p in pairs])  # (N,)
    r_j = torch.tensor([reward[(p.question.question, p.response_j)] for p in pairs])  # (N,)
    return r_i, r_j


@torch.no_grad()
def response_logprob(lm, tokenizer, questions: Sequence[str], responses: Sequence[str], *,
                     batch_size: int = 256) -> Tensor:
    """A reference scorer, not a reward model: the mean log π(a_t | s_t) of each response's tokens (and <EOS>)
    under a causal LM such as the SFT model, (B,). Used to show what the SFT trunk already knows."""
    from rlmt_edu.model import sequence_logprobs

    scores = []
    for start in range(0, len(questions), batch_size):
        chunk_q, chunk_r = questions[start: start + batch_size], responses[start: start + batch_size]
        ids, mask = encode_texts(tokenizer, chunk_q, chunk_r, context_length(lm))  # (B, T)
        logp = sequence_logprobs(lm, ids, mask).cpu()  # (B, T-1): column t scores token t + 1
        response_mask = response_token_mask(tokenizer, chunk_q, mask)  # (B, T-1)
        scores.append((logp * response_mask).sum(1) / response_mask.sum(1))
    return torch.cat(scores)  # (B,)


def response_table(model, tokenizer, pairs) -> dict[str, np.ndarray]:
    """Every distinct (question, response) of ``pairs`` with its reward, length (words), correctness and gold."""
    pairs = _as_pairs(pairs, "pairs")
    rows = {}
    for p in pairs:
        for response, gold in ((p.response_i, p.gold_i), (p.response_j, p.gold_j)):
            rows.setdefault((p.question.question, response), (p.question, gold))
    keys = list(rows)
    scores = reward_model_scores(model, tokenizer, [q for q, _ in keys], [r for _, r in keys])
    return {
        "question": np.array([q for q, _ in keys]),
        "category": np.array([rows[k][0].category for k in keys]),
        "words": np.array([len(normalize(r).split()) for _, r in keys], dtype=float),
        "reward": scores.numpy().astype(float),
        "correct": np.array([grade(rows[k][0], k[1]).correct for k in keys], dtype=bool),
        "gold": np.array([np.nan if rows[k][1] is None else rows[k][1] for k in keys], dtype=float),
    }


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x (nan when x does not vary)."""
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def _within_question_slope(table, select: np.ndarray, key: str) -> float:
    """Slope of ``key`` on length after removing each question's means (compares responses to ONE question)."""
    x, y, questions = table["words"][select], table[key][select], table["question"][select]
    dx, dy = np.empty_like(x), np.empty_like(y)
    for q in np.unique(questions):
        at = questions == q
        dx[at], dy[at] = x[at] - x[at].mean(), y[at] - y[at].mean()
    return _slope(dx, dy) if np.any(dx != 0) else float("nan")


def length_bias(table: dict[str, np.ndarray], *, labeller_temperature: float = 0.1) -> dict[str, float]:
    """The learned length bias: slopes of reward against length (words) at fixed correctness.

    For each group (``correct``, ``incorrect``) a line reward ≈ a + slope · words is fitted on the responses
    in ``table`` (from ``response_table``). Beside it, ``gold_slope_*`` fits gold / ``labeller_temperature``,
    the reward (in logits) that an unbiased Bradley–Terry labeller would imply: a reward-model slope above the
    gold one is length preference that the labels taught and the gold score does not share. ``*_within``
    slopes compare responses to the same question only (each question's means removed), which takes away
    differences between question types (e.g. refusals are longer than sums): ``length/slope_within`` over
    every response, ``length/slope_incorrect_within`` over the incorrect ones.
    """
    out = {}
    gold_logit = {**table, "gold_logit": table["gold"] / labeller_temperature}
    for group, select in (("correct", table["correct"]), ("incorrect", ~table["correct"])):
        out[f"length/slope_{group}"] = _slope(table["words"][select], table["reward"][select])
        out[f"length/gold_slope_{group}"] = _slope(table["words"][select], gold_logit["gold_logit"][select])
        out[f"length/n_{group}"] = int(select.sum())
    everything = np.ones_like(table["correct"], dtype=bool)
    out["length/slope_within"] = _within_question_slope(table, everything, "reward")
    out["length/gold_slope_within"] = _within_question_slope(gold_logit, everything, "gold_logit")
    incorrect = ~table["correct"]
    out["length/slope_incorrect_within"] = _within_question_slope(table, incorrect, "reward")
    out["length/gold_slope_incorrect_within"] = _within_question_slope(gold_logit, incorrect, "gold_logit")
    return out


def _words(text: str) -> int:
    return len(normalize(text).split())


def length_preference_within_questions(rewards_i: Sequence[float], rewards_j: Sequence[float], pairs) -> dict:
    """The length flaw, measured where nothing else differs: pairs of ONE question whose gold scores tie but
    whose responses differ in length. An unbiased scorer prefers the longer one half of the time.

    Returns ``length/longer_preferred`` (the share where ``rewards_*`` rank the longer response higher),
    ``length/labels_longer`` (the share where the labellers chose it) and ``length/tie_pairs`` (how many).
    """
    pairs = _as_pairs(pairs, "pairs")
    if not len(rewards_i) == len(rewards_j) == len(pairs):
        raise ValueError(f"rewards_j: expected one reward per pair ({len(pairs)}), got {len(rewards_i)} and {len(rewards_j)}")
    scorer, labels = [], []
    for pair, r_i, r_j in zip(pairs, rewards_i, rewards_j):
        gap = _words(pair.response_i) - _words(pair.response_j)
        if pair.gold_i is None or pair.gold_j is None or abs(pair.gold_i - pair.gold_j) > 1e-9 or gap == 0:
            continue
        scorer.append((float(r_i) > float(r_j)) == (gap > 0))
        labels.append((pair.hp == 1) == (gap > 0))
    if not scorer:
        return {"length/longer_preferred": float("nan"), "length/labels_longer": float("nan"), "length/tie_pairs": 0}
    return {"length/longer_preferred": float(np.mean(scorer)), "length/labels_longer": float(np.mean(labels)),
            "length/tie_pairs": len(scorer)}


def reward_model_reward(model, tokenizer):
    """The reward model as an RL reward function: ``(questions, responses) -> R(text)``, a tensor (B,)
    (``rlmt_edu.rl`` calls this shape a ``RewardFn``). What PPO (chapter 08) and GRAPE (chapter 11) optimise.
    The function carries the reward model as ``.model``."""
    def reward(questions, responses) -> Tensor:
        return reward_model_scores(model, tokenizer, [q.question for q in questions], list(responses))

    reward.model = model  # so that a trainer can check the reward model's vocabulary against the policy's
    return reward


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int | None):
    """Chosen and rejected texts of every pair in one right-padded tensor: rows [0, N) chosen, [N, 2N) rejected."""
    questions = [p.question.question for p in pairs]
    ids, mask = encode_texts(tokenizer, questions + questions, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                             max_length)  # (2N, T) each
    hp = torch.tensor([p.hp for p in pairs])  # (N,)
    return ids, mask, hp


def train_reward_model(
    pairs,
    config: RewardModelConfig = RewardModelConfig(),
    *,
    heldout=None,
    init: str | Path | None = None,
    device=None,
    progress: bool = True,
):
    """Train a reward model on labelled ``pairs`` with Eq. (6); returns ``(model, History)``.

    ``pairs`` and ``heldout`` are lists of ``PreferencePair`` or records (``data/preference_pairs_*.jsonl``);
    every pair is validated (same prompt, different responses). The model starts from the checkpoint ``init``
    (default: the committed SFT model) with a fresh scalar head. Every step logs

    - ``loss/reward_model``: Eq. (6), -log σ(R(text_w) - R(text_l)), the loss that is minimised;
    - ``loss/reward_function_eq5``: Eq. (5) on the same rewards written chosen first (hp = 1 everywhere);
    - ``loss/reward_function_eq5_ij``: Eq. (5) in the recorded (i, j) order with the recorded hp;
      all three are the same number: Eq. (6) is Eq. (5) after relabelling;
    - ``train/accuracy`` and ``train/margin`` on the batch;

    and every ``eval_every`` steps (and at the end), if ``heldout`` is given, the held-out loss, accuracy vs
    labels and vs gold, and the learned length slopes (see ``length_bias``).
    """
    if not isinstance(config, RewardModelConfig):
        raise ValueError(f"config: expected a RewardModelConfig, got {type(config).__name__}")
    train_pairs = _as_pairs(pairs, "pairs")
    heldout_pairs = _as_pairs(heldout, "heldout") if heldout is not None else None
    if init is None:
        init = SFT
    generator = seed_everything(config.seed)
    model, tokenizer = reward_model_from_checkpoint(init, readout=config.readout, device=device)
    ids, mask, hp = _encode_pairs(tokenizer, train_pairs, context_length(model))  # (2N, T), (2N, T), (N,)
    n_pairs = len(train_pairs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps)
    history = History()

    def heldout_row() -> dict:
        metrics = evaluate_reward_model(model, tokenizer, heldout_pairs)
        slopes = length_bias(response_table(model, tokenizer, heldout_pairs))
        return {"heldout/loss": metrics["loss"], "heldout/accuracy": metrics["accuracy"],
                "heldout/gold_accuracy": metrics.get("gold_accuracy", float("nan")),
                "heldout/length_slope_correct": slopes["length/slope_correct"],
                "heldout/length_slope_incorrect": slopes["length/slope_incorrect"]}

    if heldout_pairs is not None:
        history.append({"step": -1, **heldout_row()})  # the untrained head, for the curves' starting point
    batches = epoch_batches(n_pairs, config.batch_size, generator)
    bar = tqdm(range(config.steps), desc="reward model", disable=not progress)
    model.train()
    for step in bar:
        rows = next(batches)  # (N,)
        both = torch.cat([rows, rows + n_pairs])  # chosen texts, then their rejected partners
        rewards = rewards_of(model, ids[both], mask[both])  # (2N,)
        reward_chosen, reward_rejected = rewards.chunk(2)  # (N,), (N,)
        # Eq. 6: Loss = -log σ(R(text_w) - R(text_l))
        loss, metrics = reward_model_loss(reward_chosen, reward_rejected)
        with torch.no_grad():
            # Eq. 5 on the same batch: once chosen first (hp = 1), once in the recorded (i, j) order
            eq5 = reward_function_loss(reward_chosen, reward_rejected, torch.ones_like(reward_chosen))
            batch_hp = hp[rows].to(rewards.device)  # (N,)
            reward_i = torch.where(batch_hp == 1, reward_chosen, reward_rejected)  # (N,)
            reward_j = torch.where(batch_hp == 1, reward_rejected, reward_chosen)  # (N,)
            eq5_ij = reward_function_loss(reward_i, reward_j, batch_hp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        row = {"step": step, "loss/reward_model": loss.item(), "loss/reward_function_eq5": eq5.item(),
               "loss/reward_function_eq5_ij": eq5_ij.item(), "train/accuracy": metrics["reward_model/accuracy"],
               "train/margin": metrics["reward_model/margin"]}
        if heldout_pairs is not None and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
            row.update(heldout_row())
            model.train()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{metrics['reward_model/accuracy']:.2f}")
        history.append(row)
    model.eval()
    return model, history


# ----------------------------------------------------------------------------------------------------------
# The chapter's recipe (CLI and notebook) and its plot
# ----------------------------------------------------------------------------------------------------------

REWARD_MODEL_CONFIG = RewardModelConfig()


def reward_model_metrics(model, tokenizer, train_pairs, heldout_pairs) -> dict:
    """The numbers saved with the checkpoint: accuracies vs labels and gold, and the learned length slopes."""
    train_pairs = _as_pairs(train_pairs, "train_pairs")
    train_rewards = pair_rewards(model, tokenizer, train_pairs)  # scored once: accuracies and the tie measure
    train = pairwise_metrics(*train_rewards, train_pairs)
    heldout_pairs = _as_pairs(heldout_pairs, "heldout_pairs")
    heldout_rewards = pair_rewards(model, tokenizer, heldout_pairs)  # scored once, measured three ways
    held = pairwise_metrics(*heldout_rewards, heldout_pairs)
    by_kind = gold_accuracy_by_kind(*heldout_rewards, heldout_pairs)
    slopes = length_bias(response_table(model, tokenizer, heldout_pairs))
    ties = length_preference_within_questions(*train_rewards, train_pairs)  # 216 tie pairs (29 held out)
    metrics = {
        "train/accuracy": train["accuracy"], "train/gold_accuracy": train["gold_accuracy"],
        "heldout/loss": held["loss"], "heldout/accuracy": held["accuracy"],
        "heldout/gold_accuracy": held["gold_accuracy"], "heldout/label_gold_agreement": held["label_gold_agreement"],
        **{f"heldout/gold_accuracy/{kind}": accuracy for kind, (accuracy, _) in by_kind.items()},
        **{f"heldout/{k}": v for k, v in slopes.items()},
        **{f"train/{k}": v for k, v in ties.items()},
        **{f"heldout/{k}": v for k, v in length_preference_within_questions(*heldout_rewards, heldout_pairs).items()},
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def run_reward_model(config: RewardModelConfig = REWARD_MODEL_CONFIG, *, init: str | Path | None = None,
                     out: str | Path | None = None, device=None, progress: bool = True):
    """Train on the committed pairs, measure, and save to ``out`` (unless None). Returns (model, history, metrics)."""
    from rlmt_edu.algorithms.preference_data import load_preference_pairs

    init = SFT if init is None else Path(init)
    train_pairs, heldout_pairs = load_preference_pairs("train"), load_preference_pairs("heldout")
    model, history = train_reward_model(train_pairs, config, heldout=heldout_pairs, init=init, device=device,
                                        progress=progress)
    _, tokenizer = reward_model_from_checkpoint(init)
    metrics = reward_model_metrics(model, tokenizer, train_pairs, heldout_pairs)
    if out is not None:
        save_reward_model(model, tokenizer, out, metadata={
            "recipe": "rlmt_edu.algorithms.reward_model.run_reward_model",
            "init": relative_to_repo(init),
            "data": ["data/preference_pairs_train.jsonl", "data/preference_pairs_heldout.jsonl"],
            "config": dataclasses.asdict(config), "metrics": metrics, "history": list(history)})
    return model, history, metrics


def plot_length_bias(table: dict[str, np.ndarray], *, ax=None, title: str | None = None):
    """Scatter of reward against response length, coloured by correctness, with each group's fitted line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.2, 0.2, size=len(table["words"]))  # lengths are integers: spread the dots a little
    for group, select, colour in (("correct", table["correct"], "tab:green"),
                                  ("incorrect", ~table["correct"], "tab:red")):
        x, y = table["words"][select], table["reward"][select]
        ax.scatter(x + jitter[select], y, s=8, alpha=0.35, color=colour, label=f"{group} ({select.sum()})")
        if len(x) > 1 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, intercept + slope * xs, color=colour, linewidth=2, label=f"slope {slope:+.3f} per word")
    ax.set_xlabel("response length (words)")
    ax.set_ylabel("reward R(text)")
    ax.set_title(title or "what the reward model learned about length")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return ax
