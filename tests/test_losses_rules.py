"""The rules every function of ``rlmt_edu.losses`` keeps (see the package docstring), checked across all of them.

1. A loss detaches its constants: old and reference log-probs, rewards, baselines, advantages get no gradient,
   so forgetting ``.detach()`` never silently zeroes a gradient.
2. Log-probabilities are <= 0 everywhere, with one message.
3. Hyperparameters are one real number (Python, NumPy or a 0-dim tensor); +inf is refused where it would
   give inf or NaN.
4. No stray exceptions: an empty batch is a ``ValueError`` naming the argument; Lemma 8.1's variances do not
   depend on the confidence scale; ``token_logp`` keeps float64.
5. Every function of the equation index is importable from ``rlmt_edu.losses``.
"""

import math
import re

import numpy as np
import pytest
import torch

import rlmt_edu.losses as losses
from rlmt_edu.equations import INDEX
from rlmt_edu.losses import (
    average_variances,
    dpo_loss,
    grape_sequence_loss,
    group_relative_advantage,
    grpo_loss,
    importance_weighted_loss,
    kl_estimator_k1,
    kl_estimator_k2,
    kl_estimator_k3,
    kl_shaped_rewards,
    monte_carlo_average_variances,
    naive_preference_loss,
    ppo_clip_loss,
    reinforce_loss,
    reward_weighted_loss,
    token_logp,
    trpo_penalty_loss,
)

LOGPROB_MESSAGE = "expected log-probabilities (<= 0)"


