"""§6.1, §6.1.1 and §8.7 of the paper: GRAPE's confidence-weighted rubric reward and its variance lemma.

Rubrics differ by category, so rubric tensors are padded to the largest rubric: shape (S, J) with an
``item_mask`` (S, J) that is 1 where item j exists in sample i's rubric. ρ_i = item_mask[i].sum(). Entries
outside ``item_mask`` are ignored (they must still be finite numbers).

Constants take no gradient: in ``grape_sequence_loss`` only ``logp`` carries one (``logp_old`` and
``advantages`` are detached inside).

Shape legend: S samples (S = QG), J rubric items (padded), T tokens; ρ items of one rubric.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_logprob_values,
    check_mask,
    check_positive,
    check_same_shape,
    check_tensor,
    masked_sum,
)
from rlmt_edu.losses.ppo import _clipped_surrogate, _ratio_metrics

Tensor = torch.Tensor

#: how far a rubric's weights may sum from 1 (float32 rounding of e.g. three weights of 1/3)
WEIGHT_SUM_TOLERANCE = 1e-4


def _check_unit_interval(name: str, x: Tensor, mask: Tensor) -> None:
    """Every entry of ``x`` where ``mask`` is 1 lies in [0, 1]."""
    selected = x[mask != 0]
    if selected.numel() and (bool((selected < 0).any()) or bool((selected > 1).any())):
        raise ValueError(
            f"{name}: expected values in [0, 1] on existing rubric items, got range "
            f"[{float(selected.min()):.4g}, {float(selected.max()):.4g}]"
        )


def mean_rubric_confidence(confidence: Tensor, category: Tensor, item_mask: Tensor) -> Tensor:
    """The mean confidence of each rubric item over the samples of the same category, §6.1.

        φ̄_ij = Σ_{k ∈ ξ(text_i)} φ_kj / |ξ(text_i)|

    where ξ(text_i) is the set of samples whose question is in the same category as text_i (text_i
    included). Every sample of a category gets the same φ̄ row.

    | symbol | argument | shape |
    |---|---|---|
    | φ_kj, the judge's confidence in its score of item j for sample k | ``confidence`` | (S, J) |
    | the category of each sample (defines ξ) | ``category`` | (S,) integer |
    | which items exist in each sample's rubric | ``item_mask`` | (S, J) |
    | φ̄_ij | returned | (S, J), 0 outside ``item_mask`` |

    Samples of one category share one rubric, so their ``item_mask`` rows must be equal. Confidences are
    in [0, 1].
    """
    check_tensor("confidence", confidence, ndim=2)
    if not isinstance(category, Tensor) or category.dtype.is_floating_point or category.dtype.is_complex \
            or category.dtype == torch.bool:
        raise ValueError(f"category: expected an integer tensor of category ids, got {category!r:.80}")
    if category.dim() != 1 or category.shape[0] != confidence.shape[0]:
        raise ValueError(
            f"category: expected shape ({confidence.shape[0]},), one id per sample of confidence, "
            f"got {tuple(category.shape)}"
        )
    mask = check_mask("item_mask", item_mask, "confidence", confidence)  # (S, J)
    _check_unit_interval("confidence", confidence, mask)

    same_category = category[:, None] == category[None, :]  # (S, S) k ∈ ξ(text_i)
    rubric_differs = (mask[:, None, :] != mask[None, :, :]).any(dim=-1)  # (S, S)
    if bool((same_category & rubric_differs).any()):
        i, k = (same_category & rubric_differs).nonzero()[0].tolist()
        raise ValueError(
            f"item_mask: expected samples of one category to share one rubric, got different rows for "
            f"samples {i} and {k} (category {int(category[i])})"
        )

    members = same_category.to(confidence.dtype)  # (S, S)
    present = torch.where(mask != 0, confidence, torch.zeros_like(confidence))  # (S, J)
    # §6.1: φ̄_ij = Σ_{k ∈ ξ(text_i)} φ_kj / |ξ(text_i)|
    return members @ present / members.sum(dim=1, keepdim=True)  # (S, J)


def grape_reward(scores: Tensor, mean_confidence: Tensor, weights: Tensor, item_mask: Tensor) -> Tensor:
    """GRAPE's confidence-weighted rubric reward, Eq. 15 of the paper.

        R(text_i) = ρ_i Σ_{j=1..ρ_i} ω_ij τ_ij φ̄_ij / Σ_{j=1..ρ_i} φ̄_ij

    | symbol | argument | shape |
    |---|---|---|
    | τ_ij, the judge's score of item j for sample i | ``scores`` | (S, J), in [0, 1] |
    | φ̄_ij, from ``mean_rubric_confidence`` | ``mean_confidence`` | (S, J), in [0, 1] |
    | ω_ij, the rubric's item weights | ``weights`` | (S, J), ≥ 0, sum to 1 over the items of a row |
    | which items exist (ρ_i = row sum) | ``item_mask`` | (S, J) |
    | R(text_i) | returned | (S,) |

    Reading the formula: ρ_i·ω_ij·φ̄_ij/Σ_j φ̄_ij is the effective weight of item j. When every φ̄ in a rubric
    is equal, it is ω_ij and R = Σ_j ω_ij τ_ij, the plain weighted rubric score; with uniform weights
    ω_ij = 1/ρ_i it is the confidence-weighted average Σ_j τ_ij φ̄_ij / Σ_j φ̄_ij of Lemma 8.1. With neither,
    the effective weights need not sum to 1 and R can exceed 1 (e.g. ρ = 2, ω = (0.9, 0.1), φ̄ = (1, 0.01),
    τ = (1, 0) gives R ≈ 1.78); we compute Eq. 15 as written. Each rubric needs Σ_j φ̄_ij > 0.
    """
    check_tensor("scores", scores, ndim=2)
    check_tensor("mean_confidence", mean_confidence, ndim=2)
    check_same_shape("scores", scores, "mean_confidence", mean_confidence)
    check_tensor("weights", weights, ndim=2)
    check_same_shape("scores", scores, "weights", weights)
    mask = check_mask("item_mask", item_mask, "scores", scores)  # (S, J)
    _check_unit_interval("scores", scores, mask)
    _check_unit_interval("mean_confidence", mean_confidence, mask)
    if bool((weights[mask != 0] < 0).any()):
        lowest = float(weights[mask != 0].min())
        raise ValueError(f"weights: expected non-negative rubric weights, got minimum {lowest:.4g}")
    weight_sums = masked_sum(weights, mask, dim=1)  # (S,)
    off = (weight_sums - 1).abs() > WEIGHT_SUM_TOLERANCE
    if bool(off.any()):
        rows = off.nonzero().flatten()[:6].tolist()
        raise ValueError(
            f"weights: expected the weights of each rubric to sum to 1, got sums "
            f"{[round(float(weight_sums[r]), 6) for r in rows]} in rows {rows}"
        )
    total_confidence = masked_sum(mean_confidence, mask, dim=1)  # (S,) Σ_j φ̄_ij
    if bool((total_confidence <= 0).any()):
        rows = (total_confidence <= 0).nonzero().flatten()[:6].tolist()
        raise ValueError(f"mean_confidence: expected a positive sum over each rubric's items, got 0 in rows {rows}")

    num_items = mask.sum(dim=1)  # (S,) ρ_i
    weighted_scores = masked_sum(weights * scores * mean_confidence, mask, dim=1)  # (S,) Σ_j ω_ij τ_ij φ̄_ij
    # Eq. 15: R(text_i) = ρ_i Σ_j ω_ij τ_ij φ̄_ij / Σ_j φ̄_ij
    return num_items * weighted_scores / total_confidence


def grape_sequence_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    epsilon: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """The alternative GRAPE loss with clipping at the level of whole samples, Eq. 17 of the paper.

        Alt. GRAPE Loss = -(1/S) Σ_i min[ π1(text_i)/π0(text_i) · A(text_i),
                                          CLIP(π1(text_i)/π0(text_i), 1-ε, 1+ε) · A(text_i) ]

    with the sequence ratio taken in log space: π1(text_i)/π0(text_i) = exp(Σ_t logp_it - Σ_t logp_old_it),
    the sums running over response tokens.

    | symbol | argument | shape |
    |---|---|---|
    | log π1(a_it\\|s_it), the model being updated | ``logp`` | (S, T) |
    | log π0(a_it\\|s_it), the model that sampled | ``logp_old`` | (S, T) |
    | A(text_i), e.g. group-relative on ``grape_reward`` | ``advantages`` | (S,) |
    | response tokens | ``response_mask`` | (S, T) |
    | ε | ``epsilon`` | float > 0 |

    One ratio per sample means one clip decision per sample: a whole response stops contributing once its
    probability has moved by more than ε, whatever its individual tokens did. The paper warns this relaxed
    constraint can raise the chance of collapse. The sequence log-ratio is a sum over tokens and easily
    exceeds what exp() can hold in float32 (about 88); the clipped branch never exponentiates it, so the loss
    and gradient stay finite wherever the clip is active.

    Returns ``(loss, metrics)`` with, over samples: ``"grape/clip_fraction"``, ``"grape/approx_kl"`` (mean
    k3 estimate of the sequence-level KL(π_old‖π)), ``"grape/ratio_mean|min|max"`` (sequence ratios).
    """
    check_tensor("logp", logp, ndim=2)
    check_logprob_values("logp", logp)
    check_tensor("logp_old", logp_old, ndim=2)
    check_same_shape("logp", logp, "logp_old", logp_old)
    check_logprob_values("logp_old", logp_old)
    check_tensor("advantages", advantages, ndim=1)
    if advantages.shape[0] != logp.shape[0]:
        raise ValueError(
            f"advantages: expected {logp.shape[0]} advantages, one per sample of logp, got {advantages.shape[0]}"
        )
    mask = check_mask("response_mask", response_mask, "logp", logp)  # (S, T)
    epsilon = check_positive("epsilon", epsilon, allow_inf=True)

    # log(π1(text_i)/π0(text_i)) = Σ_t (log π1(a_it|s_it) - log π0(a_it|s_it)); π0 is a constant
    seq_log_ratio = masked_sum(logp - logp_old.detach(), mask, dim=1)  # (S,)
    surrogate, clipped = _clipped_surrogate(seq_log_ratio, advantages.detach(), epsilon)  # (S,)
    # Eq. 17: -(1/S) Σ_i min[ratio_i·A_i, CLIP(ratio_i, 1-ε, 1+ε)·A_i]
    loss = -surrogate.mean()
    every_sample = torch.ones_like(seq_log_ratio)  # (S,)
    return loss, _ratio_metrics("grape", seq_log_ratio, clipped, every_sample)


def _check_lemma_inputs(sigma: object, confidence: object) -> tuple[Tensor, Tensor]:
    check_tensor("sigma", sigma, ndim=1)
    if sigma.shape[0] == 0:
        raise ValueError("sigma: expected at least one rubric item, got an empty tensor")
    if bool((sigma < 0).any()):
        raise ValueError(f"sigma: expected standard deviations >= 0, got minimum {float(sigma.min()):.4g}")
    check_tensor("confidence", confidence, ndim=1)
    check_same_shape("sigma", sigma, "confidence", confidence)
    if bool((confidence < 0).any()):
        raise ValueError(f"confidence: expected weights >= 0, got minimum {float(confidence.min()):.4g}")
    if not float(confidence.detach().sum()) > 0:
        raise ValueError("confidence: expected a positive sum, got all zeros")
    return sigma, confidence


def average_variances(sigma: Tensor, confidence: Tensor) -> tuple[Tensor, Tensor]:
    """The two variances compared in Lemma 8.1 (§8.7), for independent scores τ_i with std σ_i.

        plain    = Var((1/ρ) Σ_i τ_i)               = (1/ρ²) Σ_i σ_i²
        weighted = Var(Σ_i τ_i φ̄_i / Σ_i φ̄_i)      = Σ_i φ̄_i² σ_i² / (Σ_i φ̄_i)²

    | symbol | argument | shape |
    |---|---|---|
    | σ_i, std of the score of rubric item i | ``sigma`` | (ρ,) |
    | φ̄_i, the confidence weight of item i | ``confidence`` | (ρ,) |
    | the two variances | returned | two 0-dim tensors |

    The lemma assumes φ̄_i ∝ 1/σ_i² (confidence inversely proportional to variance); then
    weighted = 1/Σ_i(1/σ_i²) ≤ plain, by Cauchy-Schwarz. For other confidences the weighted average can be
    *worse* (e.g. σ = (1, 2), φ̄ = (0.1, 1): weighted ≈ 3.31 > plain = 1.25), which is why §6.1.1 calls the
    result weaker than a general variance reduction. The weighted average is unchanged by scaling φ̄, so
    ``confidence`` need only be non-negative with a positive sum (it need not lie in [0, 1]).
    """
    sigma, confidence = _check_lemma_inputs(sigma, confidence)
    num_items = sigma.shape[0]  # ρ
    # the weighted average does not change when φ̄ is scaled; dividing by the largest φ̄ first keeps φ̄² and
    # (Σ φ̄)² representable for any scale (1e-30 would underflow to 0/0, 1e20 overflow to inf/inf)
    confidence = confidence / confidence.max()
    # Lemma 8.1: Var((1/ρ) Σ τ_i) = (1/ρ²) Σ σ_i²
    plain = (sigma**2).sum() / num_items**2
    # Lemma 8.1: Var(Σ τ_i φ̄_i / Σ φ̄_i) = Σ φ̄_i² σ_i² / (Σ φ̄_i)²
    weighted = (confidence**2 * sigma**2).sum() / confidence.sum() ** 2
    return plain, weighted


def monte_carlo_average_variances(
    sigma: Tensor, confidence: Tensor, *, n_draws: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Lemma 8.1 measured instead of derived: draw τ_i ~ Normal(0, σ_i) independently ``n_draws`` times,
    form both averages per draw, and return their empirical (unbiased, divisor n_draws - 1) variances.

        plain_avg    = (1/ρ) Σ_i τ_i
        weighted_avg = Σ_i τ_i φ̄_i / Σ_i φ̄_i

    | symbol | argument | shape |
    |---|---|---|
    | σ_i | ``sigma`` | (ρ,) |
    | φ̄_i | ``confidence`` | (ρ,) |
    | number of simulated rubric evaluations | ``n_draws`` | int ≥ 2 |
    | the only source of randomness | ``generator`` | ``torch.Generator`` |
    | (Var(plain_avg), Var(weighted_avg)) | returned | two 0-dim tensors |

    They converge to ``average_variances(sigma, confidence)`` as ``n_draws`` grows (relative error about
    sqrt(2 / n_draws)).
    """
    sigma, confidence = _check_lemma_inputs(sigma, confidence)
    if not isinstance(n_draws, int) or isinstance(n_draws, bool) or n_draws < 2:
        raise ValueError(f"n_draws: expected an int >= 2, got {n_draws!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")

    noise = torch.randn((n_draws, sigma.shape[0]), generator=generator, dtype=sigma.dtype, device=sigma.device)
    tau = sigma * noise  # (n_draws, ρ) τ_i ~ Normal(0, σ_i)
    confidence = confidence / confidence.max()  # scale-free, as in average_variances
    plain_avg = tau.mean(dim=1)  # (n_draws,) (1/ρ) Σ τ_i
    weighted_avg = (tau * confidence).sum(dim=1) / confidence.sum()  # (n_draws,) Σ τ_i φ̄_i / Σ φ̄_i
    return plain_avg.var(correction=1), weighted_avg.var(correction=1)
