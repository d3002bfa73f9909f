"""Chapter 01: instruction tuning by supervised fine-tuning (§1–§2, Eq. 1–2).

Each example is ``<USER> question <MODEL> answer <EOS>``. The loss is Eq. (2), the mean over examples of the
NLL of Eq. (1); with ``answer_only=True`` (the default, as §2 suggests) the NLL sums over the answer tokens
only, so the model learns to answer questions rather than to write them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.losses.nll import sft_loss
from rlmt_edu.model import sequence_logprobs
from rlmt_edu.tokenizer import batch_encode_chat
from rlmt_edu.utils import History, epoch_batches, seed_everything, warmup_cosine_schedule


@dataclass(frozen=True)
class SFTConfig:
    """Settings of one SFT run (defaults: well under a minute on a 2-core CPU)."""

    seed: int = 0  #: seeds the order of examples
    steps: int = 200  #: optimiser steps (about 17 passes over the 380 SFT pairs)
    batch_size: int = 32  #: examples per step
    learning_rate: float = 3e-4  #: peak AdamW learning rate (linear warm-up, then cosine decay to 10%)
    warmup_steps: int = 20  #: linear warm-up steps
    weight_decay: float = 0.0  #: AdamW weight decay
    answer_only: bool = True  #: sum Eq. (1) over answer tokens only (§2); False also trains on the question
    eval_every: int = 50  #: steps between calls of the evaluation callback, if one is given

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected a number > 0, got {self.learning_rate!r}")


def sft(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    config: SFTConfig = SFTConfig(),
    *,
    evaluate: Callable[[object], dict] | None = None,
    progress: bool = True,
    formatted: bool = False,
) -> History:
    """Fine-tune ``model`` in place on (question, answer) ``pairs`` with the SFT loss of Eq. (2).

    ``evaluate(model)`` (optional) returns a dict of metrics, logged every ``eval_every`` steps and at the end.
    The history logs ``loss/sft`` (Eq. 2) and ``loss/nll_per_token`` every step. ``formatted``: each pair's
    question is a whole prompt (e.g. with chapter 11's system prompt; see ``tokenizer.encode_prompt``).
    """
    if len(pairs) == 0:
        raise ValueError("pairs: expected at least one (question, answer) pair, got none")
    device = next(model.parameters()).device
    context = model.config.n_positions
    encoded = batch_encode_chat(tokenizer, list(pairs), max_length=context, formatted=formatted)  # (N, T) each
    generator = seed_everything(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps)
    history = History()
    batches = epoch_batches(len(pairs), config.batch_size, generator)
    model.train()
    bar = tqdm(range(config.steps), desc="sft", disable=not progress)
    for step in bar:
        rows = next(batches)  # (B,)
        batch = {key: value[rows] for key, value in encoded.items()}
        length = int(batch["attention_mask"].sum(dim=1).max())  # trim padding shared by the whole batch
        input_ids = batch["input_ids"][:, :length].to(device)  # (B, T)
        attention_mask = batch["attention_mask"][:, :length].to(device)  # (B, T)
        target_mask = batch["response_mask"] if config.answer_only else batch["attention_mask"]
        mask = target_mask[:, 1:length].to(device)  # (B, T-1): which predicted tokens count in Eq. (1)
        logp = sequence_logprobs(model, input_ids, attention_mask)  # (B, T-1)
        loss = sft_loss(logp, mask)  # Eq. (2): (1/S) Σ_i NLL_i
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        row = {"step": step, "loss/sft": loss.item(), "loss/nll_per_token": (-(logp * mask).sum() / mask.sum()).item()}
        if evaluate is not None and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
            model.eval()
            row.update(evaluate(model))
            model.train()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(row)
    model.eval()
    return history
