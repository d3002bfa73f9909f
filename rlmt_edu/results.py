"""The book's results table: every method of the book, measured the same way on the same held-out questions.

Each chapter that trains a method ends with ``record_result(...)`` on the model it trained. The function
measures that model exactly as every other row is measured and returns the row; when the chapter runs inside
``rlmt-edu book`` (the environment variable ``RLMT_EDU_RESULTS`` names a folder) it also writes the row there,
one JSON file per method and seed. ``results_table`` then averages the seeds of each method into one row, and
``results_markdown`` / ``results_html`` print it.

What a row holds, for the greedy answers to all held-out questions of the toy world (``rl.heldout_questions``):

- ``gold`` and ``gold/<category>``: the world's hidden gold score (what we really want), overall and per category;
- ``proxy``: the mean of the reward the method optimised (its ``proxy_fn``) on those same answers, or None where
  the method optimises no reward function (SFT imitates; DPO's reward is implicit; §3's ranker is pairwise);
- ``kl_to_sft``: Eq. (8)'s KL(π_SFT ‖ π) per response token, on the SFT model's greedy answers
  (``rl.drift_from_reference``);
- ``length``: the mean answer length in words;
- ``wall_s``: the seconds one training run of the method took in its chapter (one seed, evaluations included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlmt_edu.world.tasks import CATEGORIES

RESULTS_ENV = "RLMT_EDU_RESULTS"  #: the folder ``record_result`` writes to (set by ``rlmt-edu book``)

#: id -> (row label, chapter): the rows of the table, in the book's order
METHODS: dict[str, tuple[str, str]] = {
    "sft": ("SFT", "01"),
    "rejection_sampling": ("rejection sampling", "02"),
    "reinforce": ("REINFORCE", "03"),
    "trpo": ("TRPO", "07"),
    "ppo_beta0": ("PPO, β = 0", "08"),
    "ppo_beta1": ("PPO, β > 0", "08"),
    "grpo": ("GRPO", "09"),
    "dpo": ("DPO", "10"),
    "grape": ("GRAPE", "11"),
}

NUMBERS = ("gold", *(f"gold/{c}" for c in CATEGORIES), "proxy", "kl_to_sft", "length", "wall_s")


def measure_method(policy, tokenizer, *, reference, proxy_fn=None, system_prompts: Mapping[str, str] | None = None,
                   questions=None) -> dict[str, float | None]:
    """The table's numbers for ``policy``: held-out gold overall and per category, the proxy on the same greedy
    answers (None without ``proxy_fn``), KL to ``reference`` (the SFT model) per token, and mean length in words.

    ``system_prompts`` (category -> text) puts a system prompt before each question, GRAPE's generation mode.
    ``questions`` defaults to every held-out question of the world.
    """
    from rlmt_edu.rl import drift_from_reference, heldout_questions, heldout_report

    questions = heldout_questions() if questions is None else list(questions)
    scores = heldout_report(policy, tokenizer, proxy_fn, questions, system_prompts=system_prompts)
    row: dict[str, float | None] = {"gold": scores["eval/gold_score"]}
    for category in CATEGORIES:
        row[f"gold/{category}"] = scores.get(f"eval/gold_score/{category}")
    row["proxy"] = scores.get("eval/proxy")
    row["kl_to_sft"] = drift_from_reference(policy, reference, tokenizer, questions)["drift/kl"]
    row["length"] = scores["eval/length"]
    return row


def record_result(method: str, policy, tokenizer, *, reference, seed: int, wall_s: float, proxy: str,
                  proxy_fn=None, system_prompts: Mapping[str, str] | None = None) -> dict:
    """Measure ``policy`` (``measure_method``) as the row of ``method`` for one ``seed``, and return the row.

    ``proxy`` names the reward the method optimised (e.g. ``"reward model"``), ``proxy_fn`` computes it (or
    None), ``wall_s`` is the seconds one training run took. Inside ``rlmt-edu book`` the row is also written
    to ``$RLMT_EDU_RESULTS/<method>_seed<seed>.json`` (through a temporary file); elsewhere nothing is written.
    """
    from rlmt_edu.utils import atomic_write_text

    if method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not isinstance(wall_s, (int, float)) or not wall_s >= 0:
        raise ValueError(f"wall_s: expected seconds >= 0, got {wall_s!r}")
    label, chapter = METHODS[method]
    row = {"method": method, "label": label, "chapter": chapter, "seed": seed, "proxy_name": proxy,
           **measure_method(policy, tokenizer, reference=reference, proxy_fn=proxy_fn,
                            system_prompts=system_prompts),
           "wall_s": float(wall_s)}
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        atomic_write_text(Path(folder) / f"{method}_seed{seed}.json", json.dumps(row, indent=1))
    return row


def load_results(folder: str | Path) -> list[dict]:
    """Every row ``record_result`` wrote into ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*_seed*.json"))]


def results_table(rows: Sequence[Mapping]) -> list[dict]:
    """One row per method (in ``METHODS`` order): each number averaged over the seeds recorded, with the
    lowest and highest seed's overall gold (``gold_min``, ``gold_max``) and the seed count (``seeds``)."""
    table = []
    for method, (label, chapter) in METHODS.items():
        runs = [row for row in rows if row["method"] == method]
        if not runs:
            continue
        merged = {"method": method, "label": runs[0]["label"], "chapter": chapter, "seeds": len(runs),
                  "proxy_name": runs[0]["proxy_name"]}
        for key in NUMBERS:
            values = [row[key] for row in runs if row.get(key) is not None]
            merged[key] = sum(values) / len(values) if values else None
        golds = [row["gold"] for row in runs]
        merged["gold_min"], merged["gold_max"] = min(golds), max(golds)
        table.append(merged)
    return table


COLUMNS = (("method", "method"), ("ch.", "chapter"), ("seeds", "seeds"), ("gold (min–max)", "gold"),
           *((f"gold {c}", f"gold/{c}") for c in CATEGORIES), ("proxy optimised", "proxy_name"),
           ("proxy", "proxy"), ("KL to SFT", "kl_to_sft"), ("length", "length"), ("s / run", "wall_s"))


def _cell(row: Mapping, key: str) -> str:
    value = row.get(key if key != "method" else "label")
    if key == "gold":
        spread = "" if row["seeds"] == 1 else f" ({row['gold_min']:.3f}–{row['gold_max']:.3f})"
        return f"{value:.3f}{spread}"
    if value is None:
        return "—"
    if key == "wall_s":
        return f"{value:.1f}"
    if key == "length":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def results_markdown(table: Sequence[Mapping]) -> str:
    """The table as GitHub markdown (for README.md and ``runs/book/results.md``)."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, key) for _, key in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def results_html(table: Sequence[Mapping]) -> str:
    """The table as an HTML ``<table>`` (for the book's index page)."""
    from html import escape

    head = "".join(f"<th>{escape(name)}</th>" for name, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(row, key))}</td>" for _, key in COLUMNS) + "</tr>"
                   for row in table)
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def show_results(rows: Sequence[Mapping]) -> None:
    """Print the rows a chapter recorded, as the table's columns (seeds kept apart)."""
    print(results_markdown([{**row, "seeds": 1, "gold_min": row["gold"], "gold_max": row["gold"]} for row in rows]))