def _logps(*shape, seed=0):
    """Seeded log-probabilities in [-3, -0.5] (float64) and a nearby second set, e.g. the old model's."""
    g = torch.Generator().manual_seed(seed)
    logp = -0.5 - 2.5 * torch.rand(*shape, generator=g, dtype=torch.float64)
    other = (logp + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(max=-0.01)
    return logp, other


def _signed(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- 1. constants take no gradient -------------------------------------------------------------------------

# name -> (builder of keyword inputs, the function of them returning a scalar loss, the constants' names)
B, T = 3, 4


def _token_case():
    logp, logp_old = _logps(B, T)
    return dict(logp=logp, logp_old=logp_old, advantages=_signed(B, T), response_mask=torch.ones(B, T))


def _grpo_case():
    logp, logp_old = _logps(2, 2, T)
    return dict(logp=logp, logp_old=logp_old, advantages=_signed(2, 2), response_mask=torch.ones(2, 2, T))


def _grape_case():
    logp, logp_old = _logps(B, T)
    return dict(logp=logp, logp_old=logp_old, advantages=_signed(B), response_mask=torch.ones(B, T))


def _trpo_case():
    case = _token_case()
    case["kl"] = torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return case


def _reinforce_case():
    logp, _ = _logps(B, T)
    return dict(logp=logp, rewards=_signed(B), values=_signed(B, T, seed=2), response_mask=torch.ones(B, T))


def _dpo_case():
    chosen, rejected = _logps(5)
    ref_chosen, ref_rejected = _logps(5, seed=3)
    return dict(logp_chosen=chosen, logp_rejected=rejected, logp_ref_chosen=ref_chosen,
                logp_ref_rejected=ref_rejected)


def _k_case():
    logp, logp_ref = _logps(B, T)
    return dict(logp=logp, logp_ref=logp_ref)


CONSTANT_CASES = {
    "ppo_clip_loss": (_token_case, lambda **k: ppo_clip_loss(**k)[0], ("logp_old", "advantages"), ("logp",)),
    "grpo_loss": (_grpo_case, lambda **k: grpo_loss(**k)[0], ("logp_old", "advantages"), ("logp",)),
    "grape_sequence_loss": (_grape_case, lambda **k: grape_sequence_loss(**k)[0], ("logp_old", "advantages"),
                            ("logp",)),
    "importance_weighted_loss": (_token_case, lambda **k: importance_weighted_loss(**k)[0],
                                 ("logp_old", "advantages"), ("logp",)),
    "trpo_penalty_loss": (_trpo_case, lambda **k: trpo_penalty_loss(**k, beta=0.5)[0], ("logp_old", "advantages"),
                          ("logp", "kl")),
    "reinforce_loss": (_reinforce_case, lambda **k: reinforce_loss(**k), ("rewards", "values"), ("logp",)),
    "reward_weighted_loss": (lambda: {k: v for k, v in _reinforce_case().items() if k != "values"},
                             lambda **k: reward_weighted_loss(**k), ("rewards",), ("logp",)),
    "dpo_loss": (_dpo_case, lambda **k: dpo_loss(**k, beta=0.5)[0], ("logp_ref_chosen", "logp_ref_rejected"),
                 ("logp_chosen", "logp_rejected")),
    "kl_estimator_k1": (_k_case, lambda **k: kl_estimator_k1(**k).sum(), ("logp_ref",), ("logp",)),
    "kl_estimator_k2": (_k_case, lambda **k: kl_estimator_k2(**k).sum(), ("logp_ref",), ("logp",)),
    "kl_estimator_k3": (_k_case, lambda **k: kl_estimator_k3(**k).sum(), ("logp_ref",), ("logp",)),
}


@pytest.mark.parametrize("name", sorted(CONSTANT_CASES))
def test_a_loss_sends_no_gradient_into_its_constants(name):
    build, loss_fn, constants, trained = CONSTANT_CASES[name]
    detached = build()
    for key in trained:
        detached[key].requires_grad_(True)
    loss_fn(**detached).backward()

    attached = build()
    for key in (*trained, *constants):
        attached[key].requires_grad_(True)
    loss_fn(**attached).backward()
    for key in constants:
        assert attached[key].grad is None, f"{name}: gradient reached the constant {key}"
    for key in trained:  # and the trained side's gradient is the one the detached call gives
        torch.testing.assert_close(attached[key].grad, detached[key].grad, rtol=0, atol=0)
        assert attached[key].grad.abs().max() > 0


@pytest.mark.parametrize("name", ["ppo_clip_loss", "grpo_loss", "grape_sequence_loss", "importance_weighted_loss",
                                  "trpo_penalty_loss"])
def test_the_on_policy_step_without_detach_gets_the_policy_gradient_not_zero(name):
    """logp_old = logp, the very same tensor: the ratio is 1 and the gradient is -A/S per response token."""
    build, loss_fn, _, _ = CONSTANT_CASES[name]
    case = build()
    logp = case["logp"].requires_grad_(True)
    case["logp_old"] = logp  # the mistake a student makes on the first step: no .detach()
    if name == "trpo_penalty_loss":
        case["kl"] = torch.zeros_like(logp)  # at π1 = π0 the exact KL is 0
    loss_fn(**case).backward()
    advantages = case["advantages"]
    samples = logp.shape[0] * (logp.shape[1] if name == "grpo_loss" else 1)  # S, or QG for Eq. 14
    if name == "grpo_loss":
        expected = -advantages[:, :, None].expand_as(logp) / samples
    elif name == "grape_sequence_loss":
        expected = -advantages[:, None].expand_as(logp) / samples  # sequence ratio 1, d ratio / d logp_it = 1
    else:
        expected = -advantages / samples
    torch.testing.assert_close(logp.grad, expected)


# ---- 2. log-probabilities are <= 0, one message -------------------------------------------------------------

LOGPROB_CASES = [
    ("ppo_clip_loss", _token_case, lambda **k: ppo_clip_loss(**k), ("logp", "logp_old")),
    ("grpo_loss", _grpo_case, lambda **k: grpo_loss(**k), ("logp", "logp_old")),
    ("grape_sequence_loss", _grape_case, lambda **k: grape_sequence_loss(**k), ("logp", "logp_old")),
    ("importance_weighted_loss", _token_case, lambda **k: importance_weighted_loss(**k), ("logp", "logp_old")),
    ("trpo_penalty_loss", _trpo_case, lambda **k: trpo_penalty_loss(**k, beta=0.1), ("logp", "logp_old")),
    ("reinforce_loss", _reinforce_case, lambda **k: reinforce_loss(**k), ("logp",)),
    ("kl_shaped_rewards", lambda: {**_k_case(), "rewards": _signed(B), "response_mask": torch.ones(B, T)},
     lambda **k: kl_shaped_rewards(**k, beta=0.1), ("logp", "logp_ref")),
    ("naive_preference_loss", lambda: {k: v for k, v in _dpo_case().items() if "ref" not in k},
     lambda **k: naive_preference_loss(**k), ("logp_chosen", "logp_rejected")),
    ("dpo_loss", _dpo_case, lambda **k: dpo_loss(**k), tuple(_dpo_case())),
    ("kl_estimator_k1", _k_case, lambda **k: kl_estimator_k1(**k), ("logp", "logp_ref")),
    ("kl_estimator_k2", _k_case, lambda **k: kl_estimator_k2(**k), ("logp", "logp_ref")),
    ("kl_estimator_k3", _k_case, lambda **k: kl_estimator_k3(**k), ("logp", "logp_ref")),
]


@pytest.mark.parametrize(
    "build, fn, argument",
    [pytest.param(build, fn, arg, id=f"{name}-{arg}") for name, build, fn, args in LOGPROB_CASES for arg in args],
)
def test_a_positive_log_probability_is_rejected_with_one_message(build, fn, argument):
    case = build()
    fn(**case)  # valid as built
    bad = case[argument].clone()
    bad.view(-1)[0] = 0.7  # a probability of e^0.7 ≈ 2
    case[argument] = bad
    with pytest.raises(ValueError, match=re.escape(f"{argument}: {LOGPROB_MESSAGE}, got a maximum of 0.7")):
        fn(**case)


# ---- 3. hyperparameters: numbers of any kind, and no +inf that breaks the loss -----------------------------

INF = math.inf


@pytest.mark.parametrize(
    "call, argument",
    [
        pytest.param(lambda v: dpo_loss(**_dpo_case(), beta=v), "beta", id="dpo_loss-beta"),
        pytest.param(lambda v: trpo_penalty_loss(**_trpo_case(), beta=v), "beta", id="trpo_penalty_loss-beta"),
        pytest.param(lambda v: kl_shaped_rewards(**_k_case(), rewards=_signed(B), response_mask=torch.ones(B, T),
                                                 beta=v), "beta", id="kl_shaped_rewards-beta"),
        pytest.param(lambda v: group_relative_advantage(_signed(2, 4), scale_by_std=True, eps=v), "eps",
                     id="group_relative_advantage-eps"),
    ],
)
@pytest.mark.parametrize("value", [INF, np.float64(INF), torch.tensor(INF)], ids=["float", "numpy", "tensor"])
def test_infinite_hyperparameters_that_would_give_inf_or_nan_are_rejected(call, argument, value):
    with pytest.raises(ValueError, match=f"{argument}: expected a finite number"):
        call(value)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda v: ppo_clip_loss(**_token_case(), epsilon=v)[0], id="ppo_clip_loss-epsilon"),
        pytest.param(lambda v: grpo_loss(**_grpo_case(), epsilon=v)[0], id="grpo_loss-epsilon"),
        pytest.param(lambda v: grape_sequence_loss(**_grape_case(), epsilon=v)[0], id="grape_sequence_loss-epsilon"),
        pytest.param(lambda v: dpo_loss(**_dpo_case(), beta=v)[0], id="dpo_loss-beta"),
        pytest.param(lambda v: trpo_penalty_loss(**_trpo_case(), beta=v)[0], id="trpo_penalty_loss-beta"),
        pytest.param(lambda v: kl_shaped_rewards(**_k_case(), rewards=_signed(B), response_mask=torch.ones(B, T),
                                                 beta=v), id="kl_shaped_rewards-beta"),
        pytest.param(lambda v: group_relative_advantage(_signed(2, 4), scale_by_std=True, eps=v),
                     id="group_relative_advantage-eps"),
        pytest.param(lambda v: losses.gae(_signed(B, T), _signed(B, T, seed=4), torch.ones(B, T), gamma=v,
                                          lam=v), id="gae-gamma-lam"),
        pytest.param(lambda v: losses.trpo_constraint_satisfied(torch.full((B, T), 0.1), torch.ones(B, T),
                                                                delta=v), id="trpo_constraint_satisfied-delta"),
    ],
)
@pytest.mark.parametrize("kind", ["numpy_float64", "numpy_float32", "tensor_0d", "tensor_0d_float64"])
def test_a_hyperparameter_given_as_a_numpy_scalar_or_a_0_dim_tensor_means_the_same_number(call, kind):
    value = 0.25  # exact in float32, so every kind holds the same number
    as_kind = {"numpy_float64": np.float64(value), "numpy_float32": np.float32(value),
               "tensor_0d": torch.tensor(value), "tensor_0d_float64": torch.tensor(value, dtype=torch.float64)}
    expected, got = call(value), call(as_kind[kind])
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        assert got == expected


