"""Eq. 11 (PPO clipped loss), Eq. 12 (KL-shaped reward) and A' = R' - V of §4.7."""

import math

import pytest
import torch

from rlmt_edu.losses.ppo import kl_shaped_advantage, kl_shaped_rewards, ppo_clip_loss

LN = math.log


def random_batch(seed, batch=5, tokens=7, dtype=torch.float64):
    """Seeded (logp, logp_old, advantages, mask): a prompt of 0-2 tokens, then 1+ response tokens, padding."""
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(batch, tokens, generator=g, dtype=dtype) * 3 - 2  # ≤ -2, so logp = logp_old + noise stays ≤ 0
    logp = logp_old + torch.randn(batch, tokens, generator=g, dtype=dtype) * 0.4
    advantages = torch.randn(batch, tokens, generator=g, dtype=dtype)
    mask = torch.zeros(batch, tokens, dtype=dtype)
    for b in range(batch):
        start = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, tokens - start + 1, (1,), generator=g))
        mask[b, start : start + length] = 1
    return logp, logp_old, advantages, mask


def loop_ppo_loss(logp, logp_old, advantages, mask, epsilon):
    """Eq. 11 one sample and one token at a time, in plain Python floats."""
    total = 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t] == 1:
                ratio = math.exp(float(logp[i, t]) - float(logp_old[i, t]))
                a = float(advantages[i, t])
                clipped_ratio = min(max(ratio, 1 - epsilon), 1 + epsilon)
                total += min(ratio * a, clipped_ratio * a)
    return -total / logp.shape[0]


# ---------------------------------------------------------------- ppo_clip_loss (Eq. 11)


