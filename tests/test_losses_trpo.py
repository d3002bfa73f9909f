"""Tests for Eq. (9) ``trpo_penalty_loss`` and Eq. (10) ``trpo_constraint_satisfied``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.importance import importance_weighted_loss
from rlmt_edu.losses.kl import kl_divergence
from rlmt_edu.losses.trpo import trpo_constraint_satisfied, trpo_penalty_loss

NAN, INF = float("nan"), float("inf")
LN2 = math.log(2.0)

HAND = {
    "logp": torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
    "logp_old": torch.tensor([[-1.0, -2.0 - LN2, -3.0], [-1.0, -1.0, -1.0]]),  # ratio [[1, 2, 1], [1, 1, 1]]
    "advantages": torch.tensor([[1.0, 1.0, 5.0], [-2.0, 3.0, 7.0]]),
    "kl": torch.tensor([[0.1, 0.3, 9.0], [9.0, 0.2, 0.2]]),  # the 9s are outside the response
    "response_mask": torch.tensor([[1, 1, 0], [0, 1, 1]]),
}


def random_batch(seed, batch=4, tokens=6, vocab=5):
    """Seeded logits of an old and a new model, sampled tokens, their log-probs, advantages, exact per-token
    KL(π0‖π1) and a mask of varying response lengths."""
    g = torch.Generator().manual_seed(seed)
    logits_old = torch.randn(batch, tokens, vocab, generator=g, dtype=torch.float64)
    logits = logits_old + 0.3 * torch.randn(batch, tokens, vocab, generator=g, dtype=torch.float64)
    tokens_ = torch.randint(0, vocab, (batch, tokens), generator=g)
    mask = torch.zeros(batch, tokens)
    for b in range(batch):
        start = b % 2
        mask[b, start : start + 1 + (b * 3) % (tokens - start)] = 1
    assert len(set(mask.sum(1).tolist())) > 1
    advantages = torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    return logits_old, logits, tokens_, advantages, mask


def gather_logp(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- trpo_penalty_loss (Eq. 9)


def test_trpo_penalty_loss_hand_value_and_metrics():
    # surrogate: row 0: 1·1 + 2·1 = 3; row 1: 1·3 + 1·7 = 10; -(3 + 10)/2 = -6.5
    # KL on the response: 0.1, 0.3, 0.2, 0.2 -> mean 0.2; sum / S = 0.8 / 2 = 0.4
    loss, metrics = trpo_penalty_loss(**HAND, beta=0.5)
    assert float(loss) == pytest.approx(-6.5 + 0.5 * 0.2)
    loss_sum, _ = trpo_penalty_loss(**HAND, beta=0.5, kl_reduction="sum")
    assert float(loss_sum) == pytest.approx(-6.5 + 0.5 * 0.4)
    assert metrics["trpo/surrogate"] == pytest.approx(-6.5)
    assert metrics["trpo/kl_penalty"] == pytest.approx(0.1)
    assert metrics["trpo/kl_mean"] == pytest.approx(0.2)
    assert metrics["trpo/kl_max"] == pytest.approx(0.3)
    assert metrics["trpo/ratio_mean"] == pytest.approx(1.25)


def test_trpo_penalty_loss_matches_loop():
    logits_old, logits, tokens, advantages, mask = random_batch(0)
    logp, logp_old = gather_logp(logits, tokens), gather_logp(logits_old, tokens)
    kl = kl_divergence(logits_old, logits)
    beta = 0.7
    surrogate, kl_total, count = 0.0, 0.0, 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t] == 1:
                surrogate += math.exp(float(logp[i, t]) - float(logp_old[i, t])) * float(advantages[i, t])
                kl_total += float(kl[i, t])
                count += 1
    s = mask.shape[0]
    loss, _ = trpo_penalty_loss(logp, logp_old, advantages, kl, mask, beta=beta)
    assert float(loss) == pytest.approx(-surrogate / s + beta * kl_total / count, abs=1e-12)
    loss, _ = trpo_penalty_loss(logp, logp_old, advantages, kl, mask, beta=beta, kl_reduction="sum")
    assert float(loss) == pytest.approx(-surrogate / s + beta * kl_total / s, abs=1e-12)


def test_trpo_penalty_loss_beta_zero_is_eq7():
    logits_old, logits, tokens, advantages, mask = random_batch(1)
    logp, logp_old = gather_logp(logits, tokens), gather_logp(logits_old, tokens)
    kl = kl_divergence(logits_old, logits)
    loss, _ = trpo_penalty_loss(logp, logp_old, advantages, kl, mask, beta=0.0)
    assert torch.allclose(loss, importance_weighted_loss(logp, logp_old, advantages, mask)[0])


def test_trpo_penalty_loss_gradcheck_through_logits():
    """The gradient reaches the new model's logits through both the ratio and the exact KL."""
    logits_old, logits, tokens, advantages, mask = random_batch(2, batch=2, tokens=3, vocab=3)

    def loss_of(new_logits):
        kl = kl_divergence(logits_old, new_logits)
        logp, logp_old = gather_logp(new_logits, tokens), gather_logp(logits_old, tokens)
        loss, _ = trpo_penalty_loss(logp, logp_old, advantages, kl, mask, beta=0.3)
        return loss

    assert torch.autograd.gradcheck(loss_of, (logits.requires_grad_(),))


