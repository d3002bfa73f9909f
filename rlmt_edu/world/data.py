"""The committed data files of the world: generating them, writing them atomically, loading them.

``generate(seed)`` builds the records; ``write_data(out_dir)`` writes

==========================  ===============================================  =================================
file                        one JSON object per line                         made by
==========================  ===============================================  =================================
``pretrain_corpus.jsonl``   ``{"text": ...}``                                 ``corpus.build_corpus``
``sft_train.jsonl``         ``{"answer", "category", "harmful", "question"}``  ``tasks.make_split(...).sft``
``eval_questions.jsonl``    same fields                                       ``tasks.make_split(...).eval``
``vocab.json``              the word list, for readers                         ``vocab.vocabulary``
==========================  ===============================================  =================================

Keys are sorted and the order of records is fixed, so the same seed gives the same bytes; a test checks that
the committed files equal a fresh ``generate()``. Regenerate with ``rlmt-edu data`` (which calls
``write_data``). Nothing here needs torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rlmt_edu.world.corpus import build_corpus
from rlmt_edu.world.tasks import Question, make_split
from rlmt_edu.world.vocab import vocabulary

#: The repository's data folder, where the committed files live.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
#: The JSONL files, by name (without ".jsonl").
JSONL_FILES: tuple[str, ...] = ("pretrain_corpus", "sft_train", "eval_questions")
VOCAB_FILE = "vocab.json"
#: ``load_questions`` split -> file.
SPLIT_FILES: dict[str, str] = {"train": "sft_train", "eval": "eval_questions"}
SEED = 0  #: the seed of the committed files


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """The records of each JSONL file, keyed by file name without ".jsonl"."""
    split = make_split(seed)  # validates seed
    return {
        "pretrain_corpus": [{"text": line} for line in build_corpus(split, seed)],
        "sft_train": [q.to_record() for q in split.sft],
        "eval_questions": [q.to_record() for q in split.eval],
    }


def to_jsonl(records: list[dict]) -> str:
    """One JSON object per line, keys sorted: the exact bytes written to disk."""
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)


def vocab_json() -> str:
    """The contents of ``vocab.json``: the vocabulary as a JSON list, one word per line."""
    return json.dumps(vocabulary(), indent=1) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_data(out_dir: str | Path = "data", seed: int = SEED) -> list[Path]:
    """Generate the data and write the four files into ``out_dir`` (created if missing); return their paths.

    Each file is written atomically: a crash leaves either the old file or the new one, never half of one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents = {f"{name}.jsonl": to_jsonl(records) for name, records in generate(seed).items()}
    contents[VOCAB_FILE] = vocab_json()
    paths = []
    for filename, text in contents.items():
        _atomic_write(out / filename, text)
        paths.append(out / filename)
    return paths


def load_jsonl(name: str, data_dir: str | Path | None = None) -> list[dict]:
    """The records of one data file: ``name`` is "pretrain_corpus", "sft_train" or "eval_questions"
    (".jsonl" optional); ``data_dir`` defaults to the repository's ``data/``."""
    stem = name[: -len(".jsonl")] if isinstance(name, str) and name.endswith(".jsonl") else name
    if stem not in JSONL_FILES:
        raise ValueError(f"name: expected one of {JSONL_FILES}, got {name!r}")
    path = Path(DATA_DIR if data_dir is None else data_dir) / f"{stem}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; create it with `rlmt-edu data` (or write_data())")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_questions(split: str, data_dir: str | Path | None = None) -> list[Question]:
    """The SFT training questions (``split="train"``) or the held-out evaluation questions (``"eval"``)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split: expected one of {tuple(SPLIT_FILES)}, got {split!r}")
    return [Question.from_record(record) for record in load_jsonl(SPLIT_FILES[split], data_dir)]


def load_corpus(data_dir: str | Path | None = None) -> list[str]:
    """The pretraining corpus, one text per line."""
    return [record["text"] for record in load_jsonl("pretrain_corpus", data_dir)]
