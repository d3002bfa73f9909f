"""Tests for §8.2 ``entropy`` and §8.3 ``cross_entropy`` (and their identity with Eq. 8's KL)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.losses.information import cross_entropy, entropy
from rlmt_edu.losses.kl import kl_divergence

NAN, INF = float("nan"), float("inf")


def random_probs(seed, shape=(3, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


distributions = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8).filter(lambda xs: sum(xs) > 1e-3).map(
    lambda xs: torch.tensor(xs, dtype=torch.float64) / sum(xs)
)


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- entropy (§8.2)


def test_entropy_paper_numbers_constant_coin_die():
    # §8.2: a constant has entropy -log 1 = 0, a fair coin -log(1/2) = 0.69, a fair die -log(1/6) = 1.79
    assert float(entropy(torch.tensor([1.0, 0.0]))) == 0.0
    assert round(float(entropy(torch.tensor([0.5, 0.5]))), 2) == 0.69
    assert round(float(entropy(torch.full((6,), 1 / 6))), 2) == 1.79


def test_entropy_hand_value():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    # -(0.5 ln 0.5 + 2 · 0.25 ln 0.25) = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2
    assert float(entropy(p)) == pytest.approx(1.5 * math.log(2))


def test_entropy_matches_loop():
    p = random_probs(0)
    got = entropy(p)
    assert got.shape == (3, 4)
    for b in range(3):
        for t in range(4):
            expected = -sum(x * math.log(x) for x in p[b, t].tolist() if x > 0)
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-12)


def test_entropy_logits_path_equals_probability_path():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(entropy(logits, inputs="logits"), entropy(torch.softmax(logits, -1)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(distributions)
def test_entropy_between_zero_and_log_vocabulary(p):
    h = float(entropy(p))
    assert -1e-12 <= h <= math.log(len(p)) + 1e-9


def test_entropy_maximal_for_uniform():
    assert float(entropy(torch.full((32000,), 1 / 32000, dtype=torch.float64))) == pytest.approx(math.log(32000))


def test_entropy_gradcheck():
    p = random_probs(2, (2, 4)).requires_grad_()
    assert torch.autograd.gradcheck(entropy, (p,))
    logits = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: entropy(z, inputs="logits"), (logits,))


def test_entropy_stable_at_extremes():
    p = torch.tensor([1e-12, 1e-12, 1 - 2e-12], dtype=torch.float64, requires_grad=True)
    h = entropy(p)
    h.backward()
    assert torch.isfinite(h) and torch.isfinite(p.grad).all()
    logits = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    h = entropy(logits, inputs="logits")
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(logits.grad).all()
    assert h.item() == pytest.approx(0.0, abs=1e-6)


ENTROPY_BAD = [
    ("p_not_tensor", {"p": [0.5, 0.5]}, "p"),
    ("p_0d", {"p": torch.tensor(1.0)}, "p"),
    ("p_empty", {"p": torch.zeros(0)}, "p"),
    ("p_negative", {"p": torch.tensor([1.2, -0.2])}, "p"),
    ("p_sum_not_one", {"p": torch.tensor([0.5, 0.4])}, "p"),
    ("p_row_sum_not_one", {"p": torch.tensor([[0.5, 0.5], [0.7, 0.7]])}, "p"),
    ("p_nan", {"p": torch.tensor([NAN, 0.5])}, "p"),
    ("p_inf_logits", {"p": torch.tensor([INF, 0.5]), "inputs": "logits"}, "p"),
    ("inputs_unknown", {"inputs": "logprobs"}, "inputs"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in ENTROPY_BAD], ids=[b[0] for b in ENTROPY_BAD])
def test_entropy_rejects_bad_input(override, arg):
    assert_rejects(entropy, {"p": torch.tensor([0.5, 0.5]), **override}, arg)


# ---------------------------------------------------------------- cross_entropy (§8.3)


def test_cross_entropy_hand_value():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.25, 0.75], dtype=torch.float64)
    # -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.693147 + 0.143841 = 0.836988
    assert float(cross_entropy(p, q)) == pytest.approx(0.836988, abs=1e-6)


def test_cross_entropy_matches_loop():
    p, q = random_probs(3), random_probs(4)
    got = cross_entropy(p, q)
    for b in range(3):
        for t in range(4):
            expected = -sum(a * math.log(c) for a, c in zip(p[b, t].tolist(), q[b, t].tolist()))
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-12)


def test_cross_entropy_logits_path_equals_probability_path():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    expected = cross_entropy(torch.softmax(a, -1), torch.softmax(b, -1))
    assert torch.allclose(cross_entropy(a, b, inputs="logits"), expected)


def test_cross_entropy_of_one_hot_is_nll_of_observed_token():
    # §8.3: with p(x) = 1 at the observed token, cross entropy is the NLL of q there
    q = random_probs(6, (5,))
    one_hot = torch.zeros(5, dtype=torch.float64)
    one_hot[3] = 1.0
    assert float(cross_entropy(one_hot, q)) == pytest.approx(-math.log(float(q[3])))


def test_cross_entropy_zero_probabilities():
    p = torch.tensor([0.0, 1.0, 0.0], requires_grad=True)
    q = torch.tensor([0.0, 0.5, 0.5], requires_grad=True)
    ce = cross_entropy(p, q)
    ce.backward()
    assert ce.item() == pytest.approx(math.log(2))  # the 0·log 0 term counts 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
    assert q.grad.tolist() == [0.0, -2.0, 0.0]  # -p/q
    assert p.grad[1:].tolist() == pytest.approx([math.log(2), math.log(2)])  # -log q
    assert float(cross_entropy(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]))) == INF  # q rules out a real event


@settings(max_examples=40, deadline=None, derandomize=True)
@given(distributions, st.data())
def test_cross_entropy_at_least_entropy_and_gap_is_kl(p, data):
    q_raw = data.draw(st.lists(st.floats(1e-6, 1.0), min_size=len(p), max_size=len(p)))
    q = torch.tensor(q_raw, dtype=torch.float64) / sum(q_raw)
    ce, h = float(cross_entropy(p, q)), float(entropy(p))
    assert ce >= h - 1e-9
    # §8.4: D_KL(p‖q) = cross entropy - entropy (p may have zeros: compare via logits that reproduce p)
    p_logits = torch.where(p > 0, p.log(), torch.full_like(p, -1e4))
    assert float(kl_divergence(p_logits, q.log())) == pytest.approx(ce - h, abs=1e-9)


def test_cross_entropy_gradcheck():
    p, q = random_probs(7, (2, 4)).requires_grad_(), random_probs(8, (2, 4)).requires_grad_()
    assert torch.autograd.gradcheck(cross_entropy, (p, q))


def test_cross_entropy_stable_at_extremes():
    p = torch.tensor([1e-12, 1 - 1e-12], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([1 - 1e-12, 1e-12], dtype=torch.float64, requires_grad=True)
    ce = cross_entropy(p, q)
    ce.backward()
    assert torch.isfinite(ce) and torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert ce.item() == pytest.approx(-math.log(1e-12), rel=1e-6)
    a = torch.tensor([[1e4, -1e4]], requires_grad=True)
    b = torch.tensor([[-1e4, 1e4]], requires_grad=True)
    ce = cross_entropy(a, b, inputs="logits")
    ce.sum().backward()
    assert torch.isfinite(ce).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


CE_BAD = [
    ("p_negative", {"p": torch.tensor([1.5, -0.5])}, "p"),
    ("p_sum_not_one", {"p": torch.tensor([0.2, 0.2])}, "p"),
    ("p_nan", {"p": torch.tensor([NAN, 0.5])}, "p"),
    ("q_negative", {"q": torch.tensor([-0.25, 1.25])}, "q"),
    ("q_sum_not_one", {"q": torch.tensor([0.9, 0.9])}, "q"),
    ("q_inf", {"q": torch.tensor([INF, 0.0])}, "q"),
    ("q_shape", {"q": torch.tensor([0.2, 0.3, 0.5])}, "q"),
    ("q_0d", {"q": torch.tensor(1.0)}, "q"),
    ("inputs_unknown", {"inputs": "log"}, "inputs"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in CE_BAD], ids=[b[0] for b in CE_BAD])
def test_cross_entropy_rejects_bad_input(override, arg):
    assert_rejects(cross_entropy, {"p": torch.tensor([0.5, 0.5]), "q": torch.tensor([0.25, 0.75]), **override}, arg)
