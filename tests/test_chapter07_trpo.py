"""Chapter 07: TRPO (§4.5, Eq. 9-10) solved as TRPO solves it: conjugate gradient on Fisher-vector products,
the natural-gradient step, the backtracking line search, rejected steps, the penalty form, validation."""

import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector

from rlmt_edu.algorithms import trpo as trpo_module
from rlmt_edu.algorithms.trpo import (
    PenaltyConfig,
    TRPOConfig,
    batch_advantages,
    conjugate_gradient,
    fisher_vector_product,
    mean_kl,
    plot_trpo,
    trpo,
    trpo_penalty,
    trpo_step,
)
from rlmt_edu.model import ModelConfig, build_model, load_checkpoint, position_ids_from_mask
from rlmt_edu.paths import SFT
from rlmt_edu.rl import (
    PromptSampler,
    drift_from_reference,
    gold_reward,
    heldout_questions,
    heldout_scores,
    heldout_scores_by_category,
    prompt_pool,
    prompts_answered_wrong,
    sample_responses,
)
from rlmt_edu.rollout import Rollout, policy_logits
from rlmt_edu.tokenizer import build_tokenizer

needs_sft = pytest.mark.skipif(not (SFT / "config.json").is_file(), reason="the SFT checkpoint is not built yet")

#: a short run's settings: few prompts, CPU-quick, no periodic evaluation
QUICK = dict(prompts_per_update=8, max_new_tokens=12, eval_every=1000)


# ---- (a) conjugate gradient ----------------------------------------------------------------------------------


def _spd(n: int = 20, seed: int = 0) -> torch.Tensor:
    """A symmetric positive-definite n × n matrix with eigenvalues spread over [0.5, 20]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(0.5, 20.0, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def test_cg_solves_a_known_spd_system_to_its_tolerance():
    matrix = _spd()
    g = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: matrix @ v, g, iterations=60, tolerance=1e-10)
    assert info.converged
    assert info.relative_residual <= 1e-10
    # the reported residual is the true one, ‖g - F x‖, not CG's running estimate
    assert info.residual == pytest.approx(float((g - matrix @ x).norm()), rel=1e-6, abs=1e-14)
    assert torch.allclose(x, torch.linalg.solve(matrix, g), rtol=1e-8, atol=1e-10)
    assert torch.allclose(info.fx, matrix @ x)
    assert 1 <= info.iterations <= 60


def test_cg_reports_non_convergence_when_given_too_few_iterations():
    matrix = _spd()
    g = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: matrix @ v, g, iterations=3, tolerance=1e-10)
    assert info.iterations == 3
    assert not info.converged
    assert info.relative_residual > 1e-10
    assert info.relative_residual == pytest.approx(float((g - matrix @ x).norm() / g.norm()))


def test_cg_of_a_zero_gradient_is_zero_and_converged():
    x, info = conjugate_gradient(lambda v: 2 * v, torch.zeros(5), iterations=4)
    assert torch.equal(x, torch.zeros(5)) and info.converged and info.iterations == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(g=torch.ones(2, 2)), "g"),
    (dict(g=torch.tensor([1.0, float("nan")])), "g"),
    (dict(iterations=0), "iterations"),
    (dict(tolerance=float("nan")), "tolerance"),
    (dict(tolerance=-1.0), "tolerance"),
    (dict(fvp=lambda v: v[:1]), "fvp"),
    (dict(fvp="not callable"), "fvp"),
])
def test_cg_rejects_bad_inputs(kwargs, field):
    arguments = dict(fvp=lambda v: v, g=torch.ones(2), iterations=5, tolerance=1e-6) | kwargs
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        conjugate_gradient(arguments.pop("fvp"), arguments.pop("g"), **arguments)


# ---- (b) the Fisher-vector product is the Hessian of the mean KL, and that Hessian is the Fisher -------------


def _tiny_model_and_rollout():
    """A 1-layer GPT-2 of width 4 over a 10-word vocabulary (a few hundred parameters), in float64, and a
    hand-made batch of two left-padded prompts with responses of 4 and 2 tokens."""
    tokenizer = build_tokenizer(["apple", "pear", "plum", "fig", "kiwi"])
    model = build_model(tokenizer, ModelConfig(n_layer=1, n_head=1, n_embd=4, n_positions=16), seed=3).double()
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.tensor([[0, 5, 6], [5, 7, 8]])  # (B, P), row 0 left-padded with <PAD> = 0
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_ids = torch.randint(3, vocab, (2, 4), generator=generator)  # (B, N)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(2, 4))
    return model, rollout


def _logits_of(model, rollout, theta):
    """The response positions' logits (B, N, V) with the parameters replaced by the flat vector ``theta``."""
    named = list(model.named_parameters())
    params, offset = {}, 0
    for name, p in named:
        params[name] = theta[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    input_ids, attention_mask = rollout.sequences()
    out = torch.func.functional_call(model, params, (), dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False))
    return out.logits[:, rollout.response_slice]  # (B, N, V)