@pytest.mark.parametrize("value", [torch.tensor([0.2]), torch.tensor([0.2, 0.3]), True, "0.2", None],
                         ids=["1d_tensor", "2_values", "bool", "string", "none"])
def test_a_hyperparameter_that_is_not_one_number_is_named_in_the_error(value):
    with pytest.raises(ValueError, match="epsilon: expected a single real number"):
        ppo_clip_loss(**_token_case(), epsilon=value)


def test_epsilon_inf_is_the_unclipped_surrogate_of_eq_7():
    case = _token_case()
    unclipped, metrics = ppo_clip_loss(**case, epsilon=INF)
    eq7, _ = importance_weighted_loss(**case)
    torch.testing.assert_close(unclipped, eq7)
    assert metrics["ppo/clip_fraction"] == 0.0


# ---- 4. no stray exceptions ---------------------------------------------------------------------------------

E2, M2 = torch.zeros(0, 5), torch.ones(0, 5)
EMPTY_BATCH_CASES = [
    ("ppo_clip_loss", lambda: ppo_clip_loss(E2, E2, E2, M2), "logp"),
    ("kl_shaped_rewards", lambda: kl_shaped_rewards(torch.zeros(0), E2, E2, M2, beta=0.1), "logp"),
    ("kl_shaped_advantage", lambda: losses.kl_shaped_advantage(E2, E2, M2), "shaped_rewards"),
    ("grpo_loss", lambda: grpo_loss(torch.zeros(0, 2, 5), torch.zeros(0, 2, 5), torch.zeros(0, 2),
                                    torch.ones(0, 2, 5)), "logp"),
    ("grape_reward", lambda: losses.grape_reward(E2, E2, E2, M2), "scores"),
    ("mean_rubric_confidence", lambda: losses.mean_rubric_confidence(E2, torch.zeros(0, dtype=torch.long), M2),
     "confidence"),
    ("grape_sequence_loss", lambda: grape_sequence_loss(E2, E2, torch.zeros(0), M2), "logp"),
    ("ppo_clip_loss_no_tokens", lambda: ppo_clip_loss(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0),
                                                      torch.ones(3, 0)), "logp"),
]


