"""§4.6–4.7 of the paper: the PPO clipped loss (Eq. 11) and the KL penalty moved into the reward (Eq. 12, A').

The clipped term min[ratio·A, CLIP(ratio, 1-ε, 1+ε)·A] is written once here (``_clipped_surrogate``) and reused
by GRPO (Eq. 14, token level) and GRAPE (Eq. 17, sequence level).

Constants take no gradient: in ``ppo_clip_loss`` only ``logp``, the model being trained, carries one;
``logp_old`` and ``advantages`` are detached inside, so calling ``ppo_clip_loss(logp, logp, A, mask)`` on the
first, on-policy step (no ``.detach()``) gives the gradient A·∇log π it should, not zero.

Shape legend: B batch, Q questions, G group size, T tokens, V vocabulary.
"""

from __future__ import annotations

import math

import torch

from rlmt_edu.losses._checks import (
    check_choice,
    check_logprob_values,
    check_mask,
    check_non_negative,
    check_positive,
    check_same_shape,
    check_tensor,
    masked_mean,
    masked_sum,
)

Tensor = torch.Tensor


def _clipped_surrogate(log_ratio: Tensor, advantages: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """The summand of Eq. 11, 14 and 17, elementwise: min[ratio·A, CLIP(ratio, 1-ε, 1+ε)·A] with
    ratio = exp(log_ratio). Also returns where the clipped branch is the one the min keeps.

    Which branch wins depends on the sign of A:
      A ≥ 0:  min[ratio·A, CLIP(ratio)·A] = min(ratio, 1+ε)·A   (the lower bound 1-ε never matters)
      A < 0:  min[ratio·A, CLIP(ratio)·A] = max(ratio, 1-ε)·A   (the upper bound 1+ε never matters)
    We compute this exact rewrite, clipping the log-ratio before exponentiating. The value and the gradient
    are those of the literal formula, but a ratio so large that exp() overflows in the branch the min
    throws away (possible for Eq. 17, whose log-ratio is a sum over tokens) cannot turn the gradient into
    NaN (0·inf). Where the clip is active the capped log-ratio is a constant, so its gradient is exactly 0:
    the "no incentive to move further" of §4.6.
    """
    log_upper = math.log1p(epsilon)  # log(1+ε)
    log_lower = math.log1p(-epsilon) if epsilon < 1 else -math.inf  # log(1-ε); no lower bound once 1-ε ≤ 0
    positive = advantages >= 0
    capped_log_ratio = torch.where(
        positive, log_ratio.clamp(max=log_upper), log_ratio.clamp(min=log_lower)
    )
    # min[ratio·A, CLIP(ratio, 1-ε, 1+ε)·A]  (Eq. 11 summand)
    surrogate = torch.exp(capped_log_ratio) * advantages
    clipped = torch.where(positive, log_ratio > log_upper, log_ratio < log_lower) & (advantages != 0)
    return surrogate, clipped


def _ratio_metrics(prefix: str, log_ratio: Tensor, clipped: Tensor, mask: Tensor) -> dict[str, float]:
    """Diagnostics over the selected entries: clip fraction, k3 estimate of KL(π_old‖π), ratio statistics."""
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        ratio = torch.exp(log_ratio)
        # k3 = (r - 1) - log r with r = π/π_old: unbiased for KL(π_old‖π) on tokens sampled from π_old, ≥ 0
        k3 = torch.expm1(log_ratio) - log_ratio
        selected = ratio[mask != 0]
        return {
            f"{prefix}/clip_fraction": float(masked_mean(clipped.to(mask.dtype), mask)),
            f"{prefix}/approx_kl": float(masked_mean(k3, mask)),
            f"{prefix}/ratio_mean": float(selected.mean()),
            f"{prefix}/ratio_min": float(selected.min()),
            f"{prefix}/ratio_max": float(selected.max()),
        }


def ppo_clip_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    epsilon: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped loss, Eq. 11 of the paper.

        PPO Loss = -(1/S) Σ_i Σ_t min[ π1(a_it|s_it)/π0(a_it|s_it) · A_1(a_it, s_it),
                                      CLIP(π1(a_it|s_it)/π0(a_it|s_it), 1-ε, 1+ε) · A_1(a_it, s_it) ]

    with CLIP(v, x, y) = min(max(v, x), y). The ratio is computed in log space, exp(logp - logp_old).

    | symbol | argument | shape |
    |---|---|---|
    | log π1(a_it\\|s_it), the model being updated | ``logp`` | (B, T) |
    | log π0(a_it\\|s_it), the model that sampled (M_k, "old") | ``logp_old`` | (B, T) |
    | A_1(a_it, s_it) | ``advantages`` | (B, T) |
    | t in the sum (response tokens only, §4.1 note) | ``response_mask`` | (B, T) |
    | ε | ``epsilon`` | float > 0 (inf: no clipping, Eq. 7) |
    | S | B, the number of samples | |

    The sums stay sums: tokens are summed within a sample and the total is divided by S = B (not by the
    number of tokens). Returns ``(loss, metrics)``:

    - ``"ppo/clip_fraction"``: share of response tokens where the clipped branch is the one the min keeps
      (A > 0 and ratio > 1+ε, or A < 0 and ratio < 1-ε), i.e. where the gradient is exactly zero;
    - ``"ppo/approx_kl"``: mean over response tokens of the k3 estimator (r - 1) - log r, r = π1/π0, an
      unbiased, never-negative estimate of KL(π0‖π1) = KL(π_old‖π) on tokens sampled from π_old;
    - ``"ppo/ratio_mean"``, ``"ppo/ratio_min"``, ``"ppo/ratio_max"`` over response tokens.
    """
    check_tensor("logp", logp, ndim=2)
    check_logprob_values("logp", logp)
    check_tensor("logp_old", logp_old, ndim=2)
    check_same_shape("logp", logp, "logp_old", logp_old)
    check_logprob_values("logp_old", logp_old)
    check_tensor("advantages", advantages, ndim=2)
    check_same_shape("logp", logp, "advantages", advantages)
    mask = check_mask("response_mask", response_mask, "logp", logp)
    epsilon = check_positive("epsilon", epsilon, allow_inf=True)

    log_ratio = logp - logp_old.detach()  # (B, T) log(π1/π0); π0 is a constant
    surrogate, clipped = _clipped_surrogate(log_ratio, advantages.detach(), epsilon)  # (B, T)
    num_samples = logp.shape[0]  # S
    # Eq. 11: -(1/S) Σ_i Σ_t min[ratio·A, CLIP(ratio, 1-ε, 1+ε)·A]
    loss = -masked_sum(surrogate, mask) / num_samples
    return loss, _ratio_metrics("ppo", log_ratio, clipped, mask)


def kl_shaped_rewards(
    rewards: Tensor,
    logp: Tensor,
    logp_ref: Tensor,
    response_mask: Tensor,
    *,
    beta: float,
    reward_at: str = "every_token",
) -> Tensor:
    """The per-token reward with the KL penalty inside it, Eq. 12 of the paper.

        R'(a_t, s_t, M0, M1) = R(a_t, s_t) - β · log( π1(a_t|s_t) / π0(a_t|s_t) )

    π1 is the model being trained (in practice the policy that sampled the tokens) and π0 the original SFT
    model, which stays in the denominator for the whole run to keep the optimisation tethered (§4.7, last
    paragraph). The log term is the single-sample (k1) estimate of KL(π1‖π0); summed over tokens sampled
    from π1 it estimates that KL.

    | symbol | argument | shape |
    |---|---|---|
    | R(text_i), the sequence reward | ``rewards`` | (B,) |
    | log π1(a_t\\|s_t) | ``logp`` | (B, T) |
    | log π0(a_t\\|s_t), the reference (SFT) model | ``logp_ref`` | (B, T) |
    | response tokens | ``response_mask`` | (B, T) |
    | β | ``beta`` | float ≥ 0 |
    | R'(a_t, s_t) | returned | (B, T) |

    Where does the sequence reward go? ``reward_at="every_token"`` (default) follows §4.7: "setting a
    token-level reward for each token R(a_t, s_t) = R(s_t)", so every response token carries R.
    ``reward_at="last_token"`` puts R only on the last response token (the usual InstructGPT practice; pair
    it with a return/GAE estimate rather than R' - V). Both subtract β·log(π1/π0) on every response token.
    The result is 0 outside ``response_mask``. Nothing is detached here: R' becomes a constant where a
    loss consumes it (``ppo_clip_loss`` detaches its ``advantages``).
    """
    check_tensor("rewards", rewards, ndim=1)
    check_tensor("logp", logp, ndim=2)
    check_logprob_values("logp", logp)
    if rewards.shape[0] != logp.shape[0]:
        raise ValueError(f"rewards: expected {logp.shape[0]} rewards, one per sample of logp, got {rewards.shape[0]}")
    check_tensor("logp_ref", logp_ref, ndim=2)
    check_same_shape("logp", logp, "logp_ref", logp_ref)
    check_logprob_values("logp_ref", logp_ref)
    mask = check_mask("response_mask", response_mask, "logp", logp)
    beta = check_non_negative("beta", beta)
    check_choice("reward_at", reward_at, ("every_token", "last_token"))

    if reward_at == "every_token":
        token_rewards = rewards[:, None].expand_as(logp)  # (B, T) R(a_t, s_t) = R(s_t)
    else:
        # the last response token is the one where the running count of mask tokens reaches its total
        count = mask.cumsum(dim=-1)  # (B, T)
        is_last = (mask != 0) & (count == count[:, -1:])  # (B, T)
        token_rewards = rewards[:, None] * is_last.to(logp.dtype)  # (B, T)
    # Eq. 12: R' = R - β·log(π1(a_t|s_t) / π0(a_t|s_t))
    shaped = token_rewards - beta * (logp - logp_ref)  # (B, T)
    return torch.where(mask != 0, shaped, torch.zeros_like(shaped))


def kl_shaped_advantage(shaped_rewards: Tensor, values: Tensor, response_mask: Tensor) -> Tensor:
    """The advantage on the KL-shaped reward, §4.7 (Eq. 4 with R replaced by R' of Eq. 12).

        A'_M(a_t, s_t, M0, M1) = R'(a_t, s_t, M0, M1) - V_M(s_t)

    | symbol | argument | shape |
    |---|---|---|
    | R'(a_t, s_t), from ``kl_shaped_rewards`` | ``shaped_rewards`` | (B, T) |
    | V_M(s_t), the critic | ``values`` | (B, T) |
    | response tokens | ``response_mask`` | (B, T) |
    | A'_M(a_t, s_t) | returned | (B, T) |

    Zero outside ``response_mask``. Because A' is linear in R', the -β·log(π1/π0) term passes through
    unchanged: A' = (R - V) - β·log(π1/π0), which is how the penalty reaches the loss (§4.7).
    """
    check_tensor("shaped_rewards", shaped_rewards, ndim=2)
    check_tensor("values", values, ndim=2)
    check_same_shape("shaped_rewards", shaped_rewards, "values", values)
    mask = check_mask("response_mask", response_mask, "shaped_rewards", shaped_rewards)

    # §4.7: A' = R' - V
    advantages = shaped_rewards - values  # (B, T)
    return torch.where(mask != 0, advantages, torch.zeros_like(advantages))
