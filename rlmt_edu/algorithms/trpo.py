"""Chapter 07: TRPO (§4.5), solved the way TRPO solves it, and its penalty form, Eq. (9), beside it.

Eq. (10) asks, for each batch sampled from the current model π_old (M0), for the parameters θ (M1) that

    maximise   L(θ) = (1/S) Σ_i Σ_t π_θ(a_it|s_it) / π_old(a_it|s_it) · A_it      (minus Eq. 7's loss)
    subject to KL̄(θ) = mean over response tokens i, t of D_KL(π_old(·|s_it) ‖ π_θ(·|s_it)) ≤ δ

with the KL exact over the vocabulary (Eq. 8) and averaged over all tokens of all samples, the relaxation
the paper says the TRPO authors use. ``trpo`` solves it as Schulman et al. (2015) do, once per batch:

1. linearise the objective at θ_old:   L(θ) ≈ L(θ_old) + gᵀ(θ - θ_old),  g = ∇L(θ_old);
2. quadratise the constraint:          KL̄(θ) ≈ ½ (θ - θ_old)ᵀ F (θ - θ_old),  F = ∇²KL̄(θ_old).
   KL̄ and its gradient are both zero at θ_old; its Hessian there is the Fisher information matrix;
3. the model problem's solution is the natural-gradient step β·x, x = F⁻¹ g, β = sqrt(2δ / xᵀFx), which puts
   the quadratic KL exactly at δ. F is P × P (P ≈ 840 000 parameters here) and never formed: conjugate
   gradient solves F x = g from Fisher-vector products F v alone, each one a double back-propagation;
4. a quadratic is only a model of the KL: a backtracking line search tries θ_old + α^k·β·x, k = 0, 1, ...,
   and accepts the first whose MEASURED KL̄ is ≤ δ and whose surrogate improved. If none does (or CG did not
   converge) the update is skipped: θ stays θ_old, and the skip is counted.

``trpo_penalty`` is Eq. (9) instead: a few Adam steps per batch on -L(θ) + β·KL̄(θ) with a fixed β. The
constraint holds δ on every accepted step; the KL the penalty form ends at depends on β, the learning rate and
the number of steps, which is the difficulty of choosing β that the paper reports.

Beyond the paper: the damping λ (CG solves (F + λI) x = g), conjugate gradient, the line search and its
acceptance rule are TRPO's machinery (Schulman et al., 2015), which the paper names but does not spell out.

Shape legend: B batch (S in the paper), N response tokens (T in the paper), V vocabulary, P parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from tqdm.auto import tqdm

from rlmt_edu.losses._checks import (
    check_choice,
    check_non_negative,
    check_positive,
    check_tensor,
    masked_mean,
)
from rlmt_edu.losses.importance import importance_weighted_loss
from rlmt_edu.losses.kl import kl_divergence
from rlmt_edu.losses.nll import token_logp
from rlmt_edu.losses.trpo import trpo_constraint_satisfied, trpo_penalty_loss
from rlmt_edu.rl import (
    PROMPT_POOLS,
    REWARDS,
    BatchDrawer,
    heldout_questions,
    heldout_scores_by_category,
    prompt_pool,
)
from rlmt_edu.rollout import Rollout, policy_logits
from rlmt_edu.utils import History, seed_everything
from rlmt_edu.world.tasks import Question

Tensor = torch.Tensor
FisherVectorProduct = Callable[[Tensor], Tensor]


# ---- configs ------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class _BatchSettings:
    """What TRPO and its penalty form share: how each batch is drawn and scored, and how often to evaluate."""

    seed: int = 0  #: seeds the prompt order and the sampling generator
    updates: int = 30  #: policy updates; each samples a fresh batch from the current policy
    prompts_per_update: int = 16  #: S, one sampled response per prompt per update
    temperature: float = 1.0  #: sampling temperature; the surrogate and the KL use the same softmax(logits / T)
    max_new_tokens: int = 16  #: longest sampled response (the reference answers have at most 10 words)
    prompts: str = "train_pool"  #: "train_pool" (every category) or one category: "math", "facts", "safety"
    reward: str = "gold"  #: "gold" (the world's gold score in [0, 1], default) or "exact_match" (0/1)
    eval_every: int = 10  #: updates between greedy evaluations on the held-out questions (and at the end)

    def __post_init__(self):
        for name, low in (("seed", 0), ("updates", 1), ("prompts_per_update", 1), ("max_new_tokens", 1),
                          ("eval_every", 1)):
            _check_int(name, getattr(self, name), low)
        check_positive("temperature", self.temperature)
        check_choice("prompts", self.prompts, PROMPT_POOLS)
        check_choice("reward", self.reward, tuple(REWARDS))


@dataclass(frozen=True)
class TRPOConfig(_BatchSettings):
    """Settings of one TRPO run, the constrained form of Eq. (10) (defaults: about a minute on a 2-core CPU)."""

    delta: float = 0.01  #: δ, the trust region's radius: the largest mean KL(π_old‖π_new) per token an update may reach
    damping: float = 1.0  #: λ, CG solves (F + λI) x = g (beyond the paper): lifts F's ~0 eigenvalues so CG converges
    cg_iterations: int = 20  #: most conjugate-gradient iterations (Fisher-vector products) per update
    cg_tolerance: float = 0.1  #: CG has converged when ‖g - (F+λI) x‖ ≤ cg_tolerance · ‖g‖; else the step is rejected
    backtrack_ratio: float = 0.5  #: α, each line-search try shrinks the step by this factor
    max_backtracks: int = 10  #: shrinkings allowed: tries α^k·β·x for k = 0 .. max_backtracks, then skip

    def __post_init__(self):
        super().__post_init__()
        check_positive("delta", self.delta)
        check_non_negative("damping", self.damping)
        _check_int("cg_iterations", self.cg_iterations, 1)
        check_non_negative("cg_tolerance", self.cg_tolerance)
        ratio = check_positive("backtrack_ratio", self.backtrack_ratio)
        if not ratio < 1:
            raise ValueError(f"backtrack_ratio: expected a number in (0, 1), got {self.backtrack_ratio!r}")
        _check_int("max_backtracks", self.max_backtracks, 0)


@dataclass(frozen=True)
class PenaltyConfig(_BatchSettings):
    """Settings of one run of Eq. (9), TRPO's penalty form (defaults: well under a minute on a 2-core CPU)."""

    beta: float = 0.1  #: β, the KL penalty's fixed scale (0: no penalty, plain Eq. 7)
    learning_rate: float = 1e-4  #: Adam learning rate
    steps_per_batch: int = 4  #: Adam steps on each batch before sampling the next (1: the penalty never acts)
    max_grad_norm: float = 1.0  #: clip each step's gradient norm to this (inf: no clipping)

    def __post_init__(self):
        super().__post_init__()
        check_non_negative("beta", self.beta)
        check_positive("learning_rate", self.learning_rate)
        _check_int("steps_per_batch", self.steps_per_batch, 1)
        check_positive("max_grad_norm", self.max_grad_norm, allow_inf=True)


