"""Chapter 06: importance sampling (§8.5, Eq. 18; §4.5, Eq. 7) and the KL divergence (§8.4, Eq. 8), measured.

The equations are in ``rlmt_edu.losses`` (``importance_sampling_estimate``, ``importance_weighted_loss``,
``kl_divergence``, ``kl_estimator_k1/k2/k3``); this module holds the chapter's experiments around them:

- ``BasketballEvent``, ``basketball_estimates``: §8.5's example, the naive, the reweighted and the Eq. 18
  estimate of the mean height from the paper's 200 pros and 100 others;
- ``importance_sampling_drift``: the error and the effective sample size of Eq. 18 as the sampling
  distribution Q moves away from the target P (seeded Monte Carlo);
- ``importance_weighted_steps``: Eq. 7 on a tiny GPT, several steps on ONE batch sampled from π0, recording how
  the per-token ratio π1/π0 spreads (the reason PPO clips);
- ``fit_gaussian``: forward KL(p‖q) against reverse KL(q‖p) when a single Gaussian q is fitted to a
  two-peaked p (mode covering against mode seeking);
- ``kl_estimator_study``: k1, k2, k3 against the exact KL on a model's own next-token distributions: their
  bias and spread as the number of samples grows, and the gradient each gives when used as a loss.

The heights of the basketball example are not in the paper (it gives only the shares and the counts); ours are
labelled as such in ``BasketballEvent``.

Shape legend: B batch, T tokens (N response tokens), V vocabulary; P states (positions), M samples per state,
R repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlmt_edu.losses import (
    importance_sampling_estimate,
    importance_weighted_loss,
    kl_divergence,
    kl_estimator_k1,
    kl_estimator_k2,
    kl_estimator_k3,
)
from rlmt_edu.losses._checks import check_choice, check_positive, check_scalar_between
from rlmt_edu.rl import RewardFn, gold_reward, sample_responses, score_responses
from rlmt_edu.rollout import Rollout, policy_logits, policy_logprobs
from rlmt_edu.utils import History
from rlmt_edu.world.tasks import Question

Tensor = torch.Tensor

ESTIMATORS = {"k1": kl_estimator_k1, "k2": kl_estimator_k2, "k3": kl_estimator_k3}


# ---- §8.5: the basketball event -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BasketballEvent:
    """§8.5's event: 5% pro players (the paper's share). The heights are ours, not the paper's (it gives none):
    normal, in centimetres."""

    share_pro: float = 0.05  #: P(pp), the paper's 5%
    pro_mean: float = 200.0  #: mean height of a pro player (cm), an assumption of this book
    pro_std: float = 8.0  #: their spread (cm)
    other_mean: float = 170.0  #: mean height of everyone else (cm)
    other_std: float = 9.0  #: their spread (cm)

    def __post_init__(self):
        check_scalar_between("share_pro", self.share_pro, 0.0, 1.0)
        for name in ("pro_std", "other_std"):
            check_positive(name, getattr(self, name))

    @property
    def true_mean(self) -> float:
        """The event's mean height: P(pp)·mean_pp + P(np)·mean_np."""
        return self.share_pro * self.pro_mean + (1 - self.share_pro) * self.other_mean

    def draw(self, is_pro: Tensor, generator: torch.Generator) -> Tensor:
        """One height per person, pro or not as ``is_pro`` (N,) says: (N,) float64."""
        noise = torch.randn(is_pro.shape, generator=generator, dtype=torch.float64)
        return torch.where(is_pro, self.pro_mean + self.pro_std * noise, self.other_mean + self.other_std * noise)


