"""Chapter 02: §3's preference model, which reads TWO responses to one prompt and says which a human prefers.

The paper's preference model "takes the two text inputs and gives as output the probability of each of the
inputs being preferred by a human": one number, P(text_i), with P(text_j) = 1 - P(text_i). We build it on
the SFT model's trunk: a GPT-2 with a scalar head (``model.build_reward_model``) reads the two texts of §3,
text_i = prompt + response_i and text_j = prompt + response_j, one after the other:

    <USER> question <MODEL> response_i <EOS> <USER> question <MODEL> response_j <EOS>

in ONE forward pass, text_j's positions restarting at 0 (so each text sits where the SFT trunk saw chat
texts; text_j still attends to text_i). The head is read at the closing <EOS> of each text and the logit of
P(text_i) = σ(z) is z = s(end of text_i) - s(end of text_j) (``preference_logits``). Reading only the last
token (``readout="last"``, transformers' own pooling) is just as valid, but it stayed at chance (BCE ≈ log 2)
for the first hundred steps in our runs. It is trained with §3's binary cross entropy
(``losses.preference.preference_bce_loss``) on pairs that simulated humans labelled (hp = 1 when they
preferred response_i); the new head gets a larger learning rate than the pretrained trunk.

A model that reads both texts in one sequence can learn *where* a text sits instead of *what* it says (e.g.
"the first one usually wins"). Two defences, both on by default: every pair is trained in both orders (with
hp flipped), and ``preference_probabilities(..., symmetric=True)`` scores both orders and returns
σ((z(i, j) - z(j, i)) / 2), so P(i over j) + P(j over i) = 1 exactly.

Shape legend: B batch, T tokens (N is a number of pairs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.preference_data import check_pair_texts
from rlmt_edu.losses.preference import preference_bce_loss
from rlmt_edu.model import build_reward_model
from rlmt_edu.tokenizer import EOS, encode_prompt
from rlmt_edu.utils import History, epoch_batches, seed_everything

Tensor = torch.Tensor

#: the fields a labelled pair needs (the records of ``data/preference_pairs_*.jsonl`` have these and more)
PAIR_FIELDS = ("question", "response_i", "response_j", "hp")


@dataclass(frozen=True)
class PreferenceModelConfig:
    """Settings of one preference-model run (defaults: under a minute on a 2-core CPU)."""

    seed: int = 0  #: seeds the order of the pairs
    steps: int = 200  #: optimiser steps (about 1.3 passes over the 2,427 committed pairs in both orders)
    batch_size: int = 32  #: ordered pairs per step (each labelled pair counts twice with ``both_orders``)
    learning_rate: float = 3e-4  #: peak AdamW learning rate of the pretrained trunk (linear warm-up, then constant)
    head_learning_rate: float = 3e-3  #: peak AdamW learning rate of the new scalar head (it starts from scratch)
    warmup_steps: int = 10  #: linear warm-up steps
    weight_decay: float = 0.0  #: AdamW weight decay
    both_orders: bool = True  #: also train on (response_j, response_i, 1 - hp), so position cannot be learned
    eval_every: int = 100  #: steps between held-out evaluations (when held-out pairs are given)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        for name in ("learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.both_orders, bool):
            raise ValueError(f"both_orders: expected True or False, got {self.both_orders!r}")


def build_preference_model(init: str | Path, *, device=None):
    """The SFT trunk of checkpoint ``init`` with a fresh scalar head: a GPT2ForSequenceClassification whose
    ``logits[:, 0]`` at the last token is the log-odds that the FIRST response of the pair is preferred."""
    return build_reward_model(init, device=device)


def check_pairs(pairs: object, name: str = "pairs") -> list[dict]:
    """Validate labelled pairs (record dicts or ``preference_data.PreferencePair``s) and return them as dicts:
    each needs a question, two DIFFERENT responses (in the world's normal form) and hp ∈ {0, 1}."""
    if not isinstance(pairs, Sequence) or isinstance(pairs, (str, bytes)) or len(pairs) == 0:
        raise ValueError(f"{name}: expected a non-empty list of labelled pairs, got {pairs!r:.80}")
    pairs = [p.to_record() if hasattr(p, "to_record") else p for p in pairs]  # PreferencePair -> its record
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise ValueError(f"{name}: expected dicts with fields {PAIR_FIELDS}, got {type(pair).__name__} at index {index}")
        missing = [key for key in PAIR_FIELDS if key not in pair]
        if missing:
            raise ValueError(f"{name}: pair {index} is missing the fields {missing}")
        if pair["hp"] not in (0, 1):
            raise ValueError(f"{name}: expected hp 0 or 1, got {pair['hp']!r} at index {index}")
        try:  # the rule every pair obeys (preference_data): two different responses
            check_pair_texts(pair["question"], pair["response_i"], pair["question"], pair["response_j"])
        except ValueError as error:
            raise ValueError(f"{name}: pair {index}: {error}") from None
    return pairs


def encode_preference_pairs(
    tokenizer, questions: Sequence[str], responses_i: Sequence[str], responses_j: Sequence[str], *, max_length: int
) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (N, T) of text_i followed by text_j:
    ``<USER> q <MODEL> r_i <EOS> <USER> q <MODEL> r_j <EOS>``.

    If a pair would not fit ``max_length`` (the model's context), the longer response(s) are cut to fit, keeping
    their beginnings; the closing <EOS> always stays, so the head always reads the same kind of token.
    """
    if not (len(questions) == len(responses_i) == len(responses_j)) or len(questions) == 0:
        raise ValueError(
            f"responses_j: expected as many questions, responses_i and responses_j (at least one), got "
            f"{len(questions)}, {len(responses_i)}, {len(responses_j)}"
        )
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    rows = []
    for question, first, second in zip(questions, responses_i, responses_j):
        prompt = encode_prompt(tokenizer, question)
        ids_i = tokenizer.encode(first, add_special_tokens=False)
        ids_j = tokenizer.encode(second, add_special_tokens=False)
        budget = max_length - 2 * len(prompt) - 2  # text_i = prompt + r_i <EOS>, then text_j = prompt + r_j <EOS>
        if budget < 2:
            raise ValueError(f"questions: {question!r} leaves no room for two responses in {max_length} tokens")
        if len(ids_i) + len(ids_j) > budget:  # too long: a short response keeps all, a long one gets the rest
            keep_i = min(len(ids_i), max(budget // 2, budget - len(ids_j)))
            ids_i, ids_j = ids_i[:keep_i], ids_j[: budget - keep_i]
        rows.append(prompt + ids_i + [eos_id] + prompt + ids_j + [eos_id])
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (N, T)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def preference_logits(model, batch: dict[str, Tensor], *, readout: str = "both_ends") -> Tensor:
    """z = log-odds that response_i is preferred, one per row of an encoded batch: (N,). Gradients flow.

    One forward pass over ``text_i <EOS> text_j <EOS>``; the scalar head s(·) is then read at
    ``readout``:

    - ``"both_ends"`` (default): at the closing <EOS> of each text, z = s(h at end of text_i) - s(h at end of
      text_j). The first read has seen text_i only; the second has seen both texts, so it can judge text_j
      against text_i.
    - ``"last"``: at the last token only, z = s(h at end of text_j) (``GPT2ForSequenceClassification``'s own
      pooling). Equally valid, but in our runs it stayed near chance for hundreds of steps: the last position
      must learn to carry a comparison of two texts before the head can say anything.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (N, T) each
    if readout not in ("both_ends", "last"):
        raise ValueError(f"readout: expected 'both_ends' or 'last', got {readout!r}")
    end_i = (input_ids == model.config.eos_token_id).int().argmax(dim=1)  # (N,) the first <EOS>: text_i's end
    end_j = attention_mask.sum(dim=1) - 1  # (N,) the last real token: text_j's <EOS> (right padding)
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)  # (N, T)
    # text_j's positions restart at 0, so each text sits where the SFT trunk saw chat texts (text_j still attends to text_i)
    positions = torch.where(positions > end_i[:, None], positions - end_i[:, None] - 1, positions)  # (N, T)
    hidden = model.transformer(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions).last_hidden_state  # (N, T, C)
    scores = model.score(hidden)[..., 0].float()  # (N, T): the head's scalar at every position
    rows = torch.arange(input_ids.shape[0], device=device)  # (N,)
    if readout == "last":
        return scores[rows, end_j]  # (N,)
    return scores[rows, end_i] - scores[rows, end_j]  # (N,)


@torch.no_grad()
def preference_probabilities(
    model,
    tokenizer,
    questions: Sequence[str],
    responses_i: Sequence[str],
    responses_j: Sequence[str],
    *,
    symmetric: bool = True,
    batch_size: int = 256,
) -> Tensor:
    """P(text_i): the probability that ``responses_i[n]`` is preferred over ``responses_j[n]``, shape (N,).

    With ``symmetric`` (default) both orders are scored and P = σ((z(i, j) - z(j, i)) / 2), so swapping the
    two responses gives exactly 1 - P; without it, P = σ(z(i, j)) from the single order given.
    """
    was_training = model.training
    model.eval()
    context = model.config.n_positions
    probs = []
    for start in range(0, len(questions), batch_size):
        rows = slice(start, start + batch_size)
        q, ri, rj = list(questions[rows]), list(responses_i[rows]), list(responses_j[rows])
        z_ij = preference_logits(model, encode_preference_pairs(tokenizer, q, ri, rj, max_length=context))  # (B,)
        if symmetric:
            z_ji = preference_logits(model, encode_preference_pairs(tokenizer, q, rj, ri, max_length=context))  # (B,)
            z_ij = (z_ij - z_ji) / 2
        probs.append(torch.sigmoid(z_ij).cpu())
    model.train(was_training)
    return torch.cat(probs)  # (N,)


def preference_accuracy(model, tokenizer, pairs: Sequence[dict], *, symmetric: bool = True) -> dict[str, float]:
    """How often the model agrees with the labels, and with the gold preference.

    ``accuracy_labels``: share of pairs where P(text_i) > 1/2 exactly when hp = 1 (the noisy, length-biased
    human labels it was trained on). ``accuracy_gold``: the same against ``gold_i > gold_j``, on the pairs
    whose gold scores differ (present only when the pairs carry ``gold_i`` / ``gold_j``).
    """
    pairs = check_pairs(pairs)
    prob_i = preference_probabilities(
        model, tokenizer, [p["question"] for p in pairs], [p["response_i"] for p in pairs],
        [p["response_j"] for p in pairs], symmetric=symmetric,
    )  # (N,)
    picks_i = prob_i > 0.5  # (N,)
    hp = torch.tensor([bool(p["hp"]) for p in pairs])  # (N,)
    metrics = {"accuracy_labels": float((picks_i == hp).float().mean())}
    if all("gold_i" in p and "gold_j" in p for p in pairs):
        gap = torch.tensor([p["gold_i"] - p["gold_j"] for p in pairs], dtype=torch.float64)  # (N,)
        differ = gap.abs() > 1e-9  # (N,)
        if bool(differ.any()):
            metrics["accuracy_gold"] = float((picks_i[differ] == (gap[differ] > 0)).float().mean())
    return metrics


def _ordered_examples(pairs: Sequence[dict], both_orders: bool) -> list[tuple[str, str, str, int]]:
    examples = [(p["question"], p["response_i"], p["response_j"], int(p["hp"])) for p in pairs]
    if both_orders:  # the same comparison seen the other way round: the label flips
        examples += [(q, rj, ri, 1 - hp) for q, ri, rj, hp in examples]
    return examples


def train_preference_model(
    model,
    tokenizer,
    pairs: Sequence[dict],
    config: PreferenceModelConfig = PreferenceModelConfig(),
    *,
    heldout: Sequence[dict] | None = None,
    evaluate: Callable[[object], dict] | None = None,
    progress: bool = True,
) -> History:
    """Train ``model`` (from ``build_preference_model``) in place on labelled ``pairs`` with §3's BCE.

    Logged every step: ``preference/bce`` (the loss on the batch) and ``preference/train_accuracy`` (the batch's
    σ(z) > 1/2 against hp). Every ``eval_every`` steps and at the end, with ``heldout`` pairs:
    ``preference/heldout_accuracy_labels`` and ``preference/heldout_accuracy_gold`` (``preference_accuracy``),
    plus whatever ``evaluate(model)`` returns.
    """
    pairs = check_pairs(pairs)
    if heldout is not None:
        heldout = check_pairs(heldout, "heldout")
    examples = _ordered_examples(pairs, config.both_orders)
    context = model.config.n_positions
    encoded = encode_preference_pairs(
        tokenizer, [e[0] for e in examples], [e[1] for e in examples], [e[2] for e in examples], max_length=context
    )  # (N, T) each
    labels = torch.tensor([e[3] for e in examples], dtype=torch.float32)  # (N,) hp
    generator = seed_everything(config.seed)
    head = model.score  # the new linear head of GPT2ForSequenceClassification
    head_ids = {id(p) for p in head.parameters()}
    trunk = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": trunk, "lr": config.learning_rate}, {"params": list(head.parameters()), "lr": config.head_learning_rate}],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    )
    history = History()
    batches = epoch_batches(len(examples), config.batch_size, generator)
    model.train()
    bar = tqdm(range(config.steps), desc="preference model", disable=not progress)
    for step in bar:
        rows = next(batches)  # (B,)
        length = int(encoded["attention_mask"][rows].sum(dim=1).max())  # trim the batch's shared padding
        batch = {key: value[rows, :length] for key, value in encoded.items()}  # (B, T) each
        hp = labels[rows].to(next(model.parameters()).device)  # (B,)
        z = preference_logits(model, batch)  # (B,) log-odds of P(text_i)
        # §3: Loss = -hp·log P(text_i) - (1 - hp)·log(1 - P(text_i)), with P(text_i) = σ(z)
        loss = preference_bce_loss(z, hp, inputs="logits")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        row = {
            "step": step,
            "preference/bce": loss.item(),
            "preference/train_accuracy": float(((z > 0).float() == hp).float().mean()),
        }
        if (step + 1) % config.eval_every == 0 or step == config.steps - 1:
            model.eval()
            if heldout is not None:
                row.update({f"preference/heldout_{k}": v for k, v in preference_accuracy(model, tokenizer, heldout).items()})
            if evaluate is not None:
                row.update(evaluate(model))
            model.train()
        bar.set_postfix(bce=f"{loss.item():.3f}")
        history.append(row)
    model.eval()
    return history


def labelled_pairs_from_groups(
    questions: Sequence, groups: Sequence[Sequence[str]], labeller, *, seed: int = 0, pairs_per_question: int = 4
) -> list[dict]:
    """A few labelled pairs per question from sampled responses: distinct responses, labelled by ``labeller``
    (a ``world.preference.Labeller``), with gold scores. For quick experiments when no pairs file is at hand."""
    from rlmt_edu.world.preference import gold_score

    rng = random.Random(seed)
    pairs = []
    for question, responses in zip(questions, groups):
        distinct = sorted(set(responses))
        candidates = [(a, b) for ai, a in enumerate(distinct) for b in distinct[ai + 1 :]]
        for first, second in rng.sample(candidates, min(pairs_per_question, len(candidates))):
            if rng.random() < 0.5:
                first, second = second, first
            pairs.append({
                **question.to_record(), "response_i": first, "response_j": second,
                "hp": labeller.label(question, first, second, rng),
                "gold_i": gold_score(question, first), "gold_j": gold_score(question, second),
            })
    return pairs