# ---- conjugate gradient: solve F x = g with products F v only ----------------------------------------------


@dataclass(frozen=True)
class CGInfo:
    """How ``conjugate_gradient`` did."""

    iterations: int  #: iterations run (one product F v each)
    residual: float  #: ‖g - F x‖ at the returned x, recomputed with one more product (not CG's running estimate)
    relative_residual: float  #: residual / ‖g‖ (0 when g = 0): what ``tolerance`` bounds
    converged: bool  #: relative_residual ≤ tolerance
    fx: Tensor  #: F x at the returned x (the product behind ``residual``; TRPO reuses it for xᵀFx)


def conjugate_gradient(
    fvp: FisherVectorProduct, g: Tensor, *, iterations: int = 10, tolerance: float = 1e-10
) -> tuple[Tensor, CGInfo]:
    """Solve F x = g for a symmetric positive-definite F that is known only through products ``fvp(v)`` = F v.

    | symbol | argument | shape |
    |---|---|---|
    | v ↦ F v | ``fvp`` | (P,) → (P,) |
    | g, the right-hand side (TRPO: the surrogate's gradient) | ``g`` | (P,) |
    | most iterations (CG is exact after P in exact arithmetic) | ``iterations`` | int ≥ 1 |
    | the relative residual ‖g - F x‖ / ‖g‖ to reach | ``tolerance`` | ≥ 0 |
    | x ≈ F⁻¹ g, and a ``CGInfo`` | returned | (P,) |

    The residual is relative to ‖g‖, so the same tolerance means the same thing whatever the scale of the
    rewards. The loop stops early when CG's running residual reaches the tolerance, or when F is not positive
    along a search direction (p ᵀ F p ≤ 0); either way ``converged`` is decided by the TRUE residual at the end,
    so a caller can trust it: TRPO rejects the step when it is False.
    """
    if not callable(fvp):
        raise ValueError(f"fvp: expected a callable v -> F v, got {fvp!r:.60}")
    check_tensor("g", g, ndim=1)
    _check_int("iterations", iterations, 1)
    tolerance = check_non_negative("tolerance", tolerance)

    def product(v: Tensor) -> Tensor:
        fv = fvp(v)
        if not isinstance(fv, Tensor) or fv.shape != v.shape:
            raise ValueError(f"fvp: expected it to return a tensor of shape {tuple(v.shape)}, got {fv!r:.60}")
        return fv

    x = torch.zeros_like(g)  # (P,)
    r = g.clone()  # (P,) residual g - F x, with x = 0
    p = r.clone()  # (P,) search direction
    rr = r @ r
    threshold = tolerance * float(g.norm())
    used = 0
    while used < iterations and float(rr.sqrt()) > threshold:
        fp = product(p)  # (P,)
        curvature = p @ fp  # pᵀ F p
        if not float(curvature) > 0:  # F is not positive definite along p: no reliable step along it
            break
        step = rr / curvature
        x = x + step * p
        r = r - step * fp
        rr_next = r @ r
        # the next direction is F-conjugate to all earlier ones: p ← r + (r·r / r_prev·r_prev) p
        p = r + (rr_next / rr) * p
        rr = rr_next
        used += 1
    fx = product(x) if used else torch.zeros_like(g)  # (P,)
    residual = float((g - fx).norm())
    g_norm = float(g.norm())
    relative = residual / g_norm if g_norm > 0 else 0.0
    converged = math.isfinite(residual) and relative <= tolerance
    return x, CGInfo(iterations=used, residual=residual, relative_residual=relative, converged=converged, fx=fx)


