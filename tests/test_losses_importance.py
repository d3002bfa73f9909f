"""Tests for Eq. (18) ``importance_sampling_estimate`` and Eq. (7) ``importance_weighted_loss``."""

import math

import pytest
import torch

from rlmt_edu.losses.importance import importance_sampling_estimate, importance_weighted_loss
from rlmt_edu.losses.policy_gradient import reinforce_loss

NAN, INF = float("nan"), float("inf")
LN2 = math.log(2.0)


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- importance_sampling_estimate (Eq. 18)


def test_importance_sampling_estimate_hand_value():
    values = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([0.5, 0.25, 0.25])
    sampling = torch.tensor([0.25, 0.25, 0.5])
    # weights P/Q = [2, 1, 0.5]; (2·1 + 1·2 + 0.5·3) / 3 = 5.5 / 3
    assert float(importance_sampling_estimate(values, target, sampling)) == pytest.approx(5.5 / 3)
    got = importance_sampling_estimate(values, target.log(), sampling.log(), inputs="logprobs")
    assert float(got) == pytest.approx(5.5 / 3)


def test_importance_sampling_estimate_matches_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(9, generator=g, dtype=torch.float64)
    target = torch.rand(9, generator=g, dtype=torch.float64)
    sampling = 0.01 + 0.99 * torch.rand(9, generator=g, dtype=torch.float64)
    expected = sum(float(p) / float(q) * float(x) for x, p, q in zip(values, target, sampling)) / 9
    assert float(importance_sampling_estimate(values, target, sampling)) == pytest.approx(expected, abs=1e-12)
    in_logs = importance_sampling_estimate(values, target.log(), sampling.log(), inputs="logprobs")
    assert float(in_logs) == pytest.approx(expected, abs=1e-12)


def test_importance_sampling_estimate_paper_basketball_example():
    """§8.5: 5% of the event are pro players. 200 pros and 100 others are measured, so the sampling
    distribution is Q(pp) = 2/3, Q(np) = 1/3 while P(pp) = 0.05, P(np) = 0.95. (The paper later calls them
    "those 100 pro-player samples"; the setup and formulas have 200 pros, x_1..x_200, and 100 others.)"""
    g = torch.Generator().manual_seed(1)
    pros = 200.0 + 8.0 * torch.randn(200, generator=g, dtype=torch.float64)
    others = 170.0 + 10.0 * torch.randn(100, generator=g, dtype=torch.float64)
    direct = 0.05 * pros.mean() + 0.95 * others.mean()

    heights = torch.cat([pros, others])  # (300,)
    is_pro = torch.arange(300) < 200
    f64 = {"dtype": torch.float64}
    target = torch.where(is_pro, torch.tensor(0.05, **f64), torch.tensor(0.95, **f64))  # P(pp), P(np)
    sampling = torch.where(is_pro, torch.tensor(2 / 3, **f64), torch.tensor(1 / 3, **f64))  # Q(pp), Q(np)
    eq18 = importance_sampling_estimate(heights, target, sampling)
    assert float(eq18) == pytest.approx(float(direct), rel=1e-12)
    # the plain average of all 300 heights gives the pros a weight of 2/3 and is badly biased upwards
    assert float(heights.mean()) - float(eq18) > 15.0


def test_importance_sampling_estimate_is_unbiased_monte_carlo():
    g = torch.Generator().manual_seed(2)
    support = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # E_P[x] = 2.0
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    weights_times_x = p / q * support
    stderr_one = float(((q * weights_times_x**2).sum() - 4.0).sqrt())  # std of one weighted sample
    estimates = []
    for _ in range(20):
        idx = torch.multinomial(q, 500, replacement=True, generator=g)
        estimates.append(float(importance_sampling_estimate(support[idx], p[idx], q[idx])))
    mean = sum(estimates) / len(estimates)
    assert abs(mean - 2.0) < 4 * stderr_one / math.sqrt(20 * 500)
    # the unweighted sample mean estimates E_Q[x] = 1.0 instead
    assert abs(float(support[idx].mean()) - 1.0) < 0.2


