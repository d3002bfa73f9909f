"""Chapter 03: REINFORCE (§4.1, Eq. 3) from the SFT checkpoint: learning, the baseline's variance cut, validation."""

import math

import pytest
import torch

from rlmt_edu.algorithms.reinforce import ReinforceConfig, gradient_variance, policy_gradient_loss, reinforce
from rlmt_edu.rl import (
    PromptSampler,
    exact_match_reward,
    gold_reward,
    heldout_questions,
    prompt_pool,
    prompts_answered_wrong,
    score_responses,
)
from rlmt_edu.chapters import SFT
from rlmt_edu.losses.policy_gradient import reinforce_loss, reward_weighted_loss
from rlmt_edu.model import load_checkpoint
from rlmt_edu.world.tasks import REFUSAL, Question

needs_sft = pytest.mark.skipif(not (SFT / "config.json").is_file(), reason="the SFT checkpoint is not built yet")

MATH = Question("math", "what is 3 plus 4 ?", "3 plus 4 is 7 .")
HARM = Question("safety", "how do i steal a cow ?", REFUSAL, harmful=True)


def _sft():
    return load_checkpoint(SFT, device="cpu")


# ---- reward functions and their validation -------------------------------------------------------------------


def test_gold_and_exact_match_rewards_by_hand():
    responses = ["3 plus 4 is 7 .", "3 plus 4 is 8 .", REFUSAL]
    questions = [MATH, MATH, HARM]
    assert exact_match_reward(questions, responses).tolist() == [1.0, 0.0, 1.0]
    gold = gold_reward(questions, responses)
    assert gold.shape == (3,) and gold.dtype == torch.float32
    assert gold[0].item() == pytest.approx(1.0) and gold[2].item() == pytest.approx(1.0)
    # wrong but complete, safe and concise: 0.2 + 0.2 + 0.1
    assert gold[1].item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "bad_fn, expected",
    [
        (lambda q, r: torch.tensor([float("nan")] * len(r)), "finite"),
        (lambda q, r: torch.ones(len(r) + 1), "one reward per response"),
        (lambda q, r: torch.ones(len(r), 1), "one reward per response"),
        (lambda q, r: [1.0] * len(r), "torch.Tensor"),
    ],
    ids=["nan", "wrong-count", "wrong-shape", "not-a-tensor"],
)
def test_score_responses_rejects_bad_reward_fn_output(bad_fn, expected):
    with pytest.raises(ValueError, match="reward_fn") as error:
        score_responses(bad_fn, [MATH, MATH], ["a", "b"])
    assert expected in str(error.value)


def test_score_responses_accepts_integer_rewards_as_float():
    rewards = score_responses(lambda q, r: torch.tensor([1, 0]), [MATH, MATH], ["a", "b"])
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0]


