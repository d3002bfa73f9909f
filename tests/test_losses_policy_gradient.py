"""Tests for §4.1 ``reward_weighted_loss`` and Eq. (3) ``reinforce_loss``."""

import pytest
import torch

from rlmt_edu.losses.nll import sft_loss
from rlmt_edu.losses.policy_gradient import reinforce_loss, reward_weighted_loss

NAN, INF = float("nan"), float("inf")

HAND_LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
HAND_MASK = torch.tensor([[0, 1, 1], [1, 1, 0]])
HAND_REWARDS = torch.tensor([2.0, -1.0])


def random_batch(seed, batch=5, tokens=8):
    """Seeded float64 log-probabilities, rewards, per-token values and a mask of varying response lengths."""
    g = torch.Generator().manual_seed(seed)
    logp = -0.05 - 3 * torch.rand(batch, tokens, generator=g, dtype=torch.float64)
    rewards = torch.randn(batch, generator=g, dtype=torch.float64)
    values = torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, tokens)
    for b in range(batch):
        start = b % 3
        mask[b, start : start + 1 + (b * 2) % (tokens - start)] = 1
    assert len(set(mask.sum(1).tolist())) > 1
    return logp, rewards, values, mask


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- reward_weighted_loss


def test_reward_weighted_loss_hand_value():
    # NLL = [5, 0.75]; (1/S) Σ R·NLL = (2·5 + (-1)·0.75) / 2 = 4.625
    assert float(reward_weighted_loss(HAND_LOGP, HAND_REWARDS, HAND_MASK)) == pytest.approx(4.625)


def test_reward_weighted_loss_matches_loop():
    logp, rewards, _, mask = random_batch(0)
    total = 0.0
    for i in range(logp.shape[0]):
        nll_i = -sum(float(logp[i, t]) for t in range(logp.shape[1]) if mask[i, t] == 1)
        total += float(rewards[i]) * nll_i
    assert float(reward_weighted_loss(logp, rewards, mask)) == pytest.approx(total / logp.shape[0], abs=1e-12)


def test_reward_weighted_loss_with_unit_rewards_is_sft_loss():
    logp, _, _, mask = random_batch(1)
    assert torch.allclose(reward_weighted_loss(logp, torch.ones(5, dtype=torch.float64), mask), sft_loss(logp, mask))


def test_reward_weighted_loss_gradcheck_and_rewards_constant():
    logp, rewards, _, mask = random_batch(2, batch=3, tokens=4)
    assert torch.autograd.gradcheck(lambda x: reward_weighted_loss(x, rewards, mask), (logp.requires_grad_(),))
    rewards.requires_grad_()
    reward_weighted_loss(logp, rewards, mask).backward()
    assert rewards.grad is None  # the reward is a constant of the policy loss


def test_reward_weighted_loss_stable_for_extreme_log_probs():
    logp = torch.tensor([[-80.0, -1e4], [-1e-8, -80.0]], requires_grad=True)
    loss = reward_weighted_loss(logp, torch.tensor([1e3, -1e3]), torch.ones(2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def _valid_rw():
    return {"logp": HAND_LOGP, "rewards": HAND_REWARDS, "response_mask": HAND_MASK}


RW_BAD = [
    ("logp_1d", {"logp": torch.full((3,), -1.0)}, "logp"),
    ("logp_positive", {"logp": -HAND_LOGP + 0.1}, "logp"),
    ("logp_nan", {"logp": torch.tensor([[NAN, -1.0, -1.0], [-1.0, -1.0, -1.0]])}, "logp"),
    ("rewards_shape", {"rewards": torch.ones(3)}, "rewards"),
    ("rewards_2d", {"rewards": torch.ones(2, 1)}, "rewards"),
    ("rewards_nan", {"rewards": torch.tensor([NAN, 1.0])}, "rewards"),
    ("rewards_inf", {"rewards": torch.tensor([INF, 1.0])}, "rewards"),
    ("rewards_not_tensor", {"rewards": [1.0, 2.0]}, "rewards"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [1, 1, 0]])}, "response_mask"),
    ("mask_shape", {"response_mask": torch.ones(2, 2)}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in RW_BAD], ids=[b[0] for b in RW_BAD])
def test_reward_weighted_loss_rejects_bad_input(override, arg):
    assert_rejects(reward_weighted_loss, {**_valid_rw(), **override}, arg)


# ---------------------------------------------------------------- reinforce_loss (Eq. 3)


def test_reinforce_loss_hand_value():
    values = torch.tensor([[9.0, 1.0, 0.5], [0.5, 1.0, 9.0]])
    # row 0, tokens 1-2: (2 - 1)(-2) + (2 - 0.5)(-3) = -6.5
    # row 1, tokens 0-1: (-1 - 0.5)(-0.5) + (-1 - 1)(-0.25) = 1.25
    # Eq. 3: -(1/2)(-6.5 + 1.25) = 2.625
    assert float(reinforce_loss(HAND_LOGP, HAND_REWARDS, values, HAND_MASK)) == pytest.approx(2.625)


def test_reinforce_loss_matches_loop():
    logp, rewards, values, mask = random_batch(3)
    total = 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t] == 1:
                total += (float(rewards[i]) - float(values[i, t])) * float(logp[i, t])
    expected = -total / logp.shape[0]
    assert float(reinforce_loss(logp, rewards, values, mask)) == pytest.approx(expected, abs=1e-12)


