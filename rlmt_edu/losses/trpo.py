"""§4.5 of the paper: TRPO, as a KL penalty (Eq. 9) and as a trust-region constraint (Eq. 10).

Both take ``kl``, the exact per-token D_KL(π0(·|s_t) ‖ π1(·|s_t)) of Eq. (8), which the caller computes from
the two models' logits with ``rlmt_edu.losses.kl.kl_divergence(logits_old.detach(), logits)`` (shape (B, T)).

Constants take no gradient: ``logp_old`` and ``advantages`` are detached inside ``trpo_penalty_loss``. ``kl`` is
passed in already computed, so its gradient is whatever the caller built: detach the old model's logits.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_bool_flag,
    check_choice,
    check_logprob_values,
    check_mask,
    check_non_negative,
    check_not_empty,
    check_positive,
    check_same_shape,
    check_tensor,
    masked_mean,
    masked_sum,
)

Tensor = torch.Tensor

#: per-token KL values below -KL_ATOL are rejected (an exact KL is >= 0; rounding may leave tiny negatives)
KL_ATOL = 1e-5


def _check_kl(kl: object, like_name: str, like: Tensor | None = None) -> Tensor:
    check_tensor("kl", kl, ndim=2)
    check_not_empty("kl", kl)
    if like is not None:
        check_same_shape(like_name, like, "kl", kl)
    if bool((kl < -KL_ATOL).any()):
        raise ValueError(f"kl: expected a non-negative KL divergence per token, got a minimum of {float(kl.min()):.6g}")
    return kl


def trpo_penalty_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    kl: Tensor,
    response_mask: Tensor,
    *,
    beta: float,
    kl_reduction: str = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """Eq. (9): the TRPO loss with a KL penalty.

        TRPO Loss = -(1/S) Σ_i Σ_t π1(a_it|s_it)/π0(a_it|s_it) · A_1(a_it, s_it)
                    + β · D_KL(π0(·|s_t) ‖ π1(·|s_t))

    | symbol | argument | shape |
    |---|---|---|
    | log π1(a_it \\| s_it), the model being trained | ``logp`` | (S, T) |
    | log π0(a_it \\| s_it), the model that sampled | ``logp_old`` (detached) | (S, T) |
    | A_1(a_it, s_it) | ``advantages`` (detached) | (S, T) |
    | D_KL(π0(·\\|s_it) ‖ π1(·\\|s_it)), exact, per token | ``kl`` (from ``kl_divergence``) | (S, T) |
    | the response tokens | ``response_mask`` (0/1) | (S, T) |
    | β, the penalty's scale | ``beta`` | ≥ 0 |
    | the loss | returned | () |

    The paper writes the penalty without indices, outside the sums over i and t, though D_KL depends on s_t.
    We read it as one number for the batch:

    * ``kl_reduction="mean"`` (default): the mean of ``kl`` over all response tokens of all samples, the
      same average that Eq. (10)'s relaxed constraint bounds ("the average value of D_KL over all tokens
      and samples"). The penalty's scale then does not depend on response length.
    * ``kl_reduction="sum"``: the penalty inside the same sums as the surrogate,
      (1/S) Σ_i Σ_t D_KL(π0(·|s_it) ‖ π1(·|s_it)), i.e. -(1/S) Σ_i Σ_t [ratio·A - β·D_KL]: every token's KL
      weighs as much as every token's surrogate term.

    Returns ``(loss, metrics)``: ``"trpo/surrogate"`` (the first term), ``"trpo/kl_penalty"`` (β times the
    reduced KL), ``"trpo/kl_mean"`` and ``"trpo/kl_max"`` over response tokens, and ``"trpo/ratio_mean"``.
    """
    check_choice("kl_reduction", kl_reduction, ("mean", "sum"))
    beta = check_non_negative("beta", beta)
    check_tensor("logp", logp, ndim=2)
    check_not_empty("logp", logp)
    check_logprob_values("logp", logp)
    check_tensor("logp_old", logp_old, ndim=2)
    check_same_shape("logp", logp, "logp_old", logp_old)
    check_logprob_values("logp_old", logp_old)
    check_tensor("advantages", advantages, ndim=2)
    check_same_shape("logp", logp, "advantages", advantages)
    _check_kl(kl, "logp", logp)
    mask = check_mask("response_mask", response_mask, "logp", logp)
    num_samples = logp.shape[0]  # S

    ratio = torch.exp(logp - logp_old.detach())  # (S, T)  π1/π0
    # Eq. 9, first term: -(1/S) Σ_i Σ_t π1(a_it|s_it)/π0(a_it|s_it) · A_1(a_it, s_it)
    surrogate = -masked_sum(ratio * advantages.detach(), mask) / num_samples
    if kl_reduction == "mean":
        # Eq. 9, penalty: β · D_KL(π0 ‖ π1), D_KL averaged over all response tokens
        penalty = beta * masked_mean(kl, mask)
    else:
        # Eq. 9, penalty inside the sums: β · (1/S) Σ_i Σ_t D_KL(π0(·|s_it) ‖ π1(·|s_it))
        penalty = beta * masked_sum(kl, mask) / num_samples
    loss = surrogate + penalty

    with torch.no_grad():
        metrics = {
            "trpo/surrogate": float(surrogate),
            "trpo/kl_penalty": float(penalty),
            "trpo/kl_mean": float(masked_mean(kl, mask)),
            "trpo/kl_max": float(kl[mask != 0].max()),
            "trpo/ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, metrics


def trpo_constraint_satisfied(kl: Tensor, response_mask: Tensor, *, delta: float, per_token: bool = False) -> bool:
    """Eq. (10): is the new model inside the trust region?

        subject to: D_KL(π0(·|s_it) ‖ π1(·|s_it)) ≤ δ   ∀ i, t

    | symbol | argument | shape |
    |---|---|---|
    | D_KL(π0(·\\|s_it) ‖ π1(·\\|s_it)), exact, per token | ``kl`` (from ``kl_divergence``) | (S, T) |
    | the response tokens (the i, t that the ∀ ranges over) | ``response_mask`` (0/1) | (S, T) |
    | δ, the trust region's radius | ``delta`` | > 0 |
    | whether the constraint holds | returned | bool |

    ``per_token=False`` (default) checks the relaxation the paper says the TRPO authors use: the mean of
    D_KL over all response tokens of all samples is at most δ. ``per_token=True`` checks Eq. (10) as
    written, every response token's D_KL at most δ (stricter).
    """
    delta = check_positive("delta", delta, allow_inf=True)
    check_bool_flag("per_token", per_token)
    _check_kl(kl, "kl")
    mask = check_mask("response_mask", response_mask, "kl", kl)
    if per_token:
        # Eq. 10: D_KL(π0(·|s_it) ‖ π1(·|s_it)) ≤ δ  ∀ i, t
        return bool((kl[mask != 0] <= delta).all())
    # Eq. 10, relaxed: mean over i, t of D_KL(π0(·|s_it) ‖ π1(·|s_it)) ≤ δ
    return bool(masked_mean(kl, mask) <= delta)
