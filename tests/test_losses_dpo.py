"""§4.9: the naive preference loss on log-probabilities and the DPO loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.dpo import dpo_loss, naive_preference_loss


def softplus(x):
    """-log σ(x) = log(1 + e^{-x}), written out for the hand values."""
    return math.log1p(math.exp(-x))


def random_pairs(seed, pairs=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(pairs, generator=g, dtype=dtype) * 20 for _ in range(4)]


# ---------------------------------------------------------------- naive_preference_loss


def test_naive_preference_loss_hand_value():
    # pair 0: log π1(w) - log π1(l) = -1 - (-2) = +1 -> log(1 + e^-1) = 0.3132617
    # pair 1: -2 - (-1) = -1                       -> log(1 + e^+1) = 1.3132617
    loss = naive_preference_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_naive_preference_loss_matches_python_loop(seed):
    chosen, rejected, _, _ = random_pairs(seed)
    expected = sum(softplus(float(w) - float(l)) for w, l in zip(chosen, rejected)) / len(chosen)
    assert naive_preference_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-12)


def test_naive_preference_loss_only_pushes_the_rejected_text_down_without_limit():
    """No reference term: the gradient on log π1(text_l) never vanishes while the margin is finite."""
    chosen = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    naive_preference_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5)  # -σ(-0) = -1/2
    assert rejected.grad.item() == pytest.approx(0.5)


def test_naive_preference_loss_gradcheck():
    chosen, rejected, _, _ = random_pairs(0)
    assert torch.autograd.gradcheck(naive_preference_loss, (chosen.requires_grad_(True), rejected.requires_grad_(True)))


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_naive_preference_loss_is_finite_for_extreme_margins(gap):
    # both texts' log-probs ≤ 0: the one that is 1e4 lower sits at -1e4 - 1 or so
    chosen = torch.tensor([0.0, -1.0]) - max(0.0, -gap)
    chosen.requires_grad_(True)
    rejected = chosen.detach() - gap
    loss = naive_preference_loss(chosen, rejected)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all()
    assert loss.item() == pytest.approx(0.0 if gap > 0 else 1e4, abs=1e-3)


BAD_NAIVE = [
    ("logp_rejected", dict(logp_rejected=torch.zeros(3))),
    ("logp_chosen", dict(logp_chosen=torch.zeros(2, 1))),
    ("logp_chosen", dict(logp_chosen=torch.tensor([0.0, float("inf")]))),
    ("logp_rejected", dict(logp_rejected=torch.tensor([float("nan"), 0.0]))),
    ("logp_chosen", dict(logp_chosen=torch.zeros(0), logp_rejected=torch.zeros(0))),
    ("logp_rejected", dict(logp_rejected=[0.0, 0.0])),
]


@pytest.mark.parametrize("name,override", BAD_NAIVE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_NAIVE)])
def test_naive_preference_loss_rejects_bad_input(name, override):
    args = dict(logp_chosen=torch.zeros(2), logp_rejected=torch.zeros(2))
    args.update(override)
    with pytest.raises(ValueError, match=name):
        naive_preference_loss(**args)


# ---------------------------------------------------------------- dpo_loss


def test_dpo_loss_hand_value():
    # β = 0.5.  pair 0: log-ratios chosen -1 - (-1.5) = +0.5, rejected -2 - (-1.5) = -0.5
    #   rewards 0.25 and -0.25, argument of σ = 0.5  -> log(1 + e^-0.5)  = 0.4740770
    # pair 1: chosen -2 - (-2) = 0, rejected -1 - (-1.5) = +0.5
    #   rewards 0 and 0.25, argument = -0.25        -> log(1 + e^0.25)  = 0.8259394
    loss, metrics = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.5]), beta=0.5,
    )
    assert loss.item() == pytest.approx((0.4740770 + 0.8259394) / 2, abs=1e-6)
    assert metrics["dpo/reward_chosen"] == pytest.approx((0.25 + 0.0) / 2)
    assert metrics["dpo/reward_rejected"] == pytest.approx((-0.25 + 0.25) / 2)
    assert metrics["dpo/reward_margin"] == pytest.approx((0.5 - 0.25) / 2)
    assert metrics["dpo/reward_accuracy"] == pytest.approx(0.5)
    assert metrics["dpo/logp_chosen"] == pytest.approx(-1.5)
    assert metrics["dpo/logp_rejected"] == pytest.approx(-1.5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_loss_matches_python_loop(seed, beta):
    chosen, rejected, ref_chosen, ref_rejected = random_pairs(seed)
    expected = sum(
        softplus(beta * (float(w) - float(w0)) - beta * (float(l) - float(l0)))
        for w, l, w0, l0 in zip(chosen, rejected, ref_chosen, ref_rejected)
    ) / len(chosen)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    wins = sum(
        (float(w) - float(w0)) > (float(l) - float(l0))
        for w, l, w0, l0 in zip(chosen, rejected, ref_chosen, ref_rejected)
    )
    assert metrics["dpo/reward_accuracy"] == pytest.approx(wins / len(chosen))


@settings(max_examples=30, deadline=None)
@given(
    logps=st.lists(st.tuples(st.floats(-500, 0), st.floats(-500, 0)), min_size=1, max_size=8),
    beta=st.floats(0.01, 10),
)
def test_dpo_loss_is_log_2_when_policy_equals_reference(logps, beta):
    chosen = torch.tensor([w for w, _ in logps], dtype=torch.float64)
    rejected = torch.tensor([l for _, l in logps], dtype=torch.float64)
    loss, metrics = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert metrics["dpo/reward_margin"] == 0.0
    assert metrics["dpo/reward_accuracy"] == 0.0


def test_dpo_loss_with_a_flat_reference_is_the_naive_loss_scaled_by_beta():
    """With π0 giving both texts the same log-prob and β = 1, DPO reduces to the naive loss."""
    chosen, rejected, _, _ = random_pairs(4)
    same = torch.full_like(chosen, -3.0)
    loss, _ = dpo_loss(chosen, rejected, same, same, beta=1.0)
    assert loss.item() == pytest.approx(naive_preference_loss(chosen, rejected).item(), rel=1e-12)


def test_dpo_loss_gradcheck():
    chosen, rejected, ref_chosen, ref_rejected = random_pairs(1)
    assert torch.autograd.gradcheck(
        lambda c, r: dpo_loss(c, r, ref_chosen, ref_rejected, beta=0.3)[0],
        (chosen.requires_grad_(True), rejected.requires_grad_(True)),
    )


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_dpo_loss_is_finite_for_extreme_logits(gap):
    chosen = (torch.tensor([0.0, -2.0]) - max(0.0, -gap)).requires_grad_(True)
    rejected = (chosen.detach() - gap).requires_grad_(True)
    ref = torch.full((2,), -1.0)
    loss, metrics = dpo_loss(chosen, rejected, ref, ref, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


BAD_DPO = [
    ("beta", dict(beta=0.0)),
    ("beta", dict(beta=-0.1)),
    ("beta", dict(beta="0.1")),
    ("logp_rejected", dict(logp_rejected=torch.zeros(3))),
    ("logp_ref_chosen", dict(logp_ref_chosen=torch.zeros(1))),
    ("logp_ref_rejected", dict(logp_ref_rejected=torch.zeros(2, 1))),
    ("logp_chosen", dict(logp_chosen=torch.zeros(2, 5))),
    ("logp_ref_rejected", dict(logp_ref_rejected=torch.tensor([0.0, float("nan")]))),
    ("logp_ref_chosen", dict(logp_ref_chosen=torch.tensor([float("-inf"), 0.0]))),
    ("logp_chosen", dict(logp_chosen=torch.tensor([0, 0]))),
]


@pytest.mark.parametrize("name,override", BAD_DPO, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_DPO)])
def test_dpo_loss_rejects_bad_input(name, override):
    args = dict(
        logp_chosen=torch.zeros(2), logp_rejected=torch.zeros(2), logp_ref_chosen=torch.zeros(2),
        logp_ref_rejected=torch.zeros(2), beta=0.1,
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        dpo_loss(
            args.pop("logp_chosen"), args.pop("logp_rejected"), args.pop("logp_ref_chosen"),
            args.pop("logp_ref_rejected"), **args,
        )
