"""Tests for Eq. (8) ``kl_divergence`` and the per-token estimators ``kl_estimator_k1`` and ``kl_estimator_k3``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmt_edu.equations import INDEX
from rlmt_edu.losses.kl import kl_divergence, kl_estimator_k1, kl_estimator_k2, kl_estimator_k3

NAN, INF = float("nan"), float("inf")
LN2 = math.log(2.0)

logit_rows = st.lists(st.floats(-20, 20), min_size=2, max_size=6)


def assert_rejects(fn, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        fn(**kwargs)


# ---------------------------------------------------------------- kl_divergence (Eq. 8)


def test_kl_divergence_hand_value_and_asymmetry():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.25, 0.75], dtype=torch.float64)
    # D_KL(p‖q) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465) = 0.143841
    # D_KL(q‖p) = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.173287 + 0.304099 = 0.130812
    assert float(kl_divergence(p.log(), q.log(), inputs="logprobs")) == pytest.approx(0.143841, abs=1e-6)
    assert float(kl_divergence(q.log(), p.log(), inputs="logprobs")) == pytest.approx(0.130812, abs=1e-6)
    # logits: any shift of the log-probabilities gives the same distribution
    assert float(kl_divergence(p.log() + 3.0, q.log() - 7.0)) == pytest.approx(0.143841, abs=1e-6)


def test_kl_divergence_matches_loop_over_positions_and_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits_old = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)  # (B, T, V)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    got = kl_divergence(logits_old, logits)  # Eq. 8's D_KL(π0 ‖ π1), shape (B, T)
    assert got.shape == (3, 4)
    for b in range(3):
        for t in range(4):
            z0 = [math.exp(x) for x in logits_old[b, t].tolist()]
            z1 = [math.exp(x) for x in logits[b, t].tolist()]
            pi0 = [x / sum(z0) for x in z0]
            pi1 = [x / sum(z1) for x in z1]
            expected = sum(a * math.log(a / c) for a, c in zip(pi0, pi1))
            assert float(got[b, t]) == pytest.approx(expected, abs=1e-12)


def test_kl_divergence_gradcheck():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    q = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(kl_divergence, (p, q))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(logit_rows, st.data())
def test_kl_divergence_non_negative_and_zero_on_itself(p_row, data):
    q_row = data.draw(st.lists(st.floats(-20, 20), min_size=len(p_row), max_size=len(p_row)))
    p, q = torch.tensor(p_row, dtype=torch.float64), torch.tensor(q_row, dtype=torch.float64)
    assert float(kl_divergence(p, q)) >= -1e-12
    assert float(kl_divergence(q, p)) >= -1e-12
    assert float(kl_divergence(p, p)) == 0.0
    assert float(kl_divergence(p, p + 5.0)) == pytest.approx(0.0, abs=1e-12)  # same distribution


def test_kl_divergence_forward_differs_from_reverse_in_general():
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(50, 4, generator=g), 2 * torch.randn(50, 4, generator=g)
    gap = (kl_divergence(p, q) - kl_divergence(q, p)).abs()
    assert (gap > 1e-3).float().mean() > 0.9  # almost every random pair is asymmetric


def test_kl_divergence_stable_for_extreme_logits():
    p = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], requires_grad=True)
    q = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 1e4]], requires_grad=True)
    kl = kl_divergence(p, q)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    assert kl[0].item() == pytest.approx(2e4, rel=1e-6)  # p puts all mass where log q = -2e4


def test_kl_divergence_probabilities_at_1e_minus_12():
    p = torch.tensor([1e-12, 1 - 1e-12], dtype=torch.float64).log().requires_grad_()
    q = torch.tensor([0.5, 0.5], dtype=torch.float64).log().requires_grad_()
    forward = kl_divergence(p, q, inputs="logprobs")
    reverse = kl_divergence(q, p, inputs="logprobs")
    (forward + reverse).backward()
    assert forward.item() == pytest.approx(LN2, abs=1e-9)  # ≈ ln 2 - H(p)
    assert reverse.item() == pytest.approx(0.5 * math.log(0.5 / 1e-12) + 0.5 * math.log(0.5), rel=1e-9)
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


KL_BAD = [
    ("p_not_tensor", {"p": [0.0, 1.0]}, "p"),
    ("p_0d", {"p": torch.tensor(1.0), "q": torch.tensor(1.0)}, "p"),
    ("p_empty_vocab", {"p": torch.zeros(2, 0), "q": torch.zeros(2, 0)}, "p"),
    ("p_nan", {"p": torch.tensor([NAN, 0.0])}, "p"),
    ("p_minus_inf", {"p": torch.tensor([-INF, 0.0])}, "p"),
    ("q_inf", {"q": torch.tensor([INF, 0.0])}, "q"),
    ("q_shape", {"q": torch.zeros(3)}, "q"),
    ("p_logprobs_not_normalised", {"p": torch.tensor([-0.1, -0.1]), "inputs": "logprobs"}, "p"),
    ("q_logprobs_positive",
     {"p": torch.tensor([-LN2, -LN2]), "q": torch.tensor([0.5, -5.0]), "inputs": "logprobs"}, "q"),
    ("inputs_unknown", {"inputs": "probs"}, "inputs"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in KL_BAD], ids=[b[0] for b in KL_BAD])
def test_kl_divergence_rejects_bad_input(override, arg):
    assert_rejects(kl_divergence, {"p": torch.tensor([0.0, 1.0]), "q": torch.tensor([1.0, 0.0]), **override}, arg)


# ---------------------------------------------------------------- per-token estimators


def sampled_logps(seed, n=20000):
    """Tokens sampled from π, with their log-probabilities under π and π_ref, and the exact KL(π‖π_ref)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    logits_ref = torch.tensor([0.0, 0.5, 0.0, -0.5, 0.0], dtype=torch.float64)
    log_pi, log_ref = torch.log_softmax(logits, 0), torch.log_softmax(logits_ref, 0)
    tokens = torch.multinomial(log_pi.exp(), n, replacement=True, generator=g)
    exact = float(kl_divergence(logits, logits_ref))
    return log_pi[tokens], log_ref[tokens], exact


