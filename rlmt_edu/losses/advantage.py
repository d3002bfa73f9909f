"""§4.3 of the paper: the advantage function, Eq. (4), and the GAE it is a special case of.

Both return a (B, T) tensor that is zero outside the response. Neither detaches anything: when an advantage
feeds a policy loss it is a constant there (the policy losses detach it), and a critic is trained on its own
regression target.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_mask,
    check_not_empty,
    check_same_shape,
    check_scalar_between,
    check_tensor,
)

Tensor = torch.Tensor


def _check_values_and_mask(values: Tensor, response_mask: Tensor) -> Tensor:
    check_tensor("values", values, ndim=2)
    check_not_empty("values", values)
    return check_mask("response_mask", response_mask, "values", values)


def advantage(rewards: Tensor, values: Tensor, response_mask: Tensor) -> Tensor:
    """Eq. (4): the advantage of each response token, the text's reward minus the baseline at that token.

        A_M(a_t, s_t) = R(text) - V_M(s_t)

    | symbol | argument | shape |
    |---|---|---|
    | R(text_i), one reward per text | ``rewards`` | (B,) |
    | V_M(s_it), the critic's value before token t | ``values`` | (B, T) |
    | the response tokens | ``response_mask`` (0/1) | (B, T) |
    | A_M(a_it, s_it) | returned, 0 outside the mask | (B, T) |

    §4.3 notes that this is GAE with γ = λ = 1 (see ``gae``).
    """
    mask = _check_values_and_mask(values, response_mask)
    check_tensor("rewards", rewards, ndim=1)
    if rewards.shape[0] != values.shape[0]:
        raise ValueError(
            f"rewards: expected shape ({values.shape[0]},), one reward per row of values, got {tuple(rewards.shape)}"
        )
    # Eq. 4: A_M(a_t, s_t) = R(text) - V_M(s_t)
    adv = rewards.to(values.dtype).unsqueeze(1) - values  # (B, T)
    return torch.where(mask != 0, adv, torch.zeros_like(adv))  # (B, T)


def _check_contiguous(mask: Tensor) -> None:
    """Each row's response must be one unbroken run of 1s (prompt before it, padding after it)."""
    starts = (mask[:, 1:] > mask[:, :-1]).sum(dim=1) + (mask[:, 0] > 0).long()  # (B,) number of runs of 1s
    if bool((starts > 1).any()):
        rows = (starts > 1).nonzero().flatten()[:6].tolist()
        raise ValueError(
            f"response_mask: expected one contiguous run of response tokens per row, got gaps in rows {rows}"
        )


def gae(token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, lam: float) -> Tensor:
    """§4.3: the generalized advantage estimator (Schulman et al., 2016) over each response.

        δ_t = r_t + γ·V(s_{t+1}) - V(s_t)
        A_t = δ_t + γ·λ·A_{t+1}          (= Σ_k (γλ)^k δ_{t+k})

    | symbol | argument | shape |
    |---|---|---|
    | r_t, the reward received at token t | ``token_rewards`` | (B, T) |
    | V(s_t), the critic's value before token t | ``values`` | (B, T) |
    | the response tokens (one contiguous run per row) | ``response_mask`` (0/1) | (B, T) |
    | γ, the discount factor | ``gamma`` | in [0, 1] |
    | λ, the crediting (trace) parameter | ``lam`` | in [0, 1] |
    | A_t | returned, 0 outside the mask | (B, T) |

    The recursion runs backwards over the response tokens of each row; after the last response token the
    text is finished, so V(s_{T+1}) = 0 and A_{T+1} = 0 there. Rewards and values outside the mask are ignored.
    The paper does not define GAE; it only says Eq. (4) is GAE with both parameters set to one: put the
    sequence reward R(text) on the last response token (``r_t = 0`` elsewhere), take γ = λ = 1, and the sum
    telescopes to A_t = R(text) - V(s_t).
    """
    mask = _check_values_and_mask(values, response_mask)
    check_tensor("token_rewards", token_rewards, ndim=2)
    check_same_shape("values", values, "token_rewards", token_rewards)
    gamma = check_scalar_between("gamma", gamma, 0.0, 1.0)
    lam = check_scalar_between("lam", lam, 0.0, 1.0)
    _check_contiguous(mask)

    selected = mask != 0  # (B, T)
    zeros = torch.zeros_like(values[:, 0])  # (B,)
    next_value, next_adv = zeros, zeros  # V(s_{t+1}) and A_{t+1}; 0 after the last response token
    reversed_advs = []
    for t in reversed(range(values.shape[1])):
        # GAE: δ_t = r_t + γ·V(s_{t+1}) - V(s_t)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        # GAE: A_t = δ_t + γ·λ·A_{t+1}
        adv_t = torch.where(selected[:, t], delta + gamma * lam * next_adv, zeros)  # (B,)
        # outside the response, reset so that the last response token sees V = 0 and A = 0 after it
        next_value = torch.where(selected[:, t], values[:, t], zeros)  # (B,)
        next_adv = adv_t
        reversed_advs.append(adv_t)
    return torch.stack(reversed_advs[::-1], dim=1)  # (B, T)