def test_fisher_vector_product_is_the_hessian_of_the_mean_kl_and_that_is_the_fisher():
    model, rollout = _tiny_model_and_rollout()
    theta_old = parameters_to_vector(model.parameters()).detach().clone()  # (P,)
    mask = rollout.response_mask.bool()  # (B, N)
    logits_old = _logits_of(model, rollout, theta_old).detach()  # (B, N, V)

    def mean_kl_at(theta):  # KL̄(θ) = mean over response tokens of Σ_a π_old(a) log(π_old(a) / π_θ(a))
        log_old = torch.log_softmax(logits_old, -1)
        log_new = torch.log_softmax(_logits_of(model, rollout, theta), -1)
        return (log_old.exp() * (log_old - log_new)).sum(-1)[mask].mean()

    # the full P × P Hessian takes P double backward passes (half a minute); 24 random coordinates suffice
    coordinates = torch.randperm(theta_old.numel(), generator=torch.Generator().manual_seed(0))[:24]

    def mean_kl_of_some(sub):  # KL̄ as a function of those coordinates, the others held at θ_old
        return mean_kl_at(theta_old.index_put((coordinates,), sub))

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
        hessian = torch.autograd.functional.hessian(mean_kl_of_some, theta_old[coordinates].clone())  # (24, 24)
        # F = mean over tokens of Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ, from the Jacobian of the log-probs
        jacobian = torch.autograd.functional.jacobian(
            lambda theta: torch.log_softmax(_logits_of(model, rollout, theta), -1)[mask], theta_old,
            vectorize=True)  # (n, V, P)
    probs = torch.softmax(logits_old[mask], -1)  # (n, V)
    fisher = torch.einsum("na,nap,naq->pq", probs, jacobian, jacobian) / mask.sum()  # (P, P)
    block = fisher[coordinates][:, coordinates]  # (24, 24)
    assert hessian.abs().max() > 0
    assert torch.allclose(hessian, block, atol=1e-9 * float(fisher.abs().max()), rtol=1e-6), \
        "the Hessian of the mean KL at θ_old is the Fisher information"

    damping = 0.1
    fvp = fisher_vector_product(model, rollout, logits_old, damping=damping)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(theta_old.shape, generator=generator, dtype=torch.float64)  # (P,)
        expected = fisher @ v + damping * v
        # the library's logits are float32 (policy_logits), so agreement is to float32 precision
        assert torch.allclose(fvp(v), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)
    # and on the 24 coordinates, against the Hessian itself: (F + λI) v for a v that lives on them
    v = torch.zeros_like(theta_old).index_put((coordinates,), torch.randn(24, generator=generator, dtype=torch.float64))
    expected = hessian @ v[coordinates] + damping * v[coordinates]
    assert torch.allclose(fvp(v)[coordinates], expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)


def test_the_mean_kl_and_its_gradient_vanish_at_the_old_parameters():
    model, rollout = _tiny_model_and_rollout()
    logits_old = policy_logits(model, rollout).detach()
    assert mean_kl(model, model, rollout) == pytest.approx(0.0, abs=1e-7)
    fvp = fisher_vector_product(model, rollout, logits_old, damping=0.0)
    zero = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    assert torch.equal(fvp(zero), zero)