def test_ppo_clip_loss_hand_value():
    # sample 0 (3 response tokens):  ratio 1.5, A=+1 -> min(1.5, 1.2) = 1.2  (clipped)
    #                                ratio 0.5, A=+1 -> min(0.5, 0.8) = 0.5
    #                                ratio 1.0, A=-2 -> -2.0
    # sample 1 (2 tokens + padding): ratio 0.7, A=-1 -> min(-0.7, -0.8) = -0.8 (clipped)
    #                                ratio 1.3, A=-1 -> min(-1.3, -1.2) = -1.3
    # loss = -(1/2)(1.2 + 0.5 - 2.0 - 0.8 - 1.3) = -(1/2)(-2.4) = 1.2
    # both models' log-probs shifted by -2: the ratios are unchanged and every log-prob is ≤ 0
    logp = torch.tensor([[LN(1.5), LN(0.5), 0.0], [LN(0.7), LN(1.3), 0.0]]) - 2
    logp_old = torch.full((2, 3), -2.0)
    advantages = torch.tensor([[1.0, 1.0, -2.0], [-1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = ppo_clip_loss(logp, logp_old, advantages, mask, epsilon=0.2)
    assert loss.item() == pytest.approx(1.2, abs=1e-6)
    assert metrics["ppo/clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["ppo/ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 0.7 + 1.3) / 5)
    assert metrics["ppo/ratio_min"] == pytest.approx(0.5)
    assert metrics["ppo/ratio_max"] == pytest.approx(1.5)
    k3 = [r - 1 - LN(r) for r in (1.5, 0.5, 1.0, 0.7, 1.3)]  # (r - 1) - log r
    assert metrics["ppo/approx_kl"] == pytest.approx(sum(k3) / 5, rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("epsilon", [0.1, 0.2, 1.5])
def test_ppo_clip_loss_matches_python_loop(seed, epsilon):
    logp, logp_old, advantages, mask = random_batch(seed)
    loss, _ = ppo_clip_loss(logp, logp_old, advantages, mask, epsilon=epsilon)
    assert loss.item() == pytest.approx(loop_ppo_loss(logp, logp_old, advantages, mask, epsilon), rel=1e-10)


def test_ppo_clip_loss_ignores_padding_values():
    logp, logp_old, advantages, mask = random_batch(7)
    loss, _ = ppo_clip_loss(logp, logp_old, advantages, mask)
    junk = torch.where(mask == 0, torch.full_like(logp, -50.0), logp)
    loss_junk, _ = ppo_clip_loss(junk, logp_old, advantages * (1 + 9 * (1 - mask)), mask)
    assert loss_junk.item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ppo_clip_loss_at_ratio_one_is_minus_mean_sum_of_advantages(seed):
    _, logp_old, advantages, mask = random_batch(seed)
    loss, metrics = ppo_clip_loss(logp_old.clone(), logp_old, advantages, mask)
    expected = -(advantages * mask).sum() / advantages.shape[0]  # -(1/S) Σ_i Σ_t A_it
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["ppo/clip_fraction"] == 0.0
    assert metrics["ppo/approx_kl"] == 0.0


def test_ppo_clip_loss_gradient_is_zero_exactly_where_clipping_removes_the_incentive():
    eps = 0.2
    # ratios: 1.5 (> 1+ε), 0.6 (< 1-ε), 1.1 (inside)  x  A = +1, -1
    ratios = [1.5, 0.6, 1.1, 1.5, 0.6, 1.1]
    advs = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    logp = torch.tensor([[LN(r) - 2 for r in ratios]], dtype=torch.float64, requires_grad=True)
    logp_old = torch.full((1, 6), -2.0, dtype=torch.float64)
    advantages = torch.tensor([advs], dtype=torch.float64)
    loss, metrics = ppo_clip_loss(logp, logp_old, advantages, torch.ones(1, 6), epsilon=eps)
    loss.backward()
    grad = logp.grad[0]
    # A > 0 and ratio > 1+ε: no gain from raising the ratio further -> exactly 0
    assert grad[0].item() == 0.0
    # A < 0 and ratio < 1-ε: no gain from lowering it further -> exactly 0
    assert grad[4].item() == 0.0
    # everywhere else the unclipped branch is kept: d/dlogp of -ratio·A = -ratio·A (S = 1)
    for t in (1, 2, 3, 5):
        assert grad[t].item() == pytest.approx(-ratios[t] * advs[t], rel=1e-12)
        assert grad[t].item() != 0.0
    assert metrics["ppo/clip_fraction"] == pytest.approx(2 / 6)


def test_ppo_clip_loss_gradcheck_away_from_the_clip_kinks():
    logp, logp_old, advantages, mask = random_batch(3, batch=3, tokens=4)
    # keep every ratio away from 1±ε, where the loss has kinks
    log_ratio = logp - logp_old
    near = ((log_ratio.exp() - 1.2).abs() < 0.02) | ((log_ratio.exp() - 0.8).abs() < 0.02)
    logp = torch.where(near, logp_old + 0.5, logp).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lp: ppo_clip_loss(lp, logp_old, advantages, mask)[0], (logp,)
    )


@pytest.mark.parametrize("log_ratio", [80.0, -80.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ppo_clip_loss_is_finite_for_extreme_log_ratios(log_ratio, sign):
    logp_old = torch.full((2, 4), -90.0 if log_ratio > 0 else -1.0)
    logp = (logp_old + log_ratio).requires_grad_(True)
    advantages = torch.full((2, 4), sign)
    loss, metrics = ppo_clip_loss(logp, logp_old, advantages, torch.ones(2, 4))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert math.isfinite(metrics["ppo/approx_kl"])


BAD_PPO = [
    ("epsilon", dict(epsilon=0.0)),
    ("epsilon", dict(epsilon=-0.1)),
    ("epsilon", dict(epsilon=float("nan"))),
    ("logp_old", dict(logp_old=torch.zeros(2, 4))),
    ("advantages", dict(advantages=torch.zeros(2, 3, 1))),
    ("advantages", dict(advantages=torch.zeros(3, 2))),
    ("response_mask", dict(response_mask=torch.tensor([[1, 2, 0], [1, 1, 1]]))),
    ("response_mask", dict(response_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))),
    ("response_mask", dict(response_mask=torch.ones(2, 4))),
    ("logp", dict(logp=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))),
    ("logp_old", dict(logp_old=torch.tensor([[0.0, -float("inf"), 0.0], [0.0, 0.0, 0.0]]))),
    ("advantages", dict(advantages=torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]))),
    ("logp", dict(logp=torch.zeros(3))),
    ("logp", dict(logp=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])),
]


