"""§4.1 of the paper: REINFORCE, from the reward-weighted loss to Eq. (3) with a baseline.

Rewards and baselines are constants of the policy loss: they come from a reward model and a critic, not from
the policy being trained, so both functions detach them. Only ``logp`` carries the gradient.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_logprob_values,
    check_mask,
    check_not_empty,
    check_tensor,
    masked_sum,
)

Tensor = torch.Tensor


def _check_logp_and_mask(logp: Tensor, response_mask: Tensor) -> Tensor:
    check_tensor("logp", logp, ndim=2)
    check_not_empty("logp", logp)
    check_logprob_values("logp", logp)
    return check_mask("response_mask", response_mask, "logp", logp)


def _check_rewards(rewards: object, logp: Tensor) -> Tensor:
    check_tensor("rewards", rewards, ndim=1)
    if rewards.shape[0] != logp.shape[0]:
        raise ValueError(
            f"rewards: expected shape ({logp.shape[0]},), one reward per sample of logp, got {tuple(rewards.shape)}"
        )
    return rewards.detach().to(logp.dtype)


def _baseline_per_token(values: object, logp: Tensor) -> Tensor:
    """The baseline V as a (B, T) tensor: a per-token (B, T) tensor as is, a per-sample (B,) tensor or a single
    number (Python or 0-dim tensor) repeated over tokens. Detached: the baseline is a constant here."""
    batch, tokens = logp.shape
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = torch.tensor(float(values), dtype=logp.dtype)
    if not isinstance(values, Tensor):
        raise ValueError(f"values: expected a number or a tensor, got {type(values).__name__} {values!r:.60}")
    check_tensor("values", values)
    if values.dim() == 0:
        per_token = values.expand(batch, tokens)
    elif values.shape == (batch,):
        per_token = values.unsqueeze(1).expand(batch, tokens)
    elif values.shape == (batch, tokens):
        per_token = values
    else:
        raise ValueError(
            f"values: expected a number, shape ({batch},) or shape ({batch}, {tokens}) to match logp, "
            f"got {tuple(values.shape)}"
        )
    return per_token.detach().to(logp.dtype)  # (B, T)


def reward_weighted_loss(logp: Tensor, rewards: Tensor, response_mask: Tensor) -> Tensor:
    """§4.1: the reward-weighted loss, REINFORCE without a baseline.

        Reward Weighted Loss = (1/S) Σ_i R(text_i) · NLL(text_i, M),   NLL(text_i, M) = -Σ_t log π_M(a_it | s_it)

    | symbol | argument | shape |
    |---|---|---|
    | log π_M(a_it \\| s_it) | ``logp`` | (S, T) |
    | R(text_i) | ``rewards`` (detached) | (S,) |
    | the response tokens the sum over t runs over | ``response_mask`` (0/1) | (S, T) |
    | the loss | returned | () |

    Minimising it lowers the NLL of texts with a positive reward and raises the NLL of texts with a negative
    one. With every reward equal to 1 it is Eq. (2), the SFT loss.
    """
    mask = _check_logp_and_mask(logp, response_mask)
    rewards = _check_rewards(rewards, logp)  # (S,)
    nll = -masked_sum(logp, mask, dim=1)  # (S,)  Eq. 1
    # §4.1: Reward Weighted Loss = (1/S) Σ_i R(text_i) · NLL(text_i, M)
    return (rewards * nll).sum() / logp.shape[0]


def reinforce_loss(logp: Tensor, rewards: Tensor, values: Tensor | float, response_mask: Tensor) -> Tensor:
    """Eq. (3): the REINFORCE loss with a baseline.

        REINFORCE Loss = -(1/S) Σ_i Σ_t (R(text_i) - V_M(s_it)) · log π_M(a_it | s_it)

    | symbol | argument | shape |
    |---|---|---|
    | log π_M(a_it \\| s_it) | ``logp`` | (S, T) |
    | R(text_i), one reward per text | ``rewards`` (detached) | (S,) |
    | V_M(s_it), the baseline at each token | ``values`` (detached) | (S, T), or (S,), or a number |
    | the response tokens the sum over t runs over | ``response_mask`` (0/1) | (S, T) |
    | the loss | returned | () |

    ``values`` is normally the critic's per-token estimate (S, T). A per-sample baseline (S,) or a single
    number (a Python float or a 0-dim tensor, e.g. the batch's mean reward) is also accepted and repeated over
    every token; Eq. (3) with a baseline of 0 is ``reward_weighted_loss``.

    The baseline is treated as a constant: it is detached, so this loss sends no gradient into the critic
    (train the critic with its own regression loss). A baseline that does not depend on the sampled token
    leaves the expected gradient unchanged and, when it tracks the reward, lowers its variance.
    """
    mask = _check_logp_and_mask(logp, response_mask)
    rewards = _check_rewards(rewards, logp)  # (S,)
    baseline = _baseline_per_token(values, logp)  # (S, T)
    weight = rewards.unsqueeze(1) - baseline  # (S, T)  R(text_i) - V_M(s_it)
    # Eq. 3: REINFORCE Loss = -(1/S) Σ_i Σ_t (R(text_i) - V_M(s_it)) · log π_M(a_it | s_it)
    return -masked_sum(weight * logp, mask) / logp.shape[0]