# ---- the mean KL and its Hessian, the Fisher information ---------------------------------------------------


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _vocabulary(model) -> int:
    return model.get_input_embeddings().num_embeddings


def _mean_kl(logits_old: Tensor, logits: Tensor, response_mask: Tensor) -> Tensor:
    """KL̄ = mean over response tokens of D_KL(π_old(·|s_it) ‖ π_θ(·|s_it)), exact over the vocabulary."""
    kl = kl_divergence(logits_old.detach(), logits)  # (B, N) Eq. 8, one value per position
    # Eq. 10, relaxed: the mean of D_KL over all response tokens and samples
    return masked_mean(kl, response_mask.to(kl.dtype))


def mean_kl(old_model, model, rollout: Rollout, *, temperature: float = 1.0) -> float:
    """KL̄ between two models on a batch: Eq. (10)'s relaxed quantity, the mean over the rollout's response
    tokens of the exact D_KL(π_old(·|s_it) ‖ π(·|s_it)) (Eq. 8).

    | symbol | argument | shape |
    |---|---|---|
    | π_old, the model that sampled (or any reference) | ``old_model`` | |
    | π, the model after the update | ``model`` | |
    | s_it: the prompts and response tokens | ``rollout`` | (B, P), (B, N) |
    | KL̄ | returned | float |

    The two models must share one vocabulary: a KL between distributions over different token sets is
    meaningless, so a mismatch is a ``ValueError`` naming ``old_model``.
    """
    if _vocabulary(old_model) != _vocabulary(model):
        raise ValueError(f"old_model: expected the policy's vocabulary of {_vocabulary(model)} tokens, "
                         f"got a model of {_vocabulary(old_model)}")
    with torch.no_grad():
        logits_old = policy_logits(old_model, rollout, temperature=temperature)  # (B, N, V)
        logits = policy_logits(model, rollout, temperature=temperature)  # (B, N, V)
        return float(_mean_kl(logits_old, logits, rollout.response_mask.to(logits.device)))


def _check_logits_old(model, rollout: Rollout, logits_old: object) -> None:
    check_tensor("logits_old", logits_old, ndim=3)
    batch, tokens = rollout.response_ids.shape
    if tuple(logits_old.shape[:2]) != (batch, tokens):
        raise ValueError(f"logits_old: expected the rollout's (B, N) = ({batch}, {tokens}) positions, "
                         f"got shape {tuple(logits_old.shape)}")
    if logits_old.shape[2] != _vocabulary(model):
        raise ValueError(f"logits_old: expected the policy's vocabulary of {_vocabulary(model)} tokens, "
                         f"got {logits_old.shape[2]} (from a model of another vocabulary?)")