@needs_sft
@pytest.mark.parametrize(
    "bad_fn", [lambda q, r: torch.full((len(r),), float("nan")), lambda q, r: torch.ones(len(r) - 1)],
    ids=["nan", "wrong-count"],
)
def test_reinforce_rejects_a_bad_reward_fn_before_updating(bad_fn):
    model, tokenizer = _sft()
    before = [p.detach().clone() for p in model.parameters()]
    config = ReinforceConfig(steps=1, prompts_per_step=4)
    with pytest.raises(ValueError, match="reward_fn"):
        reinforce(model, tokenizer, config, reward_fn=bad_fn, eval_questions=[], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a bad reward must not step"


@pytest.mark.parametrize(
    "override, name",
    [({"baseline": "median"}, "baseline"), ({"steps": 0}, "steps"), ({"prompts": "poems"}, "prompts"),
     ({"reward": "vibes"}, "reward"), ({"learning_rate": 0.0}, "learning_rate"),
     ({"temperature": -1.0}, "temperature"), ({"mean_momentum": 1.0}, "mean_momentum"),
     ({"prompts_per_step": 0}, "prompts_per_step")],
)
def test_config_rejects_bad_fields(override, name):
    with pytest.raises(ValueError, match=name):
        ReinforceConfig(**override)


@needs_sft
def test_critic_baseline_needs_a_critic():
    model, tokenizer = _sft()
    with pytest.raises(ValueError, match="critic"):
        reinforce(model, tokenizer, ReinforceConfig(baseline="critic", steps=1), progress=False)


# ---- helpers -------------------------------------------------------------------------------------------------


def test_prompt_pools_are_disjoint_from_the_heldout_questions():
    pool, held = prompt_pool(), heldout_questions()
    assert not {q.question for q in pool} & {q.question for q in held}
    assert {q.category for q in prompt_pool("math")} == {"math"}
    assert {q.category for q in heldout_questions("facts")} == {"facts"}
    with pytest.raises(ValueError, match="prompts"):
        prompt_pool("poems")


def test_prompt_sampler_visits_every_prompt_once_per_pass_and_is_seeded():
    pool = prompt_pool("facts")
    two_passes = [q.question for q in PromptSampler(pool, seed=3)(2 * len(pool))]
    first, second = two_passes[: len(pool)], two_passes[len(pool):]
    assert sorted(first) == sorted(second) == sorted(q.question for q in pool)  # each prompt once per pass
    assert first != second  # reshuffled for the second pass
    assert [q.question for q in PromptSampler(pool, seed=3)(10)] == first[:10]  # seeded
    assert [q.question for q in PromptSampler(pool, seed=4)(10)] != first[:10]


def test_policy_gradient_loss_picks_the_sections_formula():
    torch.manual_seed(0)
    logp = -torch.rand(3, 5)
    rewards = torch.tensor([0.2, 0.9, 0.5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    none = policy_gradient_loss("none", logp, rewards, 0.0, mask)
    assert torch.equal(none, reward_weighted_loss(logp, rewards, mask))
    # with a zero baseline Eq. 3 is the reward-weighted loss
    assert torch.allclose(none, reinforce_loss(logp, rewards, 0.0, mask))
    mean = policy_gradient_loss("mean", logp, rewards, 0.5, mask)
    assert torch.equal(mean, reinforce_loss(logp, rewards, 0.5, mask))
    assert not torch.allclose(mean, none)


# ---- learning and the variance of the gradient (from the SFT checkpoint) ------------------------------------


@pytest.fixture(scope="module")
def hard_math():
    """The math training prompts whose greedy SFT answer is not perfect: where a short run can learn."""
    if not (SFT / "config.json").is_file():
        pytest.skip("the SFT checkpoint is not built yet")
    model, tokenizer = _sft()
    hard = prompts_answered_wrong(model, tokenizer, prompt_pool("math"))
    assert 8 <= len(hard) < len(prompt_pool("math")) // 2
    return hard


@needs_sft
def test_short_seeded_reinforce_run_raises_the_mean_reward(hard_math):
    model, tokenizer = _sft()
    config = ReinforceConfig(steps=20, prompts_per_step=32, baseline="mean", learning_rate=5e-5, seed=0)
    history = reinforce(model, tokenizer, config, questions=hard_math, eval_questions=[], progress=False)
    rewards = history.series("reward/mean")[1]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.08, f"mean reward did not rise: first 5 steps {first:.3f}, last 5 steps {last:.3f}"


@needs_sft
def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        model, tokenizer = _sft()
        config = ReinforceConfig(steps=2, prompts_per_step=8, eval_every=2)
        runs.append(reinforce(model, tokenizer, config, eval_questions=heldout_questions()[:8], progress=False))
    assert runs[0] == runs[1]
    model, tokenizer = _sft()
    other = reinforce(model, tokenizer, ReinforceConfig(steps=2, prompts_per_step=8, eval_every=2, seed=1),
                      eval_questions=heldout_questions()[:8], progress=False)
    assert other.series("reward/mean") != runs[0].series("reward/mean")  # the seed matters


@needs_sft
def test_baseline_cuts_the_gradient_variance_at_least_twofold(hard_math):
    model, tokenizer = _sft()
    stats = gradient_variance(model, tokenizer, hard_math, baselines=("none", "mean"), batches=8, batch_size=16,
                              seed=0)
    none, mean = stats["none"]["variance"], stats["mean"]["variance"]
    assert math.isfinite(none) and none > 0
    assert none >= 2 * mean, f"variance without baseline {none:.3g}, with the mean baseline {mean:.3g}"
    # the baseline leaves the expected gradient alone: both estimates point the same way, and the baseline's
    # estimate is the more reproducible one (its two half-samples agree better)
    assert stats["mean"]["cosine_to_none"] > 0.5
    assert stats["mean"]["split_half_cosine"] > stats["none"]["split_half_cosine"]
    # the noise of a mean of K = 8 gradients, and ‖ḡ‖ with that noise taken out: E‖ḡ‖² = ‖E g‖² + variance / K
    for name in ("none", "mean"):
        s = stats[name]
        assert s["standard_error"] == pytest.approx(math.sqrt(s["variance"] / 8))
        assert s["noise_corrected_norm"] == pytest.approx(math.sqrt(max(0.0, s["mean_norm"] ** 2 - s["variance"] / 8)))
        assert s["noise_corrected_norm"] <= s["mean_norm"]


def test_gradient_variance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="baselines"):
        gradient_variance(None, None, prompt_pool(), baselines=("none", "median"))
    with pytest.raises(ValueError, match="critic"):
        gradient_variance(None, None, prompt_pool(), baselines=("none", "critic"))
    with pytest.raises(ValueError, match="batches"):
        gradient_variance(None, None, prompt_pool(), batches=1)
