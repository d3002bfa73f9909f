"""The paper's mathematics as pure functions of tensors: one module per paper section.

No model, no data, no I/O; only ``torch`` is imported. See ``rlmt_edu.equations.INDEX`` for the map from
equation numbers to functions, tests and notebooks. Every function of the index is importable from here::

    from rlmt_edu.losses import dpo_loss, grpo_loss, kl_divergence

Two rules hold for every function:

1. **A loss detaches its constants.** Whatever a loss treats as fixed (the old model's ``logp_old``, the
   reference ``logp_ref``, ``rewards``, baselines ``values``, ``advantages``) is detached inside it; only the
   log-probabilities of the model being trained carry gradient. So a student who writes
   ``ppo_clip_loss(logp, logp, advantages, mask)`` on the on-policy first step, without ``.detach()``, gets
   the gradient A·∇log π and not an exact zero. We detach rather than reject a constant that requires grad
   because both calls mean the same thing, and refusing the natural one teaches nothing.
   Functions that *compute* such a quantity (``advantage``, ``gae``, ``kl_shaped_rewards``,
   ``group_relative_advantage``, ``grape_reward``) return it as computed: it becomes a constant where a loss
   consumes it. ``kl_divergence``, ``entropy`` and ``cross_entropy`` are measures, not losses with a fixed
   side: gradient flows into every argument (detach the side you hold fixed).
2. **Log-probabilities are ≤ 0.** Every argument named ``logp*`` goes through one check with one message
   (``_checks.check_logprob_values``); passing logits or a log-ratio instead is a ``ValueError``.
"""

from rlmt_edu.losses.advantage import advantage, gae
from rlmt_edu.losses.dpo import dpo_loss, naive_preference_loss
from rlmt_edu.losses.grape import (
    average_variances,
    grape_reward,
    grape_sequence_loss,
    mean_rubric_confidence,
    monte_carlo_average_variances,
)
from rlmt_edu.losses.grpo import group_relative_advantage, grpo_loss
from rlmt_edu.losses.importance import importance_sampling_estimate, importance_weighted_loss
from rlmt_edu.losses.information import cross_entropy, entropy
from rlmt_edu.losses.kl import kl_divergence, kl_estimator_k1, kl_estimator_k2, kl_estimator_k3
from rlmt_edu.losses.nll import nll, sft_loss, token_logp
from rlmt_edu.losses.policy_gradient import reinforce_loss, reward_weighted_loss
from rlmt_edu.losses.ppo import kl_shaped_advantage, kl_shaped_rewards, ppo_clip_loss
from rlmt_edu.losses.preference import (
    preference_bce_loss,
    preference_probability,
    reward_function_loss,
    reward_model_loss,
)
from rlmt_edu.losses.trpo import trpo_constraint_satisfied, trpo_penalty_loss

# in the paper's order (the order of rlmt_edu.equations.INDEX), then the helpers the equations build on
__all__ = [
    "nll", "sft_loss", "preference_bce_loss", "reward_weighted_loss", "reinforce_loss", "advantage", "gae",
    "preference_probability", "reward_function_loss", "reward_model_loss", "importance_sampling_estimate",
    "importance_weighted_loss", "kl_divergence", "kl_estimator_k1", "kl_estimator_k2", "kl_estimator_k3", "trpo_penalty_loss",
    "trpo_constraint_satisfied", "ppo_clip_loss", "kl_shaped_rewards", "kl_shaped_advantage",
    "group_relative_advantage", "grpo_loss", "naive_preference_loss", "dpo_loss", "mean_rubric_confidence",
    "grape_reward", "grape_sequence_loss", "average_variances", "entropy", "cross_entropy",
    "token_logp", "monte_carlo_average_variances",
]