def fisher_vector_product(
    model, rollout: Rollout, logits_old: Tensor, *, damping: float = 0.1, temperature: float = 1.0
) -> FisherVectorProduct:
    """The map v ↦ (F + λI) v, with F the Hessian of KL̄ at the current parameters (the Fisher information).

    | symbol | argument | shape |
    |---|---|---|
    | π_θ, whose parameters θ (flattened, P of them) F is taken over | ``model`` | |
    | s_it: the batch the KL is averaged over | ``rollout`` | (B, P), (B, N) |
    | π_old(·\\|s_it) as logits (the model that sampled, detached) | ``logits_old`` | (B, N, V) |
    | λ, the damping (beyond the paper) | ``damping`` | ≥ 0 |
    | v ↦ F v + λ v | returned | (P,) → (P,) |

    F v = ∇_θ( ∇_θ KL̄(θ) · v ), by double back-propagation: one forward pass and the first gradient ∇KL̄ are
    built here (with ``create_graph=True``); each call of the returned function is one more backward pass
    through that graph, and never forms F. When ``logits_old`` are the model's own logits (θ = θ_old), KL̄ and
    ∇KL̄ are both zero there, yet the graph of ∇KL̄ still carries its derivative, the Hessian:

        ∇²KL̄(θ_old) = mean over tokens of Σ_a π_old(a|s) ∇log π_θ(a|s) ∇log π_θ(a|s)ᵀ = F

    (tests/test_chapter07_trpo.py checks both equalities on a tiny model). The order of the P coordinates is
    ``torch.nn.utils.parameters_to_vector`` over the trainable parameters.
    """
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout: expected a Rollout, got {type(rollout).__name__}")
    _check_logits_old(model, rollout, logits_old)
    damping = check_non_negative("damping", damping)
    params = _trainable(model)
    # the fused attention kernels have no second derivative: record attention as plain differentiable ops
    with sdpa_kernel(SDPBackend.MATH):
        logits = policy_logits(model, rollout, temperature=temperature)  # (B, N, V), gradients flow
    mask = rollout.response_mask.to(logits.device)  # (B, N)
    kl = _mean_kl(logits_old.to(logits.device), logits, mask)
    grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
    flat_grad = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                           for g, p in zip(grads, params)])  # (P,) ∇KL̄, itself differentiable

    def fvp(v: Tensor) -> Tensor:
        # F v = ∇( ∇KL̄ · v ): the Hessian of the mean KL times v, without forming the Hessian
        hv = torch.autograd.grad(flat_grad @ v, params, retain_graph=True, allow_unused=True)
        hv = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])
        return hv.detach() + damping * v  # (P,)  (F + λI) v

    return fvp


# ---- one TRPO update on a batch -----------------------------------------------------------------------------


def _response_logp(logits: Tensor, rollout: Rollout) -> Tensor:
    """log π(a_it | s_it) of the sampled tokens, 0 after each response's end: (B, N)."""
    ids = rollout.response_ids.to(logits.device)  # (B, N)
    logp = token_logp(logits, ids)  # (B, N)
    return torch.where(rollout.response_mask.to(logits.device) != 0, logp, torch.zeros_like(logp))


def _surrogate(logits: Tensor, logp_old: Tensor, advantages: Tensor, rollout: Rollout) -> Tensor:
    """L(θ) = (1/S) Σ_i Σ_t π_θ/π_old · A_it: minus Eq. (7)'s loss, the quantity TRPO maximises."""
    mask = rollout.response_mask.to(logits.device)
    # Eq. 7: Loss = -(1/S) Σ_i Σ_t π1(a_it|s_it)/π0(a_it|s_it) · A_1(a_it, s_it);  L = -Loss
    loss, _ = importance_weighted_loss(_response_logp(logits, rollout), logp_old, advantages, mask)
    return -loss