# ---- (c)-(e) TRPO steps on the committed SFT model -------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_and_batch():
    """The SFT model, the math prompts it answers wrong, and one sampled batch of 8 of them with its advantages."""
    model, tokenizer = load_checkpoint(SFT, device="cpu")
    wrong = prompts_answered_wrong(model, tokenizer, prompt_pool("math"))
    batch = PromptSampler(wrong, seed=0)(8)
    rollout, responses = sample_responses(model, tokenizer, batch, temperature=1.0, max_new_tokens=12,
                                          generator=torch.Generator().manual_seed(0))
    rewards = gold_reward(batch, responses)  # (B,)
    assert rewards.std() > 0, "the test batch needs a spread of rewards"
    return model, tokenizer, wrong, rollout, batch_advantages(rewards, rollout.response_mask)


@needs_sft
def test_an_accepted_step_stays_inside_the_trust_region_measured_independently(sft_and_batch):
    start, _, _, rollout, advantages = sft_and_batch
    model, old = copy.deepcopy(start), copy.deepcopy(start)
    config = TRPOConfig()
    row = trpo_step(model, rollout, advantages, config)
    assert row["step/outcome"] == "accepted" and row["step/accepted"] == 1 and row["cg/converged"] == 1
    kl = mean_kl(old, model, rollout)  # Eq. 10's relaxed KL, measured again between two separate models
    assert 0 < kl <= config.delta
    assert kl == pytest.approx(row["kl/mean"], rel=1e-4, abs=1e-7)
    assert row["surrogate/after"] > row["surrogate/before"]
    moved = (parameters_to_vector(model.parameters()) - parameters_to_vector(old.parameters())).detach()
    assert float(moved.norm()) == pytest.approx(row["step/size"], rel=1e-4)
    assert row["step/fraction"] == config.backtrack_ratio ** row["step/backtracks"]
    # kl/max is the largest single response token's KL, measured again: at least the mean, here above δ's share
    per_token = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=policy_logits(old, rollout)),
        torch.distributions.Categorical(logits=policy_logits(model, rollout)))  # (B, N), an independent Eq. 8
    largest = float(per_token[rollout.response_mask.bool()].max().detach())
    assert row["kl/max"] == pytest.approx(largest, rel=1e-3, abs=1e-7)
    assert row["kl/max"] >= row["kl/mean"]


@needs_sft
def test_every_accepted_step_of_a_short_run_has_mean_kl_at_most_delta(sft_and_batch):
    start, tokenizer, wrong, _, _ = sft_and_batch
    model = copy.deepcopy(start)
    config = TRPOConfig(updates=3, **QUICK)
    history = trpo(model, tokenizer, config, questions=wrong, eval_questions=[], progress=False)
    rows = [row for row in history if row["step"] >= 0]
    assert len(rows) == 3
    accepted = [row for row in rows if row["step/accepted"] == 1]
    assert accepted, "no step was accepted: the check below would be empty"
    for row in accepted:
        assert 0 <= row["kl/mean"] <= config.delta
        assert row["surrogate/after"] > row["surrogate/before"]
    for row in rows:
        assert row["kl/delta"] == config.delta and row["cg/iterations"] <= config.cg_iterations
    assert rows[-1]["step/skipped"] == sum(1 - row["step/accepted"] for row in rows)


@needs_sft
def test_a_step_whose_line_search_finds_nothing_is_skipped_and_counted(sft_and_batch, monkeypatch):
    start, tokenizer, wrong, rollout, advantages = sft_and_batch
    # force it: no try is ever inside the trust region (δ = 1e-12 would too, but whether a step of ~1e-6
    # passes then depends on float32 rounding of the KL, not on the line search)
    monkeypatch.setattr(trpo_module, "trpo_constraint_satisfied", lambda kl, mask, *, delta: False)
    model = copy.deepcopy(start)
    before = parameters_to_vector(model.parameters()).clone()
    config = TRPOConfig(max_backtracks=3)
    row = trpo_step(model, rollout, advantages, config)
    assert row["step/outcome"] == "line_search_failed" and row["step/accepted"] == 0
    assert row["step/backtracks"] == 4  # k = 0, 1, 2, 3 all tried
    assert torch.equal(parameters_to_vector(model.parameters()), before), "θ must be restored exactly"
    assert row["kl/mean"] == 0.0 and row["surrogate/after"] == row["surrogate/before"]
    assert row["kl/full_step"] > 0  # the first try was measured, then undone

    history = trpo(model, tokenizer, TRPOConfig(updates=2, max_backtracks=1, **QUICK), questions=wrong,
                   eval_questions=[], progress=False)
    assert [row["step/skipped"] for row in history] == [1, 2]
    assert torch.equal(parameters_to_vector(model.parameters()), before)