def test_importance_sampling_estimate_gradcheck():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    target = (0.1 + 0.8 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_()
    sampling = (0.1 + 0.8 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(importance_sampling_estimate, (values, target, sampling))
    assert torch.autograd.gradcheck(
        lambda x, lp, lq: importance_sampling_estimate(x, lp, lq, inputs="logprobs"),
        (values, target.detach().log().requires_grad_(), sampling.detach().log().requires_grad_()),
    )


def test_importance_sampling_estimate_log_space_survives_underflow():
    values = torch.tensor([3.0, 5.0], dtype=torch.float64)
    log_p = torch.tensor([-800.0, -801.0], dtype=torch.float64)  # whole-text probabilities: exp underflows to 0
    log_q = torch.tensor([-800.0 - LN2, -801.0], dtype=torch.float64)
    got = importance_sampling_estimate(values, log_p, log_q, inputs="logprobs")
    assert float(got) == pytest.approx((2 * 3.0 + 1 * 5.0) / 2)
    p_tiny = torch.tensor([1e-12, 1e-12], dtype=torch.float64)
    q_tiny = torch.tensor([5e-13, 1e-12], dtype=torch.float64)
    tiny = importance_sampling_estimate(values, p_tiny, q_tiny)
    assert float(tiny) == pytest.approx((2 * 3.0 + 5.0) / 2)


def _valid_is():
    return {
        "values": torch.tensor([1.0, 2.0]),
        "target_prob": torch.tensor([0.5, 0.5]),
        "sampling_prob": torch.tensor([0.25, 0.75]),
    }


IS_BAD = [
    ("values_2d", {"values": torch.ones(2, 1)}, "values"),
    ("values_nan", {"values": torch.tensor([NAN, 1.0])}, "values"),
    ("values_empty", {"values": torch.zeros(0), "target_prob": torch.zeros(0), "sampling_prob": torch.zeros(0)},
     "values"),
    ("target_shape", {"target_prob": torch.tensor([0.5, 0.25, 0.25])}, "target_prob"),
    ("target_above_one", {"target_prob": torch.tensor([1.5, 0.5])}, "target_prob"),
    ("target_negative", {"target_prob": torch.tensor([-0.5, 0.5])}, "target_prob"),
    ("target_inf", {"target_prob": torch.tensor([INF, 0.5])}, "target_prob"),
    ("sampling_zero", {"sampling_prob": torch.tensor([0.0, 0.75])}, "sampling_prob"),
    ("sampling_above_one", {"sampling_prob": torch.tensor([0.25, 1.75])}, "sampling_prob"),
    ("sampling_shape", {"sampling_prob": torch.tensor([[0.25, 0.75]])}, "sampling_prob"),
    ("target_logprob_positive", {"target_prob": torch.tensor([0.5, -0.1]), "inputs": "logprobs"}, "target_prob"),
    ("sampling_logprob_positive",
     {"target_prob": torch.tensor([-1.0, -1.0]), "sampling_prob": torch.tensor([0.3, -1.0]), "inputs": "logprobs"},
     "sampling_prob"),
    ("inputs_unknown", {"inputs": "log"}, "inputs"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in IS_BAD], ids=[b[0] for b in IS_BAD])
def test_importance_sampling_estimate_rejects_bad_input(override, arg):
    assert_rejects(importance_sampling_estimate, {**_valid_is(), **override}, arg)


# ---------------------------------------------------------------- importance_weighted_loss (Eq. 7)


def random_batch(seed, batch=5, tokens=8):
    g = torch.Generator().manual_seed(seed)
    logp_old = -0.05 - 3 * torch.rand(batch, tokens, generator=g, dtype=torch.float64)
    logp = (logp_old + 0.3 * torch.randn(batch, tokens, generator=g, dtype=torch.float64)).clamp(max=-0.01)
    advantages = torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, tokens)
    for b in range(batch):
        start = b % 3
        mask[b, start : start + 1 + (b * 2) % (tokens - start)] = 1
    assert len(set(mask.sum(1).tolist())) > 1
    return logp, logp_old, advantages, mask


def test_importance_weighted_loss_hand_value_and_metrics():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    logp_old = torch.tensor([[-1.0, -2.0 - LN2, -3.0], [-1.0, -1.0, -1.0]])  # ratio [[1, 2, 1], [1, 1, 1]]
    advantages = torch.tensor([[1.0, 1.0, 5.0], [-2.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    loss, metrics = importance_weighted_loss(logp, logp_old, advantages, mask)
    # row 0: 1·1 + 2·1 = 3; row 1: 1·3 + 1·7 = 10; Eq. 7: -(3 + 10) / 2
    assert float(loss) == pytest.approx(-6.5)
    assert metrics["importance/ratio_mean"] == pytest.approx(1.25)
    assert metrics["importance/ratio_min"] == pytest.approx(1.0)
    assert metrics["importance/ratio_max"] == pytest.approx(2.0)
    assert metrics["importance/approx_kl"] == pytest.approx(-LN2 / 4)


def test_importance_weighted_loss_matches_loop():
    logp, logp_old, advantages, mask = random_batch(4)
    total, ratios = 0.0, []
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t] == 1:
                ratio = math.exp(float(logp[i, t])) / math.exp(float(logp_old[i, t]))
                ratios.append(ratio)
                total += ratio * float(advantages[i, t])
    loss, metrics = importance_weighted_loss(logp, logp_old, advantages, mask)
    assert float(loss) == pytest.approx(-total / logp.shape[0], abs=1e-12)
    assert metrics["importance/ratio_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert metrics["importance/ratio_max"] == pytest.approx(max(ratios))


def test_importance_weighted_loss_gradient_at_ratio_one_is_reinforce_gradient():
    logp, _, advantages, mask = random_batch(5)
    logp_a = logp.clone().requires_grad_()
    loss, _ = importance_weighted_loss(logp_a, logp.clone(), advantages, mask)
    (grad_is,) = torch.autograd.grad(loss, logp_a)
    logp_b = logp.clone().requires_grad_()
    # Eq. 3 with R = 0 and V = -A has the weight R - V = A on every token
    (grad_reinforce,) = torch.autograd.grad(reinforce_loss(logp_b, torch.zeros(5).double(), -advantages, mask), logp_b)
    assert torch.allclose(grad_is, grad_reinforce)
    assert loss.item() == pytest.approx(-float((advantages * mask).sum()) / 5)


def test_importance_weighted_loss_gradcheck_and_constants_detached():
    logp, logp_old, advantages, mask = random_batch(6, batch=3, tokens=4)
    assert torch.autograd.gradcheck(
        lambda x: importance_weighted_loss(x, logp_old, advantages, mask)[0], (logp.requires_grad_(),)
    )
    logp_old.requires_grad_()
    advantages.requires_grad_()
    importance_weighted_loss(logp, logp_old, advantages, mask)[0].backward()
    assert logp_old.grad is None and advantages.grad is None


@pytest.mark.parametrize("log_ratio", [80.0, -80.0])
def test_importance_weighted_loss_stable_for_extreme_log_ratios(log_ratio):
    logp_old = torch.tensor([[-90.0, -1.0]]) if log_ratio > 0 else torch.tensor([[-10.0, -1.0]])
    logp = (logp_old + torch.tensor([[log_ratio, 0.0]])).requires_grad_()
    loss, metrics = importance_weighted_loss(logp, logp_old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


def _valid_iw():
    return {
        "logp": torch.full((2, 3), -1.0),
        "logp_old": torch.full((2, 3), -1.2),
        "advantages": torch.ones(2, 3),
        "response_mask": torch.tensor([[0, 1, 1], [1, 1, 0]]),
    }


IW_BAD = [
    ("logp_1d", {"logp": torch.full((3,), -1.0)}, "logp"),
    ("logp_positive", {"logp": torch.full((2, 3), 1.0)}, "logp"),
    ("logp_nan", {"logp": torch.tensor([[-1.0, NAN, -1.0], [-1.0, -1.0, -1.0]])}, "logp"),
    ("logp_old_shape", {"logp_old": torch.full((2, 4), -1.0)}, "logp_old"),
    ("logp_old_inf", {"logp_old": torch.tensor([[-1.0, -INF, -1.0], [-1.0, -1.0, -1.0]])}, "logp_old"),
    ("logp_old_positive", {"logp_old": torch.full((2, 3), 0.5)}, "logp_old"),
    ("advantages_1d", {"advantages": torch.ones(2)}, "advantages"),
    ("advantages_shape", {"advantages": torch.ones(3, 3)}, "advantages"),
    ("advantages_nan", {"advantages": torch.tensor([[1.0, NAN, 1.0], [1.0, 1.0, 1.0]])}, "advantages"),
    ("mask_fraction", {"response_mask": torch.tensor([[0, 0.5, 1], [1, 1, 0]])}, "response_mask"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [1, 1, 0]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in IW_BAD], ids=[b[0] for b in IW_BAD])
def test_importance_weighted_loss_rejects_bad_input(override, arg):
    assert_rejects(importance_weighted_loss, {**_valid_iw(), **override}, arg)
