"""§2 of the paper: the negative log-likelihood of a text (Eq. 1) and the SFT loss (Eq. 2)."""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_bool_flag,
    check_logprob_values,
    check_mask,
    check_not_empty,
    check_tensor,
    masked_sum,
)

Tensor = torch.Tensor


def token_logp(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π(a_t | s_t) for every position: the log-softmax of ``logits`` picked at ``tokens``.

    | symbol | argument | shape |
    |---|---|---|
    | scores before the softmax over the vocabulary | ``logits`` | (B, T, V) |
    | a_t, the token that actually came next | ``tokens`` | (B, T) |
    | log π(a_t \\| s_t) | returned | (B, T) |

    For a causal LM, ``logits[:, t]`` is computed from tokens ``0..t`` and predicts token ``t+1``, so callers
    pass ``logits[:, :-1]`` with ``tokens = input_ids[:, 1:]``. Half-precision logits are computed in float32;
    float32 and float64 keep their dtype.
    """
    check_tensor("logits", logits, ndim=3)
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"tokens: expected an integer tensor of token ids, got {tokens!r:.80}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens: expected shape {tuple(logits.shape[:2])} to match logits, got {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(f"tokens: expected ids in [0, {logits.shape[-1]}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # float16 / bfloat16: the log-softmax in float32
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    return logprobs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def _check_logp_and_mask(logp: Tensor, response_mask: Tensor) -> Tensor:
    """Shared boundary checks for per-token log-probabilities (B, T) and their response mask."""
    check_tensor("logp", logp, ndim=2)
    check_not_empty("logp", logp)
    check_logprob_values("logp", logp)
    return check_mask("response_mask", response_mask, "logp", logp)


def nll(logp: Tensor, response_mask: Tensor) -> Tensor:
    """Eq. (1): the negative log-likelihood of each text under the model.

        NLL(text, M) = - Σ_t log π_M(a_t | s_t)

    The sum runs over the response tokens only (the §2 note: "calculate the NLL starting from token t where t
    is the first token of the answer"); ``response_mask`` says which tokens those are.

    | symbol | argument | shape |
    |---|---|---|
    | log π_M(a_t \\| s_t) | ``logp`` | (B, T) |
    | which t the sum runs over | ``response_mask`` (0/1) | (B, T) |
    | NLL(text_i, M) | returned | (B,) |

    It is a sum, not a mean: a longer text has a larger NLL. Under a uniform model over 32,000 tokens each
    token costs -log(1/32000) = 10.37 nats, so a 9-token text costs 93.3 (probability (1/32000)^9 = 2.84e-41).
    """
    mask = _check_logp_and_mask(logp, response_mask)
    # Eq. 1: NLL(text, M) = - Σ_t log π_M(a_t | s_t)
    return -masked_sum(logp, mask, dim=1)  # (B,)


def sft_loss(logp: Tensor, response_mask: Tensor, *, token_mean: bool = False) -> Tensor:
    """Eq. (2): the SFT loss, the average NLL over the S samples of the batch.

        SFTLoss = (1/S) Σ_i NLL(text_i, M)

    | symbol | argument | shape |
    |---|---|---|
    | log π_M(a_it \\| s_it) | ``logp`` | (S, T) |
    | the answer tokens of text_i | ``response_mask`` (0/1) | (S, T) |
    | S, the number of samples | ``logp.shape[0]`` | |
    | SFTLoss | returned | () |

    ``token_mean=False`` (the default) is the paper's normalisation: each sample's NLL is a sum over its
    tokens, and the batch is averaged over samples, so long answers weigh more than short ones.
    ``token_mean=True`` divides the total NLL by the number of response tokens in the batch instead; that is
    what ``torch.nn.functional.cross_entropy`` with ignored padding computes, and what most SFT trainers
    report. The two agree only when every sample has the same number of response tokens (up to the factor T).
    """
    check_bool_flag("token_mean", token_mean)
    per_sample = nll(logp, response_mask)  # (S,)
    if token_mean:
        # not the paper's normalisation: Σ_i NLL(text_i, M) / (number of response tokens in the batch)
        return per_sample.sum() / (response_mask != 0).sum()
    # Eq. 2: SFTLoss = (1/S) Σ_i NLL(text_i, M)
    return per_sample.sum() / per_sample.shape[0]
