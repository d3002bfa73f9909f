"""§3 and §4.4 of the paper: learning from pairs that a human compared.

A *preference model* (§3) reads two texts and outputs P(text_i), the probability that a human prefers the
first; a *reward model* (§4.4) scores one text at a time, and the probability is built from two scores. Both
are trained with the same binary cross entropy.

Pairs are 1-D tensors of shape (N,), one entry per compared pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlmt_edu.losses._checks import (
    check_choice,
    check_not_empty,
    check_prob_values,
    check_same_shape,
    check_tensor,
)

Tensor = torch.Tensor


def _check_pairs(name: str, x: object) -> Tensor:
    check_tensor(name, x, ndim=1)
    return check_not_empty(name, x)


def _check_hp(hp: object, like_name: str, like: Tensor) -> Tensor:
    """hp, the recorded human preference: 1 where text_i won, 0 where text_j won (bool or numeric)."""
    if not isinstance(hp, Tensor):
        raise ValueError(f"hp: expected a tensor of 0/1 labels, got {type(hp).__name__} {hp!r:.60}")
    check_same_shape(like_name, like, "hp", hp)
    if hp.dtype != torch.bool:
        if torch.is_floating_point(hp) and not bool(torch.isfinite(hp).all()):
            raise ValueError("hp: expected only 0 and 1, got NaN or inf")
        if not bool(((hp == 0) | (hp == 1)).all()):
            raise ValueError(f"hp: expected only 0 and 1, got values {hp.unique()[:6].tolist()}")
    return hp != 0  # (N,) bool: True where text_i is the preferred text


def preference_bce_loss(prob_i: Tensor, hp: Tensor, *, inputs: str = "probs") -> Tensor:
    """§3: the preference model's binary cross entropy, averaged over pairs.

        Loss = - hp · log P(text_i) - (1 - hp) · log(1 - P(text_i))

    | symbol | argument | shape |
    |---|---|---|
    | P(text_i), the model's probability that text_i is preferred | ``prob_i`` | (N,) |
    | hp, 1 if the human preferred text_i and 0 if text_j | ``hp`` (0/1 or bool) | (N,) |
    | the loss averaged over the N pairs | returned | () |

    With ``inputs="probs"`` (default) ``prob_i`` holds probabilities in [0, 1]. Since hp is 0 or 1, only one
    of the two terms is active, so the loss is -log of the probability given to the preferred text
    (the paper's "Loss = -log P(text_w)"); a probability of exactly 0 on the preferred text gives +inf.

    With ``inputs="logits"`` ``prob_i`` holds the logit z of P(text_i) = σ(z), and the loss is computed as
    -hp·logσ(z) - (1-hp)·logσ(-z): finite for any finite z, and exact where P is within 1e-8 of 0 or 1 (a
    float32 probability cannot even represent 1 - 1e-9). Prefer it when the model ends in a sigmoid.
    """
    check_choice("inputs", inputs, ("probs", "logits"))
    _check_pairs("prob_i", prob_i)
    if inputs == "probs":
        check_prob_values("prob_i", prob_i)
    preferred = _check_hp(hp, "prob_i", prob_i)  # (N,) bool
    if inputs == "logits":
        # §3: -hp·log P(text_i) - (1-hp)·log(1 - P(text_i)), with P = σ(z) and 1 - P = σ(-z)
        log_p_preferred = torch.where(preferred, F.logsigmoid(prob_i), F.logsigmoid(-prob_i))  # (N,)
    else:
        # §3: -hp·log P(text_i) - (1-hp)·log(1 - P(text_i)); hp ∈ {0, 1} picks one term.
        # (Pick the probability first, then take one log, so the unused branch's log 0 never meets a 0 weight.)
        log_p_preferred = torch.log(torch.where(preferred, prob_i, 1 - prob_i))  # (N,)
    return -log_p_preferred.mean()


def preference_probability(reward_i: Tensor, reward_j: Tensor, *, form: str = "sigmoid") -> Tensor:
    """§4.4: the probability that text_i is preferred over text_j, built from their two rewards.

        softmax form: P(text_i) = exp(R(text_i)) / (exp(R(text_i)) + exp(R(text_j)))
        sigmoid form: P(text_i) = 1 / (1 + exp(-(R(text_i) - R(text_j))))

    | symbol | argument | shape |
    |---|---|---|
    | R(text_i) | ``reward_i`` | (...) |
    | R(text_j) | ``reward_j`` | same as ``reward_i`` |
    | P(text_i) | returned | same as ``reward_i`` |

    The two forms are the same function (divide the softmax's numerator and denominator by exp(R(text_i)));
    both are offered so the identity can be checked. Both are computed stably (``torch.softmax`` subtracts the
    maximum; ``torch.sigmoid`` saturates), so rewards of ±1e4 give 0 or 1, never NaN.

    A slip in the paper: the sigmoid form is motivated by "the difference of the reward function i.e.
    exp(R(text_i)) - exp(R(text_j))", but the formula that follows uses R(text_i) - R(text_j), which is what
    this function (and everyone) computes.
    """
    check_choice("form", form, ("sigmoid", "softmax"))
    check_tensor("reward_i", reward_i)
    check_tensor("reward_j", reward_j)
    check_same_shape("reward_i", reward_i, "reward_j", reward_j)
    if form == "softmax":
        # §4.4: P(text_i) = exp(R_i) / (exp(R_i) + exp(R_j))
        return torch.softmax(torch.stack([reward_i, reward_j], dim=-1), dim=-1)[..., 0]
    # §4.4: P(text_i) = 1 / (1 + exp(-(R_i - R_j)))
    return torch.sigmoid(reward_i - reward_j)


def reward_function_loss(reward_i: Tensor, reward_j: Tensor, hp: Tensor) -> Tensor:
    """Eq. (5): binary cross entropy on the probability built from two rewards, averaged over pairs.

        Reward function loss = - hp · log P(text_i) - (1 - hp) · log P(text_j),
        P(text_i) = σ(R(text_i) - R(text_j)),  P(text_j) = 1 - P(text_i) = σ(R(text_j) - R(text_i))

    | symbol | argument | shape |
    |---|---|---|
    | R(text_i) | ``reward_i`` | (N,) |
    | R(text_j) | ``reward_j`` | (N,) |
    | hp, 1 if the human preferred text_i and 0 if text_j | ``hp`` (0/1 or bool) | (N,) |
    | the loss averaged over the N pairs | returned | () |

    Both logs are computed as ``logsigmoid`` of a reward difference, so the loss is finite for any rewards.
    With hp = 1 everywhere this is Eq. (6), ``reward_model_loss``.
    """
    _check_pairs("reward_i", reward_i)
    _check_pairs("reward_j", reward_j)
    check_same_shape("reward_i", reward_i, "reward_j", reward_j)
    hp = _check_hp(hp, "reward_i", reward_i).to(reward_i.dtype)  # (N,)
    margin = reward_i - reward_j  # (N,)
    # Eq. 5: -hp·log P(text_i) - (1-hp)·log P(text_j)
    #        with log P(text_i) = logσ(R_i - R_j) and log P(text_j) = logσ(R_j - R_i)
    loss = -hp * F.logsigmoid(margin) - (1 - hp) * F.logsigmoid(-margin)  # (N,)
    return loss.mean()


def reward_model_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Eq. (6): the reward model's loss on (winner, loser) pairs, averaged over pairs.

        Loss = -log σ(R(text_w) - R(text_l))

    | symbol | argument | shape |
    |---|---|---|
    | R(text_w), the reward of the preferred text | ``reward_chosen`` | (N,) |
    | R(text_l), the reward of the other text | ``reward_rejected`` | (N,) |
    | the loss averaged over the N pairs | returned | () |

    Returns ``(loss, metrics)`` with
    ``"reward_model/accuracy"`` (share of pairs with R_w > R_l strictly; ties count as wrong),
    ``"reward_model/margin"`` (mean R_w - R_l), and the mean rewards ``"reward_model/reward_chosen"`` and
    ``"reward_model/reward_rejected"``. The loss is ``-logsigmoid``, never ``-log(sigmoid)``, so it stays
    finite (≈ the margin) when the model ranks a pair badly wrong.
    """
    _check_pairs("reward_chosen", reward_chosen)
    _check_pairs("reward_rejected", reward_rejected)
    check_same_shape("reward_chosen", reward_chosen, "reward_rejected", reward_rejected)
    margin = reward_chosen - reward_rejected  # (N,)
    # Eq. 6: Loss = -log σ(R(text_w) - R(text_l))
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        metrics = {
            "reward_model/accuracy": float((margin > 0).float().mean()),
            "reward_model/margin": float(margin.mean()),
            "reward_model/reward_chosen": float(reward_chosen.mean()),
            "reward_model/reward_rejected": float(reward_rejected.mean()),
        }
    return loss, metrics
