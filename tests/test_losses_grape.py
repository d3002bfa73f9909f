"""§6.1 (φ̄), Eq. 15 (GRAPE reward), Eq. 17 (sequence-level clipped loss) and Lemma 8.1 (§8.7)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.grape import (
    average_variances,
    grape_reward,
    grape_sequence_loss,
    mean_rubric_confidence,
    monte_carlo_average_variances,
)
from rlmt_edu.losses.ppo import ppo_clip_loss

LN = math.log


def random_rubrics(seed, samples=9, items=5, categories=3, dtype=torch.float64):
    """Seeded (confidence, category, item_mask, scores, weights): each category has its own subset of items."""
    g = torch.Generator().manual_seed(seed)
    rubric = torch.zeros(categories, items, dtype=dtype)
    for k in range(categories):
        while rubric[k].sum() == 0:
            rubric[k] = (torch.rand(items, generator=g) < 0.6).to(dtype)
    category = torch.randint(0, categories, (samples,), generator=g)
    item_mask = rubric[category]  # (S, J)
    confidence = torch.rand(samples, items, generator=g, dtype=dtype)
    scores = torch.rand(samples, items, generator=g, dtype=dtype)
    raw = (torch.rand(categories, items, generator=g, dtype=dtype) + 0.1) * rubric
    weights = (raw / raw.sum(dim=1, keepdim=True))[category]  # (S, J), rows sum to 1 over items
    return confidence, category, item_mask, scores, weights


# ---------------------------------------------------------------- mean_rubric_confidence (§6.1)


def test_mean_rubric_confidence_hand_value():
    # samples 0 and 2 are category 0 (two items), sample 1 is category 1 (one item)
    confidence = torch.tensor([[0.8, 0.6], [0.5, 0.9], [0.4, 1.0]])
    category = torch.tensor([0, 1, 0])
    item_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    # category 0: φ̄ = ((0.8 + 0.4)/2, (0.6 + 1.0)/2) = (0.6, 0.8); category 1: (0.5, -) ; padding -> 0
    expected = torch.tensor([[0.6, 0.8], [0.5, 0.0], [0.6, 0.8]])
    torch.testing.assert_close(mean_rubric_confidence(confidence, category, item_mask), expected)


@pytest.mark.parametrize("seed", range(4))
def test_mean_rubric_confidence_matches_python_loop(seed):
    confidence, category, item_mask, _, _ = random_rubrics(seed)
    phi_bar = mean_rubric_confidence(confidence, category, item_mask)
    S, J = confidence.shape
    for i in range(S):
        xi = [k for k in range(S) if category[k] == category[i]]  # ξ(text_i)
        for j in range(J):
            expected = sum(float(confidence[k, j]) for k in xi) / len(xi) if item_mask[i, j] == 1 else 0.0
            assert phi_bar[i, j].item() == pytest.approx(expected, abs=1e-12)


def test_mean_rubric_confidence_gradcheck():
    confidence, category, item_mask, _, _ = random_rubrics(1, samples=5, items=3)
    confidence = (0.1 + 0.8 * confidence).requires_grad_(True)  # interior of [0, 1]
    assert torch.autograd.gradcheck(lambda c: mean_rubric_confidence(c, category, item_mask), (confidence,))


BAD_PHI = [
    ("confidence", dict(confidence=torch.tensor([[1.2, 0.5], [0.5, 0.5], [0.5, 0.5]]))),
    ("confidence", dict(confidence=torch.tensor([[-0.1, 0.5], [0.5, 0.5], [0.5, 0.5]]))),
    ("confidence", dict(confidence=torch.tensor([[float("nan"), 0.5], [0.5, 0.5], [0.5, 0.5]]))),
    ("confidence", dict(confidence=torch.full((3,), 0.5))),
    ("category", dict(category=torch.tensor([0.0, 1.0, 0.0]))),
    ("category", dict(category=torch.tensor([0, 1]))),
    ("category", dict(category=torch.tensor([[0, 1, 0]]))),
    ("category", dict(category=[0, 1, 0])),
    ("item_mask", dict(item_mask=torch.ones(3, 3))),
    ("item_mask", dict(item_mask=torch.tensor([[1, 1], [0, 0], [1, 1]]))),
    ("item_mask", dict(item_mask=torch.tensor([[1, 1], [1, 0], [1, 0]]))),  # category 0 with two rubrics
    ("item_mask", dict(item_mask=torch.tensor([[1, 1], [1, -1], [1, 1]]))),
]


@pytest.mark.parametrize("name,override", BAD_PHI, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_PHI)])
def test_mean_rubric_confidence_rejects_bad_input(name, override):
    args = dict(
        confidence=torch.full((3, 2), 0.5), category=torch.tensor([0, 1, 0]),
        item_mask=torch.tensor([[1, 1], [1, 0], [1, 1]]),
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        mean_rubric_confidence(**args)


# ---------------------------------------------------------------- grape_reward (Eq. 15)


def test_grape_reward_hand_value():
    scores = torch.tensor([[1.0, 0.5], [0.2, 0.0]])
    mean_confidence = torch.tensor([[0.6, 0.8], [0.5, 0.0]])
    weights = torch.tensor([[0.75, 0.25], [1.0, 0.0]])
    item_mask = torch.tensor([[1, 1], [1, 0]])
    # row 0: ρ = 2, Σ ω τ φ̄ = 0.75·1·0.6 + 0.25·0.5·0.8 = 0.55, Σ φ̄ = 1.4 -> 2·0.55/1.4
    # row 1: ρ = 1, 1·0.2·0.5 / 0.5 = 0.2
    reward = grape_reward(scores, mean_confidence, weights, item_mask)
    torch.testing.assert_close(reward, torch.tensor([2 * 0.55 / 1.4, 0.2]))


def test_grape_reward_can_exceed_one_as_written():
    """Eq. 15's effective weights ρ·ω_j·φ̄_j/Σφ̄ need not sum to 1: the docstring's example, R ≈ 1.78."""
    reward = grape_reward(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.01]]), torch.tensor([[0.9, 0.1]]), torch.ones(1, 2)
    )
    assert reward.item() == pytest.approx(2 * 0.9 / 1.01, rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_grape_reward_matches_python_loop(seed):
    confidence, category, item_mask, scores, weights = random_rubrics(seed)
    phi_bar = mean_rubric_confidence(confidence, category, item_mask)
    reward = grape_reward(scores, phi_bar, weights, item_mask)
    for i in range(scores.shape[0]):
        items = [j for j in range(scores.shape[1]) if item_mask[i, j] == 1]
        numerator = sum(float(weights[i, j] * scores[i, j] * phi_bar[i, j]) for j in items)
        expected = len(items) * numerator / sum(float(phi_bar[i, j]) for j in items)
        assert reward[i].item() == pytest.approx(expected, rel=1e-12)


rubric_strategy = st.integers(1, 6).flatmap(
    lambda rho: st.tuples(
        st.lists(st.floats(0, 1), min_size=rho, max_size=rho),  # τ
        st.lists(st.floats(0.01, 1), min_size=rho, max_size=rho),  # raw weights
        st.floats(0.01, 1),  # the common φ̄
    )
)


@settings(max_examples=40, deadline=None)
@given(rubric=rubric_strategy)
def test_grape_reward_with_equal_confidences_is_the_weighted_score(rubric):
    tau, raw, phi = rubric
    scores = torch.tensor([tau], dtype=torch.float64)
    weights = torch.tensor([raw], dtype=torch.float64)
    weights = weights / weights.sum()
    reward = grape_reward(scores, torch.full_like(scores, phi), weights, torch.ones_like(scores))
    assert reward.item() == pytest.approx(float((weights * scores).sum()), rel=1e-9, abs=1e-12)  # Σ ω τ


@settings(max_examples=30, deadline=None)
@given(rubric=rubric_strategy, conf=st.lists(st.floats(0.01, 1), min_size=6, max_size=6))
def test_grape_reward_with_uniform_weights_is_the_confidence_weighted_average(rubric, conf):
    """ω_j = 1/ρ turns Eq. 15 into Σ τ φ̄ / Σ φ̄, the weighted average of Lemma 8.1."""
    tau, _, _ = rubric
    rho = len(tau)
    scores = torch.tensor([tau], dtype=torch.float64)
    phi = torch.tensor([conf[:rho]], dtype=torch.float64)
    reward = grape_reward(scores, phi, torch.full_like(scores, 1 / rho), torch.ones_like(scores))
    assert reward.item() == pytest.approx(float((scores * phi).sum() / phi.sum()), rel=1e-9, abs=1e-12)


def test_grape_reward_gradcheck():
    confidence, category, item_mask, scores, weights = random_rubrics(2, samples=4, items=3)
    scores = (0.1 + 0.8 * scores).requires_grad_(True)
    phi = (0.1 + 0.8 * confidence).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s, c, w: grape_reward(s, c, w, item_mask), (scores, phi, weights.requires_grad_(True))
    )


def _reward_args(**override):
    args = dict(
        scores=torch.tensor([[1.0, 0.5], [0.2, 0.0]]), mean_confidence=torch.tensor([[0.6, 0.8], [0.5, 0.0]]),
        weights=torch.tensor([[0.75, 0.25], [1.0, 0.0]]), item_mask=torch.tensor([[1, 1], [1, 0]]),
    )
    args.update(override)
    return args


BAD_REWARD = [
    ("weights", dict(weights=torch.tensor([[0.5, 0.25], [1.0, 0.0]]))),
    ("weights", dict(weights=torch.tensor([[0.75, 0.25], [0.5, 0.5]]))),  # 0.5 sits on a missing item
    ("weights", dict(weights=torch.tensor([[1.25, -0.25], [1.0, 0.0]]))),
    ("weights", dict(weights=torch.ones(2, 3))),
    ("weights", dict(weights=torch.tensor([[float("nan"), 0.25], [1.0, 0.0]]))),
    ("scores", dict(scores=torch.tensor([[1.5, 0.5], [0.2, 0.0]]))),
    ("scores", dict(scores=torch.tensor([[1.0, -0.5], [0.2, 0.0]]))),
    ("scores", dict(scores=torch.tensor([1.0, 0.5]))),
    ("scores", dict(scores=torch.tensor([[1.0, float("inf")], [0.2, 0.0]]))),
    ("mean_confidence", dict(mean_confidence=torch.tensor([[0.6, 1.8], [0.5, 0.0]]))),
    ("mean_confidence", dict(mean_confidence=torch.tensor([[0.0, 0.0], [0.5, 0.0]]))),
    ("mean_confidence", dict(mean_confidence=torch.ones(3, 2))),
    ("item_mask", dict(item_mask=torch.tensor([[1, 1], [1, 3]]))),
    ("item_mask", dict(item_mask=torch.tensor([[1, 1], [0, 0]]))),
]


@pytest.mark.parametrize("name,override", BAD_REWARD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_REWARD)])
def test_grape_reward_rejects_bad_input(name, override):
    with pytest.raises(ValueError, match=name):
        grape_reward(**_reward_args(**override))


# ---------------------------------------------------------------- grape_sequence_loss (Eq. 17)


def loop_grape_loss(logp, logp_old, advantages, mask, eps):
    total = 0.0
    for i in range(logp.shape[0]):
        log_ratio = sum(float(logp[i, t]) - float(logp_old[i, t]) for t in range(logp.shape[1]) if mask[i, t] == 1)
        ratio, a = math.exp(log_ratio), float(advantages[i])
        total += min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
    return -total / logp.shape[0]


def random_sequences(seed, samples=6, tokens=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(samples, tokens, generator=g, dtype=dtype) * 3 - 2  # ≤ -2, so logp = logp_old + noise stays ≤ 0
    logp = logp_old + torch.randn(samples, tokens, generator=g, dtype=dtype) * 0.15
    advantages = torch.randn(samples, generator=g, dtype=dtype)
    mask = torch.zeros(samples, tokens, dtype=dtype)
    for i in range(samples):
        start = int(torch.randint(0, min(2, tokens), (1,), generator=g))  # 0-1 prompt tokens
        length = int(torch.randint(1, tokens - start + 1, (1,), generator=g))
        mask[i, start : start + length] = 1
    return logp, logp_old, advantages, mask


def test_grape_sequence_loss_hand_value():
    # sample 0: token log-ratios ln 1.5 and 0 (third token is padding) -> ratio 1.5; A = 2 -> min(3, 2.4) = 2.4
    # sample 1: ln 0.5 + ln 2 + ln 0.9 = ln 0.9 -> ratio 0.9; A = -1 -> min(-0.9, -0.9) = -0.9
    # loss = -(1/2)(2.4 - 0.9) = -0.75
    # (both models' log-probs shifted by -3, which leaves every ratio unchanged; padding holds junk -7)
    logp = torch.tensor([[LN(1.5), 0.0, -4.0], [LN(0.5), LN(2.0), LN(0.9)]]) - 3
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, metrics = grape_sequence_loss(logp, torch.full((2, 3), -3.0), torch.tensor([2.0, -1.0]), mask)
    assert loss.item() == pytest.approx(-0.75, abs=1e-6)
    assert metrics["grape/clip_fraction"] == pytest.approx(0.5)
    assert metrics["grape/ratio_max"] == pytest.approx(1.5)
    assert metrics["grape/ratio_min"] == pytest.approx(0.9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_grape_sequence_loss_matches_python_loop(seed, epsilon):
    logp, logp_old, advantages, mask = random_sequences(seed)
    loss, _ = grape_sequence_loss(logp, logp_old, advantages, mask, epsilon=epsilon)
    assert loss.item() == pytest.approx(loop_grape_loss(logp, logp_old, advantages, mask, epsilon), rel=1e-10)


def test_grape_sequence_loss_equals_ppo_clip_loss_for_one_token_responses():
    logp, logp_old, advantages, _ = random_sequences(3, tokens=1)
    mask = torch.ones_like(logp)
    grape, _ = grape_sequence_loss(logp, logp_old, advantages, mask)
    ppo, _ = ppo_clip_loss(logp, logp_old, advantages[:, None], mask)
    assert grape.item() == pytest.approx(ppo.item(), rel=1e-12)


def test_grape_sequence_loss_gradient_is_zero_exactly_where_clipping_removes_the_incentive():
    # sequence ratios 1.5 (A=+1, clipped), 0.6 (A=-1, clipped), 1.1 (A=+1), 0.6 (A=+1), 1.5 (A=-1)
    ratios = [1.5, 0.6, 1.1, 0.6, 1.5]
    advs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    half = torch.tensor([[LN(r) / 2] * 2 for r in ratios], dtype=torch.float64)  # two tokens share the log-ratio
    logp = (half - 2).requires_grad_(True)  # logp_old = -2 on every token
    logp_old = torch.full((5, 2), -2.0, dtype=torch.float64)
    loss, metrics = grape_sequence_loss(logp, logp_old, advs, torch.ones(5, 2))
    loss.backward()
    assert logp.grad[0].abs().max().item() == 0.0
    assert logp.grad[1].abs().max().item() == 0.0
    for i in (2, 3, 4):
        # d/dlogp_it of -(1/S)·exp(Σ_t log-ratio)·A = -(1/S)·ratio·A, the same for every token of the sample
        expected = -ratios[i] * advs[i].item() / 5
        torch.testing.assert_close(logp.grad[i], torch.full((2,), expected, dtype=torch.float64))
        assert logp.grad[i].abs().min().item() > 0
    assert metrics["grape/clip_fraction"] == pytest.approx(2 / 5)


def test_grape_sequence_loss_gradcheck_away_from_the_clip_kinks():
    logp, logp_old, advantages, mask = random_sequences(6, samples=4, tokens=3)
    seq_ratio = ((logp - logp_old) * mask).sum(1).exp()
    assert ((seq_ratio - 1.2).abs() > 0.02).all() and ((seq_ratio - 0.8).abs() > 0.02).all()
    assert torch.autograd.gradcheck(
        lambda lp: grape_sequence_loss(lp, logp_old, advantages, mask)[0], (logp.requires_grad_(True),)
    )


@pytest.mark.parametrize("log_ratio", [80.0, -80.0])
def test_grape_sequence_loss_is_finite_for_extreme_log_ratios(log_ratio):
    logp_old = torch.full((4, 2), -90.0 if log_ratio > 0 else -1.0)
    logp = logp_old.clone()
    logp[:, 0] += log_ratio  # one token carries the whole sequence log-ratio of ±80
    logp.requires_grad_(True)
    loss, _ = grape_sequence_loss(logp, logp_old, torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.ones(4, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()


def test_grape_sequence_loss_stays_finite_when_the_sequence_ratio_overflows_in_the_clipped_branch():
    """A sequence log-ratio of +200 (e^200 is inf in float32) with A > 0 is clipped: loss (1+ε)·A, gradient 0.
    The literal min(ratio·A, CLIP(ratio)·A) would give a NaN gradient here (0·inf)."""
    logp = torch.full((2, 4), -1.0)
    logp_old = torch.full((2, 4), -1.0)
    logp_old[0] -= 50.0  # log-ratio 4 tokens × 50 = +200
    logp[1] -= 50.0  # -200, A < 0: clipped at 1-ε
    logp.requires_grad_(True)
    loss, _ = grape_sequence_loss(logp, logp_old, torch.tensor([1.0, -1.0]), torch.ones(2, 4))
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 0.8 * -1.0) / 2, rel=1e-6)
    assert logp.grad.abs().max().item() == 0.0


BAD_SEQ = [
    ("epsilon", dict(epsilon=0.0)),
    ("epsilon", dict(epsilon=-1.0)),
    ("advantages", dict(advantages=torch.ones(2, 3))),
    ("advantages", dict(advantages=torch.ones(3))),
    ("advantages", dict(advantages=torch.tensor([1.0, float("nan")]))),
    ("logp_old", dict(logp_old=torch.zeros(2, 4))),
    ("logp", dict(logp=torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]))),
    ("logp", dict(logp=torch.zeros(2, 3, 1))),
    ("response_mask", dict(response_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))),
    ("response_mask", dict(response_mask=torch.tensor([[1, 1, 1], [1, 0.5, 0]]))),
]


@pytest.mark.parametrize("name,override", BAD_SEQ, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_SEQ)])
def test_grape_sequence_loss_rejects_bad_input(name, override):
    args = dict(
        logp=torch.zeros(2, 3), logp_old=torch.zeros(2, 3), advantages=torch.ones(2),
        response_mask=torch.ones(2, 3), epsilon=0.2,
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        grape_sequence_loss(
            args.pop("logp"), args.pop("logp_old"), args.pop("advantages"), args.pop("response_mask"), **args
        )


# ---------------------------------------------------------------- average_variances (Lemma 8.1)


def test_average_variances_hand_value():
    # σ = (1, 2), φ̄ = (1, 1/4) ∝ 1/σ²:  plain = (1 + 4)/4 = 1.25
    # weighted = (1²·1 + (1/4)²·4) / (1 + 1/4)² = 1.25 / 1.5625 = 0.8 = 1 / (1/1 + 1/4)
    plain, weighted = average_variances(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.25]))
    assert plain.item() == pytest.approx(1.25)
    assert weighted.item() == pytest.approx(0.8)


def test_average_variances_matches_python_loop():
    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    conf = torch.rand(7, generator=g, dtype=torch.float64)
    plain, weighted = average_variances(sigma, conf)
    s, c = [float(x) for x in sigma], [float(x) for x in conf]
    assert plain.item() == pytest.approx(sum(x * x for x in s) / len(s) ** 2, rel=1e-12)
    assert weighted.item() == pytest.approx(sum((ci * si) ** 2 for ci, si in zip(c, s)) / sum(c) ** 2, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(sigmas=st.lists(st.floats(0.05, 10), min_size=1, max_size=8), k=st.floats(1e-3, 10))
def test_average_variances_weighted_is_smaller_when_confidence_is_inverse_variance(sigmas, k):
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    plain, weighted = average_variances(sigma, k / sigma**2)  # φ̄_i = k/σ_i², the lemma's assumption
    assert weighted.item() <= plain.item() * (1 + 1e-12)
    assert weighted.item() == pytest.approx(1 / (1 / sigma**2).sum().item(), rel=1e-9)  # 1 / Σ 1/σ_i²


def test_average_variances_weighted_can_be_larger_when_confidence_is_not_inverse_variance():
    """§6.1.1: "variance does not reduce for all possible values": trust the noisy item most and it grows."""
    plain, weighted = average_variances(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 1.0]))
    assert plain.item() == pytest.approx(1.25)
    assert weighted.item() == pytest.approx((0.1**2 * 1 + 1.0**2 * 4) / 1.1**2)  # ≈ 3.31
    assert weighted.item() > plain.item()


def test_average_variances_gradcheck():
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    conf = torch.tensor([0.9, 0.4, 0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, c: average_variances(s, c), (sigma, conf))


BAD_LEMMA = [
    ("sigma", dict(sigma=torch.tensor([1.0, -2.0]))),
    ("sigma", dict(sigma=torch.ones(2, 2))),
    ("sigma", dict(sigma=torch.tensor([1.0, float("nan")]))),
    ("sigma", dict(sigma=torch.zeros(0), confidence=torch.zeros(0))),
    ("confidence", dict(confidence=torch.tensor([1.0, -0.5]))),
    ("confidence", dict(confidence=torch.zeros(2))),
    ("confidence", dict(confidence=torch.ones(3))),
    ("confidence", dict(confidence=torch.tensor([1.0, float("inf")]))),
]


@pytest.mark.parametrize("name,override", BAD_LEMMA, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_LEMMA)])
def test_average_variances_rejects_bad_input(name, override):
    args = dict(sigma=torch.tensor([1.0, 2.0]), confidence=torch.tensor([1.0, 0.25]))
    args.update(override)
    with pytest.raises(ValueError, match=name):
        average_variances(**args)


# ---------------------------------------------------------------- monte_carlo_average_variances


@pytest.mark.parametrize(
    "sigma,confidence",
    [
        ([0.5, 1.0, 2.0, 4.0], [1 / 0.25, 1.0, 1 / 4, 1 / 16]),  # φ̄ ∝ 1/σ²: weighted < plain
        ([1.0, 2.0], [0.1, 1.0]),  # the counterexample: weighted > plain
    ],
)
def test_monte_carlo_average_variances_agrees_with_average_variances(sigma, confidence):
    sigma, confidence = torch.tensor(sigma, dtype=torch.float64), torch.tensor(confidence, dtype=torch.float64)
    n = 40_000
    mc_plain, mc_weighted = monte_carlo_average_variances(
        sigma, confidence, n_draws=n, generator=torch.Generator().manual_seed(0)
    )
    plain, weighted = average_variances(sigma, confidence)
    tolerance = 4 * math.sqrt(2 / n)  # 4 standard errors of a sample variance, relative
    assert mc_plain.item() == pytest.approx(plain.item(), rel=tolerance)
    assert mc_weighted.item() == pytest.approx(weighted.item(), rel=tolerance)
    assert (mc_weighted < mc_plain) == (weighted < plain)


def test_monte_carlo_average_variances_is_reproducible_with_a_seed():
    sigma, confidence = torch.tensor([1.0, 3.0]), torch.tensor([0.9, 0.1])
    first = monte_carlo_average_variances(sigma, confidence, n_draws=500, generator=torch.Generator().manual_seed(3))
    second = monte_carlo_average_variances(sigma, confidence, n_draws=500, generator=torch.Generator().manual_seed(3))
    other = monte_carlo_average_variances(sigma, confidence, n_draws=500, generator=torch.Generator().manual_seed(4))
    assert first[0].item() == second[0].item() and first[1].item() == second[1].item()
    assert first[0].item() != other[0].item()


BAD_MC = [
    ("n_draws", dict(n_draws=1)),
    ("n_draws", dict(n_draws=2.5)),
    ("n_draws", dict(n_draws=True)),
    ("generator", dict(generator=None)),
    ("generator", dict(generator=0)),
    ("sigma", dict(sigma=torch.tensor([-1.0, 2.0]))),
    ("confidence", dict(confidence=torch.tensor([0.0, 0.0]))),
]


@pytest.mark.parametrize("name,override", BAD_MC, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_MC)])
def test_monte_carlo_average_variances_rejects_bad_input(name, override):
    args = dict(
        sigma=torch.tensor([1.0, 2.0]), confidence=torch.tensor([1.0, 0.25]), n_draws=100,
        generator=torch.Generator().manual_seed(0),
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        monte_carlo_average_variances(args.pop("sigma"), args.pop("confidence"), **args)