def basketball_estimates(heights: Tensor, is_pro: Tensor, share_pro: float) -> dict[str, float]:
    """Three estimates of the mean height from a sample with pros over-represented (§8.5).

    - ``naive``: the plain mean of all N heights (each sample weighs 1/N whatever its group);
    - ``reweighted``: P(pp)·(mean of the pros) + P(np)·(mean of the others), the paper's first formula;
    - ``eq18``: Eq. 18, (1/N) Σ_i P(x_i)/Q(x_i)·x_i, with Q the groups' shares in the sample.

    The last two are the same number: the paper's derivation rewrites one as the other.
    """
    is_pro = is_pro.bool()
    n, n_pro = len(heights), int(is_pro.sum())
    if n_pro in (0, n):
        raise ValueError(f"is_pro: expected both groups in the sample, got {n_pro} pros of {n}")
    def per_person(pro: float, other: float) -> Tensor:  # (N,) float64, the pro value where is_pro
        return torch.where(is_pro, torch.tensor(pro, dtype=torch.float64), torch.tensor(other, dtype=torch.float64))

    q = per_person(n_pro / n, (n - n_pro) / n)  # Q(x_i): the group's share in the sample
    p = per_person(share_pro, 1 - share_pro)  # P(x_i): its share at the event
    return {
        "naive": float(heights.mean()),
        "reweighted": share_pro * float(heights[is_pro].mean()) + (1 - share_pro) * float(heights[~is_pro].mean()),
        "eq18": float(importance_sampling_estimate(heights, p, q)),
    }


def effective_sample_size(weights: Tensor) -> Tensor:
    """Kish's effective sample size (Σ w)² / Σ w² over the last dimension: N when every weight is equal, near 1
    when one sample carries all the weight. Beyond the paper; the usual diagnostic of importance sampling."""
    return weights.sum(-1) ** 2 / (weights**2).sum(-1)


def importance_sampling_drift(event: BasketballEvent, sampling_shares: Sequence[float], *, n: int = 300,
                              repeats: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    """Eq. 18 as the sampling distribution Q drifts from the target P, by seeded Monte Carlo.

    For each Q(pp) in ``sampling_shares`` draw ``repeats`` samples of ``n`` people, each a pro with probability
    Q(pp), and estimate the mean height two ways: the naive mean, and Eq. 18 with weights P(x_i)/Q(x_i) (Q
    known, as it is for the old model's samples in Eq. 7). Returns arrays over the shares: ``rmse_naive``,
    ``rmse_eq18``, ``bias_naive``, ``bias_eq18``, ``ess`` (mean effective sample size / n) and
    ``max_weight_share`` (mean share of the total weight carried by the heaviest sample).
    """
    shares = np.asarray(sampling_shares, dtype=float)
    if shares.ndim != 1 or not ((shares > 0) & (shares < 1)).all():
        raise ValueError(f"sampling_shares: expected values in (0, 1), got {sampling_shares!r}")
    generator = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("rmse_naive", "rmse_eq18", "bias_naive", "bias_eq18", "ess", "max_weight_share")}
    for q_pro in shares:
        is_pro = torch.rand(repeats, n, generator=generator, dtype=torch.float64) < q_pro  # (R, n)
        heights = event.draw(is_pro, generator)  # (R, n)
        weights = torch.where(is_pro, event.share_pro / q_pro, (1 - event.share_pro) / (1 - q_pro))  # P/Q
        naive = heights.mean(-1)  # (R,)
        eq18 = (weights * heights).mean(-1)  # (R,) Eq. 18, one estimate per repeat
        for name, estimate in (("naive", naive), ("eq18", eq18)):
            error = estimate - event.true_mean
            out[f"rmse_{name}"].append(float(error.pow(2).mean().sqrt()))
            out[f"bias_{name}"].append(float(error.mean()))
        out["ess"].append(float((effective_sample_size(weights) / n).mean()))
        out["max_weight_share"].append(float((weights.max(-1).values / weights.sum(-1)).mean()))
    return {"sampling_share": shares, **{k: np.array(v) for k, v in out.items()}}


# ---- §4.5, Eq. 7: learning from the old model's samples ------------------------------------------------------