@pytest.mark.parametrize("call, argument", [pytest.param(c, a, id=n) for n, c, a in EMPTY_BATCH_CASES])
def test_an_empty_batch_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=f"^{argument}: expected at least one sample"):
        call()


@pytest.mark.parametrize("scale", [1e-30, 1e-19, 1e-3, 1e3, 1e19, 1e20, 1e30])
def test_lemma_8_1_variances_do_not_depend_on_the_confidence_scale(scale):
    sigma = torch.tensor([0.1, 0.3, 0.5])
    confidence = torch.tensor([0.9, 0.4, 0.2])
    plain, weighted = average_variances(sigma, confidence)
    plain_s, weighted_s = average_variances(sigma, confidence * scale)  # float32 throughout
    assert torch.isfinite(weighted_s) and weighted_s > 0
    torch.testing.assert_close(plain_s, plain)
    torch.testing.assert_close(weighted_s, weighted, rtol=1e-5, atol=0)
    mc = monte_carlo_average_variances(sigma, confidence * scale, n_draws=500,
                                       generator=torch.Generator().manual_seed(0))
    mc_unit = monte_carlo_average_variances(sigma, confidence, n_draws=500, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc[1], mc_unit[1], rtol=1e-5, atol=0)


def test_token_logp_keeps_float64_and_lifts_half_precision_to_float32():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(1))
    exact = token_logp(logits, tokens)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0],
                               rtol=0, atol=0)
    assert token_logp(logits.float(), tokens).dtype == torch.float32
    assert token_logp(logits.to(torch.bfloat16), tokens).dtype == torch.float32


# ---- 5. the import the README table suggests --------------------------------------------------------------


@pytest.mark.parametrize("equation", INDEX, ids=lambda e: f"{e.label}-{e.function.rsplit('.', 1)[1]}")
def test_every_indexed_function_is_importable_from_rlmt_edu_losses(equation):
    name = equation.function.rsplit(".", 1)[1]
    assert name in losses.__all__
    namespace: dict = {}
    exec(f"from rlmt_edu.losses import {name}", namespace)  # the line a reader writes
    assert namespace[name] is equation.resolve()


def test_all_lists_only_what_the_package_defines():
    assert len(set(losses.__all__)) == len(losses.__all__)
    for name in losses.__all__:
        assert callable(getattr(losses, name)), name
