"""Chapter 06: the basketball example (§8.5, Eq. 18), importance sampling under drift, Eq. 7 on the tiny GPT,
Eq. 8 per position, forward vs reverse KL fits, and the k1/k2/k3 estimators against the exact KL."""

import copy
import math

import numpy as np
import pytest
import torch

from rlmt_edu.algorithms.importance_and_kl import (
    BasketballEvent,
    basketball_estimates,
    effective_sample_size,
    exact_kl_per_position,
    fit_gaussian,
    importance_sampling_drift,
    importance_weighted_steps,
    kl_estimator_study,
    parameter_gradient_cosines,
    plot_kl_fits,
    two_peaked_target,
)
from rlmt_edu.losses import importance_sampling_estimate
from rlmt_edu.model import load_checkpoint
from rlmt_edu.paths import SFT
from rlmt_edu.rl import prompt_pool
from rlmt_edu.widgets import slider_plot

PAPER_SAMPLE = torch.cat([torch.ones(200, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)])  # 200 pp, 100 np


# ---- §8.5 ------------------------------------------------------------------------------------------------------


def test_the_reweighted_average_is_eq_18_and_the_naive_one_is_biased_upward():
    event = BasketballEvent()
    heights = event.draw(PAPER_SAMPLE, torch.Generator().manual_seed(0))
    estimates = basketball_estimates(heights, PAPER_SAMPLE, event.share_pro)
    assert estimates["eq18"] == pytest.approx(estimates["reweighted"], rel=1e-12)
    assert estimates["naive"] - event.true_mean > 15  # 2/3 of the sample are pros, 5% of the event
    assert abs(estimates["eq18"] - event.true_mean) < 2.0


def test_eq_18_with_the_papers_weights_p_over_q():
    """The paper's last line: (1/300)[Σ_pros 0.05/(2/3)·x_i + Σ_others 0.95/(1/3)·x_i]."""
    heights = BasketballEvent().draw(PAPER_SAMPLE, torch.Generator().manual_seed(1))
    by_hand = (0.05 / (2 / 3) * heights[:200].sum() + 0.95 / (1 / 3) * heights[200:].sum()) / 300
    p = torch.full((300,), 0.95, dtype=torch.float64).masked_fill(PAPER_SAMPLE, 0.05)
    q = torch.full((300,), 1 / 3, dtype=torch.float64).masked_fill(PAPER_SAMPLE, 2 / 3)
    assert float(importance_sampling_estimate(heights, p, q)) == pytest.approx(float(by_hand), rel=1e-12)
    assert basketball_estimates(heights, PAPER_SAMPLE, 0.05)["eq18"] == pytest.approx(float(by_hand), rel=1e-12)


def test_basketball_estimates_need_both_groups():
    with pytest.raises(ValueError, match="is_pro: expected both groups"):
        basketball_estimates(torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.bool), 0.05)


def test_importance_sampling_drift_error_and_effective_sample_size():
    event = BasketballEvent()
    drift = importance_sampling_drift(event, [0.05, 0.3, 0.667, 0.95], n=300, repeats=200, seed=0)
    assert drift["ess"][0] == pytest.approx(1.0)  # Q = P: every weight is 1
    assert drift["rmse_eq18"][0] == pytest.approx(drift["rmse_naive"][0])
    assert (np.diff(drift["ess"]) < 0).all()  # the further Q drifts, the fewer effective samples
    assert (drift["rmse_eq18"][1:3] < drift["rmse_naive"][1:3]).all()  # unbiased beats biased here ...
    assert abs(drift["bias_eq18"][2]) < 0.2 * abs(drift["bias_naive"][2])
    assert drift["rmse_eq18"][3] > drift["rmse_eq18"][1]  # ... but its error grows as the weights blow up


def test_importance_sampling_drift_rejects_shares_outside_0_1():
    with pytest.raises(ValueError, match="sampling_shares"):
        importance_sampling_drift(BasketballEvent(), [0.0, 0.5])


def test_effective_sample_size_is_n_for_equal_weights_and_1_for_one_weight():
    assert float(effective_sample_size(torch.full((7,), 0.3))) == pytest.approx(7.0)
    assert float(effective_sample_size(torch.tensor([0.0, 0.0, 5.0]))) == pytest.approx(1.0)


# ---- Eq. 7 and Eq. 8 on the tiny GPT -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft():
    return load_checkpoint(SFT)


@pytest.fixture(scope="module")
def updated(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model)
    rollout, history, ratios = importance_weighted_steps(policy, tokenizer, prompt_pool()[:24], steps=3,
                                                         learning_rate=1e-4, seed=0)
    return policy, rollout, history, ratios


