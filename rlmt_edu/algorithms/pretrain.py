"""Chapter 00: pretraining a tiny GPT on the toy world's corpus (the paper's introduction).

Next-token prediction on plain text: the NLL of Eq. (1) on every token of every window. Pretraining uses the
per-token mean of the NLL (``sft_loss(..., token_mean=True)``) because the windows are cut from one long
stream of text, so "one sample" has no meaning of its own; SFT (chapter 01) uses Eq. (2) as written.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from rlmt_edu.losses.nll import sft_loss
from rlmt_edu.model import ModelConfig, build_model, sequence_logprobs
from rlmt_edu.utils import History, choose_device, seed_everything, warmup_cosine_schedule


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (defaults: about a minute on a 2-core CPU)."""

    seed: int = 0  #: seeds the model's initialisation and the order of training windows
    steps: int = 1200  #: optimiser steps
    batch_size: int = 32  #: windows per step
    window: int = 63  #: predicted tokens per window; a window plus its first token fills the context (64)
    learning_rate: float = 3e-3  #: peak AdamW learning rate, reached after `warmup_steps`, then cosine decay
    warmup_steps: int = 50  #: linear warm-up steps
    weight_decay: float = 0.01  #: AdamW weight decay
    heldout_fraction: float = 0.05  #: share of corpus lines kept out of training, for the held-out NLL
    eval_every: int = 100  #: steps between held-out evaluations
    model: ModelConfig = field(default_factory=ModelConfig)  #: the tiny GPT-2's shape

    def __post_init__(self):
        for name in ("steps", "batch_size", "window", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.window >= self.model.n_positions:
            raise ValueError(f"window: expected less than the context {self.model.n_positions}, got {self.window}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction: expected a number in (0, 1), got {self.heldout_fraction!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected a number > 0, got {self.learning_rate!r}")


def split_corpus(lines: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of corpus lines into (train, held-out)."""
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed)).tolist()
    n_heldout = max(1, int(len(lines) * heldout_fraction))
    heldout = [lines[i] for i in sorted(order[:n_heldout])]
    train = [lines[i] for i in sorted(order[n_heldout:])]
    return train, heldout


def token_stream(tokenizer, lines: list[str]) -> torch.Tensor:
    """All lines as one stream of ids, each line closed by <EOS>."""
    ids: list[int] = []
    for line in lines:
        ids.extend(tokenizer.encode(line, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def unigram_nll(train_stream: torch.Tensor, heldout_stream: torch.Tensor, vocab_size: int) -> float:
    """Held-out NLL per token of the unigram model (token frequencies of the training stream, add-one
    smoothed): the baseline that a model ignoring all context would reach."""
    counts = Counter(train_stream.tolist())
    total = len(train_stream) + vocab_size
    return -sum(math.log((counts[t] + 1) / total) for t in heldout_stream.tolist()) / len(heldout_stream)


@torch.no_grad()
def heldout_nll_per_token(model, stream: torch.Tensor, window: int, device: torch.device) -> float:
    """Mean NLL per token of ``stream`` cut into consecutive windows (each predicted from its own start)."""
    model.eval()
    n_windows = max(1, (len(stream) - 1) // window)
    chunks = stream[: n_windows * window + 1]
    total, count = 0.0, 0
    for start in range(0, n_windows * window, window * 32):
        stop = min(start + window * 32, n_windows * window)
        x = chunks[start : stop + 1]
        rows = (len(x) - 1) // window
        ids = torch.stack([x[r * window : (r + 1) * window + 1] for r in range(rows)]).to(device)  # (B, W+1)
        logp = sequence_logprobs(model, ids, torch.ones_like(ids))  # (B, W)
        total += float(-logp.sum())
        count += logp.numel()
    model.train()
    return total / count


def pretrain(
    lines: list[str],
    tokenizer,
    config: PretrainConfig = PretrainConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
):
    """Train a fresh tiny GPT on ``lines`` of plain text. Returns ``(model, history)``.

    The history logs ``loss/train`` every step and ``eval/heldout_nll`` (per token) every ``eval_every`` steps,
    next to the constant ``eval/unigram_nll`` baseline.
    """
    if not lines:
        raise ValueError("lines: expected a non-empty list of corpus lines, got none")
    device = choose_device(device) if not isinstance(device, torch.device) else device
    seed_everything(config.seed)
    train_lines, heldout_lines = split_corpus(lines, config.heldout_fraction, config.seed)
    train_stream, heldout_stream = token_stream(tokenizer, train_lines), token_stream(tokenizer, heldout_lines)
    baseline = unigram_nll(train_stream, heldout_stream, len(tokenizer))

    model = build_model(tokenizer, config.model, seed=config.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, config.steps)
    batches = torch.Generator().manual_seed(config.seed)
    offsets = torch.arange(config.window + 1)  # (W+1,)
    history = History()
    model.train()
    bar = tqdm(range(config.steps), desc="pretrain", disable=not progress)
    for step in bar:
        starts = torch.randint(0, len(train_stream) - config.window - 1, (config.batch_size,), generator=batches)
        ids = train_stream[starts[:, None] + offsets].to(device)  # (B, W+1)
        logp = sequence_logprobs(model, ids, torch.ones_like(ids))  # (B, W): log π(a_t | s_t)
        # Eq. (1) on every token, averaged per token (see the module docstring)
        loss = sft_loss(logp, torch.ones_like(logp), token_mean=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        row = {"step": step, "loss/train": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if (step + 1) % config.eval_every == 0 or step == config.steps - 1:
            row["eval/heldout_nll"] = heldout_nll_per_token(model, heldout_stream, config.window, device)
            row["eval/unigram_nll"] = baseline
            bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{row['eval/heldout_nll']:.3f}")
        history.append(row)
    model.eval()
    return model, history


def config_to_dict(config) -> dict:
    """A config as plain JSON-ready data (for checkpoint metadata)."""
    return asdict(config)
