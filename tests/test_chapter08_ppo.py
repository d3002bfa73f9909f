"""Chapter 08: PPO with the KL term in the reward (§4.6-4.7, Eq. 11-12): the advantages on R', the two
normalisations, mini-batches of one batch, validation, and a short seeded run that learns."""

import copy
import math

import pytest
import torch

from rlmt_edu.algorithms.ppo import PPOConfig, ppo, ppo_advantages, ppo_loss
from rlmt_edu.algorithms.reward_model import load_reward_model, reward_model_reward
from rlmt_edu.losses import ppo_clip_loss
from rlmt_edu.model import ModelConfig, build_model, load_checkpoint
from rlmt_edu.paths import REWARD_MODEL, SFT
from rlmt_edu.rl import prompt_pool
from rlmt_edu.rollout import Rollout
from rlmt_edu.tokenizer import build_tokenizer

needs_models = pytest.mark.skipif(not (SFT / "config.json").is_file() or not (REWARD_MODEL / "config.json").is_file(),
                                  reason="the SFT and reward-model checkpoints are not built yet")


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    logp_old = -torch.rand(3, 4, generator=generator) * mask
    logp_ref = -torch.rand(3, 4, generator=generator) * mask
    values = torch.randn(3, 4, generator=generator) * mask
    rewards = torch.tensor([1.0, -0.5, 0.25])
    return rewards, logp_old, logp_ref, values, mask


# ---- Eq. 12 and the advantage on it ----------------------------------------------------------------------------


def test_eq4_advantage_is_r_minus_beta_log_ratio_minus_v_on_every_response_token():
    rewards, logp_old, logp_ref, values, mask = _batch()
    shaped, advantages = ppo_advantages(rewards, logp_old, logp_ref, values, mask, PPOConfig(beta=0.3))
    expected = (rewards[:, None] - 0.3 * (logp_old - logp_ref) - values) * mask
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(shaped, (rewards[:, None] - 0.3 * (logp_old - logp_ref)) * mask)


def test_gae_with_gamma_lambda_one_is_the_return_to_go_minus_v():
    rewards, logp_old, logp_ref, values, mask = _batch(1)
    config = PPOConfig(beta=0.5, advantage="gae", gamma=1.0, lam=1.0)
    _, advantages = ppo_advantages(rewards, logp_old, logp_ref, values, mask, config)
    penalty = -0.5 * (logp_old - logp_ref) * mask  # (B, N) every token's -β·log-ratio
    to_go = penalty.flip(1).cumsum(1).flip(1) + rewards[:, None]  # R on the last token, so it counts for all
    torch.testing.assert_close(advantages, (to_go - values) * mask)


def test_a_critic_of_the_wrong_shape_is_refused():
    rewards, logp_old, logp_ref, values, mask = _batch()
    with pytest.raises(ValueError, match=r"values: expected the critic's values in the response's shape \(3, 4\)"):
        ppo_advantages(rewards, logp_old, logp_ref, values[:, :3], mask, PPOConfig())


# ---- Eq. 11's normalisation ------------------------------------------------------------------------------------


def test_per_sample_is_eq11_and_token_mean_divides_by_the_tokens_instead():
    _, logp_old, _, advantages, mask = _batch(2)
    logp = (logp_old - 0.2 * torch.rand(3, 4, generator=torch.Generator().manual_seed(3))) * mask
    paper, _ = ppo_loss(logp, logp_old, advantages, mask, epsilon=0.2)
    torch.testing.assert_close(paper, ppo_clip_loss(logp, logp_old, advantages, mask, epsilon=0.2)[0])
    trl, _ = ppo_loss(logp, logp_old, advantages, mask, epsilon=0.2, normalization="token_mean")
    torch.testing.assert_close(trl, paper * 3 / mask.sum())  # × S / tokens: 8 tokens in 3 samples
    with pytest.raises(ValueError, match="normalization"):
        ppo_loss(logp, logp_old, advantages, mask, epsilon=0.2, normalization="sequence")


# ---- mini-batches of one batch ---------------------------------------------------------------------------------


def test_rollout_select_takes_rows_and_keeps_the_column_layout():
    rollout = Rollout(torch.tensor([[0, 5], [6, 7], [0, 8]]), torch.tensor([[0, 1], [1, 1], [0, 1]]),
                      torch.tensor([[9, 2], [9, 9], [2, 0]]), torch.tensor([[1, 1], [1, 1], [1, 0]]),
                      torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, 0.0]]))
    part = rollout.select(torch.tensor([2, 0]))
    assert part.response_ids.tolist() == [[2, 0], [9, 2]] and part.prompt_ids.tolist() == [[0, 8], [0, 5]]
    assert part.logp.tolist() == [[-5.0, 0.0], [-1.0, -2.0]] and part.response_slice == rollout.response_slice
    for rows in (torch.tensor([3]), torch.tensor([], dtype=torch.long), torch.tensor([0.0]), [0]):
        with pytest.raises(ValueError, match="rows: expected"):
            rollout.select(rows)


# ---- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs: expected an int >= 1"),
    ("minibatch_size", 64, "minibatch_size: expected at most the batch"),
    ("beta", -0.1, "beta"),
    ("beta", math.nan, "beta"),
    ("epsilon", 0.0, "epsilon"),
    ("advantage", "td", "advantage"),
    ("loss_normalization", "sequence", "loss_normalization"),
    ("lam", 1.5, "lam: expected a number in"),
    ("prompts", "poetry", "prompts"),
])
def test_ppo_config_names_a_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**{field: value})


