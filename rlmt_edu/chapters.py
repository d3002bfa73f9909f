"""The chapter recipes that the CLI, the notebooks and the reproduction tests share.

Each recipe fixes the config a chapter uses, runs the procedure, measures the chapter's numbers and, given
``out``, saves a checkpoint with those numbers in its metadata (``rlmt_edu.json``); nothing is saved by default,
so no call overwrites the committed checkpoints by accident. ``rlmt-edu pretrain`` and ``rlmt-edu sft`` call
these, and ``tests/test_checkpoints.py`` checks that running them again reproduces the committed checkpoints'
metrics.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from rlmt_edu.algorithms.pretrain import PretrainConfig, pretrain
from rlmt_edu.algorithms.sft import SFTConfig, sft
from rlmt_edu.evaluation import continue_text, evaluate, is_question
from rlmt_edu.model import load_checkpoint, save_checkpoint
from rlmt_edu.paths import CHECKPOINTS, PRETRAINED, REPO, SFT, relative_to_repo  # noqa: F401 (re-exported)
from rlmt_edu.utils import History, choose_device


PRETRAIN_CONFIG = PretrainConfig()
SFT_CONFIG = SFTConfig()


def corpus_lines() -> list[str]:
    from rlmt_edu.world.data import load_jsonl

    return [row["text"] for row in load_jsonl("pretrain_corpus")]


def question_continuation_share(model, tokenizer, questions: list[str]) -> float:
    """Share of plain-text questions that the model continues with another question (§1's first point)."""
    continuations = continue_text(model, tokenizer, questions, max_new_tokens=12)
    return sum(is_question(c) for c in continuations) / len(continuations)


def pretrain_metrics(model, tokenizer, history: History) -> dict:
    from rlmt_edu.world.data import load_questions

    questions = [q.question for q in load_questions("eval") if q.category != "safety"]
    return {
        "eval/heldout_nll": round(history.last("eval/heldout_nll"), 4),
        "eval/unigram_nll": round(history.last("eval/unigram_nll"), 4),
        "eval/question_continuation": round(question_continuation_share(model, tokenizer, questions), 4),
    }


def run_pretrain(config: PretrainConfig = PRETRAIN_CONFIG, *, out: Path | None = None, device=None,
                 progress: bool = True):
    """Pretrain on the committed corpus; save to ``out`` (unless None). Returns (model, history, metrics)."""
    from rlmt_edu.world.vocab import world_tokenizer

    tokenizer = world_tokenizer()
    model, history = pretrain(corpus_lines(), tokenizer, config, device=choose_device(device), progress=progress)
    metrics = pretrain_metrics(model, tokenizer, history)
    if out is not None:
        save_checkpoint(model, tokenizer, out, metadata={
            "recipe": "rlmt_edu.chapters.run_pretrain", "config": dataclasses.asdict(config),
            "metrics": metrics, "history": list(history)})
    return model, history, metrics


def sft_pairs() -> list[tuple[str, str]]:
    from rlmt_edu.world.data import load_questions

    return [(q.question, q.answer) for q in load_questions("train")]


def sft_metrics(model, tokenizer) -> dict:
    from rlmt_edu.world.data import load_questions

    metrics, _ = evaluate(model, tokenizer, load_questions("eval"))
    return {k: round(v, 4) for k, v in metrics.items()}


def run_sft(config: SFTConfig = SFT_CONFIG, *, init: Path = PRETRAINED, out: Path | None = None, device=None,
            progress: bool = True, eval_every: bool = False):
    """Instruction-tune the checkpoint at ``init`` on the committed SFT pairs; save to ``out`` (unless None).
    Returns (model, history, metrics)."""
    model, tokenizer = load_checkpoint(init, device=choose_device(device), argument="init")
    evaluate_fn = (lambda m: sft_metrics(m, tokenizer)) if eval_every else None
    history = sft(model, tokenizer, sft_pairs(), config, evaluate=evaluate_fn, progress=progress)
    metrics = {"loss/sft": round(history.last("loss/sft"), 4), **sft_metrics(model, tokenizer)}
    if out is not None:
        save_checkpoint(model, tokenizer, out, metadata={
            "recipe": "rlmt_edu.chapters.run_sft", "init": relative_to_repo(init),
            "config": dataclasses.asdict(config), "metrics": metrics, "history": list(history)})
    return model, history, metrics


__all__ = ["PRETRAIN_CONFIG", "SFT_CONFIG", "PRETRAINED", "SFT", "run_pretrain", "run_sft"]
