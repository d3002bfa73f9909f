"""§4.9 of the paper: the naive preference loss on log-probabilities, and DPO.

Both take *sequence* log-probabilities: log π(text) = Σ_t log π(a_t|s_t) over the response tokens (the sum
of a ``token_logp`` row under the response mask), one number per text; each is checked to be ≤ 0.

Constants take no gradient: in ``dpo_loss`` the reference log-probs (π0, frozen) are detached inside. In the
naive loss both arguments are π1 and both carry gradient.

Shape legend: B batch (here: preference pairs), Q questions, G group size, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlmt_edu.losses._checks import check_logprob_values, check_positive, check_same_shape, check_tensor

Tensor = torch.Tensor


def _check_pair_logps(named: list[tuple[str, object]]) -> None:
    """Every argument a finite 1-D float tensor of sequence log-probabilities (≤ 0), of the same (non-zero)
    length as the first."""
    first_name, first = named[0]
    check_tensor(first_name, first, ndim=1)
    if first.shape[0] == 0:
        raise ValueError(f"{first_name}: expected at least one preference pair, got shape {tuple(first.shape)}")
    for name, x in named:
        check_tensor(name, x, ndim=1)
        check_same_shape(first_name, first, name, x)
        check_logprob_values(name, x)


def naive_preference_loss(logp_chosen: Tensor, logp_rejected: Tensor) -> Tensor:
    """The naive preference loss of §4.9: Eq. 6 with the reward R(text) replaced by -NLL(text).

        Loss = -log σ( -(NLL(text_w) - NLL(text_l)) ) = -log σ( log π1(text_w) - log π1(text_l) )

    averaged over the pairs ("aggregate this loss over all samples").

    | symbol | argument | shape |
    |---|---|---|
    | log π1(text_w), sum of token log-probs of the preferred response | ``logp_chosen`` | (B,) |
    | log π1(text_l), the same for the less preferred response | ``logp_rejected`` | (B,) |

    Nothing ties π1 to where it started, so minimising this pushes log π1(text_l) toward -∞ and can wreck
    the model: the collapse that DPO's reference ratio prevents. Computed with ``logsigmoid`` (stable for
    any margin).
    """
    _check_pair_logps([("logp_chosen", logp_chosen), ("logp_rejected", logp_rejected)])
    # §4.9: -log σ(log π1(text_w) - log π1(text_l)), mean over pairs
    return -F.logsigmoid(logp_chosen - logp_rejected).mean()


def dpo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    logp_ref_chosen: Tensor,
    logp_ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """The DPO loss of §4.9 (Rafailov et al., 2023).

        DPO Loss = -log σ{ β log(π1(text_w)/π0(text_w)) - β log(π1(text_l)/π0(text_l)) }

    averaged over the pairs. π0 is the frozen reference (SFT) model.

    | symbol | argument | shape |
    |---|---|---|
    | log π1(text_w), the model being trained, preferred text | ``logp_chosen`` | (B,) |
    | log π1(text_l), less preferred text | ``logp_rejected`` | (B,) |
    | log π0(text_w), reference model | ``logp_ref_chosen`` | (B,) |
    | log π0(text_l), reference model | ``logp_ref_rejected`` | (B,) |
    | β | ``beta`` | float > 0 |

    The ratios are differences of log-probabilities and σ is taken through ``logsigmoid``. When π1 = π0 the
    argument of σ is 0 and the loss is log 2.

    Returns ``(loss, metrics)``; the implied rewards are r(text) = β log(π1(text)/π0(text)):
    ``"dpo/reward_chosen"`` and ``"dpo/reward_rejected"`` (means over pairs), ``"dpo/reward_margin"`` (mean
    of their difference), ``"dpo/reward_accuracy"`` (share of pairs whose chosen reward is strictly larger),
    and ``"dpo/logp_chosen"``, ``"dpo/logp_rejected"`` (mean sequence log-probs under π1, to watch both fall
    or rise during training).
    """
    _check_pair_logps(
        [
            ("logp_chosen", logp_chosen),
            ("logp_rejected", logp_rejected),
            ("logp_ref_chosen", logp_ref_chosen),
            ("logp_ref_rejected", logp_ref_rejected),
        ]
    )
    beta = check_positive("beta", beta)

    # π0 is frozen: its log-probs are constants
    reward_chosen = beta * (logp_chosen - logp_ref_chosen.detach())  # (B,) β log(π1(text_w)/π0(text_w))
    reward_rejected = beta * (logp_rejected - logp_ref_rejected.detach())  # (B,) β log(π1(text_l)/π0(text_l))
    # §4.9: -log σ(β log(π1(w)/π0(w)) - β log(π1(l)/π0(l))), mean over pairs
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()

    with torch.no_grad():
        margin = (reward_chosen - reward_rejected).detach()  # (B,)
        metrics = {
            "dpo/reward_chosen": float(reward_chosen.detach().mean()),
            "dpo/reward_rejected": float(reward_rejected.detach().mean()),
            "dpo/reward_margin": float(margin.mean()),
            "dpo/reward_accuracy": float((margin > 0).to(margin.dtype).mean()),
            "dpo/logp_chosen": float(logp_chosen.detach().mean()),
            "dpo/logp_rejected": float(logp_rejected.detach().mean()),
        }
    return loss, metrics
