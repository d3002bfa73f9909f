"""§4.5 and §8.4 of the paper: the KL divergence, exact over the vocabulary (Eq. 8) and estimated per token.

``kl_divergence(p, q)`` is D_KL(p‖q) = Σ_a p(a) log(p(a)/q(a)): the first argument is the distribution the
expectation is taken under. KL is not symmetric, so the direction is the argument order: Eq. (8)'s
D_KL(π0‖π1) is ``kl_divergence(logits_old, logits)``, its reverse D_KL(π1‖π0) is ``kl_divergence(logits,
logits_old)``.

The per-token estimators use only the log-probabilities of the tokens that were actually sampled, as the
KL-in-the-reward of §4.7 (Eq. 12) does. For tokens sampled from π, both estimate D_KL(π‖π_ref):
k1 = log π(a) - log π_ref(a) is unbiased but is negative for some tokens; k3 = (r - 1) - log r with
r = π_ref(a)/π(a) is also unbiased (E_π[r] = 1) and never negative; k2 = ½ (log r)² is never negative and
biased, but its gradient as a loss is the gradient of D_KL(π‖π_ref). k1 is the paper's (§4.7, Eq. 12);
k2 and k3 are beyond the paper, the estimators RLHF code uses (chapter 06 measures all three).

Gradients: ``kl_divergence`` lets gradient flow into both arguments (fitting either direction of KL is the
point of chapter 06; detach the one you hold fixed, e.g. ``kl_divergence(logits_old.detach(), logits)`` for
TRPO). In the per-token estimators the reference is a constant: ``logp_ref`` is detached inside.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_choice,
    check_logprob_values,
    check_not_empty,
    check_same_shape,
    check_tensor,
)

Tensor = torch.Tensor

#: how far logsumexp of a row of log-probabilities may be from 0 (i.e. its probabilities' sum from 1)
LOGPROB_NORMALISATION_ATOL = 1e-4


def _log_distribution(name: str, x: Tensor, inputs: str) -> Tensor:
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a distribution over the last dimension (..., V), got a 0-dim tensor")
    check_not_empty(name, x)
    if inputs == "logprobs":
        check_logprob_values(name, x)
        total = torch.logsumexp(x, dim=-1)  # (...)
        if not bool((total.abs() <= LOGPROB_NORMALISATION_ATOL).all()):
            worst = float(total.flatten()[total.abs().flatten().argmax()])
            raise ValueError(
                f"{name}: expected normalised log-probabilities (logsumexp over the last dimension = 0), "
                f"got a logsumexp of {worst:.6g}; pass inputs='logits' for unnormalised scores"
            )
    # log_softmax is exact for logits and a no-op (up to rounding) for log-probabilities
    return torch.log_softmax(x, dim=-1)  # (..., V)


def kl_divergence(p: Tensor, q: Tensor, *, inputs: str = "logits") -> Tensor:
    """Eq. (8): the exact KL divergence between two next-token distributions, summed over the vocabulary.

        D_KL(π0(·|s_t) ‖ π1(·|s_t)) = Σ_{a_t} π0(a_t|s_t) · log(π0(a_t|s_t) / π1(a_t|s_t))

    | symbol | argument | shape |
    |---|---|---|
    | π0(·\\|s_t), the distribution the expectation is taken under | ``p`` | (..., V) |
    | π1(·\\|s_t) | ``q`` | (..., V), same as ``p`` |
    | the sum over a_t | the last dimension, V | |
    | D_KL(π0 ‖ π1) per position | returned | (...) |

    ``inputs="logits"`` (default): ``p`` and ``q`` are unnormalised scores, e.g. a model's output for
    (B, T, V). ``inputs="logprobs"``: they are log-probabilities, checked to be normalised. Either way they
    go through ``log_softmax``, and the sum is Σ exp(log p)·(log p - log q): no division, no log of a
    probability that underflowed, so logits of ±1e4 give a finite value and gradient. Zero-probability
    entries (-inf) are not accepted; use a large negative finite number.

    The result is ≥ 0 mathematically; rounding can leave values of order -1e-7 (float32) when p ≈ q.
    """
    check_choice("inputs", inputs, ("logits", "logprobs"))
    check_tensor("p", p)
    check_tensor("q", q)
    check_same_shape("p", p, "q", q)
    log_p = _log_distribution("p", p, inputs)  # (..., V)
    log_q = _log_distribution("q", q, inputs)  # (..., V)
    # Eq. 8: D_KL(π0 ‖ π1) = Σ_a π0(a) · log(π0(a) / π1(a))
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (...)


def _check_token_logps(logp: Tensor, logp_ref: Tensor) -> None:
    check_tensor("logp", logp)
    check_logprob_values("logp", logp)
    check_tensor("logp_ref", logp_ref)
    check_same_shape("logp", logp, "logp_ref", logp_ref)
    check_logprob_values("logp_ref", logp_ref)


def kl_estimator_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """§8.4 / Eq. (12): the single-sample log-ratio estimate of D_KL(π ‖ π_ref), token by token.

        k1 = log π(a_t|s_t) - log π_ref(a_t|s_t)

    | symbol | argument | shape |
    |---|---|---|
    | log π(a_t \\| s_t), the model that sampled a_t | ``logp`` | any, e.g. (B, T) |
    | log π_ref(a_t \\| s_t), the reference | ``logp_ref`` | same as ``logp`` |
    | k1 per token | returned | same as ``logp`` |

    This is the log term that Eq. (12) subtracts (times β) from the reward. Averaged over tokens sampled from
    π it is an unbiased estimate of D_KL(π‖π_ref) = E_π[log π - log π_ref]; a single value is negative
    whenever π_ref gives the sampled token more probability than π does.
    """
    _check_token_logps(logp, logp_ref)
    # §8.4 / Eq. 12: k1 = log(π(a_t|s_t) / π_ref(a_t|s_t))
    return logp - logp_ref.detach()


def kl_estimator_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Beyond the paper: the squared-log-ratio estimate of D_KL(π ‖ π_ref), token by token.

        k2 = ½ (log r)²,   r = π_ref(a_t|s_t) / π(a_t|s_t)

    | symbol | argument | shape |
    |---|---|---|
    | log π(a_t \\| s_t), the model that sampled a_t | ``logp`` | any, e.g. (B, T) |
    | log π_ref(a_t \\| s_t), the reference | ``logp_ref`` | same as ``logp`` |
    | k2 per token | returned | same as ``logp`` |

    Never negative and biased: E_π[k2] ≈ D_KL(π‖π_ref) only while π and π_ref are close (it agrees to second
    order in log r). Used as a loss on tokens sampled from π, its gradient is (log π - log π_ref)·∇log π,
    whose expectation is exactly ∇ D_KL(π‖π_ref): the estimator to differentiate, not the one to report.
    """
    _check_token_logps(logp, logp_ref)
    log_r = logp_ref.detach() - logp  # log r = log π_ref - log π; the reference is a constant
    # k2 = ½ (log r)²
    return 0.5 * log_r**2