@needs_sft
def test_a_cg_that_does_not_converge_is_reported_and_its_step_rejected(sft_and_batch):
    start, tokenizer, wrong, rollout, advantages = sft_and_batch
    model = copy.deepcopy(start)
    before = parameters_to_vector(model.parameters()).clone()
    row = trpo_step(model, rollout, advantages, TRPOConfig(cg_iterations=1, cg_tolerance=1e-12))
    assert row["cg/converged"] == 0 and row["cg/iterations"] == 1 and row["cg/residual"] > 1e-12
    assert row["step/outcome"] == "cg_not_converged" and row["step/accepted"] == 0
    assert math.isnan(row["kl/full_step"])  # never tried
    assert torch.equal(parameters_to_vector(model.parameters()), before)


@needs_sft
def test_a_batch_of_equal_rewards_gives_no_direction_and_no_step(sft_and_batch):
    start, _, _, rollout, _ = sft_and_batch
    model = copy.deepcopy(start)
    before = parameters_to_vector(model.parameters()).clone()
    zero = batch_advantages(torch.ones(rollout.response_ids.shape[0]), rollout.response_mask)
    row = trpo_step(model, rollout, zero, TRPOConfig())
    assert row["step/outcome"] == "no_direction" and row["grad/norm"] == 0.0
    assert torch.equal(parameters_to_vector(model.parameters()), before)


def test_batch_advantages_are_reward_minus_batch_mean_on_response_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = batch_advantages(torch.tensor([1.0, 0.0]), mask)
    assert advantages.tolist() == [[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]]


# ---- Eq. 9, the penalty form --------------------------------------------------------------------------------


@needs_sft
def test_the_penalty_form_logs_its_kl_and_a_larger_beta_keeps_it_smaller(sft_and_batch):
    start, tokenizer, wrong, _, _ = sft_and_batch
    kls = {}
    for beta in (0.0, 100.0):
        model = copy.deepcopy(start)
        config = PenaltyConfig(updates=1, beta=beta, learning_rate=3e-4, steps_per_batch=6, **QUICK)
        history = trpo_penalty(model, tokenizer, config, questions=wrong, eval_questions=[], progress=False)
        (row,) = history
        assert row["kl/beta"] == beta and row["kl/mean"] > 0 and row["kl/max"] >= row["kl/mean"]
        kls[beta] = row["kl/mean"]
    assert kls[100.0] < kls[0.0]


# ---- held-out scores per category, the plot -------------------------------------------------------------------


@needs_sft
def test_heldout_scores_by_category_agree_with_heldout_scores(sft_and_batch):
    model, tokenizer, _, _, _ = sft_and_batch
    questions = heldout_questions()
    scores = heldout_scores_by_category(model, tokenizer, questions)
    assert {k: scores[k] for k in ("eval/gold_score", "eval/accuracy")} == heldout_scores(model, tokenizer, questions)
    counts = {c: sum(q.category == c for q in questions) for c in ("math", "facts", "safety")}
    weighted = sum(scores[f"eval/gold_score/{c}"] * n for c, n in counts.items()) / len(questions)
    assert weighted == pytest.approx(scores["eval/gold_score"], rel=1e-5)


