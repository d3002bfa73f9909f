"""Chapter 04: the critic V(s_t) (§4.2), the advantage A = R - V (Eq. 4) and GAE(γ = λ = 1) on real rollouts."""

import pytest
import torch

from rlmt_edu.algorithms.critic import (
    CriticConfig,
    build_critic,
    critic_values,
    evaluate_critic,
    explained_variance,
    train_critic,
    value_loss,
)
from rlmt_edu.algorithms.reinforce import ReinforceConfig, reinforce
from rlmt_edu.rl import prompt_pool, prompts_answered_wrong, sample_responses
from rlmt_edu.chapters import SFT
from rlmt_edu.losses.advantage import advantage, gae
from rlmt_edu.model import load_checkpoint

needs_sft = pytest.mark.skipif(not (SFT / "config.json").is_file(), reason="the SFT checkpoint is not built yet")


@pytest.fixture(scope="module")
def policy():
    return load_checkpoint(SFT, device="cpu")


def _rollout(model, tokenizer, n=6, seed=0):
    questions = prompt_pool()[::50][:n]
    generator = torch.Generator().manual_seed(seed)
    return sample_responses(model, tokenizer, questions, temperature=1.0, max_new_tokens=16, generator=generator)


# ---- the regression loss and its measure ---------------------------------------------------------------------


def test_value_loss_is_the_mean_squared_error_over_response_tokens():
    values = torch.tensor([[0.5, 0.0, 9.0], [1.0, 2.0, 0.0]])
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # (0.5² + 1² + 1² + 2²) / 4 tokens; the 9.0 outside the mask is ignored
    assert value_loss(values, rewards, mask).item() == pytest.approx((0.25 + 1 + 1 + 4) / 4)