def test_trpo_penalty_loss_penalty_pulls_towards_old_model():
    logits_old, logits, tokens, _, mask = random_batch(3)
    logits.requires_grad_()
    kl = kl_divergence(logits_old, logits)
    zero_adv = torch.zeros(mask.shape, dtype=torch.float64)
    logp, logp_old = gather_logp(logits, tokens), gather_logp(logits_old, tokens)
    loss, _ = trpo_penalty_loss(logp, logp_old, zero_adv, kl, mask, beta=1.0)
    loss.backward()
    with torch.no_grad():  # a small step against the gradient lowers the mean KL
        stepped = logits - 0.1 * logits.grad
        before = float(kl_divergence(logits_old, logits)[mask == 1].mean())
        after = float(kl_divergence(logits_old, stepped)[mask == 1].mean())
    assert after < before


@pytest.mark.parametrize("log_ratio", [80.0, -80.0])
def test_trpo_penalty_loss_stable_for_extreme_log_ratios(log_ratio):
    logp_old = torch.tensor([[-90.0, -1.0]]) if log_ratio > 0 else torch.tensor([[-10.0, -1.0]])
    logp = (logp_old + torch.tensor([[log_ratio, 0.0]])).requires_grad_()
    kl = torch.tensor([[50.0, 0.0]], requires_grad=True)
    loss, metrics = trpo_penalty_loss(logp, logp_old, torch.tensor([[1.0, -1.0]]), kl, torch.ones(1, 2), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(kl.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


TRPO_BAD = [
    ("beta_negative", {"beta": -0.1}, "beta"),
    ("beta_nan", {"beta": NAN}, "beta"),
    ("beta_string", {"beta": "0.1"}, "beta"),
    ("kl_reduction_unknown", {"kl_reduction": "max"}, "kl_reduction"),
    ("logp_1d", {"logp": torch.full((3,), -1.0)}, "logp"),
    ("logp_positive", {"logp": torch.full((2, 3), 0.5)}, "logp"),
    ("logp_old_shape", {"logp_old": torch.full((2, 2), -1.0)}, "logp_old"),
    ("logp_old_nan", {"logp_old": torch.tensor([[NAN, -1.0, -1.0], [-1.0, -1.0, -1.0]])}, "logp_old"),
    ("advantages_shape", {"advantages": torch.ones(2)}, "advantages"),
    ("advantages_inf", {"advantages": torch.tensor([[INF, 1.0, 1.0], [1.0, 1.0, 1.0]])}, "advantages"),
    ("kl_negative", {"kl": torch.tensor([[-0.1, 0.3, 0.0], [0.0, 0.2, 0.2]])}, "kl"),
    ("kl_shape", {"kl": torch.zeros(2, 4)}, "kl"),
    ("kl_1d", {"kl": torch.zeros(3)}, "kl"),
    ("kl_nan", {"kl": torch.tensor([[NAN, 0.3, 0.0], [0.0, 0.2, 0.2]])}, "kl"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [0, 1, 1]])}, "response_mask"),
    ("mask_value_2", {"response_mask": torch.tensor([[2, 1, 0], [0, 1, 1]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in TRPO_BAD], ids=[b[0] for b in TRPO_BAD])
def test_trpo_penalty_loss_rejects_bad_input(override, arg):
    assert_rejects(trpo_penalty_loss, {**HAND, "beta": 0.5, **override}, arg)


# ---------------------------------------------------------------- trpo_constraint_satisfied (Eq. 10)


def test_trpo_constraint_satisfied_hand_values():
    kl, mask = HAND["kl"], HAND["response_mask"]  # response KLs 0.1, 0.3, 0.2, 0.2: mean 0.2, max 0.3
    assert trpo_constraint_satisfied(kl, mask, delta=0.2) is True  # mean ≤ δ (the 9s are masked out)
    assert trpo_constraint_satisfied(kl, mask, delta=0.19) is False
    assert trpo_constraint_satisfied(kl, mask, delta=0.25, per_token=True) is False  # 0.3 > 0.25
    assert trpo_constraint_satisfied(kl, mask, delta=0.3, per_token=True) is True


def test_trpo_constraint_satisfied_matches_loop():
    logits_old, logits, _, _, mask = random_batch(4)
    kl = kl_divergence(logits_old, 3 * logits)
    selected = [float(kl[i, t]) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t] == 1]
    mean_kl, max_kl = sum(selected) / len(selected), max(selected)
    for delta in (0.5 * mean_kl, mean_kl * 1.0001, 0.5 * (mean_kl + max_kl), max_kl * 1.0001, 2 * max_kl):
        assert trpo_constraint_satisfied(kl, mask, delta=delta) == (mean_kl <= delta)
        assert trpo_constraint_satisfied(kl, mask, delta=delta, per_token=True) == (max_kl <= delta)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), delta=st.floats(1e-3, 2.0))
