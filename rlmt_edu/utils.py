"""Small shared machinery: seeding, the device choice, the History that procedures return, atomic saving."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a fresh CPU ``torch.Generator`` seeded the same way.

    Sampling code takes that generator explicitly, so two runs with one seed draw the same tokens.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


DEVICE_ENV = "RLMT_EDU_DEVICE"  #: a device for every ``choose_device()`` without one (``rlmt-edu book --device``)


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on, chosen once: ``device`` if given, else ``$RLMT_EDU_DEVICE`` if set, else cuda,
    then mps, then cpu.

    A named device must exist here: ``"cuda"`` without a usable GPU (or ``"mps"`` off Apple silicon) raises a
    ``ValueError`` naming ``device`` at once, instead of an error deep inside the first ``.to(device)``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        device = os.environ.get(DEVICE_ENV) or None
    if device is not None:
        if device not in ("cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
        if device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(device[5:]) if ":" in device else 0
            if index >= count:
                here = f"cuda:0 to cuda:{count - 1} are" if count else "no CUDA device is"
                raise ValueError(f"device: expected an available device, got {device!r} ({here} available)")
        if device == "mps" and not _mps_available():
            raise ValueError("device: expected an available device, got 'mps' (MPS is not available)")
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning rate × factor: linear warm-up over ``warmup_steps``, then cosine decay to 10% at ``total_steps``."""
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of mini-batches, without end: each epoch is a fresh permutation of ``range(n)`` drawn from
    ``generator``, cut into ``batch_size`` rows; an epoch's incomplete last batch is skipped.

    The first permutation is drawn at the call, the later ones when an epoch runs out, so a training loop that
    takes ``next(batches)`` once per step uses ``generator`` in the same order as if it shuffled inline.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size: expected ints >= 1, got n={n!r}, batch_size={batch_size!r}")
    first = torch.randperm(n, generator=generator)

    def batches() -> Iterator[torch.Tensor]:
        order, cursor = first, 0
        while True:
            if cursor + batch_size > n:  # a new epoch: reshuffle
                order, cursor = torch.randperm(n, generator=generator), 0
            yield order[cursor : cursor + batch_size]
            cursor += batch_size

    return batches()


class History(list):
    """A training run's record: a list of per-step metric dicts, e.g. ``{"step": 3, "loss/sft": 1.2}``.

    Plots read it by key (``history.series("loss/sft")``); nothing reads notebook globals.
    """

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps at which ``key`` was logged and its values there."""
        steps, values = [], []
        for i, row in enumerate(self):
            if key in row:
                steps.append(row.get("step", i))
                values.append(row[key])
        if not values:
            known = sorted({k for row in self for k in row})
            raise ValueError(f"key: {key!r} was never logged; logged keys are {known}")
        return steps, values

    def last(self, key: str) -> float:
        """The last logged value of ``key``."""
        return self.series(key)[1][-1]

    def keys(self) -> list[str]:
        return sorted({k for row in self for k in row})

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(list(self), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "History":
        return cls(json.loads(Path(path).read_text()))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` to fill a temporary folder beside ``target``, then move it into place.

    A crash half-way leaves ``target`` as it was (the old checkpoint, or nothing), never half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
