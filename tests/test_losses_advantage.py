"""Tests for Eq. (4) ``advantage`` and §4.3 ``gae``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.advantage import advantage, gae

NAN, INF = float("nan"), float("inf")


def random_batch(seed, batch=5, tokens=8):
    """Seeded float64 rewards, per-token rewards, values and a contiguous mask (prompt, response, padding) of
    a different response length in most rows."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, generator=g, dtype=torch.float64)
    token_rewards = torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    values = torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, tokens)
    for b in range(batch):
        start = int(torch.randint(0, tokens // 2 + 1, (1,), generator=g))
        length = int(torch.randint(1, tokens - start + 1, (1,), generator=g))
        mask[b, start : start + length] = 1
    return rewards, token_rewards, values, mask


def reward_on_last_token(rewards, mask):
    last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)  # index of each row's last response token
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype)
    token_rewards[torch.arange(mask.shape[0]), last] = rewards
    return token_rewards


def loop_gae(token_rewards, values, mask, gamma, lam):
    out = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for b in range(mask.shape[0]):
        positions = [t for t in range(mask.shape[1]) if mask[b, t] == 1]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(positions):
            delta = float(token_rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(values[b, t])
            out[b][t] = next_adv
    return torch.tensor(out, dtype=torch.float64)


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- advantage (Eq. 4)


def test_advantage_hand_value():
    rewards = torch.tensor([1.0, 0.0])
    values = torch.tensor([[0.5, 0.2, 9.0], [0.1, 0.3, 0.6]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected = torch.tensor([[0.5, 0.8, 0.0], [0.0, -0.3, -0.6]])  # R - V on the response, 0 elsewhere
    assert torch.allclose(advantage(rewards, values, mask), expected)


def test_advantage_matches_loop():
    rewards, _, values, mask = random_batch(0)
    got = advantage(rewards, values, mask)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            expected = float(rewards[b]) - float(values[b, t]) if mask[b, t] == 1 else 0.0
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-12)


def test_advantage_gradcheck():
    rewards, _, values, mask = random_batch(1, batch=3, tokens=4)
    assert torch.autograd.gradcheck(
        lambda r, v: advantage(r, v, mask), (rewards.requires_grad_(), values.requires_grad_())
    )


def test_advantage_stable_for_huge_values():
    values = torch.tensor([[1e30, -1e30]], requires_grad=True)
    adv = advantage(torch.tensor([1e30]), values, torch.tensor([[1, 0]]))
    adv.sum().backward()
    assert torch.isfinite(adv).all() and torch.equal(values.grad, torch.tensor([[-1.0, 0.0]]))


ADV_BAD = [
    ("rewards_shape", {"rewards": torch.ones(3)}, "rewards"),
    ("rewards_2d", {"rewards": torch.ones(2, 1)}, "rewards"),
    ("rewards_nan", {"rewards": torch.tensor([NAN, 1.0])}, "rewards"),
    ("values_1d", {"values": torch.zeros(3)}, "values"),
    ("values_inf", {"values": torch.tensor([[INF, 0.0, 0.0], [0.0, 0.0, 0.0]])}, "values"),
    ("values_empty", {"values": torch.zeros(0, 3), "response_mask": torch.zeros(0, 3)}, "values"),
    ("mask_shape", {"response_mask": torch.ones(2, 2)}, "response_mask"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [1, 0, 0]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in ADV_BAD], ids=[b[0] for b in ADV_BAD])
def test_advantage_rejects_bad_input(override, arg):
    valid = {"rewards": torch.tensor([1.0, 0.0]), "values": torch.zeros(2, 3), "response_mask": torch.ones(2, 3)}
    assert_rejects(advantage, {**valid, **override}, arg)


# ---------------------------------------------------------------- gae (§4.3)


def test_gae_hand_value():
    token_rewards = torch.tensor([[5.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 9.0]])
    values = torch.tensor([[7.0, 0.5, 0.25, 3.0], [0.0, 1.0, 0.5, 3.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])  # row 0: prompt, 2 response tokens, padding
    got = gae(token_rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: t=2: δ = 1 + 0.9·0 - 0.25 = 0.75, A = 0.75
    #        t=1: δ = 0 + 0.9·0.25 - 0.5 = -0.275, A = -0.275 + 0.45·0.75 = 0.0625
    # row 1: t=1: δ = 2 + 0 - 1 = 1, A = 1;  t=0: δ = 0 + 0.9·1 - 0 = 0.9, A = 0.9 + 0.45·1 = 1.35
    expected = torch.tensor([[0.0, 0.0625, 0.75, 0.0], [1.35, 1.0, 0.0, 0.0]])
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.5, 0.0), (0.0, 0.7)])
def test_gae_matches_loop(gamma, lam):
    _, token_rewards, values, mask = random_batch(2)
    got = gae(token_rewards, values, mask, gamma=gamma, lam=lam)
    assert torch.allclose(got, loop_gae(token_rewards, values, mask, gamma, lam), atol=1e-12)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), tokens=st.integers(1, 7))