def test_eq_7_starts_on_policy_then_the_ratios_spread(updated):
    _, _, history, ratios = updated
    assert len(history) == len(ratios) == 4
    # on-policy: ratio 1 up to float rounding (the sampler's cached forward against one full forward pass)
    assert history[0]["importance/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert history[0]["importance/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert history[0]["loss/eq7"] == pytest.approx(0.0, abs=1e-6)  # Σ A = 0 with the mean baseline
    spread = [float(r.log().std()) for r in ratios]
    assert spread[0] < 1e-5 and spread[-1] > spread[1] > 100 * spread[0]
    assert history[-1]["loss/eq7"] < history[0]["loss/eq7"]  # the surrogate improves on its own batch


def test_exact_kl_per_position_is_zero_against_itself_and_positive_after_updates(sft, updated):
    model, _ = sft
    policy, rollout, _, _ = updated
    assert float(exact_kl_per_position(model, model, rollout).abs().max()) < 1e-6
    kl = exact_kl_per_position(model, policy, rollout)  # (B, N)
    assert kl.shape == rollout.response_mask.shape
    assert bool((kl[rollout.response_mask == 0] == 0).all())
    assert float(kl[rollout.response_mask != 0].min()) > -1e-6 and float(kl.max()) > 1e-4


def test_parameter_gradient_cosines_are_numbers_in_minus_one_one(sft, updated):
    model, _ = sft
    policy, rollout, _, _ = updated
    cosines = parameter_gradient_cosines(policy, model, rollout)
    assert set(cosines) == {"k1", "k2", "k3"}
    assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in cosines.values())


# ---- §8.4: forward and reverse KL ---------------------------------------------------------------------------------

GRID = torch.linspace(-14, 14, 701, dtype=torch.float64)  # wide: q's tails must not be cut off by the grid


def test_the_forward_kl_fit_matches_the_targets_mean_and_variance():
    """Minimising KL(p‖q) over normals q matches p's first two moments (mode covering)."""
    target = two_peaked_target(GRID, separation=6.0, weight=0.3)
    p = target.exp()
    mean = float((p * GRID).sum())
    std = float(((p * (GRID - mean) ** 2).sum()).sqrt())
    fit = fit_gaussian(target, GRID, direction="forward")
    assert fit.mean == pytest.approx(mean, abs=0.02)
    assert fit.std == pytest.approx(std, abs=0.02)


def test_the_reverse_kl_fit_picks_one_peak_once_the_peaks_are_apart():
    target = two_peaked_target(GRID, separation=6.0, weight=0.5)
    reverse = fit_gaussian(target, GRID, direction="reverse")
    forward = fit_gaussian(target, GRID, direction="forward")
    assert reverse.mean == pytest.approx(3.0, abs=0.1) and reverse.std == pytest.approx(1.0, abs=0.1)
    assert forward.std > 3.0
    assert reverse.reverse_kl < forward.reverse_kl and forward.forward_kl < reverse.forward_kl


@pytest.mark.parametrize("kwargs, name", [(dict(separation=0.0, weight=0.5), "separation"),
                                          (dict(separation=2.0, weight=1.0), "weight"),
                                          (dict(separation=2.0, weight=-0.1), "weight")])
def test_two_peaked_target_rejects_bad_shapes(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        two_peaked_target(GRID, **kwargs)


def test_fit_gaussian_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        fit_gaussian(two_peaked_target(GRID, separation=2.0, weight=0.5), GRID, direction="sideways")


def test_the_slider_plot_draws_the_default_plot_and_rejects_bad_ranges():
    import matplotlib

    matplotlib.use("Agg")
    ax, fits = plot_kl_fits(6.0, 0.5)
    assert set(fits) == {"forward", "reverse"} and len(ax.lines) == 2
    widget = slider_plot(lambda separation: plot_kl_fits(separation, 0.5), separation=(1.0, 8.0, 0.5, 6.0))
    assert widget is not None and len(widget.children) >= 2  # a slider and the output
    with pytest.raises(ValueError, match="separation"):
        slider_plot(plot_kl_fits, separation=(1.0, 8.0, 0.5, 9.0))


# ---- k1, k2, k3 against the exact KL -------------------------------------------------------------------------------


def test_kl_estimator_study_bias_spread_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits_ref = torch.randn(40, 12, generator=g, dtype=torch.float64)
    logits = logits_ref + 0.8 * torch.randn(40, 12, generator=g, dtype=torch.float64)
    study = kl_estimator_study(logits, logits_ref, samples_per_state=(1, 16), repeats=100, seed=0)
    k1, k2, k3 = (study["estimators"][k] for k in ("k1", "k2", "k3"))
    assert abs(k1["exact_bias"]) < 1e-12 and abs(k3["exact_bias"]) < 1e-12  # unbiased
    assert k2["exact_bias"] > 1e-3  # biased
    for row in (k1, k2, k3):
        assert row["spread"][1] < row["spread"][0]  # more samples, less spread
    # as losses: k1's expected gradient is zero, k2's is the reverse KL's, k3's the forward KL's
    assert k1["grad_norm_ratio"] < 1e-10
    assert k2["grad_cosine_reverse"] == pytest.approx(1.0, abs=1e-10)
    assert k3["grad_cosine_forward"] == pytest.approx(1.0, abs=1e-10)
    assert k3["grad_cosine_reverse"] < 0.999
    assert k2["grad_error"][1] < k2["grad_error"][0]
    assert math.isfinite(study["exact_mean_kl"]) and study["exact_mean_kl"] > 0


def test_kl_estimator_study_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits_ref"):
        kl_estimator_study(torch.zeros(3, 4), torch.zeros(3, 5))
