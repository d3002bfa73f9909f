"""Chapter 09: GRPO (§4.8, Eq. 13-14): groups from the shared drawer, the on-policy step (loss ~0, gradient not),
the KL option, validation, and a short seeded run that learns the practice sums."""

import copy

import pytest
import torch

from rlmt_edu import rl
from rlmt_edu.algorithms.grpo import GRPOConfig, grpo, grpo_kl_term, grpo_step, zero_signal_share
from rlmt_edu.losses import kl_estimator_k3
from rlmt_edu.model import load_checkpoint
from rlmt_edu.paths import SFT

needs_sft = pytest.mark.skipif(not (SFT / "config.json").is_file(), reason="the SFT checkpoint is not built yet")


@pytest.fixture(scope="module")
def sft():
    model, tokenizer = load_checkpoint(SFT)
    return model.requires_grad_(False), tokenizer


def _drawer(model, tokenizer, reward_fn=rl.exact_match_reward, q=2, g=4, seed=0):
    return rl.BatchDrawer(model, tokenizer, rl.prompt_pool("math_practice"), reward_fn, seed=seed, batch_size=q,
                          group_size=g, temperature=1.0, max_new_tokens=16)


# ---- the prompt pools and the grouped drawer -----------------------------------------------------------------------


def test_math_practice_is_half_the_heldout_sums_and_its_heldout_set_the_other_half():
    practice, rest = rl.prompt_pool("math_practice"), rl.heldout_questions("math_practice")
    held = rl.heldout_questions("math")
    assert sorted(q.question for q in practice + rest) == sorted(q.question for q in held)
    assert not set(q.question for q in practice) & set(q.question for q in rest)
    assert len(practice) == len(held) // 2
    train = {q.question for q in rl.prompt_pool("train_pool")}
    assert not any(q.question in train for q in practice)  # never a training question


@needs_sft
def test_the_drawer_puts_a_questions_group_in_consecutive_rows(sft):
    model, tokenizer = sft
    questions, rollout, responses, rewards = _drawer(model, tokenizer, q=3, g=4)()
    assert len(questions) == len(responses) == 12 and rewards.shape == (12,)
    for q in range(3):
        assert len({x.question for x in questions[4 * q: 4 * q + 4]}) == 1
    assert len({questions[0].question, questions[4].question, questions[8].question}) == 3


def test_zero_signal_share_counts_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    assert zero_signal_share(rewards) == 0.75


# ---- one step ----------------------------------------------------------------------------------------------------


@needs_sft
def test_the_on_policy_loss_is_minus_sum_of_a_times_length_over_qg_and_its_gradient_is_not_zero(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # lr 0: the step leaves the weights alone
    config = GRPOConfig(questions_per_step=4, group_size=4)
    draw = _drawer(policy, tokenizer, rl.gold_reward, q=4, g=4)
    row = grpo_step(policy, optimizer, draw, config)
    assert row["grpo/ratio_min"] == row["grpo/ratio_max"] == 1.0 and row["grpo/clip_fraction"] == 0.0
    assert row["grad_norm"] > 0.1
    # the same batch again (same seed): the loss is -(1/QG) Σ A_qg T_qg
    _, rollout, _, rewards = _drawer(policy, tokenizer, rl.gold_reward, q=4, g=4)()
    advantages = rewards.view(4, 4) - rewards.view(4, 4).mean(1, keepdim=True)
    lengths = rollout.response_mask.view(4, 4, -1).sum(-1).float()
    assert row["loss/grpo"] == pytest.approx(-(advantages * lengths).sum().item() / 16, abs=1e-5)
    assert row["sampler/logp_gap"] < 1e-4  # the sampler's log-probs and the forward pass agree


@needs_sft
def test_several_updates_per_batch_move_the_ratio_off_one_and_the_clip_acts(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    config = GRPOConfig(questions_per_step=8, group_size=4, updates_per_batch=4)
    row = grpo_step(policy, optimizer, _drawer(policy, tokenizer, q=8, g=4), config)  # the practice sums: mixed R
    assert row["groups/zero_signal"] < 1.0
    assert row["grpo/ratio_max"] > 1.2 and row["grpo/clip_fraction"] > 0.0
    assert row["loss/grpo_last"] != row["loss/grpo"]


def test_the_kl_term_is_k3_normalised_like_eq14_and_ratio_corrected_on_request():
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 3, 4, generator=generator) - 0.1
    logp_old = logp - 0.2 * torch.rand(2, 3, 4, generator=generator)
    logp_ref = -torch.rand(2, 3, 4, generator=generator) - 0.1
    mask = torch.ones(2, 3, 4)
    mask[0, 1, 2:] = 0
    k3 = kl_estimator_k3(logp, logp_ref) * mask
    torch.testing.assert_close(grpo_kl_term(logp, logp_old, logp_ref, mask), k3.sum() / 6)
    torch.testing.assert_close(grpo_kl_term(logp, logp_old, logp_ref, mask, normalization="token_mean"),
                               k3.sum() / mask.sum())
    corrected = grpo_kl_term(logp, logp_old, logp_ref, mask, estimator="k3_ratio_corrected")
    torch.testing.assert_close(corrected, (k3 * torch.exp(logp - logp_old)).sum() / 6)
    # on-policy the two estimators agree
    torch.testing.assert_close(grpo_kl_term(logp, logp, logp_ref, mask, estimator="k3_ratio_corrected"),
                               grpo_kl_term(logp, logp, logp_ref, mask))


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("group_size", 1, r"group_size: expected an int >= 2 \(a group of one"),
    ("questions_per_step", 0, "questions_per_step: expected an int >= 1"),
    ("normalization", "mean", "normalization"),
    ("kl_estimator", "k2", "kl_estimator"),
    ("beta", -0.1, "beta"),
    ("prompts", "poems", "prompts"),
    ("scale_by_std", 1, "scale_by_std: expected True or False"),
])
def test_bad_configs_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{field: value})