def test_plot_trpo_draws_six_panels_and_checks_its_arguments():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = {"kl/mean": 0.004, "kl/full_step": 0.02, "surrogate/before": 0.1, "surrogate/after": 0.2,
           "reward/mean": 0.5, "step/accepted": 1, "step/backtracks": 2}
    history = [{"step": -1, "eval/gold_score": 0.8}] + [{"step": i, **row} for i in range(3)]
    history[-1]["eval/gold_score"] = 0.85
    axes = plot_trpo(history, {0.1: history}, delta=0.01)
    assert len(axes) == 6 and axes[0].get_lines()[-1].get_ydata()[0] == 0.01  # the δ line
    with pytest.raises(ValueError, match="^axes"):
        plot_trpo(history, {}, delta=0.01, axes=plt.subplots(1, 2)[1])
    with pytest.raises(ValueError, match="^delta"):
        plot_trpo(history, {}, delta=0.0)
    plt.close("all")


# ---- (f) bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.0, -0.01, float("nan"), float("inf"), "0.01", True])
def test_a_bad_delta_is_refused(delta):
    with pytest.raises(ValueError, match="^delta: expected"):
        TRPOConfig(delta=delta)


@pytest.mark.parametrize("field, value", [
    ("damping", -0.1), ("damping", float("nan")), ("cg_iterations", 0), ("cg_tolerance", -1.0),
    ("backtrack_ratio", 1.0), ("backtrack_ratio", 0.0), ("max_backtracks", -1), ("updates", 0),
    ("prompts_per_update", 0), ("temperature", 0.0), ("max_new_tokens", 0), ("prompts", "poetry"),
    ("reward", "vibes"), ("eval_every", 0), ("seed", -1),
])
def test_trpo_config_names_a_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        TRPOConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("beta", -1.0), ("beta", float("inf")), ("learning_rate", 0.0), ("steps_per_batch", 0),
    ("max_grad_norm", 0.0), ("updates", 0),
])
def test_penalty_config_names_a_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        PenaltyConfig(**{field: value})


@needs_sft
def test_a_model_of_another_vocabulary_is_refused(sft_and_batch):
    model, tokenizer, _, rollout, advantages = sft_and_batch
    other_tokenizer = build_tokenizer(["apple", "pear", "plum"])
    other = build_model(other_tokenizer, ModelConfig(n_layer=1, n_head=1, n_embd=8, n_positions=64))
    with pytest.raises(ValueError, match="^old_model: expected the policy's vocabulary of 274 tokens"):
        mean_kl(other, model, rollout)
    other_logits = torch.zeros(*rollout.response_ids.shape, len(other_tokenizer))
    with pytest.raises(ValueError, match="^logits_old: expected the policy's vocabulary of 274 tokens"):
        fisher_vector_product(model, rollout, other_logits)
    with pytest.raises(ValueError, match="^tokenizer: expected the model's vocabulary of 274 tokens"):
        trpo(copy.deepcopy(model), other_tokenizer, TRPOConfig(updates=1), progress=False)
    with pytest.raises(ValueError, match="^tokenizer: expected"):
        trpo_penalty(copy.deepcopy(model), other_tokenizer, PenaltyConfig(updates=1), progress=False)


@needs_sft
def test_trpo_step_refuses_mismatched_inputs(sft_and_batch):
    model, _, _, rollout, advantages = sft_and_batch
    with pytest.raises(ValueError, match="^advantages: expected the rollout's shape"):
        trpo_step(copy.deepcopy(model), rollout, advantages[:, :-1])
    with pytest.raises(ValueError, match="^config: expected a TRPOConfig"):
        trpo_step(copy.deepcopy(model), rollout, advantages, PenaltyConfig())
    with pytest.raises(ValueError, match="^config: expected a PenaltyConfig"):
        trpo_penalty(copy.deepcopy(model), None, TRPOConfig())


# ---- drift from the SFT model (the chapter's section 5) ------------------------------------------------------


@needs_sft
def test_drift_from_reference_is_zero_for_the_reference_itself(sft_and_batch):
    model, tokenizer, _, _, _ = sft_and_batch
    questions = heldout_questions()[::8]
    drift = drift_from_reference(copy.deepcopy(model), model, tokenizer, questions)
    categories = {q.category for q in questions}
    assert set(drift) == {"drift/kl", "drift/kl_first"} | {
        f"drift/{k}/{c}" for k in ("kl", "kl_first") for c in categories}
    assert all(abs(v) < 1e-6 for v in drift.values())