def importance_weighted_steps(
    model, tokenizer, questions: Sequence[Question], *, steps: int, learning_rate: float,
    reward_fn: RewardFn = gold_reward, seed: int = 0, temperature: float = 1.0, max_new_tokens: int = 16,
) -> tuple[Rollout, History, list[Tensor]]:
    """Sample ONE batch from ``model`` (π0), then take ``steps`` optimiser steps of Eq. 7 on it, in place.

    The advantage of every token of response i is R(text_i) minus the batch's mean reward (a constant
    baseline, Eq. 3). Each step re-scores the same tokens under the updated model (π1) and logs the
    ``importance/*`` metrics of ``importance_weighted_loss`` and the share of ratios outside [0.8, 1.2]
    (``ratio/outside_0.2``). Returns the rollout, the History (row 0 is the on-policy start, ratio 1) and the
    ratios π1/π0 of the response tokens before each step and after the last one (``steps + 1`` tensors).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    learning_rate = check_positive("learning_rate", learning_rate)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    rollout, responses = sample_responses(model, tokenizer, questions, temperature=temperature,
                                          max_new_tokens=max_new_tokens, generator=generator)
    rewards = score_responses(reward_fn, questions, responses).to(device)  # (B,)
    mask = rollout.response_mask  # (B, N)
    advantages = (rewards - rewards.mean())[:, None].expand_as(rollout.logp)  # (B, N) R(text_i) - mean R
    logp_old = rollout.logp  # (B, N) log π0, a constant
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    history, ratios = History(), []
    model.eval()  # no dropout: π1 scored the way it samples
    for step in range(steps + 1):
        logp = policy_logprobs(model, rollout, temperature=temperature)  # (B, N) log π1, with gradients
        # Eq. 7: -(1/S) Σ_i Σ_t π1(a_it|s_it)/π0(a_it|s_it) · A_1(a_it, s_it)
        loss, metrics = importance_weighted_loss(logp, logp_old, advantages, mask)
        ratio = torch.exp(logp.detach() - logp_old)[mask != 0]  # response tokens only
        ratios.append(ratio.cpu())
        history.append({"step": step, "loss/eq7": loss.item(), **metrics,
                        "ratio/outside_0.2": float(((ratio < 0.8) | (ratio > 1.2)).float().mean())})
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return rollout, history, ratios


def exact_kl_per_position(model_old, model_new, rollout: Rollout) -> Tensor:
    """Eq. 8 at every response position: D_KL(π0(·|s_t) ‖ π1(·|s_t)) over the whole vocabulary, (B, N), 0 after
    each response ends. ``model_old`` is π0 (e.g. the SFT model), ``model_new`` is π1."""
    with torch.no_grad():
        logits_old = policy_logits(model_old, rollout)  # (B, N, V)
        logits_new = policy_logits(model_new, rollout)  # (B, N, V)
        kl = kl_divergence(logits_old, logits_new)  # (B, N) Eq. 8
    return torch.where(rollout.response_mask.to(kl.device) != 0, kl, torch.zeros_like(kl))


# ---- §8.4: forward and reverse KL, fitted ---------------------------------------------------------------------


def two_peaked_target(grid: Tensor, *, separation: float, weight: float, std: float = 1.0) -> Tensor:
    """Log-probabilities on ``grid`` (M,) of a mixture of two normals at ±separation/2 (std ``std``), the left one
    with mixture weight ``weight``: (M,), normalised over the grid."""
    check_positive("separation", separation)
    weight = check_scalar_between("weight", weight, 0.0, 1.0)
    check_positive("std", std)
    if not 0 < weight < 1:
        raise ValueError(f"weight: expected a number in (0, 1), got {weight!r}")
    left = math.log(weight) - 0.5 * ((grid + separation / 2) / std) ** 2
    right = math.log(1 - weight) - 0.5 * ((grid - separation / 2) / std) ** 2
    return torch.log_softmax(torch.logaddexp(left, right), dim=-1)  # (M,)


@dataclass(frozen=True)
class GaussianFit:
    """A normal q = N(mean, std²) on the grid, fitted to a target by one direction of KL."""

    direction: str  #: "forward" minimises KL(p‖q), "reverse" minimises KL(q‖p)
    mean: float
    std: float
    logq: Tensor  #: (M,) its log-probabilities on the grid
    forward_kl: float  #: KL(p‖q) at the fit
    reverse_kl: float  #: KL(q‖p) at the fit


def fit_gaussian(target_logp: Tensor, grid: Tensor, *, direction: str, steps: int = 500, learning_rate: float = 0.05,
                 init_mean: float = 1.0, init_std: float = 0.5) -> GaussianFit:
    """Fit q = N(μ, σ²) on ``grid`` to the target p (log-probabilities ``target_logp``, (M,)) by gradient descent
    (Adam) on one direction of Eq. 8's divergence (the §8.4 definition, over the grid):

    - ``direction="forward"``: minimise D_KL(p‖q) = Σ_x p(x) log(p(x)/q(x)); q must cover every x where p has
      mass, so it spreads over both peaks (mode covering);
    - ``direction="reverse"``: minimise D_KL(q‖p) = Σ_x q(x) log(q(x)/p(x)); q is punished for mass where p has
      little, so it settles on one peak (mode seeking). Which peak depends on where it starts: ``init_mean``.
    """
    check_choice("direction", direction, ("forward", "reverse"))
    mean = torch.tensor(float(init_mean), dtype=grid.dtype, requires_grad=True)
    log_std = torch.tensor(math.log(check_positive("init_std", init_std)), dtype=grid.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([mean, log_std], lr=learning_rate)

    def logq_now() -> Tensor:
        return torch.log_softmax(-0.5 * ((grid - mean) / log_std.exp()) ** 2, dim=-1)  # (M,)

    target = target_logp.detach()
    for _ in range(steps):
        logq = logq_now()
        loss = kl_divergence(target, logq, inputs="logprobs") if direction == "forward" else \
            kl_divergence(logq, target, inputs="logprobs")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logq = logq_now()
        return GaussianFit(direction, float(mean), float(log_std.exp()), logq,
                           float(kl_divergence(target, logq, inputs="logprobs")),
                           float(kl_divergence(logq, target, inputs="logprobs")))


def plot_kl_fits(separation: float = 4.0, weight: float = 0.5, *, ax=None, grid: Tensor | None = None):
    """Draw the two-peaked target and its forward- and reverse-KL Gaussian fits; returns (ax, fits)."""
    import matplotlib.pyplot as plt

    grid = torch.linspace(-12, 12, 601, dtype=torch.float64) if grid is None else grid
    target = two_peaked_target(grid, separation=separation, weight=weight)
    fits = {d: fit_gaussian(target, grid, direction=d) for d in ("forward", "reverse")}
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.4))
    ax.fill_between(grid, target.exp(), color="0.8", label="target p (two peaks)")
    for (d, fit), colour in zip(fits.items(), ("tab:blue", "tab:red")):
        what = "KL(p‖q): covers both" if d == "forward" else "KL(q‖p): picks one"
        ax.plot(grid, fit.logq.exp(), color=colour, lw=2,
                label=f"{d} {what}  (μ={fit.mean:+.2f}, σ={fit.std:.2f})")
    ax.set_xlim(-8, 8)
    ax.set_xlabel("x")
    ax.set_ylabel("probability on the grid")
    ax.set_title(f"one Gaussian fitted to two peaks (separation {separation:g}, left weight {weight:g})")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return ax, fits


# ---- the per-token estimators k1, k2, k3 against the exact KL --------------------------------------------------


def response_distributions(model, rollout: Rollout) -> Tensor:
    """The next-token logits at every response token of ``rollout`` under ``model``, stacked: (P, V), P the
    number of response tokens (the states s_t the model actually visited)."""
    with torch.no_grad():
        logits = policy_logits(model, rollout)  # (B, N, V)
    return logits[rollout.response_mask.to(logits.device) != 0].double().cpu()  # (P, V)


def kl_estimator_study(logits: Tensor, logits_ref: Tensor, *, samples_per_state: Sequence[int] = (1, 4, 16, 64),
                       repeats: int = 200, seed: int = 0) -> dict:
    """k1, k2, k3 against the exact D_KL(π‖π_ref), on the states of ``logits`` (π) and ``logits_ref`` (π_ref),
    both (P, V).

    Values: draw M tokens a ~ π(·|s) at each of the P states, ``repeats`` times; each estimator's estimate of
    the mean KL over the states is the mean of k(a) over the M·P draws. Reported per estimator and M: ``bias``
    (mean estimate - exact mean KL), ``spread`` (std of the estimate over repeats), and ``exact_bias`` (the
    bias with M → ∞, Σ_a π(a) k(a) averaged over states, computed over the whole vocabulary).

    Gradients, with respect to the logits of π at every state (the parameters' gradient is the network's
    Jacobian times this one): the estimator used as a loss, mean over the draws of k(a), the sampled tokens
    held fixed as in any training step. Reported per estimator and M: ``grad_error``, the mean over repeats of
    ‖ĝ - g*‖ / ‖g*‖ with g* = ∇ D_KL(π‖π_ref) (the exact reverse KL's gradient); and per estimator the cosines
    of its expected gradient (M → ∞) with g* and with ∇ D_KL(π_ref‖π), and its norm relative to ‖g*‖.
    """
    if logits.shape != logits_ref.shape or logits.dim() != 2:
        raise ValueError(f"logits_ref: expected the shape of logits {tuple(logits.shape)} (P, V), "
                         f"got {tuple(logits_ref.shape)}")
    generator = torch.Generator().manual_seed(seed)
    z = logits.detach().double().requires_grad_(True)  # (P, V)
    logp_ref_all = torch.log_softmax(logits_ref.detach().double(), -1)  # (P, V)
    logp_all = torch.log_softmax(z, -1)  # (P, V)
    probs = logp_all.detach().exp()  # (P, V)

    exact = kl_divergence(z, logits_ref.double())  # (P,) Eq. 8, D_KL(π‖π_ref) per state
    target = float(exact.detach().mean())
    (g_reverse,) = torch.autograd.grad(exact.mean(), z, retain_graph=True)  # (P, V) g*
    (g_forward,) = torch.autograd.grad(kl_divergence(logits_ref.double(), z).mean(), z, retain_graph=True)

    def cosine(a: Tensor, b: Tensor) -> float:
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))

    result = {"exact_mean_kl": target, "states": int(z.shape[0]), "samples_per_state": list(samples_per_state),
              "estimators": {}}
    for name, k in ESTIMATORS.items():
        every = k(logp_all, logp_ref_all)  # (P, V): k(a) for every token a at every state
        exact_bias = float((probs * every.detach()).sum(-1).mean()) - target
        # expected gradient as a loss: Σ_a π(a) ∇k(a), the sampling distribution π(a) not differentiated
        (g_expected,) = torch.autograd.grad((probs * every).sum(-1).mean(), z, retain_graph=True)
        row = {"exact_bias": exact_bias, "bias": [], "spread": [], "grad_error": [],
               "grad_cosine_reverse": cosine(g_expected, g_reverse),
               "grad_cosine_forward": cosine(g_expected, g_forward),
               "grad_norm_ratio": float(g_expected.norm() / g_reverse.norm())}
        for m in samples_per_state:
            # R repeats × M draws at each of the P states: tokens (R, P, M)
            tokens = torch.multinomial(probs, repeats * m, replacement=True, generator=generator)  # (P, R·M)
            tokens = tokens.reshape(-1, repeats, m).permute(1, 0, 2)  # (R, P, M)
            z_rep = z.detach().expand(repeats, *z.shape).clone().requires_grad_(True)  # (R, P, V)
            logp = torch.log_softmax(z_rep, -1).gather(-1, tokens)  # (R, P, M) log π(a)
            logp_ref = logp_ref_all.expand(repeats, *z.shape).gather(-1, tokens)  # (R, P, M) log π_ref(a)
            values = k(logp, logp_ref).mean(dim=(1, 2))  # (R,) one estimate of the mean KL per repeat
            (grads,) = torch.autograd.grad(values.sum(), z_rep)  # (R, P, V) each repeat's loss gradient
            values = values.detach()
            error = (grads - g_reverse).flatten(1).norm(dim=1) / g_reverse.norm()  # (R,)
            row["bias"].append(float(values.mean()) - target)
            row["spread"].append(float(values.std()))
            row["grad_error"].append(float(error.mean()))
        result["estimators"][name] = row
    return result


def parameter_gradient_cosines(policy, reference, rollout: Rollout) -> dict[str, float]:
    """The same question in parameter space, on the rollout's own sampled tokens (one per state, as in
    training): cos(∇θ mean_t k(a_t), ∇θ mean_t D_KL(π_θ(·|s_t)‖π_ref(·|s_t))) for k1, k2, k3."""
    params = [p for p in policy.parameters() if p.requires_grad]
    mask = rollout.response_mask != 0
    with torch.no_grad():
        logp_ref = policy_logprobs(reference, rollout)[mask]  # (P,)
        logits_ref = policy_logits(reference, rollout)[mask]  # (P, V)

    def flat_grad(loss: Tensor) -> Tensor:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])

    exact = flat_grad(kl_divergence(policy_logits(policy, rollout)[mask], logits_ref).mean()).double()
    out = {}
    for name, k in ESTIMATORS.items():
        g = flat_grad(k(policy_logprobs(policy, rollout)[mask], logp_ref).mean()).double()
        out[name] = float(g @ exact / (g.norm() * exact.norm()).clamp_min(1e-300))
    return out