def test_kl_estimator_k1_hand_value():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    logp_ref = torch.tensor([-2.0, -1.0, -0.5])
    assert torch.equal(kl_estimator_k1(logp, logp_ref), torch.tensor([1.0, -1.0, 0.0]))  # can be negative


def test_kl_estimator_k1_matches_loop():
    logp, logp_ref, _ = sampled_logps(3, n=50)
    got = kl_estimator_k1(logp.reshape(5, 10), logp_ref.reshape(5, 10)).flatten()
    for n in range(50):
        assert float(got[n]) == pytest.approx(math.log(math.exp(float(logp[n])) / math.exp(float(logp_ref[n]))))


def test_kl_estimator_k1_unbiased_monte_carlo():
    logp, logp_ref, exact = sampled_logps(4)
    k1 = kl_estimator_k1(logp, logp_ref)
    assert (k1 < 0).any()  # single values go negative ...
    stderr = float(k1.std()) / math.sqrt(len(k1))
    assert abs(float(k1.mean()) - exact) < 4 * stderr  # ... the average is the KL


def test_kl_estimator_k1_gradcheck():
    logp, logp_ref, _ = sampled_logps(5, n=6)
    assert torch.autograd.gradcheck(lambda lp: kl_estimator_k1(lp, logp_ref), (logp.requires_grad_(),))


def test_kl_estimator_k3_hand_value():
    logp = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)
    logp_ref = torch.tensor([-1.0 + LN2, -1.0 - LN2, -1.0], dtype=torch.float64)
    # r = 2: (2 - 1) - ln 2 = 0.306853;  r = 1/2: (0.5 - 1) + ln 2 = 0.193147;  r = 1: 0
    expected = torch.tensor([1 - LN2, -0.5 + LN2, 0.0], dtype=torch.float64)
    assert torch.allclose(kl_estimator_k3(logp, logp_ref), expected, atol=1e-12)


def test_kl_estimator_k3_matches_loop():
    logp, logp_ref, _ = sampled_logps(6, n=40)
    got = kl_estimator_k3(logp.reshape(4, 10), logp_ref.reshape(4, 10)).flatten()
    for n in range(40):
        r = math.exp(float(logp_ref[n])) / math.exp(float(logp[n]))
        assert float(got[n]) == pytest.approx((r - 1) - math.log(r), abs=1e-12)


def test_kl_estimator_k3_unbiased_and_never_negative_monte_carlo():
    logp, logp_ref, exact = sampled_logps(7)
    k3 = kl_estimator_k3(logp, logp_ref)
    assert (k3 >= 0).all()
    stderr = float(k3.std()) / math.sqrt(len(k3))
    assert abs(float(k3.mean()) - exact) < 4 * stderr


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_kl_estimator_k3_never_negative(logp, logp_ref):
    for dtype in (torch.float32, torch.float64):
        value = kl_estimator_k3(torch.tensor([logp], dtype=dtype), torch.tensor([logp_ref], dtype=dtype))
        assert float(value) >= 0.0


def test_kl_estimator_k3_expm1_form_keeps_precision_where_naive_form_fails():
    """For small log-ratios the naive (exp(log r) - 1) - log r in float32 loses most digits and even goes
    negative; the expm1 form stays accurate. The reference is the same inputs in float64."""
    logp = torch.tensor([-0.01, -0.01, -0.01, -2e-8], dtype=torch.float32)
    logp_ref = logp + torch.tensor([3e-4, -3e-4, 1e-3, 1e-8])  # log r ≈ these, rounded to float32
    log_r = logp_ref - logp
    reference = torch.expm1(log_r.double()) - log_r.double()  # ≈ (log r)^2 / 2
    got = kl_estimator_k3(logp, logp_ref)
    naive = (torch.exp(log_r) - 1) - log_r
    assert (got >= 0).all()
    rel_err = ((got.double() - reference).abs() / reference)[:3]
    naive_rel_err = ((naive.double() - reference).abs() / reference)[:3]
    assert (rel_err < 1e-3).all()
    assert (naive_rel_err > 1e-2).all()
    assert float(naive[3]) < 0  # log r = 1e-8: exp(log r) rounds to 1, so the naive k3 is -1e-8


