"""§4.8 of the paper: the group-relative advantage (Eq. 13, Dr. GRPO) and the GRPO loss (Eq. 14).

GRPO is PPO's clipped loss with a different advantage: each of the G responses to a question is compared with
the mean reward of its own group, so no value model is needed.

Constants take no gradient: in ``grpo_loss`` only ``logp`` carries one; ``logp_old`` and ``advantages`` are
detached inside (so the on-policy first step, ``logp_old = logp``, gets the right gradient, not zero).

Shape legend: B batch, Q questions, G group size, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from rlmt_edu.losses._checks import (
    check_choice,
    check_logprob_values,
    check_mask,
    check_positive,
    check_same_shape,
    check_tensor,
    masked_mean,
    masked_sum,
)
from rlmt_edu.losses.ppo import _clipped_surrogate, _ratio_metrics

Tensor = torch.Tensor

NORMALIZATIONS = ("paper", "token_mean", "sequence_mean")


def group_relative_advantage(rewards: Tensor, *, scale_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """Group-relative advantage, Eq. 13 of the paper (the Dr. GRPO form).

        A(text_qg) = R(text_qg) - (1/G) Σ_{i=1..G} R(text_qi)

    | symbol | argument | shape |
    |---|---|---|
    | R(text_qg), reward of the g-th response to question q | ``rewards`` | (Q, G) |
    | A(text_qg) | returned | (Q, G) |

    The paper's form (default) only subtracts the group mean. ``scale_by_std=True`` also divides by the
    group's standard deviation plus ``eps``, as the original GRPO of Shao et al. (2024) does:
    A = (R_qg - mean_g R_q) / (std_g R_q + eps). The std is the *unbiased* sample std (Bessel's correction,
    divisor G - 1), which is ``torch.std``'s default and what TRL uses. Dr. GRPO drops this division because
    it up-weights questions whose rewards barely vary (too easy or too hard). Needs G ≥ 2: with one
    response there is nothing to compare against, and every advantage would be 0.

    Either way the advantages of a group sum to zero.
    """
    check_tensor("rewards", rewards, ndim=2)
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: expected a group size G >= 2 (shape (Q, G)), got shape {tuple(rewards.shape)}")
    if rewards.shape[0] < 1:
        raise ValueError(f"rewards: expected at least one question (Q >= 1), got shape {tuple(rewards.shape)}")
    if not isinstance(scale_by_std, bool):
        raise ValueError(f"scale_by_std: expected True or False, got {scale_by_std!r}")
    eps = check_positive("eps", eps)

    group_mean = rewards.mean(dim=1, keepdim=True)  # (Q, 1)
    # Eq. 13: A(text_qg) = R(text_qg) - (1/G) Σ_i R(text_qi)
    advantages = rewards - group_mean  # (Q, G)
    if scale_by_std:
        group_std = rewards.std(dim=1, keepdim=True, correction=1)  # (Q, 1) unbiased, divisor G - 1
        advantages = advantages / (group_std + eps)  # (Q, G) original GRPO
    return advantages


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    epsilon: float = 0.2,
    normalization: str = "paper",
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss, Eq. 14 of the paper: PPO's clipped loss with one advantage per response.

        GRPO Loss = -(1/(QG)) Σ_q Σ_g Σ_t min[ π1(a_qgt|s_qgt)/π0(a_qgt|s_qgt) · A(text_qg),
                                              CLIP(π1(a_qgt|s_qgt)/π0(a_qgt|s_qgt), 1-ε, 1+ε) · A(text_qg) ]

    | symbol | argument | shape |
    |---|---|---|
    | log π1(a_qgt\\|s_qgt), the model being updated | ``logp`` | (Q, G, T) |
    | log π0(a_qgt\\|s_qgt), the model that sampled | ``logp_old`` | (Q, G, T) |
    | A(text_qg), e.g. from ``group_relative_advantage`` | ``advantages`` | (Q, G) |
    | t in the sum (response tokens) | ``response_mask`` | (Q, G, T) |
    | ε | ``epsilon`` | float > 0 (inf: no clipping) |

    The same A(text_qg) multiplies every token of response (q, g). ``normalization`` says what the summed
    clipped terms are divided by:

    - ``"paper"`` (default, Eq. 14 exactly): sum over every response token, divided by QG, the number of
      responses. Every token weighs 1/(QG), so a response counts in proportion to its length.
    - ``"token_mean"``: the same sum divided by the number of response tokens in the batch, so every token
      weighs the same whatever the response it belongs to.
    - ``"sequence_mean"``: the mean over each response's own tokens, then the mean over the QG responses
      (the original GRPO of Shao et al.). A token of a short response weighs more than one of a long
      response, which biases learning toward short correct answers and long wrong ones.

    How these map onto TRL's ``GRPOConfig.loss_type`` (same clipped term, different divisor):
    ``"grpo"`` is our ``"sequence_mean"``. ``"dr_grpo"`` divides the token sum by (number of responses ×
    ``max_completion_length``); that divisor is a constant, so it is our ``"paper"`` loss scaled by
    1 / ``max_completion_length``: the same gradient direction, and the same length weighting. ``"bnpo"``
    is our ``"token_mean"`` over the batch on one device; ``"dapo"`` is also a token mean, but with the
    token count taken over the whole global batch (all devices and gradient-accumulation steps), which is
    the same thing when the batch is processed in one step as here. (TRL's optional KL term β·KL is not
    part of Eq. 14; add it separately if you want it.)

    Returns ``(loss, metrics)`` with ``"grpo/clip_fraction"``, ``"grpo/approx_kl"`` (mean k3 estimate of
    KL(π_old‖π) over response tokens) and ``"grpo/ratio_mean|min|max"``, as in ``ppo_clip_loss``.
    """
    check_tensor("logp", logp, ndim=3)
    check_logprob_values("logp", logp)
    check_tensor("logp_old", logp_old, ndim=3)
    check_same_shape("logp", logp, "logp_old", logp_old)
    check_logprob_values("logp_old", logp_old)
    check_tensor("advantages", advantages, ndim=2)
    if advantages.shape != logp.shape[:2]:
        raise ValueError(
            f"advantages: expected shape (Q, G) = {tuple(logp.shape[:2])} to match logp, got {tuple(advantages.shape)}"
        )
    check_mask("response_mask", response_mask, "logp", logp)  # a 0/1 tensor of shape (Q, G, T)
    num_questions, group_size, num_tokens = logp.shape
    # and each of the QG responses has at least one response token: check per (q, g) row
    mask = check_mask(
        "response_mask", response_mask.reshape(-1, num_tokens), "logp", logp.reshape(-1, num_tokens)
    ).reshape(logp.shape)  # (Q, G, T)
    epsilon = check_positive("epsilon", epsilon, allow_inf=True)
    check_choice("normalization", normalization, NORMALIZATIONS)

    log_ratio = logp - logp_old.detach()  # (Q, G, T); π0 is a constant
    token_advantages = advantages.detach()[:, :, None].expand_as(logp)  # (Q, G, T) same A for every token
    surrogate, clipped = _clipped_surrogate(log_ratio, token_advantages, epsilon)  # (Q, G, T)
    if normalization == "paper":
        # Eq. 14: -(1/(QG)) Σ_q Σ_g Σ_t min[ratio·A, CLIP(ratio, 1-ε, 1+ε)·A]
        loss = -masked_sum(surrogate, mask) / (num_questions * group_size)
    elif normalization == "token_mean":
        # -(Σ_q Σ_g Σ_t min[...]) / (number of response tokens)
        loss = -masked_mean(surrogate, mask)
    else:
        # -(1/(QG)) Σ_q Σ_g (1/T_qg) Σ_t min[...], T_qg = response length of (q, g)
        loss = -masked_mean(surrogate, mask, dim=-1).mean()
    return loss, _ratio_metrics("grpo", log_ratio, clipped, mask)
