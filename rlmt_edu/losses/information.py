"""§8.2-8.3 of the paper: entropy and cross entropy of distributions over the last dimension.

Inputs are probability tensors (..., V) whose last dimension sums to 1, or, with ``inputs="logits"``,
unnormalised scores that go through a (log-)softmax. Logarithms are natural (nats), as in the paper's
-log(1/2) = 0.69. KL divergence (§8.4) is ``rlmt_edu.losses.kl.kl_divergence``; the identity
D_KL(p‖q) = cross_entropy(p, q) - entropy(p) is tested.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import check_choice, check_not_empty, check_prob_simplex, check_same_shape, check_tensor

Tensor = torch.Tensor

#: how far a distribution's sum may be from 1
PROB_SUM_ATOL = 1e-4


def _check_distribution(name: str, x: object, inputs: str) -> Tensor:
    check_tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a distribution over the last dimension (..., V), got a 0-dim tensor")
    check_not_empty(name, x)
    if inputs == "probs":
        check_prob_simplex(name, x, atol=PROB_SUM_ATOL)
    return x


def entropy(p: Tensor, *, inputs: str = "probs") -> Tensor:
    """§8.2: the entropy of a distribution, the expected NLL of its own samples.

        Entropy = -Σ_x p(x) · log p(x)

    | symbol | argument | shape |
    |---|---|---|
    | p(x) | ``p`` (probabilities; logits with ``inputs="logits"``) | (..., V) |
    | the sum over x | the last dimension, V | |
    | the entropy in nats | returned | (...) |

    0 · log 0 is taken as 0 (``torch.xlogy``), so a one-hot distribution has entropy exactly 0. The entropy
    lies in [0, log V]. The derivative of -p log p is infinite at p = 0, so an exact zero in ``p`` gives a
    non-finite gradient there; probabilities as small as 1e-12 are fine, and the logits path has no such point.
    """
    check_choice("inputs", inputs, ("probs", "logits"))
    _check_distribution("p", p, inputs)
    if inputs == "logits":
        log_p = torch.log_softmax(p, dim=-1)  # (..., V)
        # §8.2: Entropy = -Σ_x p(x) log p(x)
        return -(log_p.exp() * log_p).sum(dim=-1)  # (...)
    # §8.2: Entropy = -Σ_x p(x) log p(x), with 0·log 0 = 0
    return -torch.xlogy(p, p).sum(dim=-1)  # (...)


def cross_entropy(p: Tensor, q: Tensor, *, inputs: str = "probs") -> Tensor:
    """§8.3: the cross entropy of q relative to p, the expected NLL under q of samples drawn from p.

        Cross entropy = -Σ_x p(x) · log q(x)

    | symbol | argument | shape |
    |---|---|---|
    | p(x), the true distribution | ``p`` (probabilities; logits with ``inputs="logits"``) | (..., V) |
    | q(x), the model's distribution | ``q`` (same kind as ``p``) | (..., V) |
    | the sum over x | the last dimension, V | |
    | the cross entropy in nats | returned | (...) |

    0 · log q(x) is taken as 0 where p(x) = 0, even when q(x) = 0. Where p(x) > 0 and q(x) = 0 the cross
    entropy is +inf, as it should be (q calls an event that happens impossible). It is never below
    ``entropy(p)``; the gap is D_KL(p‖q). With a one-hot p at the observed token it is that token's NLL under
    q, which is why the NLL loss of Eq. (1) is called "cross entropy loss".
    """
    check_choice("inputs", inputs, ("probs", "logits"))
    _check_distribution("p", p, inputs)
    _check_distribution("q", q, inputs)
    check_same_shape("p", p, "q", q)
    if inputs == "logits":
        # §8.3: Cross entropy = -Σ_x p(x) log q(x)
        return -(torch.softmax(p, dim=-1) * torch.log_softmax(q, dim=-1)).sum(dim=-1)  # (...)
    # where p(x) = q(x) = 0 use q = 1 inside the log: same value (0), and a zero gradient instead of 0/0 = NaN
    q_safe = torch.where((p == 0) & (q == 0), torch.ones_like(q), q)  # (..., V)
    # §8.3: Cross entropy = -Σ_x p(x) log q(x), with 0·log q = 0
    return -torch.xlogy(p, q_safe).sum(dim=-1)  # (...)