def test_kl_estimator_k3_gradcheck():
    logp, logp_ref, _ = sampled_logps(8, n=6)
    assert torch.autograd.gradcheck(lambda lp: kl_estimator_k3(lp, logp_ref), (logp.requires_grad_(),))


@pytest.mark.parametrize("fn", [kl_estimator_k1, kl_estimator_k2, kl_estimator_k3], ids=["k1", "k2", "k3"])
def test_kl_estimators_stable_for_log_ratios_of_80(fn):
    logp = torch.tensor([-80.0, 0.0, -1.0], requires_grad=True)
    logp_ref = torch.tensor([0.0, -80.0, -1.0], requires_grad=True)
    value = fn(logp, logp_ref)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logp.grad).all()
    assert logp_ref.grad is None  # the reference is a constant


ESTIMATOR_VALID = {"logp": torch.tensor([-1.0, -2.0]), "logp_ref": torch.tensor([-2.0, -1.0])}
ESTIMATOR_BAD = [
    ("logp_not_tensor", {"logp": [-1.0, -2.0]}, "logp"),
    ("logp_nan", {"logp": torch.tensor([NAN, -1.0])}, "logp"),
    ("logp_positive", {"logp": torch.tensor([0.3, -1.0])}, "logp"),
    ("logp_integer", {"logp": torch.tensor([-1, -2])}, "logp"),
    ("logp_ref_inf", {"logp_ref": torch.tensor([-INF, -1.0])}, "logp_ref"),
    ("logp_ref_positive", {"logp_ref": torch.tensor([-1.0, 2.0])}, "logp_ref"),
    ("logp_ref_shape", {"logp_ref": torch.tensor([-1.0, -1.0, -1.0])}, "logp_ref"),
]


@pytest.mark.parametrize("override,arg", [b[1:] for b in ESTIMATOR_BAD], ids=[b[0] for b in ESTIMATOR_BAD])
def test_kl_estimator_k1_rejects_bad_input(override, arg):
    assert_rejects(kl_estimator_k1, {**ESTIMATOR_VALID, **override}, arg)


@pytest.mark.parametrize("override,arg", [b[1:] for b in ESTIMATOR_BAD], ids=[b[0] for b in ESTIMATOR_BAD])
def test_kl_estimator_k3_rejects_bad_input(override, arg):
    assert_rejects(kl_estimator_k3, {**ESTIMATOR_VALID, **override}, arg)


@pytest.mark.parametrize("override,arg", [b[1:] for b in ESTIMATOR_BAD], ids=[b[0] for b in ESTIMATOR_BAD])
def test_kl_estimator_k2_rejects_bad_input(override, arg):
    assert_rejects(kl_estimator_k2, {**ESTIMATOR_VALID, **override}, arg)


# ---------------------------------------------------------------- k2, beyond the paper


def test_kl_estimator_k2_hand_value():
    # log r = log π_ref - log π: -1, +1, 0 -> ½(log r)² = 0.5, 0.5, 0
    logp = torch.tensor([-1.0, -2.0, -0.5])
    logp_ref = torch.tensor([-2.0, -1.0, -0.5])
    torch.testing.assert_close(kl_estimator_k2(logp, logp_ref), torch.tensor([0.5, 0.5, 0.0]))


def test_kl_estimator_k2_is_biased_but_its_loss_gradient_is_the_gradient_of_the_kl():
    """E_π[k2] != KL(π‖π_ref) here, but E_π[∇ k2] = ∇ KL(π‖π_ref) exactly (summed over the vocabulary)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
    logits_ref = torch.tensor([0.0, 0.5, 0.0, -0.5, 0.0], dtype=torch.float64)
    log_pi, log_ref = torch.log_softmax(logits, 0), torch.log_softmax(logits_ref, 0)
    pi = log_pi.exp().detach()
    exact = kl_divergence(logits, logits_ref)
    (grad_exact,) = torch.autograd.grad(exact, logits)
    k2 = kl_estimator_k2(log_pi, log_ref)  # (V,) the value of k2 if each token had been sampled
    assert abs(float((pi * k2).sum().detach()) - float(exact.detach())) > 1e-3  # biased
    # the expected gradient of k2 as a loss: Σ_a π(a) ∇ k2(a), the token fixed, π(a) not differentiated
    (grad_k2,) = torch.autograd.grad((pi * k2).sum(), logits)
    torch.testing.assert_close(grad_k2, grad_exact)


def test_kl_estimators_beyond_the_paper_are_labelled_so_in_the_index():
    labels = {eq.function.rsplit(".", 1)[1]: eq.label for eq in INDEX}
    assert labels["kl_estimator_k2"] == labels["kl_estimator_k3"] == "beyond the paper"
    assert "Beyond the paper" in kl_estimator_k2.__doc__ and "Beyond the paper" in kl_estimator_k3.__doc__