def test_value_loss_rejects_bad_inputs():
    values, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="rewards"):
        value_loss(values, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="values"):
        value_loss(torch.full((2, 3), float("nan")), torch.zeros(2), mask)
    with pytest.raises(ValueError, match="response_mask"):
        value_loss(values, torch.zeros(2), torch.zeros(2, 3))


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25])
    mask = torch.ones(4, 3)
    perfect = rewards[:, None].expand(4, 3).clone()
    assert explained_variance(perfect, rewards, mask) == pytest.approx(1.0)
    constant = torch.full((4, 3), rewards.mean().item())
    assert explained_variance(constant, rewards, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(torch.zeros(4, 3) + 5, rewards, mask) < 0


# ---- the critic on real rollouts -----------------------------------------------------------------------------


@needs_sft
def test_critic_values_read_the_state_before_each_token_and_ignore_padding(policy):
    model, tokenizer = policy
    critic = build_critic(SFT)
    questions = [prompt_pool("math")[0], prompt_pool("facts")[0], prompt_pool("safety")[0]]  # prompt lengths differ
    rollout, _ = sample_responses(model, tokenizer, questions, temperature=1.0, max_new_tokens=16,
                                  generator=torch.Generator().manual_seed(0))
    values = critic_values(critic, rollout)  # (B, N)
    assert values.shape == rollout.response_ids.shape
    assert torch.all(values[rollout.response_mask == 0] == 0)
    # each row alone, unpadded: V(s_t) is the head's output on the token just before response token t
    assert not bool(rollout.prompt_mask.all()), "the batch should mix prompt lengths (left padding)"
    for row in range(rollout.response_ids.shape[0]):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        response = rollout.response_ids[row][rollout.response_mask[row].bool()]
        ids = torch.cat([prompt, response])[None]
        with torch.no_grad():
            alone = critic(input_ids=ids).logits[0, :, 0]  # (L,)
        expected = alone[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        assert torch.allclose(values[row, : len(response)].detach(), expected, atol=1e-5), row


@needs_sft
def test_critic_loss_falls_and_explains_variance(policy):
    """On math prompts of mixed difficulty (half answered wrong greedily, half right) the fitted critic
    predicts held-out rewards better than their mean: explained variance > 0 (it starts far below)."""
    model, tokenizer = policy
    math_pool = prompt_pool("math")
    hard = prompts_answered_wrong(model, tokenizer, math_pool)
    hard_texts = {q.question for q in hard}
    easy = [q for q in math_pool if q.question not in hard_texts][: len(hard)]
    critic = build_critic(SFT)
    config = CriticConfig(steps=30, prompts_per_step=16, heldout_rollouts=64, eval_every=10, learning_rate=5e-4)
    history, (rollout, rewards) = train_critic(critic, model, tokenizer, hard + easy, config, progress=False)
    held = history.series("critic/heldout_loss")[1]
    assert held[-1] < 0.5 * held[0], f"held-out critic loss did not fall enough: {held}"
    explained = history.series("critic/explained_variance")[1]
    assert explained[0] < 0 and explained[-1] > 0.2, explained
    assert rewards.shape == (64,) and rollout.response_ids.shape[0] == 64


@needs_sft
def test_gae_with_gamma_lambda_one_equals_eq4_advantage_on_real_rollouts(policy):
    """§4.3: Eq. (4) is GAE with γ = λ = 1 when R(text) is received on the last response token."""
    model, tokenizer = policy
    critic = build_critic(SFT)
    rollout, texts = _rollout(model, tokenizer)
    rewards = torch.linspace(0.1, 0.9, len(texts))  # (B,)
    mask = rollout.response_mask
    with torch.no_grad():
        values = critic_values(critic, rollout).double()  # (B, N)
    last = mask.sum(dim=1) - 1  # (B,) index of each row's last response token
    token_rewards = torch.zeros_like(values)
    token_rewards[torch.arange(len(texts)), last] = rewards.double()
    via_gae = gae(token_rewards, values, mask, gamma=1.0, lam=1.0)
    via_eq4 = advantage(rewards.double(), values, mask)
    assert (via_gae - via_eq4).abs().max().item() < 1e-12
    # and with γ < 1 they differ: the equality is special to γ = λ = 1
    assert (gae(token_rewards, values, mask, gamma=0.9, lam=1.0) - via_eq4).abs().max().item() > 1e-3


@needs_sft
def test_reinforce_with_the_critic_as_baseline_refits_the_critic(policy):
    _, tokenizer = policy
    model, _ = load_checkpoint(SFT, device="cpu")
    critic = build_critic(SFT)
    before = [p.detach().clone() for p in critic.parameters()]
    config = ReinforceConfig(steps=3, prompts_per_step=8, baseline="critic")
    history = reinforce(model, tokenizer, config, critic=critic, eval_questions=[], progress=False)
    losses = history.series("critic/loss")[1]
    assert len(losses) == 3
    # the baseline was the critic's V, not the batch's mean reward (which the "mean" baseline uses at step 0)
    assert history[0]["baseline/mean"] != pytest.approx(history[0]["reward/mean"], abs=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.parameters())), "the critic was not updated"


@needs_sft
def test_evaluate_critic_logs_the_explained_variance_at_the_first_and_the_last_token(policy):
    model, tokenizer = policy
    critic = build_critic(SFT)
    questions = [prompt_pool(c)[i] for c in ("math", "facts", "safety") for i in (0, 1)]  # answers of mixed length
    rollout, _ = sample_responses(model, tokenizer, questions, temperature=1.0, max_new_tokens=16,
                                  generator=torch.Generator().manual_seed(0))
    rewards = torch.linspace(0.1, 0.9, rollout.response_ids.shape[0])  # (B,)
    metrics = evaluate_critic(critic, rollout, rewards)
    with torch.no_grad():
        values = critic_values(critic, rollout)  # (B, N)
    last = rollout.response_mask.sum(dim=1) - 1  # (B,) each row's last response token
    assert len(set(last.tolist())) > 1, "the rows should end at different tokens"
    at_last = values[torch.arange(len(last)), last][:, None]  # (B, 1)
    at_first = values[:, :1]  # (B, 1)
    ones = torch.ones_like(at_last)
    assert metrics["critic/explained_variance_last"] == pytest.approx(explained_variance(at_last, rewards, ones))
    assert metrics["critic/explained_variance_first"] == pytest.approx(explained_variance(at_first, rewards, ones))