def test_reinforce_loss_zero_baseline_is_reward_weighted_loss():
    logp, rewards, _, mask = random_batch(4)
    expected = reward_weighted_loss(logp, rewards, mask)
    assert torch.allclose(reinforce_loss(logp, rewards, torch.zeros_like(logp), mask), expected)
    assert torch.allclose(reinforce_loss(logp, rewards, 0.0, mask), expected)


def test_reinforce_loss_constant_baselines_broadcast_per_token():
    logp, rewards, _, mask = random_batch(5)
    per_sample = torch.randn(5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expanded = per_sample.unsqueeze(1).expand_as(logp)
    expected = reinforce_loss(logp, rewards, expanded, mask)
    assert torch.allclose(reinforce_loss(logp, rewards, per_sample, mask), expected)
    full = torch.full_like(logp, 0.7)
    for scalar in (0.7, torch.tensor(0.7, dtype=torch.float64)):
        assert torch.allclose(reinforce_loss(logp, rewards, scalar, mask), reinforce_loss(logp, rewards, full, mask))


def test_reinforce_loss_gradcheck_and_baseline_detached():
    logp, rewards, values, mask = random_batch(6, batch=3, tokens=4)
    assert torch.autograd.gradcheck(lambda x: reinforce_loss(x, rewards, values, mask), (logp.requires_grad_(),))
    values.requires_grad_()
    rewards.requires_grad_()
    reinforce_loss(logp, rewards, values, mask).backward()
    assert values.grad is None and rewards.grad is None  # baseline and reward are constants here


def test_reinforce_loss_baseline_keeps_gradient_mean_and_cuts_variance():
    """Monte Carlo over one-token texts: with the baseline V = E[R] the per-sample gradients have the same mean
    (the exact policy gradient) and a much smaller variance than with no baseline."""
    g = torch.Generator().manual_seed(7)
    theta = torch.tensor([0.2, -0.1, 0.5, 0.0], dtype=torch.float64)
    reward_of_token = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    probs = torch.softmax(theta, dim=0)
    expected_reward = float((probs * reward_of_token).sum())
    # exact gradient of -E[R]: -Σ_a π_a R_a (onehot_a - π)
    exact = -(probs * reward_of_token) + probs * expected_reward
    tokens = torch.multinomial(probs, 2000, replacement=True, generator=g)

    def per_sample_grads(baseline):
        # one copy of θ per sample: row n of the gradient is sample n's term of the batch loss, times 1/N
        n = len(tokens)
        thetas = theta.expand(n, -1).clone().requires_grad_()  # (N, V)
        logp = torch.log_softmax(thetas, dim=1).gather(1, tokens.unsqueeze(1))  # (N, 1): one-token texts
        loss = reinforce_loss(logp, reward_of_token[tokens], baseline, torch.ones(n, 1))
        (grad,) = torch.autograd.grad(loss, thetas)
        return n * grad  # (N, V)

    no_baseline = per_sample_grads(0.0)
    with_baseline = per_sample_grads(expected_reward)
    for grads in (no_baseline, with_baseline):
        stderr = grads.std(dim=0) / len(tokens) ** 0.5
        assert ((grads.mean(dim=0) - exact).abs() <= 4 * stderr + 1e-9).all()
    assert with_baseline.var(dim=0).sum() < 0.5 * no_baseline.var(dim=0).sum()


def test_reinforce_loss_stable_for_extreme_log_probs():
    logp = torch.tensor([[-80.0, -1e4], [-1e-8, -80.0]], requires_grad=True)
    loss = reinforce_loss(logp, torch.tensor([1e3, -1e3]), torch.tensor([[5.0, -5.0], [0.0, 1e3]]), torch.ones(2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def _valid_reinforce():
    return {"logp": HAND_LOGP, "rewards": HAND_REWARDS, "values": torch.zeros(2, 3), "response_mask": HAND_MASK}


REINFORCE_BAD = [
    ("logp_3d", {"logp": torch.full((2, 3, 1), -1.0)}, "logp"),
    ("logp_inf", {"logp": torch.tensor([[-INF, -1.0, -1.0], [-1.0, -1.0, -1.0]])}, "logp"),
    ("logp_positive", {"logp": torch.full((2, 3), 0.5)}, "logp"),
    ("rewards_shape", {"rewards": torch.ones(1)}, "rewards"),
    ("rewards_nan", {"rewards": torch.tensor([1.0, NAN])}, "rewards"),
    ("values_wrong_tokens", {"values": torch.zeros(2, 4)}, "values"),
    ("values_wrong_batch", {"values": torch.zeros(3)}, "values"),
    ("values_3d", {"values": torch.zeros(2, 3, 1)}, "values"),
    ("values_nan", {"values": torch.tensor([[0.0, NAN, 0.0], [0.0, 0.0, 0.0]])}, "values"),
    ("values_inf_number", {"values": INF}, "values"),
    ("values_string", {"values": "mean"}, "values"),
    ("values_bool", {"values": True}, "values"),
    ("mask_value_3", {"response_mask": torch.tensor([[0, 3, 1], [1, 1, 0]])}, "response_mask"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 1, 1], [0, 0, 0]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in REINFORCE_BAD], ids=[b[0] for b in REINFORCE_BAD])
def test_reinforce_loss_rejects_bad_input(override, arg):
    assert_rejects(reinforce_loss, {**_valid_reinforce(), **override}, arg)
