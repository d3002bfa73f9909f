"""Eq. 13 (group-relative advantage, Dr. GRPO) and Eq. 14 (GRPO loss, sum over tokens / QG)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.grpo import group_relative_advantage, grpo_loss
from rlmt_edu.losses.ppo import ppo_clip_loss

LN = math.log


def random_groups(seed, questions=3, group=4, tokens=6, dtype=torch.float64):
    """Seeded (logp, logp_old, advantages (Q, G), mask) with responses of different lengths."""
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(questions, group, tokens, generator=g, dtype=dtype) * 3 - 2  # ≤ -2, so logp = logp_old + noise stays ≤ 0
    logp = logp_old + torch.randn(questions, group, tokens, generator=g, dtype=dtype) * 0.4
    advantages = torch.randn(questions, group, generator=g, dtype=dtype)
    mask = torch.zeros(questions, group, tokens, dtype=dtype)
    for q in range(questions):
        for k in range(group):
            start = int(torch.randint(0, 2, (1,), generator=g))
            length = int(torch.randint(1, tokens - start + 1, (1,), generator=g))
            mask[q, k, start : start + length] = 1
    return logp, logp_old, advantages, mask


def clipped_term(ratio, a, eps):
    return min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)


def loop_grpo_loss(logp, logp_old, advantages, mask, eps, normalization):
    """Eq. 14 and its two alternatives, one response and one token at a time, in plain Python."""
    Q, G, T = logp.shape
    total, tokens, per_sequence = 0.0, 0, []
    for q in range(Q):
        for k in range(G):
            seq_total, seq_tokens = 0.0, 0
            for t in range(T):
                if mask[q, k, t] == 1:
                    ratio = math.exp(float(logp[q, k, t]) - float(logp_old[q, k, t]))
                    seq_total += clipped_term(ratio, float(advantages[q, k]), eps)
                    seq_tokens += 1
            total += seq_total
            tokens += seq_tokens
            per_sequence.append(seq_total / seq_tokens)
    if normalization == "paper":
        return -total / (Q * G)
    if normalization == "token_mean":
        return -total / tokens
    return -sum(per_sequence) / len(per_sequence)


# ---------------------------------------------------------------- group_relative_advantage (Eq. 13)


def test_group_relative_advantage_hand_value():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    # group means 0.5 and 2.0
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(group_relative_advantage(rewards), expected)


def test_group_relative_advantage_hand_value_scaled_by_unbiased_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    # unbiased std (divisor G - 1 = 3): group 0: sqrt(4·0.25/3) = sqrt(1/3); group 1: sqrt((1+1)/3) = sqrt(2/3)
    s0, s1 = math.sqrt(1 / 3) + 1e-6, math.sqrt(2 / 3) + 1e-6
    expected = torch.tensor(
        [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [1 / s1, -1 / s1, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(group_relative_advantage(rewards, scale_by_std=True), expected)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale_by_std", [False, True])
def test_group_relative_advantage_matches_python_loop(seed, scale_by_std):
    rewards = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    advantages = group_relative_advantage(rewards, scale_by_std=scale_by_std, eps=1e-6)
    for q in range(4):
        row = [float(r) for r in rewards[q]]
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - 1))
        for k in range(5):
            expected = (row[k] - mean) / (std + 1e-6) if scale_by_std else row[k] - mean
            assert advantages[q, k].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


rewards_strategy = st.integers(1, 4).flatmap(
    lambda q: st.integers(2, 6).flatmap(
        lambda g: st.lists(
            st.lists(st.floats(-100, 100, allow_nan=False), min_size=g, max_size=g), min_size=q, max_size=q
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(rows=rewards_strategy, scale_by_std=st.booleans())
def test_group_relative_advantage_sums_to_zero_per_group(rows, scale_by_std):
    rewards = torch.tensor(rows, dtype=torch.float64)
    advantages = group_relative_advantage(rewards, scale_by_std=scale_by_std)
    scale = 1.0 if scale_by_std else float(rewards.abs().max()) + 1.0
    assert torch.allclose(advantages.sum(dim=1), torch.zeros(rewards.shape[0], dtype=torch.float64), atol=1e-9 * scale)


def test_group_relative_advantage_is_zero_for_a_constant_group():
    rewards = torch.tensor([[0.7, 0.7, 0.7], [1.0, 0.0, 1.0]])
    for scale_by_std in (False, True):
        advantages = group_relative_advantage(rewards, scale_by_std=scale_by_std)
        assert torch.isfinite(advantages).all()
        assert advantages[0].abs().max().item() == 0.0


def test_group_relative_advantage_gradcheck():
    rewards = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(group_relative_advantage, (rewards,))
    assert torch.autograd.gradcheck(lambda r: group_relative_advantage(r, scale_by_std=True), (rewards,))


BAD_ADV = [
    ("rewards", dict(rewards=torch.ones(3, 1))),
    ("rewards", dict(rewards=torch.ones(4))),
    ("rewards", dict(rewards=torch.ones(2, 3, 1))),
    ("rewards", dict(rewards=torch.ones(0, 3))),
    ("rewards", dict(rewards=torch.tensor([[1.0, float("nan")]]))),
    ("rewards", dict(rewards=torch.tensor([[1.0, float("inf")]]))),
    ("rewards", dict(rewards=torch.tensor([[1, 0]]))),
    ("eps", dict(eps=0.0)),
    ("eps", dict(eps=-1e-6)),
    ("scale_by_std", dict(scale_by_std="yes")),
]


@pytest.mark.parametrize("name,override", BAD_ADV, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ADV)])
def test_group_relative_advantage_rejects_bad_input(name, override):
    args = dict(rewards=torch.ones(2, 3), scale_by_std=False, eps=1e-6)
    args.update(override)
    with pytest.raises(ValueError, match=name):
        group_relative_advantage(args.pop("rewards"), **args)


# ---------------------------------------------------------------- grpo_loss (Eq. 14)

# Q = 1, G = 2, T = 2.  Response 0 (A = +1, two tokens): ratios 1.5 -> 1.2 (clipped), 0.5 -> 0.5; sum 1.7.
# Response 1 (A = -1, one token + padding): ratio 0.7 -> min(-0.7, -0.8) = -0.8 (clipped); sum -0.8.
HAND_LOGP = torch.tensor([[[LN(1.5), LN(0.5)], [LN(0.7), LN(1.3)]]]) - 2  # logp_old = -2: ratios 1.5, 0.5, ...
HAND_LOGP_OLD = torch.full((1, 2, 2), -2.0)
HAND_ADV = torch.tensor([[1.0, -1.0]])
HAND_MASK = torch.tensor([[[1, 1], [1, 0]]])


@pytest.mark.parametrize(
    "normalization,expected",
    [
        ("paper", -(1.7 - 0.8) / 2),  # Eq. 14: -(1/QG) Σ Σ Σ, QG = 2
        ("token_mean", -(1.7 - 0.8) / 3),  # 3 response tokens
        ("sequence_mean", -((1.7 / 2) + (-0.8 / 1)) / 2),  # mean of per-response token means
    ],
)
def test_grpo_loss_hand_value(normalization, expected):
    loss, metrics = grpo_loss(HAND_LOGP, HAND_LOGP_OLD, HAND_ADV, HAND_MASK, normalization=normalization)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["grpo/clip_fraction"] == pytest.approx(2 / 3)
    assert metrics["grpo/ratio_max"] == pytest.approx(1.5)
    assert metrics["grpo/ratio_min"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("normalization", ["paper", "token_mean", "sequence_mean"])
def test_grpo_loss_matches_python_loop(seed, normalization):
    logp, logp_old, advantages, mask = random_groups(seed)
    loss, _ = grpo_loss(logp, logp_old, advantages, mask, epsilon=0.15, normalization=normalization)
    expected = loop_grpo_loss(logp, logp_old, advantages, mask, 0.15, normalization)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_grpo_loss_equals_ppo_clip_loss_on_the_flattened_batch(seed):
    """GRPO is PPO with A(text_qg) on every token: with S = QG the two losses and metrics agree."""
    logp, logp_old, advantages, mask = random_groups(seed)
    Q, G, T = logp.shape
    grpo, grpo_metrics = grpo_loss(logp, logp_old, advantages, mask, normalization="paper")
    token_advantages = advantages[:, :, None].expand(Q, G, T).reshape(Q * G, T)
    ppo, ppo_metrics = ppo_clip_loss(
        logp.reshape(Q * G, T), logp_old.reshape(Q * G, T), token_advantages, mask.reshape(Q * G, T)
    )
    assert grpo.item() == pytest.approx(ppo.item(), rel=1e-12)
    for key in ("clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"):
        assert grpo_metrics[f"grpo/{key}"] == pytest.approx(ppo_metrics[f"ppo/{key}"], rel=1e-12)


def test_grpo_loss_normalizations_agree_when_every_response_has_the_same_length():
    logp, logp_old, advantages, _ = random_groups(5, tokens=4)
    mask = torch.ones_like(logp)  # every response has T = 4 tokens
    paper, _ = grpo_loss(logp, logp_old, advantages, mask, normalization="paper")
    token_mean, _ = grpo_loss(logp, logp_old, advantages, mask, normalization="token_mean")
    sequence_mean, _ = grpo_loss(logp, logp_old, advantages, mask, normalization="sequence_mean")
    assert paper.item() == pytest.approx(4 * token_mean.item(), rel=1e-12)  # sum over 4 tokens vs mean
    assert token_mean.item() == pytest.approx(sequence_mean.item(), rel=1e-12)


def test_grpo_loss_gradient_is_zero_exactly_where_clipping_removes_the_incentive():
    ratios = [[1.5, 0.6, 1.1], [1.5, 0.6, 1.1]]  # response 0 has A = +1, response 1 has A = -1
    logp = torch.tensor([[[LN(r) - 2 for r in row] for row in ratios]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    logp_old = torch.full((1, 2, 3), -2.0, dtype=torch.float64)  # the ratios are exp(logp - logp_old)
    loss, _ = grpo_loss(logp, logp_old, advantages, torch.ones(1, 2, 3))
    loss.backward()
    grad = logp.grad[0]
    assert grad[0, 0].item() == 0.0  # A > 0, ratio > 1+ε
    assert grad[1, 1].item() == 0.0  # A < 0, ratio < 1-ε
    for k, t in [(0, 1), (0, 2), (1, 0), (1, 2)]:
        a = advantages[0, k].item()
        assert grad[k, t].item() == pytest.approx(-ratios[k][t] * a / 2, rel=1e-12)  # -(1/QG)·ratio·A
        assert grad[k, t].item() != 0.0


def test_grpo_loss_gradcheck_away_from_the_clip_kinks():
    logp, logp_old, advantages, mask = random_groups(8, questions=2, group=2, tokens=3)
    ratio = (logp - logp_old).exp()
    near = ((ratio - 1.2).abs() < 0.02) | ((ratio - 0.8).abs() < 0.02)
    logp = torch.where(near, logp_old + 0.5, logp).requires_grad_(True)
    for normalization in ("paper", "token_mean", "sequence_mean"):
        assert torch.autograd.gradcheck(
            lambda lp: grpo_loss(lp, logp_old, advantages, mask, normalization=normalization)[0], (logp,),
        )


@pytest.mark.parametrize("log_ratio", [80.0, -80.0])
def test_grpo_loss_is_finite_for_extreme_log_ratios(log_ratio):
    logp_old = torch.full((2, 2, 3), -90.0 if log_ratio > 0 else -1.0)
    logp = (logp_old + log_ratio).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0], [-2.0, 2.0]])
    loss, _ = grpo_loss(logp, logp_old, advantages, torch.ones(2, 2, 3))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()


BAD_LOSS = [
    ("epsilon", dict(epsilon=0.0)),
    ("epsilon", dict(epsilon=-0.2)),
    ("normalization", dict(normalization="mean")),
    ("advantages", dict(advantages=torch.ones(4))),
    ("advantages", dict(advantages=torch.ones(2, 3))),
    ("advantages", dict(advantages=torch.tensor([[1.0, float("inf")], [0.0, 0.0]]))),
    ("logp", dict(logp=torch.zeros(4, 3))),
    ("logp_old", dict(logp_old=torch.zeros(2, 2, 4))),
    ("logp_old", dict(logp_old=torch.full((2, 2, 3), float("nan")))),
    ("response_mask", dict(response_mask=torch.tensor([[[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 0]]]))),
    ("response_mask", dict(response_mask=torch.full((2, 2, 3), 0.5))),
    ("response_mask", dict(response_mask=torch.ones(2, 3))),
]


@pytest.mark.parametrize("name,override", BAD_LOSS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_LOSS)])
def test_grpo_loss_rejects_bad_input(name, override):
    args = dict(
        logp=torch.zeros(2, 2, 3), logp_old=torch.zeros(2, 2, 3), advantages=torch.ones(2, 2),
        response_mask=torch.ones(2, 2, 3), epsilon=0.2, normalization="paper",
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        grpo_loss(args.pop("logp"), args.pop("logp_old"), args.pop("advantages"), args.pop("response_mask"), **args)