def batch_advantages(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """A_it = R_i - mean_j R_j on every response token of sample i: a constant baseline, the batch mean (B, N)."""
    check_tensor("rewards", rewards, ndim=1)
    if rewards.shape[0] != response_mask.shape[0]:
        raise ValueError(f"rewards: expected one reward per sample ({response_mask.shape[0]}), got {rewards.shape[0]}")
    # A = R - V with V the batch's mean reward: the same for every token of a response
    centred = rewards - rewards.mean()  # (B,)
    return centred[:, None] * response_mask.to(rewards.dtype)  # (B, N)


def trpo_step(model, rollout: Rollout, advantages: Tensor, config: TRPOConfig = TRPOConfig()) -> dict[str, float]:
    """One TRPO update of ``model`` on a sampled batch, in place; returns what happened.

    | symbol | argument | shape |
    |---|---|---|
    | π_θ, at θ_old on entry (it sampled ``rollout``) | ``model`` | |
    | the batch: prompts, sampled tokens, response mask | ``rollout`` | (B, P), (B, N) |
    | A_it | ``advantages`` | (B, N) |
    | δ, λ, CG and line-search settings | ``config`` | ``TRPOConfig`` |

    On return the model holds the accepted step θ_old + α^k·β·x, or θ_old exactly if the step was rejected:
    because CG did not converge (``"step/outcome": "cg_not_converged"``), because the gradient gave no
    direction (``"no_direction"``, e.g. every sample earned the same reward), or because no line-search try
    kept the measured KL̄ ≤ δ while improving the surrogate (``"line_search_failed"``).

    Returned metrics: ``kl/mean`` (KL̄ measured on the batch after the update: 0 when rejected), ``kl/max``
    (the largest single-token KL of the batch after the update: what the mean lets through), ``kl/delta``,
    ``kl/full_step`` (measured KL̄ at the first try, β·x, whose quadratic model says δ; NaN if not tried),
    ``surrogate/before``, ``surrogate/after``, ``step/accepted`` (0/1), ``step/backtracks`` (tries rejected),
    ``step/size`` (‖θ - θ_old‖), ``step/fraction`` (α^k, 0 when rejected), ``cg/iterations``, ``cg/residual``
    (relative, what ``cg_tolerance`` bounds), ``cg/converged`` (0/1), ``grad/norm`` (‖g‖), ``step/outcome``.
    """
    if not isinstance(config, TRPOConfig):
        raise ValueError(f"config: expected a TRPOConfig, got {type(config).__name__}")
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout: expected a Rollout, got {type(rollout).__name__}")
    params = _trainable(model)
    device = params[0].device
    check_tensor("advantages", advantages, ndim=2)
    if advantages.shape != rollout.response_ids.shape:
        raise ValueError(f"advantages: expected the rollout's shape {tuple(rollout.response_ids.shape)}, "
                         f"got {tuple(advantages.shape)}")
    advantages = advantages.to(device)
    mask = rollout.response_mask.to(device)  # (B, N)
    temperature = config.temperature

    # θ_old, and π_old's logits on the batch: the fixed side of every ratio and every KL below
    theta_old = parameters_to_vector(params).detach().clone()  # (P,)
    logits = policy_logits(model, rollout, temperature=temperature)  # (B, N, V), gradients flow
    logits_old = logits.detach()  # (B, N, V)
    logp_old = _response_logp(logits_old, rollout)  # (B, N)
    surrogate = _surrogate(logits, logp_old, advantages, rollout)  # ratio = 1 here: L(θ_old) = (1/S) Σ Σ A
    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    g = torch.cat([(d if d is not None else torch.zeros_like(p)).reshape(-1) for d, p in zip(grads, params)])  # (P,)
    before = surrogate.item()
    row = {"kl/delta": config.delta, "surrogate/before": before, "surrogate/after": before,
           "kl/mean": 0.0, "kl/max": 0.0, "kl/full_step": math.nan, "step/accepted": 0, "step/backtracks": 0,
           "step/size": 0.0, "step/fraction": 0.0, "grad/norm": float(g.norm())}

    # x = F⁻¹ g by conjugate gradient, from Fisher-vector products only
    fvp = fisher_vector_product(model, rollout, logits_old, damping=config.damping, temperature=temperature)
    x, info = conjugate_gradient(fvp, g, iterations=config.cg_iterations, tolerance=config.cg_tolerance)
    row.update({"cg/iterations": info.iterations, "cg/residual": info.relative_residual,
                "cg/converged": int(info.converged)})
    if not info.converged:
        row["step/outcome"] = "cg_not_converged"  # an unconverged x is not F⁻¹ g: reject, never use it
        return row
    # xᵀ F x of the KL's own Hessian: CG's product is (F + λI) x, so take the damping back out. The damping
    # only shapes the direction x; the step length answers to the undamped quadratic model of the KL
    curvature = float(x @ info.fx) - config.damping * float(x @ x)
    if not (curvature > 0 and math.isfinite(curvature)):
        row["step/outcome"] = "no_direction"  # g = 0 (every reward equal), or x has no curvature: nothing to climb
        return row
    # the largest step along x whose quadratic KL model ½ (βx)ᵀF(βx) equals δ: β = sqrt(2δ / xᵀFx)
    beta = math.sqrt(2 * config.delta / curvature)
    full_step = beta * x  # (P,)

    # backtracking line search on θ_old + α^k·β·x: accept the first try inside the trust region that improves L
    with torch.no_grad():
        for k in range(config.max_backtracks + 1):
            fraction = config.backtrack_ratio**k
            vector_to_parameters(theta_old + fraction * full_step, params)
            trial = policy_logits(model, rollout, temperature=temperature)  # (B, N, V)
            if not bool(torch.isfinite(trial).all()):
                continue  # a step so large the logits overflowed: shrink it
            kl = kl_divergence(logits_old, trial)  # (B, N) Eq. 8
            kl_mean = float(masked_mean(kl, mask.to(kl.dtype)))
            kl_max = float(kl.masked_fill(mask == 0, 0).max())  # the one token that moved most
            if k == 0:
                row["kl/full_step"] = kl_mean
            after = float(_surrogate(trial, logp_old, advantages, rollout))
            # Eq. 10, relaxed: mean over i, t of D_KL(π_old(·|s_it) ‖ π_new(·|s_it)) ≤ δ; and L improved
            if trpo_constraint_satisfied(kl.clamp_min(0), mask, delta=config.delta) and after > before:
                row.update({"kl/mean": kl_mean, "kl/max": kl_max, "surrogate/after": after, "step/accepted": 1,
                            "step/backtracks": k, "step/size": float((fraction * full_step).norm()),
                            "step/fraction": fraction, "step/outcome": "accepted"})
                return row
        vector_to_parameters(theta_old, params)  # nothing acceptable: restore θ_old exactly
    row.update({"step/backtracks": config.max_backtracks + 1, "step/outcome": "line_search_failed"})
    return row


# ---- the loops ----------------------------------------------------------------------------------------------


def _check_vocabulary(model, tokenizer) -> None:
    if len(tokenizer) != _vocabulary(model):
        raise ValueError(f"tokenizer: expected the model's vocabulary of {_vocabulary(model)} tokens, "
                         f"got a tokenizer of {len(tokenizer)}")


class _BatchDrawer:
    """``rl.BatchDrawer``'s batch, with TRPO's advantages A = R - mean(R) and the batch's logged numbers."""

    def __init__(self, model, tokenizer, config: _BatchSettings, questions: Sequence[Question] | None):
        pool = prompt_pool(config.prompts) if questions is None else list(questions)
        self.draw = BatchDrawer(model, tokenizer, pool, REWARDS[config.reward], seed=config.seed,
                                batch_size=config.prompts_per_update, temperature=config.temperature,
                                max_new_tokens=config.max_new_tokens)

    def __call__(self) -> tuple[Rollout, Tensor, dict[str, float]]:
        _, rollout, _, rewards = self.draw()  # (B,) on the model's device
        advantages = batch_advantages(rewards, rollout.response_mask.to(rewards.device))  # (B, N)
        row = {"reward/mean": rewards.mean().item(),
               "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
               "response/length": rollout.response_lengths.float().mean().item()}
        return rollout, advantages, row


def _run(name: str, model, tokenizer, config: _BatchSettings, update, *, questions, eval_questions,
         progress: bool) -> History:
    """The loop both procedures share: draw a batch, ``update(rollout, advantages) -> metrics``, evaluate."""
    _check_vocabulary(model, tokenizer)
    eval_questions = heldout_questions(config.prompts) if eval_questions is None else list(eval_questions)
    seed_everything(config.seed)
    draw = _BatchDrawer(model, tokenizer, config, questions)
    history = History()
    model.eval()  # no dropout: the distribution that sampled and the one scored are the same
    if eval_questions:
        history.append({"step": -1, **heldout_scores_by_category(model, tokenizer, eval_questions)})
    bar = tqdm(range(config.updates), desc=name, disable=not progress)
    for step in bar:
        rollout, advantages, row = draw()
        row = {"step": step, **row, **update(rollout, advantages)}
        if eval_questions and ((step + 1) % config.eval_every == 0 or step == config.updates - 1):
            row.update(heldout_scores_by_category(model, tokenizer, eval_questions))
        bar.set_postfix(kl=f"{row['kl/mean']:.4f}", reward=f"{row['reward/mean']:.3f}")
        history.append(row)
    return history


def trpo(
    model,
    tokenizer,
    config: TRPOConfig = TRPOConfig(),
    *,
    questions: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    progress: bool = True,
) -> History:
    """Train ``model`` (e.g. the SFT checkpoint) in place with TRPO, Eq. (10); return the History.

    Each update samples one response per prompt for ``prompts_per_update`` prompts from the current policy,
    scores it, and takes one ``trpo_step`` with A_it = R_i - mean(R) (a constant baseline on every token).

    The reward is the toy world's gold score in [0, 1] by default (``reward="gold"``): dense (a wrong but
    well-formed answer still earns part of it, so most batches have a spread of rewards to learn from, where
    exact match is often all 0 or all 1), bounded, so advantages are of order 1 and δ means the same from batch
    to batch, and the true quality that chapter 08 later measures proxy rewards against.

    - ``questions``: the prompt pool (default ``prompt_pool(config.prompts)``); ``eval_questions``: held out,
      answered greedily every ``eval_every`` updates and at the end (default ``heldout_questions(...)``).

    Logged every update: ``reward/mean``, ``reward/std``, ``response/length``, ``step/skipped`` (rejected
    updates so far) and everything ``trpo_step`` returns; every ``eval_every`` updates and at the end
    ``eval/gold_score``, ``eval/accuracy`` and both per category (``eval/gold_score/math``, ...); step -1 is
    the start.
    """
    if not isinstance(config, TRPOConfig):
        raise ValueError(f"config: expected a TRPOConfig, got {type(config).__name__}")
    skipped = 0

    def update(rollout: Rollout, advantages: Tensor) -> dict[str, float]:
        nonlocal skipped
        row = trpo_step(model, rollout, advantages, config)
        skipped += 1 - row["step/accepted"]
        return {**row, "step/skipped": skipped}

    return _run(f"trpo (δ={config.delta:g})", model, tokenizer, config, update, questions=questions,
                eval_questions=eval_questions, progress=progress)


def trpo_penalty(
    model,
    tokenizer,
    config: PenaltyConfig = PenaltyConfig(),
    *,
    questions: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    progress: bool = True,
) -> History:
    """Train ``model`` in place with Eq. (9), TRPO's penalty form; return the History.

    Batches, rewards and advantages as in ``trpo``. On each batch, ``steps_per_batch`` Adam steps on

        TRPO Loss = -(1/S) Σ_i Σ_t π_θ/π_old · A_it + β · KL̄(θ),   KL̄ from kl_divergence(logits_old, logits)

    with π_old the policy that sampled the batch (its logits fixed before the first step). The Adam state
    carries over from batch to batch.

    Logged every update, beside ``reward/*`` and the evaluations: ``kl/mean`` (KL̄ measured on the batch after
    its last step, to compare with TRPO's δ), ``kl/max`` (its largest single token), ``kl/beta``,
    ``surrogate/before`` and ``surrogate/after``, ``loss/trpo_penalty`` (at the last step), ``grad/norm`` (of the last step, before clipping).
    """
    if not isinstance(config, PenaltyConfig):
        raise ValueError(f"config: expected a PenaltyConfig, got {type(config).__name__}")
    params = _trainable(model)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)

    def update(rollout: Rollout, advantages: Tensor) -> dict[str, float]:
        mask = rollout.response_mask.to(advantages.device)  # (B, N)
        with torch.no_grad():
            logits_old = policy_logits(model, rollout, temperature=config.temperature)  # (B, N, V)
            logp_old = _response_logp(logits_old, rollout)  # (B, N)
            before = float(_surrogate(logits_old, logp_old, advantages, rollout))
        for _ in range(config.steps_per_batch):
            logits = policy_logits(model, rollout, temperature=config.temperature)  # (B, N, V), gradients flow
            kl = kl_divergence(logits_old, logits)  # (B, N) Eq. 8, exact; the old side is a constant
            # Eq. 9: -(1/S) Σ_i Σ_t π1/π0 · A + β · D_KL(π0 ‖ π1), D_KL averaged over the response tokens
            loss, _ = trpo_penalty_loss(_response_logp(logits, rollout), logp_old, advantages, kl, mask,
                                        beta=config.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
        with torch.no_grad():
            logits = policy_logits(model, rollout, temperature=config.temperature)  # (B, N, V)
            kl = kl_divergence(logits_old, logits)  # (B, N)
            kl_mean = float(masked_mean(kl, mask.to(kl.dtype)))
            kl_max = float(kl.masked_fill(mask == 0, 0).max())
            after = float(_surrogate(logits, logp_old, advantages, rollout))
        return {"kl/mean": kl_mean, "kl/max": kl_max, "kl/beta": config.beta, "surrogate/before": before,
                "surrogate/after": after, "loss/trpo_penalty": loss.item(), "grad/norm": float(grad_norm)}

    return _run(f"trpo penalty (β={config.beta:g})", model, tokenizer, config, update, questions=questions,
                eval_questions=eval_questions, progress=progress)


# ---- the chapter's plot -------------------------------------------------------------------------------------


def plot_trpo(history_trpo: History, histories_penalty: Mapping[float, History], delta: float, axes=None):
    """Chapter 07's figure: the constrained form against the penalty form, per update.

    Six panels: (1) TRPO's measured mean KL per update against δ (a horizontal line), and its first try's;
    (2) the penalty form's mean KL for each β, against the same δ; (3) TRPO's surrogate gain of each update,
    L(θ_new) - L(θ_old) (0 for a rejected one); (4) the sampled reward of every run; (5) TRPO's accepted-step rate (running) and backtracking count;
    (6) the held-out gold score of every run. ``axes``: six Axes (any shape), or None for a new 2 × 3 figure.
    Returns the axes, flattened.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    delta = check_positive("delta", delta)
    if not isinstance(histories_penalty, Mapping):
        raise ValueError(f"histories_penalty: expected a dict beta -> History, got {type(histories_penalty).__name__}")
    if axes is None:
        _, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained")
    axes = list(np.asarray(axes).flatten())
    if len(axes) != 6:
        raise ValueError(f"axes: expected 6 Axes, got {len(axes)}")

    def updates(history: History) -> list[dict]:
        return [row for row in history if row.get("step", 0) >= 0 and "kl/mean" in row]

    rows = updates(history_trpo)
    steps = [row["step"] for row in rows]
    ax = axes[0]
    ax.plot(steps, [row["kl/mean"] for row in rows], marker="o", markersize=3, label="after the update")
    ax.plot(steps, [row["kl/full_step"] for row in rows], marker="x", markersize=4, linestyle="none", alpha=0.6,
            label="first try, β·x")
    ax.axhline(delta, color="black", linestyle="--", linewidth=1, label=f"δ = {delta:g}")
    ax.set_title("TRPO (Eq. 10): mean KL(π_old‖π_new) per update")
    ax.set_ylabel("mean KL per token")

    ax = axes[1]
    for beta, history in histories_penalty.items():
        penalty_rows = updates(history)
        ax.plot([r["step"] for r in penalty_rows], [r["kl/mean"] for r in penalty_rows], marker="o", markersize=3,
                label=f"β = {beta:g}")
    ax.axhline(delta, color="black", linestyle="--", linewidth=1, label=f"TRPO's δ = {delta:g}")
    ax.set_yscale("log")
    ax.set_title("penalty form (Eq. 9): mean KL per update")
    if not histories_penalty:
        ax.text(0.5, 0.5, "no penalty-form run given", ha="center", va="center", transform=ax.transAxes)

    ax = axes[2]
    ax.plot(steps, [row["surrogate/after"] - row["surrogate/before"] for row in rows], marker="o", markersize=3,
            label="L(θ_new) - L(θ_old)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title("TRPO: surrogate gain per update, L = (1/S) Σ Σ ratio·A")

    ax = axes[3]
    ax.plot(steps, [row["reward/mean"] for row in rows], label=f"TRPO δ={delta:g}")
    for beta, history in histories_penalty.items():
        penalty_rows = updates(history)
        ax.plot([r["step"] for r in penalty_rows], [r["reward/mean"] for r in penalty_rows], alpha=0.7,
                label=f"penalty β={beta:g}")
    ax.set_title("sampled reward R per update")

    ax = axes[4]
    accepted = np.array([row["step/accepted"] for row in rows], dtype=float)
    ax.plot(steps, np.cumsum(accepted) / np.arange(1, len(accepted) + 1), color="tab:green",
            label="accepted-step rate (so far)")
    ax.set_ylim(-0.05, 1.05)
    twin = ax.twinx()
    twin.bar(steps, [row["step/backtracks"] for row in rows], alpha=0.3, color="tab:purple", label="backtracks")
    twin.set_ylabel("line-search tries rejected")
    ax.set_title("TRPO: accepted steps and backtracking")
    twin.legend(frameon=False, loc="lower right")

    ax = axes[5]
    for label, history in [(f"TRPO δ={delta:g}", history_trpo)] + [
            (f"penalty β={beta:g}", h) for beta, h in histories_penalty.items()]:
        evals = [row for row in history if "eval/gold_score" in row]
        ax.plot([r["step"] for r in evals], [r["eval/gold_score"] for r in evals], marker="o", markersize=3,
                label=label)
    ax.set_title("held-out gold score (greedy)")

    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    return axes