@needs_sft
def test_drift_from_reference_is_the_mean_kl_on_the_references_greedy_answers(sft_and_batch):
    from rlmt_edu.rollout import sample
    from rlmt_edu.tokenizer import encode_prompt

    reference, tokenizer, _, _, _ = sft_and_batch
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.05 * torch.randn(model.transformer.wte.weight.shape,
                                                             generator=torch.Generator().manual_seed(0)))
    questions = [q for q in heldout_questions() if q.category == "safety"][:10]
    drift = drift_from_reference(model, reference, tokenizer, questions)
    rollout = sample(reference, [encode_prompt(tokenizer, q.question) for q in questions], max_new_tokens=24,
                     greedy=True, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    # the same number two other ways: mean_kl (the TRPO constraint's quantity) and the first column by hand
    assert drift["drift/kl"] == pytest.approx(mean_kl(reference, model, rollout), rel=1e-4)
    assert drift["drift/kl/safety"] == drift["drift/kl"]
    first = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=policy_logits(reference, rollout)[:, 0]),
        torch.distributions.Categorical(logits=policy_logits(model, rollout)[:, 0]))  # (B,)
    assert drift["drift/kl_first"] == pytest.approx(float(first.mean().detach()), rel=1e-4)
    assert drift["drift/kl"] > 0


@needs_sft
def test_drift_from_reference_refuses_bad_input(sft_and_batch):
    model, tokenizer, _, _, _ = sft_and_batch
    other = build_model(build_tokenizer(["apple", "pear"]), ModelConfig(n_layer=1, n_head=1, n_embd=4), seed=0)
    with pytest.raises(ValueError, match="reference: expected the policy's vocabulary"):
        drift_from_reference(model, other, tokenizer, heldout_questions()[:2])
    with pytest.raises(ValueError, match="questions: expected at least one question"):
        drift_from_reference(model, model, tokenizer, [])


# ---- plots.plot_seeds -----------------------------------------------------------------------------------------


def _history(values, steps=None):
    from rlmt_edu.utils import History

    history = History()
    for step, value in zip(steps or range(len(values)), values):
        history.append({"step": step, "reward/mean": value})
    return history


def test_plot_seeds_draws_the_mean_and_the_min_max_band_of_the_seeds():
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from rlmt_edu.plots import plot_seeds

    runs = {"a": [_history([0.0, 1.0, 2.0]), _history([2.0, 3.0, 8.0]), _history([1.0, 2.0, 5.0])],
            "b": [_history([5.0, 5.0, 5.0])]}
    ax = plot_seeds(runs, "reward/mean")
    mean_a, mean_b = ax.lines
    assert list(mean_a.get_ydata()) == [1.0, 2.0, 5.0] and list(mean_b.get_ydata()) == [5.0, 5.0, 5.0]
    assert mean_a.get_label() == "a (mean of 3)"
    band = ax.collections[0].get_paths()[0].vertices  # the polygon of fill_between(min, max)
    assert np.isclose(band[:, 1].min(), 0.0) and np.isclose(band[:, 1].max(), 8.0)
    matplotlib.pyplot.close("all")


def test_plot_seeds_refuses_what_it_cannot_compare():
    import matplotlib

    matplotlib.use("Agg")
    from rlmt_edu.plots import plot_seeds

    with pytest.raises(ValueError, match="runs: expected a non-empty dict"):
        plot_seeds({}, "reward/mean")
    with pytest.raises(ValueError, match="at least one History for 'a'"):
        plot_seeds({"a": []}, "reward/mean")
    with pytest.raises(ValueError, match="'loss' was never logged"):
        plot_seeds({"a": [_history([1.0])]}, "loss")
    with pytest.raises(ValueError, match="same steps"):
        plot_seeds({"a": [_history([1.0, 2.0]), _history([1.0, 2.0], steps=[0, 5])]}, "reward/mean")
    matplotlib.pyplot.close("all")