def test_trpo_constraint_satisfied_per_token_implies_mean(seed, delta):
    logits_old, logits, _, _, mask = random_batch(seed, batch=3, tokens=4, vocab=3)
    kl = kl_divergence(logits_old, 4 * logits)
    if trpo_constraint_satisfied(kl, mask, delta=delta, per_token=True):
        assert trpo_constraint_satisfied(kl, mask, delta=delta)


CONSTRAINT_BAD = [
    ("delta_zero", {"delta": 0.0}, "delta"),
    ("delta_negative", {"delta": -0.01}, "delta"),
    ("delta_nan", {"delta": NAN}, "delta"),
    ("delta_none", {"delta": None}, "delta"),
    ("per_token_string", {"per_token": "yes"}, "per_token"),
    ("kl_negative", {"kl": torch.tensor([[-1.0, 0.3, 0.0], [0.0, 0.2, 0.2]])}, "kl"),
    ("kl_inf", {"kl": torch.tensor([[INF, 0.3, 0.0], [0.0, 0.2, 0.2]])}, "kl"),
    ("kl_3d", {"kl": torch.zeros(2, 3, 1)}, "kl"),
    ("kl_not_tensor", {"kl": [[0.1, 0.3, 0.0], [0.0, 0.2, 0.2]]}, "kl"),
    ("mask_shape", {"response_mask": torch.ones(2, 4)}, "response_mask"),
    ("mask_empty_row", {"response_mask": torch.tensor([[0, 0, 0], [0, 1, 1]])}, "response_mask"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in CONSTRAINT_BAD], ids=[b[0] for b in CONSTRAINT_BAD])
def test_trpo_constraint_satisfied_rejects_bad_input(override, arg):
    valid = {"kl": HAND["kl"], "response_mask": HAND["response_mask"], "delta": 0.2}
    assert_rejects(trpo_constraint_satisfied, {**valid, **override}, arg)