def test_infinite_epsilon_is_allowed_it_means_no_clipping():
    assert PPOConfig(epsilon=math.inf).epsilon == math.inf


@pytest.fixture(scope="module")
def models():
    policy, tokenizer = load_checkpoint(SFT, device="cpu")
    reward_model, reward_tokenizer = load_reward_model(device="cpu")
    return policy, tokenizer, reward_model_reward(reward_model, reward_tokenizer)


@needs_models
def test_a_reward_model_or_a_critic_of_another_vocabulary_is_refused(models):
    policy, tokenizer, reward_fn = models
    other = build_model(build_tokenizer(["apple", "pear"]), ModelConfig(n_layer=1, n_head=1, n_embd=4), seed=0)
    quick = PPOConfig(iterations=1, prompts_per_iteration=2, minibatch_size=2, eval_every=1)

    def reward_of_other(questions, responses):
        return torch.zeros(len(responses))

    reward_of_other.model = other
    with pytest.raises(ValueError, match="reward_model: expected the policy's vocabulary of 274 tokens"):
        ppo(copy.deepcopy(policy), tokenizer, reward_of_other, quick, eval_questions=[], progress=False)
    with pytest.raises(ValueError, match="critic: expected the policy's vocabulary"):
        ppo(copy.deepcopy(policy), tokenizer, reward_fn, quick, critic=other, eval_questions=[], progress=False)
    with pytest.raises(ValueError, match="reward_fn: expected a callable"):
        ppo(copy.deepcopy(policy), tokenizer, "rm", quick, eval_questions=[], progress=False)


# ---- a short run -----------------------------------------------------------------------------------------------


@needs_models
def test_same_seed_same_run(models):
    policy, tokenizer, reward_fn = models
    config = PPOConfig(iterations=2, prompts_per_iteration=8, minibatch_size=4, epochs=2)
    runs = [ppo(copy.deepcopy(policy), tokenizer, reward_fn, config, questions=prompt_pool("math")[:40],
                eval_questions=[], progress=False) for _ in range(2)]
    rows = [[row for row in history if row["step"] >= 0] for history in runs]
    assert len(rows[0]) == 2
    assert [row["loss/ppo"] for row in rows[0]] == [row["loss/ppo"] for row in rows[1]]
    assert [row["reward/proxy"] for row in rows[0]] == [row["reward/proxy"] for row in rows[1]]


@needs_models
def test_a_short_seeded_run_raises_the_reward_it_optimises_and_keeps_the_kl_finite(models):
    """12 iterations on the 32 math prompts the SFT model answers wrong, with the gold score as the optimised
    reward: greedy gold on those prompts measured 0.50 -> 0.85 (~12 s on 2 cores)."""
    from rlmt_edu.rl import gold_reward, prompts_answered_wrong

    policy, tokenizer, _ = models
    wrong = prompts_answered_wrong(policy, tokenizer, prompt_pool("math"))
    config = PPOConfig(beta=0.0, learning_rate=3e-5, iterations=12, prompts_per_iteration=16, minibatch_size=8,
                       critic_warmup=4, eval_every=12)
    history = ppo(copy.deepcopy(policy), tokenizer, gold_reward, config, questions=wrong, eval_questions=wrong,
                  progress=False)
    before, after = history[0]["eval/gold_score"], history[-1]["eval/gold_score"]
    assert after > before + 0.15, (before, after)
    rows = [row for row in history if row["step"] >= 0]
    assert len(rows) == 12
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("kl/sft", "loss/ppo", "loss/value", "ppo/approx_kl"))
    assert 0 <= max(row["ppo/clip_fraction"] for row in rows) <= 1
    assert history[0]["value/explained_variance"] > 0  # the warm-up fitted the critic before the first step


def test_the_reference_must_not_be_the_policy_itself():
    tokenizer = build_tokenizer(["apple", "pear"])
    policy = build_model(tokenizer, ModelConfig(n_layer=1, n_head=1, n_embd=4), seed=0)
    with pytest.raises(ValueError, match="reference: expected a frozen copy"):
        ppo(policy, tokenizer, lambda q, r: torch.zeros(len(r)), PPOConfig(iterations=1), reference=policy,
            eval_questions=[], progress=False)


def test_plot_clip_region_shows_zero_gradient_where_the_clip_acts():
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from rlmt_edu.algorithms.ppo import plot_clip_region

    axes = plot_clip_region(0.2)
    positive, negative = axes[1].lines[0], axes[1].lines[1]  # the gradients d/dr for A = +1 and A = -1
    r, g_pos = positive.get_xdata(), positive.get_ydata()
    g_neg = negative.get_ydata()
    assert np.allclose(g_pos[r > 1.21], 0) and np.allclose(g_pos[r < 1.19], 1)  # A = +1: flat past 1 + ε
    assert np.allclose(g_neg[r < 0.79], 0) and np.allclose(g_neg[r > 0.81], -1)  # A = -1: flat below 1 - ε
    with pytest.raises(ValueError, match="epsilon"):
        plot_clip_region(0.0)
    matplotlib.pyplot.close("all")
