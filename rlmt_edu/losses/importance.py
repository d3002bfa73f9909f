"""§8.5 and §4.5 of the paper: importance sampling, Eq. (18), and the importance-weighted policy loss, Eq. (7).

Samples drawn from one distribution (Q, or the old model π0) are reweighted by P/Q (or π1/π0) to estimate
an average under another. Ratios of token probabilities are always formed in log space,
exp(log π1 - log π0), as the paper's footnote 2 recommends.

Constants take no gradient: in ``importance_weighted_loss`` only ``logp`` carries one (``logp_old`` and
``advantages`` are detached inside).
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_choice,
    check_logprob_values,
    check_mask,
    check_not_empty,
    check_prob_values,
    check_same_shape,
    check_tensor,
    masked_mean,
    masked_sum,
)

Tensor = torch.Tensor


def importance_sampling_estimate(
    values: Tensor, target_prob: Tensor, sampling_prob: Tensor, *, inputs: str = "probs"
) -> Tensor:
    """Eq. (18): estimate an average under P from N samples drawn from Q.

        Estimate = (1/N) Σ_i P(x_i)/Q(x_i) · x_i

    | symbol | argument | shape |
    |---|---|---|
    | x_i, the observed sample values | ``values`` | (N,) |
    | P(x_i), the probability under the distribution of interest | ``target_prob`` | (N,) |
    | Q(x_i), the probability under the distribution that was sampled | ``sampling_prob`` | (N,) |
    | N | ``values.shape[0]`` | |
    | the estimate | returned | () |

    With ``inputs="probs"`` (default) the probabilities are given as such: P in [0, 1], Q in (0, 1] (a value
    that was sampled had a positive chance of being sampled). With ``inputs="logprobs"`` the two arguments are
    log P(x_i) and log Q(x_i) and the ratio is formed in log space, exp(log P - log Q), which stays exact
    when P and Q are both tiny (e.g. probabilities of whole texts).

    The basketball example of §8.5 is the case where P and Q are class probabilities: P(pro) = 0.05, P(other)
    = 0.95, and with 200 pros and 100 others sampled, Q(pro) = 2/3, Q(other) = 1/3. (The paper then speaks of
    "those 100 pro-player samples"; the setup and the formulas have 200 pros and 100 others.)
    """
    check_choice("inputs", inputs, ("probs", "logprobs"))
    check_tensor("values", values, ndim=1)
    check_not_empty("values", values)
    check_tensor("target_prob", target_prob, ndim=1)
    check_tensor("sampling_prob", sampling_prob, ndim=1)
    check_same_shape("values", values, "target_prob", target_prob)
    check_same_shape("values", values, "sampling_prob", sampling_prob)
    if inputs == "logprobs":
        check_logprob_values("target_prob", target_prob)
        check_logprob_values("sampling_prob", sampling_prob)
        weight = torch.exp(target_prob - sampling_prob)  # (N,)  P(x_i)/Q(x_i), in log space
    else:
        check_prob_values("target_prob", target_prob)
        check_prob_values("sampling_prob", sampling_prob, allow_zero=False)
        weight = target_prob / sampling_prob  # (N,)  P(x_i)/Q(x_i)
    # Eq. 18: Estimate = (1/N) Σ_i P(x_i)/Q(x_i) · x_i
    return (weight * values).sum() / values.shape[0]


def importance_weighted_loss(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, response_mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Eq. (7): the REINFORCE loss with importance weights, for texts sampled from the old model M0.

        Loss = -(1/S) Σ_i Σ_t π1(a_it | s_it) / π0(a_it | s_it) · A_1(a_it, s_it)

    | symbol | argument | shape |
    |---|---|---|
    | log π1(a_it \\| s_it), the model being trained | ``logp`` | (S, T) |
    | log π0(a_it \\| s_it), the model that sampled the texts | ``logp_old`` (detached) | (S, T) |
    | A_1(a_it, s_it) | ``advantages`` (detached) | (S, T) |
    | the response tokens | ``response_mask`` (0/1) | (S, T) |
    | the loss | returned | () |

    The ratio is exp(logp - logp_old). Its gradient is ratio · ∇log π1, so at π1 = π0 the gradient equals the
    gradient of Eq. (3) (with A = R - V).

    Returns ``(loss, metrics)``: ``"importance/ratio_mean"``, ``"importance/ratio_min"``,
    ``"importance/ratio_max"`` over response tokens, and ``"importance/approx_kl"`` = mean over response
    tokens of (logp_old - logp), the single-sample (k1) estimate of KL(π0‖π1), unbiased because the tokens were
    sampled from π0.
    """
    check_tensor("logp", logp, ndim=2)
    check_not_empty("logp", logp)
    check_logprob_values("logp", logp)
    check_tensor("logp_old", logp_old, ndim=2)
    check_same_shape("logp", logp, "logp_old", logp_old)
    check_logprob_values("logp_old", logp_old)
    check_tensor("advantages", advantages, ndim=2)
    check_same_shape("logp", logp, "advantages", advantages)
    mask = check_mask("response_mask", response_mask, "logp", logp)

    log_ratio = logp - logp_old.detach()  # (S, T)
    ratio = torch.exp(log_ratio)  # (S, T)  π1/π0
    # Eq. 7: Loss = -(1/S) Σ_i Σ_t π1(a_it|s_it)/π0(a_it|s_it) · A_1(a_it, s_it)
    loss = -masked_sum(ratio * advantages.detach(), mask) / logp.shape[0]

    with torch.no_grad():
        selected = ratio[mask != 0]
        metrics = {
            "importance/ratio_mean": float(selected.mean()),
            "importance/ratio_min": float(selected.min()),
            "importance/ratio_max": float(selected.max()),
            "importance/approx_kl": float(masked_mean(-log_ratio, mask)),
        }
    return loss, metrics
