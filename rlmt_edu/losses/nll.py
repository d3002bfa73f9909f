"""§2 of the paper: the negative log-likelihood of a text (Eq. 1) and the SFT loss (Eq. 2)."""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import check_tensor

Tensor = torch.Tensor


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π(a_t | s_t) for every position: the log-softmax of ``logits`` picked at ``tokens``.

    | symbol | argument | shape |
    |---|---|---|
    | scores before the softmax over the vocabulary | ``logits`` | (B, T, V) |
    | a_t, the token that actually came next | ``tokens`` | (B, T) |
    | log π(a_t \\| s_t) | returned | (B, T) |

    For a causal LM, ``logits[:, t]`` is computed from tokens ``0..t`` and predicts token ``t+1``, so callers
    pass ``logits[:, :-1]`` with ``tokens = input_ids[:, 1:]``.
    """
    check_tensor("logits", logits, ndim=3)
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"tokens: expected an integer tensor of token ids, got {tokens!r:.80}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens: expected shape {tuple(logits.shape[:2])} to match logits, got {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(f"tokens: expected ids in [0, {logits.shape[-1]}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logprobs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