def test_gae_with_gamma_lam_one_equals_eq4_advantage(seed, batch, tokens):
    # §4.3: Eq. 4 is GAE with the discount factor and the crediting parameter set to one
    rewards, _, values, mask = random_batch(seed, batch, tokens)
    got = gae(reward_on_last_token(rewards, mask), values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(got, advantage(rewards, values, mask), atol=1e-12)


def test_gae_special_cases():
    _, token_rewards, values, mask = random_batch(3)
    on = mask == 1
    # γ = 0: only the immediate reward counts, A_t = r_t - V(s_t)
    assert torch.allclose(gae(token_rewards, values, mask, gamma=0.0, lam=0.8)[on], (token_rewards - values)[on])
    # λ = 1: A_t = Σ_k γ^k r_{t+k} - V(s_t), the discounted return minus the value
    returns = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in reversed(range(values.shape[1])):
        running = torch.where(on[:, t], token_rewards[:, t] + 0.9 * running, torch.zeros_like(running))
        returns[:, t] = running
    assert torch.allclose(gae(token_rewards, values, mask, gamma=0.9, lam=1.0)[on], (returns - values)[on])


def test_gae_ignores_everything_outside_the_mask():
    _, token_rewards, values, mask = random_batch(4)
    noisy_r = torch.where(mask == 1, token_rewards, torch.full_like(token_rewards, 1e6))
    noisy_v = torch.where(mask == 1, values, torch.full_like(values, -1e6))
    got = gae(noisy_r, noisy_v, mask, gamma=0.9, lam=0.9)
    assert torch.allclose(got, gae(token_rewards, values, mask, gamma=0.9, lam=0.9))
    assert (got[mask == 0] == 0).all()


def test_gae_gradcheck():
    _, token_rewards, values, mask = random_batch(5, batch=3, tokens=5)
    assert torch.autograd.gradcheck(
        lambda r, v: gae(r, v, mask, gamma=0.9, lam=0.8), (token_rewards.requires_grad_(), values.requires_grad_())
    )


def test_gae_stable_for_long_extreme_sequences():
    tokens = 64
    token_rewards = torch.full((1, tokens), 1e3)
    values = torch.full((1, tokens), -1e3, requires_grad=True)
    adv = gae(token_rewards, values, torch.ones(1, tokens), gamma=1.0, lam=1.0)
    adv.sum().backward()
    assert torch.isfinite(adv).all() and torch.isfinite(values.grad).all()


def _valid_gae():
    return {
        "token_rewards": torch.zeros(2, 3),
        "values": torch.zeros(2, 3),
        "response_mask": torch.tensor([[0, 1, 1], [1, 1, 0]]),
        "gamma": 0.9,
        "lam": 0.95,
    }


GAE_BAD = [
    ("gamma_negative", {"gamma": -0.1}, "gamma"),
    ("gamma_above_one", {"gamma": 1.01}, "gamma"),
    ("gamma_nan", {"gamma": NAN}, "gamma"),
    ("gamma_string", {"gamma": "0.9"}, "gamma"),
    ("gamma_bool", {"gamma": True}, "gamma"),
    ("lam_negative", {"lam": -0.5}, "lam"),
    ("lam_above_one", {"lam": 2.0}, "lam"),
    ("lam_none", {"lam": None}, "lam"),
    ("token_rewards_shape", {"token_rewards": torch.zeros(2, 4)}, "token_rewards"),
    ("token_rewards_1d", {"token_rewards": torch.zeros(2)}, "token_rewards"),
    ("token_rewards_nan", {"token_rewards": torch.tensor([[0.0, NAN, 0.0], [0.0, 0.0, 0.0]])}, "token_rewards"),
    ("values_3d", {"values": torch.zeros(2, 3, 1)}, "values"),
    ("values_inf", {"values": torch.tensor([[0.0, 0.0, -INF], [0.0, 0.0, 0.0]])}, "values"),
    ("mask_gap", {"response_mask": torch.tensor([[1, 0, 1], [1, 1, 0]])}, "response_mask"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [1, 1, 0]])}, "response_mask"),
    ("mask_value_2", {"response_mask": torch.tensor([[0, 2, 1], [1, 1, 0]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in GAE_BAD], ids=[b[0] for b in GAE_BAD])
def test_gae_rejects_bad_input(override, arg):
    assert_rejects(gae, {**_valid_gae(), **override}, arg)