@pytest.mark.parametrize("name,override", BAD_PPO, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_PPO)])
def test_ppo_clip_loss_rejects_bad_input(name, override):
    args = dict(
        logp=torch.zeros(2, 3), logp_old=torch.zeros(2, 3), advantages=torch.ones(2, 3),
        response_mask=torch.ones(2, 3), epsilon=0.2,
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        ppo_clip_loss(args.pop("logp"), args.pop("logp_old"), args.pop("advantages"), args.pop("response_mask"), **args)


# ---------------------------------------------------------------- kl_shaped_rewards (Eq. 12)

HAND_R = torch.tensor([1.0, 2.0])
HAND_LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
HAND_LOGP_REF = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0]])
HAND_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_kl_shaped_rewards_hand_value_every_token():
    # log(π1/π0) = [[0.5, -1, (pad)], [0.5, 0.5, 0.5]], β = 0.1
    # R' = R - 0.1·log-ratio: [[1 - 0.05, 1 + 0.1, 0], [2 - 0.05, 1.95, 1.95]]
    shaped = kl_shaped_rewards(HAND_R, HAND_LOGP, HAND_LOGP_REF, HAND_MASK, beta=0.1)
    expected = torch.tensor([[0.95, 1.1, 0.0], [1.95, 1.95, 1.95]])
    torch.testing.assert_close(shaped, expected)


def test_kl_shaped_rewards_hand_value_last_token():
    # R only on the last response token; -β·log-ratio on every response token
    shaped = kl_shaped_rewards(HAND_R, HAND_LOGP, HAND_LOGP_REF, HAND_MASK, beta=0.1, reward_at="last_token")
    expected = torch.tensor([[-0.05, 1.1, 0.0], [-0.05, -0.05, 1.95]])
    torch.testing.assert_close(shaped, expected)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reward_at", ["every_token", "last_token"])
def test_kl_shaped_rewards_matches_python_loop(seed, reward_at):
    logp, logp_ref, _, mask = random_batch(seed)
    rewards = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    beta = 0.3
    shaped = kl_shaped_rewards(rewards, logp, logp_ref, mask, beta=beta, reward_at=reward_at)
    for i in range(logp.shape[0]):
        last = max(t for t in range(logp.shape[1]) if mask[i, t] == 1)
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                expected = 0.0
            else:
                r = float(rewards[i]) if (reward_at == "every_token" or t == last) else 0.0
                expected = r - beta * (float(logp[i, t]) - float(logp_ref[i, t]))
            assert shaped[i, t].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_kl_shaped_rewards_with_beta_zero_is_the_reward(seed):
    logp, logp_ref, _, mask = random_batch(seed)
    rewards = torch.linspace(-1, 1, logp.shape[0], dtype=torch.float64)
    shaped = kl_shaped_rewards(rewards, logp, logp_ref, mask, beta=0.0)
    torch.testing.assert_close(shaped, rewards[:, None] * mask)


