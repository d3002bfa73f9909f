"""Where things live on disk: the repository's committed data and checkpoints, and ``runs/`` for new output.

Everything under ``data/`` is committed and read by the notebooks and tests; commands write new work under
``runs/`` unless told otherwise. Nothing here imports the rest of the package, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"  #: the committed data files (data/*.jsonl)
CHECKPOINTS = DATA / "checkpoints"  #: the committed checkpoints
PRETRAINED = CHECKPOINTS / "pretrained"  #: chapter 00's model
SFT = CHECKPOINTS / "sft"  #: chapter 01's model, the start of every RL chapter
REWARD_MODEL = CHECKPOINTS / "reward_model"  #: chapter 05's reward model
RUNS = REPO / "runs"  #: where commands write new checkpoints, histories and plots (not committed)


def relative_to_repo(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (for metadata that travels), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)
