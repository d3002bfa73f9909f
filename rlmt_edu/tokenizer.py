"""Word-level tokenizer: one token per word, as the paper assumes (§2, footnote 1).

Built with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast`` so that it saves with
``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``. Words and punctuation are separated
by spaces in the toy world ("a spider has 8 legs ."); punctuation typed by a user is split off too.

The chat format of §1: ``<USER> question <MODEL> answer <EOS>``. The *response mask* marks the answer tokens
(and the closing ``<EOS>``): the tokens whose NLL Eq. (1) sums when we train on answers only (§2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS, USER, MODEL, SYSTEM, CRITIQUE = (
    "<PAD>", "<UNK>", "<EOS>", "<USER>", "<MODEL>", "<SYSTEM>", "<CRITIQUE>",
)
#: Special tokens take the first ids, in this order: <PAD>=0, <UNK>=1, <EOS>=2, <USER>=3, <MODEL>=4, ...
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, EOS, USER, MODEL, SYSTEM, CRITIQUE)
_SPECIAL_PATTERN = re.compile(r"<[A-Za-z_]+>")


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is ``SPECIAL_TOKENS`` followed by ``words`` (duplicates dropped)."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *words):
        if not isinstance(token, str) or not token or any(ch.isspace() for ch in token):
            raise ValueError(f"words: expected non-empty strings without spaces, got {token!r}")
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        bos_token=EOS,
        additional_special_tokens=[USER, MODEL, SYSTEM, CRITIQUE],
        padding_side="right",
        model_max_length=10_000,
    )
    return tokenizer


def check_known_special_tokens(text: str, argument: str = "text") -> None:
    """Raise if ``text`` contains something shaped like a special token that this tokenizer does not know."""
    for found in _SPECIAL_PATTERN.findall(text):
        if found not in SPECIAL_TOKENS:
            raise ValueError(
                f"{argument}: unknown special token {found!r}; expected only {', '.join(SPECIAL_TOKENS)}"
            )


def format_prompt(question: str, *, system: str | None = None) -> str:
    """``<USER> question <MODEL>``: what the model sees before it answers. With ``system`` (chapter 11's
    system prompt of a category, §6.1 item 1) the prompt starts ``<SYSTEM> system``."""
    prompt = f"{USER} {question.strip()} {MODEL}"
    return prompt if system is None else f"{SYSTEM} {system.strip()} {prompt}"


def format_revision_prompt(system: str, question: str, previous: str, critique: str) -> str:
    """Chapter 11's revision prompt (§6.1 item 2): the question, a previous response and a critique of it, after
    which the model writes an improved response:
    ``<SYSTEM> system <USER> question <MODEL> previous <CRITIQUE> critique <MODEL>``."""
    for argument, text in (("system", system), ("question", question), ("previous", previous),
                           ("critique", critique)):
        if not isinstance(text, str) or (argument != "previous" and not text.strip()):
            raise ValueError(f"{argument}: expected a non-empty string, got {text!r}")
        check_known_special_tokens(text, argument)
    return f"{format_prompt(question, system=system)} {previous.strip()} {CRITIQUE} {critique.strip()} {MODEL}"


def format_chat(question: str, answer: str) -> str:
    """``<USER> question <MODEL> answer <EOS>``: one SFT example."""
    return f"{format_prompt(question)} {answer.strip()} {EOS}"


def encode_prompt(tokenizer: PreTrainedTokenizerFast, question: str, *, formatted: bool = False) -> list[int]:
    """Token ids of ``<USER> question <MODEL>``; with ``formatted=True``, ``question`` is already a whole prompt
    ending in ``<MODEL>`` (e.g. from ``format_prompt(q, system=...)`` or ``format_revision_prompt``)."""
    _check_text("question", question)
    if not formatted:
        return tokenizer.encode(format_prompt(question), add_special_tokens=False)
    if not question.rstrip().endswith(MODEL):
        raise ValueError(f"question: expected a formatted prompt ending in {MODEL}, got {question[-40:]!r}")
    return tokenizer.encode(question, add_special_tokens=False)


def encode_chat(tokenizer: PreTrainedTokenizerFast, question: str, answer: str, *,
                formatted: bool = False) -> tuple[list[int], list[int]]:
    """Ids of ``<USER> question <MODEL> answer <EOS>`` and its response mask (1 on answer tokens and <EOS>).
    ``formatted``: ``question`` is a whole prompt, as in ``encode_prompt``."""
    _check_text("question", question)
    _check_text("answer", answer)
    prompt = encode_prompt(tokenizer, question, formatted=formatted)
    response = tokenizer.encode(f"{answer.strip()} {EOS}", add_special_tokens=False)
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def batch_encode_chat(
    tokenizer: PreTrainedTokenizerFast,
    pairs: Sequence[tuple[str, str]],
    max_length: int | None = None,
    *,
    formatted: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded batch of chat examples.

    Returns ``input_ids``, ``attention_mask`` and ``response_mask``, each of shape (B, T) where T is the longest
    example. ``max_length`` (e.g. the model's context) rejects longer examples instead of cutting them.
    ``formatted``: each pair's first element is a whole prompt (see ``encode_prompt``).
    """
    if len(pairs) == 0:
        raise ValueError("pairs: expected at least one (question, answer) pair, got none")
    encoded = [encode_chat(tokenizer, q, a, formatted=formatted) for q, a in pairs]
    longest = max(len(ids) for ids, _ in encoded)
    if max_length is not None and longest > max_length:
        raise ValueError(f"pairs: expected examples of at most {max_length} tokens, got one of {longest}")
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)  # (B, T)
    response_mask = torch.zeros((len(encoded), longest), dtype=torch.long)  # (B, T)
    for row, (ids, mask) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def _check_text(argument: str, text: object) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{argument}: expected a non-empty string, got {text!r}")
    check_known_special_tokens(text, argument)