def kl_estimator_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Beyond the paper (the §8.4 KL, estimated): a never-negative, unbiased single-sample estimate of D_KL(π ‖ π_ref), token by token.

        k3 = (r - 1) - log r,   r = π_ref(a_t|s_t) / π(a_t|s_t)

    | symbol | argument | shape |
    |---|---|---|
    | log π(a_t \\| s_t), the model that sampled a_t | ``logp`` | any, e.g. (B, T) |
    | log π_ref(a_t \\| s_t), the reference | ``logp_ref`` | same as ``logp`` |
    | k3 per token | returned | same as ``logp`` |

    Unbiased because E_π[r - 1] = Σ_a π_ref(a) - 1 = 0, so E_π[k3] = E_π[-log r] = D_KL(π‖π_ref); never
    negative because x - 1 ≥ log x. (Not in the paper; it is the estimator most RLHF code uses.) As a loss its
    gradient, (1 - r)·∇log π, has expectation ∇ D_KL(π_ref‖π): the *other* direction (chapter 06).

    Computed as expm1(log r) - log r with log r = logp_ref - logp, never as (exp(log r) - 1) - log r: for
    |log r| below ~1e-4 in float32, exp(log r) - 1 keeps few correct digits and the difference can come out
    negative, while expm1 keeps full relative precision.
    """
    _check_token_logps(logp, logp_ref)
    log_r = logp_ref.detach() - logp  # log r = log π_ref - log π; the reference is a constant
    # §8.4: k3 = (r - 1) - log r, with r - 1 = expm1(log r)
    return torch.expm1(log_r) - log_r