@pytest.mark.parametrize("seed", range(3))
def test_kl_shaped_rewards_subtracts_beta_times_the_mean_k1_estimate(seed):
    """Averaged over a sample's response tokens, R' = R - β·mean_t k1, k1 = log π1 - log π0 (§4.7)."""
    logp, logp_ref, _, mask = random_batch(seed)
    rewards = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    beta = 0.05
    shaped = kl_shaped_rewards(rewards, logp, logp_ref, mask, beta=beta)
    mean_shaped = (shaped * mask).sum(1) / mask.sum(1)
    mean_k1 = ((logp - logp_ref) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(rewards - mean_shaped, beta * mean_k1)


def test_kl_shaped_rewards_gradcheck():
    logp, logp_ref, _, mask = random_batch(1, batch=3, tokens=4)
    rewards = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    for reward_at in ("every_token", "last_token"):
        assert torch.autograd.gradcheck(
            lambda r, lp, lr: kl_shaped_rewards(r, lp, lr, mask, beta=0.2, reward_at=reward_at),
            (rewards, logp.requires_grad_(True), logp_ref.requires_grad_(True)),
        )


def test_kl_shaped_rewards_is_finite_for_extreme_log_ratios():
    logp = torch.tensor([[0.0, -80.0], [-80.0, 0.0]])
    logp_ref = torch.tensor([[-80.0, 0.0], [0.0, -80.0]])
    shaped = kl_shaped_rewards(torch.ones(2), logp, logp_ref, torch.ones(2, 2), beta=0.5)
    assert torch.isfinite(shaped).all()
    torch.testing.assert_close(shaped, torch.tensor([[1 - 40.0, 1 + 40.0], [1 + 40.0, 1 - 40.0]]))


BAD_SHAPED = [
    ("beta", dict(beta=-0.1)),
    ("beta", dict(beta=None)),
    ("reward_at", dict(reward_at="first_token")),
    ("rewards", dict(rewards=torch.ones(2, 3))),
    ("rewards", dict(rewards=torch.ones(3))),
    ("rewards", dict(rewards=torch.tensor([1.0, float("nan")]))),
    ("logp_ref", dict(logp_ref=torch.zeros(2, 4))),
    ("logp", dict(logp=torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]))),
    ("response_mask", dict(response_mask=torch.ones(2, 2))),
    ("response_mask", dict(response_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]))),
]


@pytest.mark.parametrize("name,override", BAD_SHAPED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_SHAPED)])
def test_kl_shaped_rewards_rejects_bad_input(name, override):
    args = dict(
        rewards=torch.ones(2), logp=torch.zeros(2, 3), logp_ref=torch.zeros(2, 3),
        response_mask=torch.ones(2, 3), beta=0.1,
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        kl_shaped_rewards(
            args.pop("rewards"), args.pop("logp"), args.pop("logp_ref"), args.pop("response_mask"), **args
        )


# ---------------------------------------------------------------- kl_shaped_advantage (§4.7)


def test_kl_shaped_advantage_hand_value():
    shaped = torch.tensor([[0.95, 1.1, 0.0], [1.95, 1.95, 1.95]])
    values = torch.tensor([[0.5, 1.0, 7.0], [2.0, 1.0, 0.0]])
    # A' = R' - V on response tokens, 0 on padding
    expected = torch.tensor([[0.45, 0.1, 0.0], [-0.05, 0.95, 1.95]])
    torch.testing.assert_close(kl_shaped_advantage(shaped, values, HAND_MASK), expected)


@pytest.mark.parametrize("seed", range(3))
def test_kl_shaped_advantage_matches_python_loop_and_passes_the_penalty_through(seed):
    logp, logp_ref, values, mask = random_batch(seed)
    rewards = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    beta = 0.2
    adv = kl_shaped_advantage(kl_shaped_rewards(rewards, logp, logp_ref, mask, beta=beta), values, mask)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            # linear in R': A' = (R - V) - β·log(π1/π0)
            expected = 0.0
            if mask[i, t] == 1:
                expected = float(rewards[i]) - float(values[i, t]) - beta * (float(logp[i, t]) - float(logp_ref[i, t]))
            assert adv[i, t].item() == pytest.approx(expected, abs=1e-12)


def test_kl_shaped_advantage_gradcheck():
    shaped, values, _, mask = random_batch(2, batch=3, tokens=4)
    assert torch.autograd.gradcheck(
        lambda r, v: kl_shaped_advantage(r, v, mask), (shaped.requires_grad_(True), values.requires_grad_(True))
    )


BAD_ADV = [
    ("values", dict(values=torch.zeros(2, 4))),
    ("values", dict(values=torch.zeros(2))),
    ("shaped_rewards", dict(shaped_rewards=torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]))),
    ("values", dict(values=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))),
    ("response_mask", dict(response_mask=torch.full((2, 3), 0.5))),
]


@pytest.mark.parametrize("name,override", BAD_ADV, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ADV)])
def test_kl_shaped_advantage_rejects_bad_input(name, override):
    args = dict(shaped_rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), response_mask=torch.ones(2, 3))
    args.update(override)
    with pytest.raises(ValueError, match=name):
        kl_shaped_advantage(**args)
