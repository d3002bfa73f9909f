"""Chapter 10: learning from preference pairs with no reward model (§4.9): the naive loss, then DPO.

Both losses read the *sequence* log-probability of a whole response, log π(text) = Σ_t log π(a_t|s_t) over the
response tokens and its <EOS> (``pair_logps``), for the chosen text_w and the rejected text_l of each labelled
pair (chapter 05's ``data/preference_pairs_*.jsonl``, labelled by the simulated, length-loving humans):

- ``loss="naive"``: §4.9's first loss, Eq. 6 with R(text) = -NLL(text): -log σ(log π1(text_w) - log π1(text_l)).
  Nothing ties π1 to where it started;
- ``loss="dpo"``: -log σ(β log π1(text_w)/π0(text_w) - β log π1(text_l)/π0(text_l)) with π0 the frozen SFT
  model, whose log-probs are computed once, when the pairs are encoded (``encode_pair_batch``).

The pairs are off-policy data: nothing is sampled during training. What the model does is measured beside it:
held-out pairwise accuracy of the implied reward β log π1/π0 (against the labels and against gold), the greedy
answers' gold score per category, the drift from the SFT model, and the gold win rate against the SFT model.

Shape legend: B pairs, T tokens (prompt and response, right-padded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.preference_data import PreferencePair
from rlmt_edu.algorithms.reward_model import encode_texts, response_token_mask
from rlmt_edu.evaluation import answer
from rlmt_edu.losses._checks import check_choice, check_positive
from rlmt_edu.losses.dpo import dpo_loss, naive_preference_loss
from rlmt_edu.model import context_length, sequence_logprobs
from rlmt_edu.rl import check_same_vocabulary, frozen_reference, gold_reward, heldout_scores_by_category
from rlmt_edu.utils import History, epoch_batches, seed_everything
from rlmt_edu.world.tasks import Question, normalize

Tensor = torch.Tensor
LOSSES = ("dpo", "naive")


@dataclass(frozen=True)
class DPOConfig:
    """Settings of one run on preference pairs (defaults: chapter 10's; about 0.17 s per step on a 2-core CPU)."""

    seed: int = 0  #: seeds the order of the pairs
    loss: str = "dpo"  #: "dpo" (with the frozen reference) or "naive" (§4.9's first loss, π1 alone)
    beta: float = 0.1  #: β of the DPO loss (unused by the naive loss)
    steps: int = 40  #: gradient steps; the pairs are reshuffled after each pass (40 × 32 ≈ half of the 2,424)
    batch_size: int = 32  #: pairs per gradient step
    learning_rate: float = 5e-5  #: AdamW learning rate
    max_grad_norm: float = 1.0  #: clip each step's gradient norm to this
    eval_every: int = 25  #: steps between held-out evaluations (and at the start and the end)

    def __post_init__(self):
        for name in ("seed", "steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            low = 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        check_choice("loss", self.loss, LOSSES)
        for name in ("beta", "learning_rate", "max_grad_norm"):
            check_positive(name, getattr(self, name))


@dataclass
class PairBatch:
    """Encoded preference pairs: rows [0, B) are the chosen texts, rows [B, 2B) the rejected ones."""

    input_ids: Tensor  #: (2B, T) right-padded ``<USER> q <MODEL> response <EOS>``
    attention_mask: Tensor  #: (2B, T)
    response_mask: Tensor  #: (2B, T - 1) 1 where a ``sequence_logprobs`` column scores a response token
    logp_ref_chosen: Tensor | None  #: (B,) log π0(text_w) under the frozen reference, or None
    logp_ref_rejected: Tensor | None  #: (B,) log π0(text_l)
    pairs: list  #: the PreferencePairs (or (question, chosen, rejected) triples) encoded

    def __len__(self) -> int:
        return self.input_ids.shape[0] // 2

    def select(self, rows: Tensor) -> "PairBatch":
        """The pairs ``rows`` (a 1-D index tensor) as a smaller batch."""
        both = torch.cat([rows, rows + len(self)])
        width = int(self.attention_mask[both].sum(1).max())  # right-padded: drop the columns all padding
        pick = (lambda x: None if x is None else x[rows.to(x.device)])
        return PairBatch(self.input_ids[both, :width], self.attention_mask[both, :width],
                         self.response_mask[both, : width - 1], pick(self.logp_ref_chosen),
                         pick(self.logp_ref_rejected), [self.pairs[i] for i in rows.tolist()])


def _triples(pairs) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) of each pair; refuses an empty response and identical chosen/rejected."""
    if isinstance(pairs, (str, dict)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"pairs: expected a non-empty list of preference pairs, got {pairs!r:.60}")
    out = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, PreferencePair):
            triple = (pair.question.question, pair.chosen, pair.rejected)
        elif isinstance(pair, (tuple, list)) and len(pair) == 3 and all(isinstance(x, str) for x in pair):
            triple = tuple(pair)
        else:
            raise ValueError(f"pairs[{index}]: expected a PreferencePair or a (question, chosen, rejected) triple "
                             f"of strings, got {pair!r:.80}")
        question, chosen, rejected = triple
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ValueError(f"pairs[{index}]: expected a non-empty {name} response, got {text!r} "
                                 f"for {question!r:.60}")
        if normalize(chosen) == normalize(rejected):
            raise ValueError(f"pairs[{index}]: expected different chosen and rejected responses, got {chosen!r:.60} "
                             "twice (the pair says nothing)")
        out.append(triple)
    return out


def pairs_with_responses(pairs) -> tuple[list, int]:
    """The pairs whose chosen and rejected responses are both non-empty, and how many were left out.

    A sampled response can be empty (the model emitted <EOS> at once); three of the committed training pairs
    have one. ``encode_pair_batch`` refuses such a pair rather than guess what its log π(text) should mean, so a
    caller drops them here, visibly."""
    kept = [p for p in pairs if all(getattr(p, side).strip() for side in ("chosen", "rejected"))]
    return kept, len(pairs) - len(kept)


def pair_logps(model, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """Sequence log-probabilities log π(text_w), log π(text_l) under ``model``, (B,) each, from one forward
    pass over the 2B texts: the sum of log π(a_t|s_t) over each response's tokens and its <EOS>. Gradients
    flow into ``model``."""
    logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, backend="auto")  # (2B, T-1)
    summed = (logp * batch.response_mask.to(logp.device, logp.dtype)).sum(1)  # (2B,)
    return summed[: len(batch)], summed[len(batch):]


def encode_pair_batch(tokenizer, pairs, *, reference=None) -> PairBatch:
    """Tokenise ``pairs`` (PreferencePairs, or (question, chosen, rejected) triples) once, and, given the frozen
    ``reference`` (π0, e.g. the SFT model), compute its sequence log-probs once: DPO's π0 never changes."""
    triples = _triples(pairs)
    questions = [q for q, _, _ in triples]
    limit = None if reference is None else context_length(reference)
    ids, mask = encode_texts(tokenizer, questions + questions, [c for _, c, _ in triples] + [r for _, _, r in triples],
                             limit)  # (2B, T) each
    batch = PairBatch(ids, mask, response_token_mask(tokenizer, questions + questions, mask), None, None,
                      list(pairs))
    if reference is not None:
        if any(p.requires_grad for p in reference.parameters()):
            raise ValueError("reference: expected a frozen model (requires_grad False on every parameter), got one "
                             "that requires grad: its log-probs would be trained along with the policy")
        check_same_vocabulary(reference, tokenizer)
        reference.eval()
        with torch.no_grad():
            chosen, rejected = [], []
            for start in range(0, len(batch), 256):
                part = batch.select(torch.arange(start, min(start + 256, len(batch))))
                c, r = pair_logps(reference, part)
                chosen.append(c)
                rejected.append(r)
        batch.logp_ref_chosen, batch.logp_ref_rejected = torch.cat(chosen), torch.cat(rejected)
    return batch


def dpo_step(policy, optimizer: torch.optim.Optimizer, batch: PairBatch, config: DPOConfig) -> dict[str, float]:
    """One gradient step of the chosen loss on ``batch``; returns the loss, the mean chosen and rejected
    log-probs under π1 and (DPO) the implied rewards, their margin and the share of pairs ranked as labelled."""
    logp_chosen, logp_rejected = pair_logps(policy, batch)  # (B,) each
    if config.loss == "naive":
        loss = naive_preference_loss(logp_chosen, logp_rejected)  # §4.9, π1 alone
        metrics = {"dpo/logp_chosen": logp_chosen.mean().item(), "dpo/logp_rejected": logp_rejected.mean().item(),
                   "dpo/reward_accuracy": (logp_chosen > logp_rejected).float().mean().item()}
    else:
        if batch.logp_ref_chosen is None:
            raise ValueError("batch: expected the reference's log-probs for DPO; encode it with "
                             "encode_pair_batch(..., reference=sft_model)")
        loss, metrics = dpo_loss(logp_chosen, logp_rejected, batch.logp_ref_chosen.to(logp_chosen.device),
                                 batch.logp_ref_rejected.to(logp_chosen.device), beta=config.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
    optimizer.step()
    return {"loss": loss.item(), **metrics}


@torch.no_grad()
def heldout_pair_accuracy(policy, batch: PairBatch, *, beta: float = 1.0) -> dict[str, float]:
    """How the implied reward r(text) = β log π1(text)/π0(text) ranks held-out pairs (π1 alone if ``batch`` has
    no reference log-probs): ``pairs/label_accuracy`` (share ranked as the labeller did) and
    ``pairs/gold_accuracy`` (share ranked as gold does, over the pairs gold does not tie), a tied margin
    counting half (at the start of DPO every margin is 0: 0.5 is chance, not a measurement), plus the mean
    log-probs of chosen and rejected texts."""
    logp_chosen, logp_rejected = pair_logps(policy, batch)
    margin = logp_chosen - logp_rejected
    if batch.logp_ref_chosen is not None:
        margin = margin - (batch.logp_ref_chosen - batch.logp_ref_rejected).to(margin.device)
    margin = beta * margin.cpu()
    golds = [getattr(pair, "gold_preference", None) for pair in batch.pairs]
    decided = torch.tensor([g is not None for g in golds])  # (B,) pairs gold does not tie
    # +1 where gold prefers the chosen text, -1 where it prefers the rejected one (0: gold ties, left out)
    gold_sign = torch.tensor([0.0 if g is None else (1.0 if (g == 1) == (p.hp == 1) else -1.0)
                              for g, p in zip(golds, batch.pairs)])  # (B,)

    def ranked_as(sign: Tensor, rows: Tensor) -> float:  # share of rows whose margin has ``sign``; a tie counts half
        agree = (torch.sign(margin[rows]) == sign[rows]).float() + 0.5 * (margin[rows] == 0).float()
        return float(agree.mean()) if bool(rows.any()) else float("nan")

    return {"pairs/label_accuracy": ranked_as(torch.ones_like(margin), torch.ones_like(decided)),
            "pairs/gold_accuracy": ranked_as(gold_sign, decided),
            "pairs/logp_chosen": logp_chosen.mean().item(), "pairs/logp_rejected": logp_rejected.mean().item()}


def _evaluate(policy, tokenizer, questions: Sequence[Question], heldout: PairBatch | None, beta: float):
    scores = {}
    if questions:
        responses = answer(policy, tokenizer, [q.question for q in questions])
        scores.update(heldout_scores_by_category(policy, tokenizer, questions, responses=responses))
        scores["eval/length"] = sum(len(r.split()) for r in responses) / len(responses)
    if heldout is not None:
        scores.update(heldout_pair_accuracy(policy, heldout, beta=beta))
    return scores


def dpo(
    policy,
    tokenizer,
    pairs,
    config: DPOConfig = DPOConfig(),
    *,
    reference=None,
    heldout_pairs=None,
    eval_questions: Sequence[Question] = (),
    progress: bool = True,
) -> History:
    """Train ``policy`` (e.g. the SFT model) in place on preference ``pairs`` with DPO (or the naive loss);
    return the History.

    - ``pairs``: PreferencePairs or (question, chosen, rejected) triples, or a ``PairBatch`` already encoded by
      ``encode_pair_batch(tokenizer, pairs, reference=reference)`` (to encode once for many runs);
    - ``reference``: the frozen π0 (default: a frozen copy of ``policy`` as it is on entry); its log-probs of
      every pair are computed once, before the first step;
    - ``heldout_pairs``: pairs never trained on, whose implied-reward ranking is measured at every evaluation
      (``pairs/label_accuracy``, ``pairs/gold_accuracy``, ``pairs/logp_chosen|rejected``);
    - ``eval_questions``: questions answered greedily at every evaluation (``eval/gold_score`` per category,
      ``eval/accuracy``, ``eval/length``).

    Logged every step: ``loss``, ``dpo/logp_chosen``, ``dpo/logp_rejected``, ``dpo/reward_accuracy`` and, for
    DPO, ``dpo/reward_chosen``, ``dpo/reward_rejected``, ``dpo/reward_margin`` (see ``losses.dpo_loss``).
    """
    if not isinstance(config, DPOConfig):
        raise ValueError(f"config: expected a DPOConfig, got {type(config).__name__}")
    reference = frozen_reference(policy, tokenizer, reference)

    def encoded(given, name: str) -> PairBatch:
        if not isinstance(given, PairBatch):
            return encode_pair_batch(tokenizer, given, reference=reference)
        if given.logp_ref_chosen is None:
            raise ValueError(f"{name}: expected a PairBatch encoded with the reference's log-probs "
                             "(encode_pair_batch(..., reference=...)), got one without")
        return given

    train = encoded(pairs, "pairs")  # a PairBatch is used as given: encode once, train many times
    heldout = None if heldout_pairs is None else encoded(heldout_pairs, "heldout_pairs")
    if heldout is not None and config.loss == "naive":  # the naive loss has no reference: rank by π1 alone
        heldout = dataclasses.replace(heldout, logp_ref_chosen=None, logp_ref_rejected=None)
    beta = config.beta if config.loss == "dpo" else 1.0
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
    policy.eval()  # no dropout: π1 and π0 are scored the same way
    history = History()
    eval_questions = list(eval_questions)
    if eval_questions or heldout is not None:
        history.append({"step": -1, **_evaluate(policy, tokenizer, eval_questions, heldout, beta)})
    if config.batch_size > len(train):
        raise ValueError(f"batch_size: expected at most the {len(train)} training pairs, got {config.batch_size}")
    total = config.steps
    batches = epoch_batches(len(train), config.batch_size, generator)
    desc = f"dpo (β={config.beta:g})" if config.loss == "dpo" else "naive preference loss"
    bar = tqdm(range(total), desc=desc, disable=not progress)
    for step in bar:
        row = {"step": step, **dpo_step(policy, optimizer, train.select(next(batches)), config)}
        if (eval_questions or heldout is not None) and ((step + 1) % config.eval_every == 0 or step == total - 1):
            row.update(_evaluate(policy, tokenizer, eval_questions, heldout, beta))
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    return history


def gold_win_rate(model, baseline, tokenizer, questions: Sequence[Question], *, samples: int = 4,
                  temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 16) -> dict[str, float]:
    """Head to head by gold score: ``samples`` responses of ``model`` and of ``baseline`` (e.g. the SFT model) to
    each of ``questions``, sampled at ``temperature`` (seeded), the k-th of one against the k-th of the other.

    Returned: ``wins``, ``ties``, ``losses`` (counts of comparisons), ``win_rate`` = (wins + ties / 2) / n, the
    usual convention, and ``decided_win_rate`` = wins / (wins + losses). Sampled, not greedy, because that is how
    a policy is used and how DPO's win rates are usually measured; a greedy answer hides every change that does
    not flip the most likely token.
    """
    from rlmt_edu.rl import sample_responses

    if len(questions) == 0:
        raise ValueError("questions: expected at least one question, got none")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    repeated = [q for q in questions for _ in range(samples)]
    golds = []
    for policy in (model, baseline):
        device = next(policy.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        _, responses = sample_responses(policy, tokenizer, repeated, temperature=temperature,
                                        max_new_tokens=max_new_tokens, generator=generator)
        golds.append(gold_reward(repeated, responses))
    ours, theirs = golds
    wins, losses = int((ours > theirs + 1e-9).sum()), int((ours < theirs - 1e-9).sum())
    ties = len(repeated) - wins - losses
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / len(repeated),
            "decided_win_rate": wins / (wins + losses) if wins + losses else float("nan")}


# ---- the chapter's plot -------------------------------------------------------------------------------------


def plot_dpo(runs: Mapping[str, Sequence[History]], axes=None):
    """Chapter 10's figure: per configuration (label -> one History per seed), mean and min-max band over seeds
    of the training loss, the chosen and rejected log-probs (training batches), the held-out pairwise gold
    accuracy and the greedy held-out gold score. ``axes``: four Axes or None. Returns the axes."""
    from rlmt_edu.plots import panel_axes, plot_seeds

    axes = panel_axes(axes, 4)
    plot_seeds(runs, "loss", ax=axes[0], smooth=5, title="training loss", ylabel="loss")
    for key, style in (("dpo/logp_chosen", "-"), ("dpo/logp_rejected", "--")):
        plot_seeds(runs, key, ax=axes[1], smooth=5, title="log π1(text): chosen (—), rejected (--)",
                   ylabel="nats per response")
        for line in axes[1].get_lines()[-len(runs):]:
            line.set_linestyle(style)
    plot_seeds(runs, "pairs/gold_accuracy", ax=axes[2], title="held-out pairs ranked as gold does",
               ylabel="accuracy")
    plot_seeds(runs, "eval/gold_score", ax=axes[3], title="held-out gold score (greedy answers)", ylabel="gold")
    for ax in axes:
        ax.set_xlabel("step")
    return axes
