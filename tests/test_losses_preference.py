"""Tests for §3 ``preference_bce_loss``, §4.4 ``preference_probability``, Eq. (5) ``reward_function_loss`` and
Eq. (6) ``reward_model_loss``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.preference import (
    preference_bce_loss,
    preference_probability,
    reward_function_loss,
    reward_model_loss,
)

NAN, INF = float("nan"), float("inf")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def random_pairs(seed, n=7):
    g = torch.Generator().manual_seed(seed)
    prob_i = 0.02 + 0.96 * torch.rand(n, generator=g, dtype=torch.float64)
    hp = torch.randint(0, 2, (n,), generator=g)
    reward_i = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    reward_j = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    return prob_i, hp, reward_i, reward_j


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- preference_bce_loss (§3)


def test_preference_bce_loss_hand_value():
    prob_i = torch.tensor([0.8, 0.3])
    hp = torch.tensor([1, 0])
    # pair 1: text_i preferred, -log 0.8 = 0.22314; pair 2: text_j preferred, -log(1 - 0.3) = 0.35667
    assert float(preference_bce_loss(prob_i, hp)) == pytest.approx((0.223144 + 0.356675) / 2, abs=1e-6)


def test_preference_bce_loss_matches_loop():
    prob_i, hp, _, _ = random_pairs(0)
    terms = [
        -h * math.log(p) - (1 - h) * math.log(1 - p) for p, h in zip(prob_i.tolist(), hp.tolist())
    ]
    assert float(preference_bce_loss(prob_i, hp)) == pytest.approx(sum(terms) / len(terms), abs=1e-12)


def test_preference_bce_loss_logits_path_equals_probability_path():
    prob_i, hp, _, _ = random_pairs(1)
    logits = torch.log(prob_i) - torch.log1p(-prob_i)
    assert torch.allclose(preference_bce_loss(logits, hp, inputs="logits"), preference_bce_loss(prob_i, hp))
    assert torch.allclose(preference_bce_loss(logits, hp.bool(), inputs="logits"), preference_bce_loss(prob_i, hp))


def test_preference_bce_loss_is_minus_log_p_winner_when_hp_is_one():
    # §3: "Loss = -log P(text_w)"
    prob_i, _, _, _ = random_pairs(2)
    assert torch.allclose(preference_bce_loss(prob_i, torch.ones(7)), -torch.log(prob_i).mean())


def test_preference_bce_loss_gradcheck():
    prob_i, hp, _, _ = random_pairs(3, n=4)
    assert torch.autograd.gradcheck(lambda p: preference_bce_loss(p, hp), (prob_i.clone().requires_grad_(),))
    logits = torch.log(prob_i) - torch.log1p(-prob_i)
    assert torch.autograd.gradcheck(
        lambda z: preference_bce_loss(z, hp, inputs="logits"), (logits.requires_grad_(),)
    )


def test_preference_bce_loss_stable_at_extremes():
    hp = torch.tensor([1, 0, 1, 0])
    logits = torch.tensor([1e4, -1e4, -1e4, 1e4], requires_grad=True)
    loss = preference_bce_loss(logits, hp, inputs="logits")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(1e4 / 2)  # two pairs right (cost 0), two wrong by 1e4
    tiny = torch.tensor([1e-12, 1 - 1e-12], dtype=torch.float64, requires_grad=True)
    loss = preference_bce_loss(tiny, torch.tensor([1, 0]))
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(1e-12), rel=1e-6)  # both pairs: the preferred text got 1e-12
    assert torch.isfinite(tiny.grad).all()


def _valid_bce():
    return {"prob_i": torch.tensor([0.8, 0.3]), "hp": torch.tensor([1, 0])}


BCE_BAD = [
    ("prob_not_tensor", {"prob_i": [0.8, 0.3]}, "prob_i"),
    ("prob_2d", {"prob_i": torch.tensor([[0.8, 0.3]]), "hp": torch.tensor([[1, 0]])}, "prob_i"),
    ("prob_empty", {"prob_i": torch.zeros(0), "hp": torch.zeros(0)}, "prob_i"),
    ("prob_above_one", {"prob_i": torch.tensor([1.2, 0.3])}, "prob_i"),
    ("prob_negative", {"prob_i": torch.tensor([-0.1, 0.3])}, "prob_i"),
    ("prob_nan", {"prob_i": torch.tensor([NAN, 0.3])}, "prob_i"),
    ("logit_inf", {"prob_i": torch.tensor([INF, 0.3]), "inputs": "logits"}, "prob_i"),
    ("hp_two", {"hp": torch.tensor([2, 0])}, "hp"),
    ("hp_half", {"hp": torch.tensor([0.5, 0.0])}, "hp"),
    ("hp_minus_one", {"hp": torch.tensor([-1, 0])}, "hp"),
    ("hp_nan", {"hp": torch.tensor([NAN, 0.0])}, "hp"),
    ("hp_shape", {"hp": torch.tensor([1, 0, 1])}, "hp"),
    ("hp_not_tensor", {"hp": [1, 0]}, "hp"),
    ("inputs_unknown", {"inputs": "probabilities"}, "inputs"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in BCE_BAD], ids=[b[0] for b in BCE_BAD])
def test_preference_bce_loss_rejects_bad_input(override, arg):
    assert_rejects(preference_bce_loss, {**_valid_bce(), **override}, arg)


# ---------------------------------------------------------------- preference_probability (§4.4)


def test_preference_probability_hand_value():
    r_i, r_j = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 2.0 + math.log(3)])
    expected = torch.tensor([sigmoid(1.0), 0.5, 0.25])  # e^2 / (e^2 + 3 e^2) = 1/4
    assert torch.allclose(preference_probability(r_i, r_j), expected)
    assert torch.allclose(preference_probability(r_i, r_j, form="softmax"), expected)


def test_preference_probability_matches_loop():
    _, _, r_i, r_j = random_pairs(4)
    for form in ("sigmoid", "softmax"):
        got = preference_probability(r_i, r_j, form=form)
        for n in range(len(r_i)):
            a, b = float(r_i[n]), float(r_j[n])
            assert float(got[n]) == pytest.approx(math.exp(a) / (math.exp(a) + math.exp(b)), abs=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(-50, 50), min_size=1, max_size=6),
    st.lists(st.floats(-50, 50), min_size=6, max_size=6),
)
def test_preference_probability_sigmoid_equals_softmax_and_pairs_sum_to_one(ri, rj):
    r_i = torch.tensor(ri, dtype=torch.float64)
    r_j = torch.tensor(rj[: len(ri)], dtype=torch.float64)
    p_sig = preference_probability(r_i, r_j)
    assert torch.allclose(p_sig, preference_probability(r_i, r_j, form="softmax"), atol=1e-12)
    assert torch.allclose(p_sig + preference_probability(r_j, r_i), torch.ones_like(p_sig))


def test_preference_probability_uses_reward_difference_not_exp_difference():
    # The paper's text says "exp(R_i) - exp(R_j)"; its formula (and the softmax identity) needs R_i - R_j.
    r_i, r_j = torch.tensor([2.0]), torch.tensor([1.0])
    softmax_form = preference_probability(r_i, r_j, form="softmax")
    assert torch.allclose(preference_probability(r_i, r_j), softmax_form)
    assert not torch.allclose(torch.sigmoid(torch.exp(r_i) - torch.exp(r_j)), softmax_form, atol=1e-2)


def test_preference_probability_gradcheck():
    _, _, r_i, r_j = random_pairs(5, n=3)
    for form in ("sigmoid", "softmax"):
        assert torch.autograd.gradcheck(
            lambda a, b: preference_probability(a, b, form=form),
            (r_i.clone().requires_grad_(), r_j.clone().requires_grad_()),
        )


def test_preference_probability_stable_for_huge_rewards():
    r_i = torch.tensor([1e4, -1e4, 1e4], requires_grad=True)
    r_j = torch.tensor([-1e4, 1e4, 1e4])
    for form in ("sigmoid", "softmax"):
        p = preference_probability(r_i, r_j, form=form)
        assert torch.equal(p.detach(), torch.tensor([1.0, 0.0, 0.5]))
        (grad,) = torch.autograd.grad(p.sum(), r_i)
        assert torch.isfinite(grad).all()


PROB_BAD = [
    ("form_unknown", {"form": "tanh"}, "form"),
    ("reward_i_not_tensor", {"reward_i": [1.0, 2.0]}, "reward_i"),
    ("reward_i_nan", {"reward_i": torch.tensor([NAN, 1.0])}, "reward_i"),
    ("reward_j_inf", {"reward_j": torch.tensor([INF, 1.0])}, "reward_j"),
    ("reward_j_shape", {"reward_j": torch.tensor([1.0, 2.0, 3.0])}, "reward_j"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in PROB_BAD], ids=[b[0] for b in PROB_BAD])
def test_preference_probability_rejects_bad_input(override, arg):
    valid = {"reward_i": torch.tensor([1.0, 2.0]), "reward_j": torch.tensor([0.0, 3.0])}
    assert_rejects(preference_probability, {**valid, **override}, arg)


# ---------------------------------------------------------------- reward_function_loss (Eq. 5)


def test_reward_function_loss_hand_value():
    r_i, r_j, hp = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([1, 0])
    # pair 1: i preferred, R_i - R_j = 1: -log σ(1) = 0.313262
    # pair 2: j preferred, R_j - R_i = 1: -log σ(1) = 0.313262
    assert float(reward_function_loss(r_i, r_j, hp)) == pytest.approx(0.313262, abs=1e-6)


def test_reward_function_loss_matches_loop():
    _, hp, r_i, r_j = random_pairs(6)
    terms = []
    for a, b, h in zip(r_i.tolist(), r_j.tolist(), hp.tolist()):
        p_i = math.exp(a) / (math.exp(a) + math.exp(b))
        terms.append(-h * math.log(p_i) - (1 - h) * math.log(1 - p_i))
    assert float(reward_function_loss(r_i, r_j, hp)) == pytest.approx(sum(terms) / len(terms), abs=1e-12)


def test_reward_function_loss_is_bce_of_preference_probability():
    _, hp, r_i, r_j = random_pairs(7)
    expected = preference_bce_loss(preference_probability(r_i, r_j), hp)
    assert torch.allclose(reward_function_loss(r_i, r_j, hp), expected)
    assert torch.allclose(reward_function_loss(r_i, r_j, hp), preference_bce_loss(r_i - r_j, hp, inputs="logits"))


def test_reward_function_loss_symmetric_under_swapping_texts():
    _, hp, r_i, r_j = random_pairs(8)
    assert torch.allclose(reward_function_loss(r_i, r_j, hp), reward_function_loss(r_j, r_i, 1 - hp))


def test_reward_function_loss_with_hp_one_is_eq6():
    _, _, r_i, r_j = random_pairs(9)
    eq6, _ = reward_model_loss(r_i, r_j)
    assert torch.allclose(reward_function_loss(r_i, r_j, torch.ones(7)), eq6)


def test_reward_function_loss_gradcheck():
    _, hp, r_i, r_j = random_pairs(10, n=4)
    assert torch.autograd.gradcheck(
        lambda a, b: reward_function_loss(a, b, hp), (r_i.requires_grad_(), r_j.requires_grad_())
    )


def test_reward_function_loss_stable_for_huge_margins():
    r_i = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = reward_function_loss(r_i, torch.zeros(2), torch.tensor([1, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(1e4 / 2)
    assert torch.isfinite(r_i.grad).all()


RFL_BAD = [
    ("reward_i_2d", {"reward_i": torch.ones(2, 1)}, "reward_i"),
    ("reward_i_nan", {"reward_i": torch.tensor([NAN, 1.0])}, "reward_i"),
    ("reward_j_shape", {"reward_j": torch.ones(3)}, "reward_j"),
    ("reward_j_inf", {"reward_j": torch.tensor([1.0, -INF])}, "reward_j"),
    ("hp_two", {"hp": torch.tensor([2, 1])}, "hp"),
    ("hp_shape", {"hp": torch.tensor([1])}, "hp"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in RFL_BAD], ids=[b[0] for b in RFL_BAD])
def test_reward_function_loss_rejects_bad_input(override, arg):
    valid = {"reward_i": torch.tensor([1.0, 2.0]), "reward_j": torch.tensor([0.0, 3.0]), "hp": torch.tensor([1, 0])}
    assert_rejects(reward_function_loss, {**valid, **override}, arg)


# ---------------------------------------------------------------- reward_model_loss (Eq. 6)


def test_reward_model_loss_hand_value_and_metrics():
    loss, metrics = reward_model_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    # (-log σ(1) - log σ(0)) / 2 = (0.313262 + 0.693147) / 2
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    assert metrics["reward_model/accuracy"] == 0.5  # a tie counts as wrong
    assert metrics["reward_model/margin"] == 0.5
    assert metrics["reward_model/reward_chosen"] == 0.5
    assert metrics["reward_model/reward_rejected"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_reward_model_loss_matches_loop():
    _, _, r_w, r_l = random_pairs(11)
    terms = [-math.log(sigmoid(a - b)) for a, b in zip(r_w.tolist(), r_l.tolist())]
    correct = [a > b for a, b in zip(r_w.tolist(), r_l.tolist())]
    loss, metrics = reward_model_loss(r_w, r_l)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert metrics["reward_model/accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_reward_model_loss_gradcheck():
    _, _, r_w, r_l = random_pairs(12, n=4)
    assert torch.autograd.gradcheck(
        lambda a, b: reward_model_loss(a, b)[0], (r_w.requires_grad_(), r_l.requires_grad_())
    )


def test_reward_model_loss_stable_when_badly_wrong():
    r_w = torch.tensor([-1e4, 1e4], requires_grad=True)
    loss, _ = reward_model_loss(r_w, torch.zeros(2))
    loss.backward()
    assert loss.item() == pytest.approx(1e4 / 2)
    assert torch.allclose(r_w.grad, torch.tensor([-0.5, 0.0]))  # -σ(-margin)/N


RML_BAD = [
    ("chosen_not_tensor", {"reward_chosen": [1.0, 2.0]}, "reward_chosen"),
    ("chosen_2d", {"reward_chosen": torch.ones(2, 1)}, "reward_chosen"),
    ("chosen_empty", {"reward_chosen": torch.zeros(0), "reward_rejected": torch.zeros(0)}, "reward_chosen"),
    ("chosen_nan", {"reward_chosen": torch.tensor([NAN, 1.0])}, "reward_chosen"),
    ("rejected_inf", {"reward_rejected": torch.tensor([INF, 1.0])}, "reward_rejected"),
    ("rejected_shape", {"reward_rejected": torch.ones(3)}, "reward_rejected"),
    ("rejected_integer", {"reward_rejected": torch.tensor([0, 1])}, "reward_rejected"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in RML_BAD], ids=[b[0] for b in RML_BAD])
def test_reward_model_loss_rejects_bad_input(override, arg):
    valid = {"reward_chosen": torch.tensor([1.0, 2.0]), "reward_rejected": torch.tensor([0.0, 3.0])}
    assert_rejects(reward_model_loss, {**valid, **override}, arg)
