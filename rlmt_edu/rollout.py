"""Sampling responses: the paper's Figure 1 (feed each generated token back in, one at a time) as a short loop.

``sample`` turns a batch of prompts into a ``Rollout``: the sampled response tokens, a mask of which of them
belong to the response, and log π(a_t | s_t) of each sampled token. Every RL chapter starts its step here.

The loop keeps a KV cache: the keys and values of tokens already seen are computed once and reused, so each
step costs one token's forward pass instead of the whole sequence's. For GPT-2 models the step runs through
``LeanGPT2`` (in ``rlmt_edu.model``), GPT-2's forward pass written out over the *same* weights (nothing copied), with a preallocated
cache; at our tiny sizes the per-call overhead of the general ``transformers`` forward dominates, and the lean
forward is faster (see ``benchmarks/README.md``). ``tests/test_rollout.py`` proves that its logits equal the
``transformers`` logits. Any other ``AutoModelForCausalLM`` goes through its own forward with its own cache.

Shape legend: B batch, T tokens, V vocabulary; P is the (left-padded) prompt length, N the response length,
S = P + N the cache length, C the embedding width, H heads.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlmt_edu.losses._checks import check_choice, check_positive
from rlmt_edu.model import LeanGPT2, context_length, position_ids_from_mask, sequence_logprobs  # noqa: F401 (LeanGPT2 re-exported)

Tensor = torch.Tensor


@dataclass
class Rollout:
    """A batch of prompts and the responses sampled for them.

    ``prompt_ids`` are LEFT-padded, so every prompt ends at column P - 1 and every response starts at column
    P of ``sequences()``. Responses are right-padded after their ``<EOS>`` (which belongs to the response).
    """

    prompt_ids: Tensor
    """(B, P) prompt tokens, left-padded with the pad id."""
    prompt_mask: Tensor
    """(B, P) 1 on real prompt tokens, 0 on padding."""
    response_ids: Tensor
    """(B, N) sampled tokens, the pad id after a row's <EOS>."""
    response_mask: Tensor
    """(B, N) 1 on sampled tokens up to and including <EOS>, 0 after it."""
    logp: Tensor
    """(B, N) log-prob of each sampled token under the distribution it was drawn from, 0 where masked."""
    temperature: float = 1.0
    """The temperature the tokens were drawn at: ``logp`` is under softmax(logits / temperature)."""

    def sequences(self) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` of prompt + response, each (B, P + N): ready for one forward pass."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P+N)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)  # (B, P+N)
        return input_ids, attention_mask

    @property
    def response_slice(self) -> slice:
        """Columns of ``sequence_logprobs(model, *self.sequences())`` (shape (B, P + N - 1)) that score the
        response tokens: column P - 1 + t scores response token t."""
        prompt_length = self.prompt_ids.shape[1]
        return slice(prompt_length - 1, prompt_length - 1 + self.response_ids.shape[1])

    @property
    def response_lengths(self) -> Tensor:
        """(B,) number of response tokens per row, <EOS> included."""
        return self.response_mask.sum(dim=1)

    def select(self, rows: Tensor) -> "Rollout":
        """The rollout of the samples ``rows`` (a 1-D index tensor): a mini-batch of the same batch. The column
        layout (P prompt columns, N response columns) is kept, so positions and slices stay valid."""
        if not isinstance(rows, Tensor) or rows.ndim != 1 or rows.numel() == 0 or rows.dtype != torch.long:
            raise ValueError(f"rows: expected a non-empty 1-D tensor of row indices (long), got {rows!r:.60}")
        batch = self.response_ids.shape[0]
        if int(rows.min()) < 0 or int(rows.max()) >= batch:
            raise ValueError(f"rows: expected indices in [0, {batch}), got {rows.tolist()!r:.60}")
        rows = rows.to(self.response_ids.device)
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                       self.response_mask[rows], self.logp[rows], self.temperature)

    def decode(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The response texts, without special tokens (no <EOS>, no padding)."""
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(self.response_ids, self.response_mask)]
        return tokenizer.batch_decode(rows, skip_special_tokens=True)


def policy_logprobs(model: PreTrainedModel, rollout: Rollout, *, temperature: float = 1.0,
                    backend: str = "hf") -> Tensor:
    """log π(a_t | s_t) of the rollout's response tokens under ``model``, from ONE forward pass: (B, N).

    | symbol | argument | shape |
    |---|---|---|
    | π, the policy being scored (e.g. the one being trained, or the reference) | ``model`` | |
    | s_t, a_t: prompts and sampled response tokens | ``rollout`` | (B, P), (B, N) |
    | log π(a_t \\| s_t), 0 where ``rollout.response_mask`` is 0 | returned | (B, N) |

    Gradients flow into ``model``. With the sampling model and the sampling ``temperature`` this reproduces
    ``rollout.logp`` (up to float rounding): that is what makes the first PPO ratio exactly 1. ``backend``:
    see ``model.sequence_logprobs``.
    """
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout: expected a Rollout, got {type(rollout).__name__}")
    input_ids, attention_mask = rollout.sequences()
    logp = sequence_logprobs(model, input_ids, attention_mask, temperature=temperature,
                             backend=backend)  # (B, P+N-1)
    logp = logp[:, rollout.response_slice]  # (B, N)
    return torch.where(rollout.response_mask.to(logp.device) != 0, logp, torch.zeros_like(logp))  # (B, N)


def merge_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts whose prompts and responses differ in length into one: prompts re-padded on the LEFT to
    the longest P, responses on the RIGHT to the longest N (rows in the order given). Chapter 11 joins its
    system-mode samples, its revision-mode samples and SFT answers this way into one group batch."""
    if len(rollouts) == 0 or not all(isinstance(r, Rollout) for r in rollouts):
        raise ValueError(f"rollouts: expected a non-empty list of Rollout, got {rollouts!r:.60}")
    if len({r.temperature for r in rollouts}) != 1:
        raise ValueError(f"rollouts: expected one sampling temperature, got {sorted({r.temperature for r in rollouts})}")
    longest_prompt = max(r.prompt_ids.shape[1] for r in rollouts)
    longest_response = max(r.response_ids.shape[1] for r in rollouts)

    def pad(x: Tensor, width: int, value: float, left: bool) -> Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        torch.cat([pad(r.prompt_ids, longest_prompt, pad_id, True) for r in rollouts]),
        torch.cat([pad(r.prompt_mask, longest_prompt, 0, True) for r in rollouts]),
        torch.cat([pad(r.response_ids, longest_response, pad_id, False) for r in rollouts]),
        torch.cat([pad(r.response_mask, longest_response, 0, False) for r in rollouts]),
        torch.cat([pad(r.logp, longest_response, 0.0, False) for r in rollouts]),
        rollouts[0].temperature,
    )


@torch.no_grad()
def forced_rollout(model: PreTrainedModel, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                   pad_id: int, temperature: float = 1.0) -> Rollout:
    """A Rollout of GIVEN responses (token ids, <EOS> included) after ``prompts``, as if ``model`` had sampled
    them: ``logp`` is their log-probability under ``model`` (teacher forcing). Chapter 11 puts SFT answers into
    a group this way (§6.1 "Use of SFT data")."""
    if len(prompts) == 0 or len(prompts) != len(responses) or any(len(r) == 0 for r in responses):
        raise ValueError(f"responses: expected one non-empty token list per prompt ({len(prompts)}), "
                         f"got {len(responses)}")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P)
    longest = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), longest), pad_id, dtype=torch.long, device=device)  # (B, N)
    response_mask = torch.zeros_like(response_ids)  # (B, N)
    for row, ids in enumerate(responses):
        response_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        response_mask[row, : len(ids)] = 1
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask,
                      torch.zeros(response_ids.shape, device=device), temperature)
    rollout.logp = policy_logprobs(model, rollout, temperature=temperature)  # (B, N)
    return rollout


def policy_logits(model: PreTrainedModel, rollout: Rollout, *, temperature: float = 1.0) -> Tensor:
    """The whole next-token distribution π(· | s_t) at every response position of ``rollout``, as logits:
    (B, N, V), from one forward pass.

    | symbol | argument | shape |
    |---|---|---|
    | π, the policy being scored | ``model`` | |
    | s_t: prompts and the response tokens before a_t | ``rollout`` | (B, P), (B, N) |
    | logits of π(· \\| s_t) (divided by ``temperature``) | returned | (B, N, V) |

    ``log_softmax(policy_logits(...))`` picked at the sampled tokens is ``policy_logprobs``; the full rows are
    what an exact KL over the vocabulary (Eq. 8) needs. Rows where ``rollout.response_mask`` is 0 are scores
    after the response ended: ignore them. Gradients flow into ``model``.
    """
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout: expected a Rollout, got {type(rollout).__name__}")
    temperature = check_positive("temperature", temperature)
    input_ids, attention_mask = rollout.sequences()
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits  # (B, P+N, V)
    # logits[:, t] has seen tokens 0..t and scores token t + 1: the same columns as policy_logprobs
    return logits[:, rollout.response_slice].float() / temperature  # (B, N, V)


def sample(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    eos_id: int | None,
    pad_id: int,
    backend: str = "auto",
) -> Rollout:
    """Sample up to ``max_new_tokens`` tokens after each prompt, feeding each token back in (Figure 1).

    - Prompts of different lengths are LEFT-padded into one batch (positions are counted over real tokens, so
      padding changes nothing).
    - Each step draws a_t ~ softmax(logits / temperature) with ``torch.multinomial`` (or takes the argmax
      when ``greedy``), and records log softmax(logits / temperature)[a_t]; at ``temperature=1`` that is the
      model's own log π(a_t | s_t).
    - A row stops at ``eos_id`` (the <EOS> is part of its response, padding follows); the loop stops when every
      row has stopped or after ``max_new_tokens``. ``eos_id=None`` never stops early.
    - ``generator`` drives the draws: it must live on the model's device (e.g. ``torch.Generator("cuda")``
      for a model on the GPU); None uses torch's global random state. Same generator seed, same samples.
    - The model runs in eval mode (no dropout) and without gradients; its mode is restored afterwards.
    - ``backend``: "auto" uses ``LeanGPT2`` for GPT-2 models and the model's own forward otherwise; "lean"
      or "hf" force one of them.

    Raises ``ValueError`` for empty prompts, token ids outside the vocabulary, a prompt longer than the
    model's context, or a prompt + ``max_new_tokens`` that would not fit in it.
    """
    _check_sampling_arguments(model, prompts, max_new_tokens, temperature, greedy, generator, eos_id, pad_id, backend)
    device = model.get_input_embeddings().weight.device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P), (B, P)
    batch_size, prompt_length = prompt_ids.shape
    limit = context_length(model)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens: expected at most {limit - prompt_length} so that the longest prompt "
            f"({prompt_length} tokens) plus the response fits the model's context of {limit}, got {max_new_tokens}"
        )
    use_lean = backend == "lean" or (backend == "auto" and LeanGPT2.supports(model))

    # the outputs are allocated outside inference mode, so that they can enter a loss's autograd graph later
    response_ids = torch.full((batch_size, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
    response_mask = torch.zeros((batch_size, max_new_tokens), dtype=torch.long, device=device)  # (B, N)
    logp = torch.zeros((batch_size, max_new_tokens), dtype=torch.float32, device=device)  # (B, N)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (B,) rows that emitted <EOS>
    next_position = prompt_mask.sum(dim=1, keepdim=True)  # (B, 1) position of each row's first response token
    with _eval_mode_without_gradients(model):
        step = (LeanGPT2 if use_lean else _CachedForward)(model, batch_size, prompt_length + max_new_tokens)
        # Figure 1: read the prompt once (filling the KV cache) ...
        logits = step(prompt_ids, position_ids_from_mask(prompt_mask), prompt_mask)  # (B, V) scores for token 0
        for t in range(max_new_tokens):
            scaled = logits.float() / temperature  # (B, V)
            logprobs = torch.log_softmax(scaled, dim=-1)  # (B, V)
            if greedy:
                token = scaled.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                probs = torch.softmax(scaled, dim=-1)  # (B, V)
                token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            # a row that already emitted <EOS> gets padding, masked out
            token = token.masked_fill(finished[:, None], pad_id)  # (B, 1)
            response_ids[:, t] = token[:, 0]
            response_mask[:, t] = (~finished).long()
            logp[:, t] = logprobs.gather(-1, token)[:, 0].masked_fill(finished, 0.0)
            if eos_id is not None:
                finished |= token[:, 0] == eos_id
            if t + 1 == max_new_tokens or bool(finished.all()):
                break
            # ... then feed each chosen token back in, one at a time (padding of finished rows is harmless)
            logits = step(token, next_position + t, torch.ones_like(token))  # (B, V)
    n = t + 1  # the loop stops early once every row has emitted <EOS>
    return Rollout(prompt_ids, prompt_mask, response_ids[:, :n], response_mask[:, :n], logp[:, :n], float(temperature))


@contextmanager
def _eval_mode_without_gradients(model: PreTrainedModel) -> Iterator[None]:
    """Sample with dropout off and no autograd bookkeeping; give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # like no_grad, and ~10% faster per step at batch 8 on a CPU
            yield
    finally:
        model.train(was_training)


def _check_sampling_arguments(model, prompts, max_new_tokens, temperature, greedy, generator, eos_id, pad_id, backend):
    device = model.get_input_embeddings().weight.device
    vocab_size = model.get_input_embeddings().num_embeddings
    _check_prompts(prompts, vocab_size, context_length(model))
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    check_positive("temperature", temperature)
    if not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not isinstance(greedy, bool):
        raise ValueError(f"greedy: expected True or False, got {greedy!r}")
    for name, token_id in (("eos_id", eos_id), ("pad_id", pad_id)):
        if token_id is None and name == "eos_id":
            continue
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise ValueError(f"{name}: expected a token id in [0, {vocab_size}), got {token_id!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator: expected a generator on the model's device {device.type!r}, got one on "
                f"{generator.device.type!r} (create it with torch.Generator({device.type!r}))"
            )
    check_choice("backend", backend, ("auto", "lean", "hf"))
    if backend == "lean" and not LeanGPT2.supports(model):
        raise ValueError(f"backend: 'lean' needs a GPT2LMHeadModel, got {type(model).__name__}")


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Stack token lists of different lengths into (B, P) ids and mask, padding on the LEFT.

    Left padding lines up the ends of the prompts, so the next token of every row is predicted at the same
    column and the generated tokens of all rows land in the same columns.
    """
    longest = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((len(prompts), longest), dtype=torch.long)  # (B, P)
    for row, ids in enumerate(prompts):
        prompt_ids[row, longest - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        prompt_mask[row, longest - len(ids):] = 1
    return prompt_ids.to(device), prompt_mask.to(device)


def _check_prompts(prompts: object, vocab_size: int, limit: int | None) -> None:
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list of token-id lists, got {prompts!r:.80}")
    for row, ids in enumerate(prompts):
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or len(ids) == 0:
            raise ValueError(
                f"prompts: expected every prompt to be a non-empty list of token ids, got {ids!r:.80} at index {row}"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"prompts: expected token ids in [0, {vocab_size}), got {list(ids)!r:.80} at index {row}")
        if limit is not None and len(ids) > limit:
            raise ValueError(
                f"prompts: expected prompts of at most {limit} tokens (the model's context), "
                f"got {len(ids)} at index {row}"
            )


class _CachedForward:
    """One sampling step through the model's own forward and its own KV cache (any causal LM)."""

    def __init__(self, model: PreTrainedModel, batch_size: int, max_length: int):
        self.model = model
        self.cache = None
        # transformers 5 renamed the forward's ``past_key_values`` to ``cache`` (the old name goes in 5.40)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.key_mask = torch.zeros((batch_size, max_length), dtype=torch.long,
                                    device=model.get_input_embeddings().weight.device)  # (B, S)
        self.length = 0

    def __call__(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
        start, end = self.length, self.length + input_ids.shape[1]
        self.key_mask[:, start:end] = mask
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.key_mask[:, :end],
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_name: self.cache},
        )
        self.cache, self.length = out[self.cache_name], end
        return out.logits[:, -1]  # (B, V)