@needs_sft
def test_a_drawer_that_does_not_match_q_and_g_is_refused(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"draw: expected a BatchDrawer of Q = 8 questions × G = 8"):
        grpo_step(policy, optimizer, _drawer(policy, tokenizer, q=2, g=4), GRPOConfig())


@needs_sft
@pytest.mark.parametrize("reward_fn, message", [
    (lambda qs, rs: torch.ones(len(rs) - 1), r"reward_fn: expected one reward per response, shape \(8,\)"),
    (lambda qs, rs: torch.full((len(rs),), float("nan")), "reward_fn: expected finite rewards, got 8 NaN"),
    (lambda qs, rs: [1.0] * len(rs), "reward_fn: expected it to return a torch.Tensor"),
])
def test_a_reward_function_of_the_wrong_count_or_not_finite_is_refused(sft, reward_fn, message):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=message):
        grpo_step(policy, optimizer, _drawer(policy, tokenizer, reward_fn), GRPOConfig(questions_per_step=2,
                                                                                         group_size=4))


@needs_sft
def test_a_reference_that_requires_grad_or_is_the_policy_is_refused(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    config = GRPOConfig(questions_per_step=2, group_size=4, beta=0.1)
    with pytest.raises(ValueError, match="reference: expected a frozen model"):
        grpo_step(policy, optimizer, _drawer(policy, tokenizer), config, reference=copy.deepcopy(policy))
    with pytest.raises(ValueError, match="reference: expected the frozen SFT model for the KL term"):
        grpo_step(policy, optimizer, _drawer(policy, tokenizer), config)
    with pytest.raises(ValueError, match="reference: expected a frozen copy of the start model"):
        grpo(policy, tokenizer, rl.exact_match_reward, config, reference=policy, progress=False)


# ---- learning ---------------------------------------------------------------------------------------------------


@needs_sft
@pytest.mark.slow
def test_a_short_seeded_run_learns_the_practice_sums(sft):
    model, tokenizer = sft
    policy = copy.deepcopy(model).requires_grad_(True)
    practice = rl.prompt_pool("math_practice")
    config = GRPOConfig(steps=12, eval_every=12)
    history = grpo(policy, tokenizer, rl.exact_match_reward, config, reference=model, eval_questions=practice,
                   progress=False)
    before, after = history[0]["eval/accuracy"], history[-1]["eval/accuracy"]
    assert before < 0.7 and after >= before + 0.15, (before, after)
    assert all(0.0 <= row["groups/zero_signal"] <= 1.0 for row in history if row["step"] >= 0)
