"""Measuring a chat model on the toy world's questions: greedy answers graded by ``world.grading``.

Used by the SFT procedure, the CLI and the notebooks, so every chapter reports the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlmt_edu.rollout import sample
from rlmt_edu.tokenizer import encode_prompt, format_prompt
from rlmt_edu.world.grading import grade, summarize
from rlmt_edu.world.tasks import Question


@torch.no_grad()
def answer(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 24,
    greedy: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 128,
    systems: Sequence[str | None] | None = None,
) -> list[str]:
    """The model's answers to chat ``questions`` (``<USER> q <MODEL>`` … up to <EOS>), as text. ``systems``:
    one system prompt (or None) per question, put before it as ``<SYSTEM> ...`` (chapter 11)."""
    if isinstance(questions, str):
        raise ValueError("questions: expected a list of strings, got a single string")
    if systems is not None and len(systems) != len(questions):
        raise ValueError(f"systems: expected one system prompt (or None) per question ({len(questions)}), "
                         f"got {len(systems)}")
    texts = [format_prompt(q, system=None if systems is None else systems[i]) for i, q in enumerate(questions)]
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [encode_prompt(tokenizer, text, formatted=True) for text in texts[start : start + batch_size]]
        rollout = sample(
            model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
            generator=generator, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        )
        answers.extend(rollout.decode(tokenizer))
    return answers


@torch.no_grad()
def continue_text(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 12,
    greedy: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Plain text completion (no chat tokens): what a pretrained model does with a prompt."""
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    rollout = sample(
        model, prompts, max_new_tokens=max_new_tokens, greedy=greedy, generator=generator,
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
    )
    return rollout.decode(tokenizer)


def is_question(continuation: str) -> bool:
    """Does a continuation start with another question (its first sentence ends with '?')?"""
    words = continuation.split()
    for word in words:
        if word in (".", "?"):
            return word == "?"
    return False


def evaluate(model, tokenizer, questions: Sequence[Question], **answer_kwargs) -> tuple[dict, list[dict]]:
    """Answer ``questions`` (greedy by default) and grade them with ``world.grading``.

    Returns ``(metrics, rows)``: the rates of ``world.grading.summarize`` (format, accuracy, math and facts
    exact match, refusals of harmful asks, over-refusals of benign ones) and one dict per question.
    """
    answers = answer(model, tokenizer, [q.question for q in questions], **answer_kwargs)
    rows = []
    for q, response in zip(questions, answers):
        g = grade(q, response)
        rows.append({"category": q.category, "harmful": q.harmful, "question": q.question, "response": response,
                     "format_ok": g.format_ok, "correct": g.correct, "refused": g.refused, "reason": g.reason})
    return summarize(questions, answers), rows
