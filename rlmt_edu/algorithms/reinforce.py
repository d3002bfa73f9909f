"""Chapter 03: REINFORCE (§4.1), from the reward-weighted loss to Eq. (3) with a baseline.

One step: sample a response for each of a batch of prompts from the current policy (Figure 1), score each
response with a reward function R(text), and take one gradient step on

    reward-weighted loss (§4.1)   (1/S) Σ_i R(text_i) · NLL(text_i, M)                    baseline "none"
    REINFORCE loss (Eq. 3)        -(1/S) Σ_i Σ_t (R(text_i) - V_M(s_it)) · log π_M(a_it | s_it)

where the baseline V is either a constant running mean of past rewards ("mean") or a learned critic's
per-token value V(s_t) (``baseline="critic"``, §4.2; see ``rlmt_edu.algorithms.critic``). Then sample again
from the updated policy: unlike rejection sampling (§3), every sample is used, and none is used twice.

``gradient_variance`` measures what the baseline is for: with the policy fixed, how much the policy gradient
of one mini-batch scatters around its mean, with and without a baseline.

Prompts, sampling and the reward functions R(text) (the toy world's gold score by default, or exact match)
come from ``rlmt_edu.rl``, which every RL chapter shares.

Shape legend: B batch (S in the paper), T tokens (N response tokens of a rollout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.critic import critic_update, critic_values
from rlmt_edu.losses._checks import check_choice, masked_sum
from rlmt_edu.losses.policy_gradient import reinforce_loss, reward_weighted_loss
from rlmt_edu.rl import (
    PROMPT_POOLS,
    REWARDS,
    PromptSampler,
    RewardFn,
    gold_reward,
    heldout_questions,
    heldout_scores,
    prompt_pool,
    sample_responses,
    score_responses,
)
from rlmt_edu.rollout import Rollout, policy_logprobs
from rlmt_edu.utils import History, seed_everything
from rlmt_edu.world.tasks import Question

Tensor = torch.Tensor

BASELINES = ("none", "mean", "critic")


# ---- the REINFORCE loop --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReinforceConfig:
    """Settings of one REINFORCE run (defaults: about a minute on a 2-core CPU)."""

    seed: int = 0  #: seeds the prompt order and the sampling generator
    steps: int = 60  #: policy updates; each samples a fresh batch from the current policy
    prompts_per_step: int = 32  #: S, one sampled response per prompt per step
    baseline: str = "mean"  #: "none" (§4.1 reward-weighted loss), "mean" (running mean) or "critic" (V(s_t))
    temperature: float = 1.0  #: sampling temperature; the loss scores tokens under the same distribution
    learning_rate: float = 3e-5  #: AdamW learning rate of the policy
    max_new_tokens: int = 16  #: longest sampled response (the reference answers have at most 10 words)
    prompts: str = "train_pool"  #: "train_pool" (every category) or one category: "math", "facts", "safety"
    reward: str = "gold"  #: "gold" (gold score in [0, 1]) or "exact_match"; ignored when a reward_fn is given
    mean_momentum: float = 0.9  #: running-mean baseline b <- m*b + (1-m)*mean(R), updated after each step
    critic_learning_rate: float = 3e-4  #: AdamW learning rate of the critic, refit on every batch ("critic")
    max_grad_norm: float = 1.0  #: clip the policy gradient's norm to this (inf: no clipping)
    eval_every: int = 10  #: steps between greedy evaluations on the held-out questions (and at the end)

    def __post_init__(self):
        for name in ("seed", "steps", "prompts_per_step", "max_new_tokens", "eval_every"):
            value = getattr(self, name)
            low = 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        check_choice("baseline", self.baseline, BASELINES)
        check_choice("prompts", self.prompts, PROMPT_POOLS)
        check_choice("reward", self.reward, tuple(REWARDS))
        for name in ("temperature", "learning_rate", "critic_learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        if not isinstance(self.mean_momentum, (int, float)) or not 0 <= self.mean_momentum < 1:
            raise ValueError(f"mean_momentum: expected a number in [0, 1), got {self.mean_momentum!r}")


def policy_gradient_loss(baseline: str, logp: Tensor, rewards: Tensor, values: Tensor | float,
                         response_mask: Tensor) -> Tensor:
    """The loss of one REINFORCE step: §4.1's reward-weighted loss for ``baseline="none"``, else Eq. (3)."""
    if baseline == "none":
        # §4.1: (1/S) Σ_i R(text_i) · NLL(text_i, M)
        return reward_weighted_loss(logp, rewards, response_mask)
    # Eq. 3: -(1/S) Σ_i Σ_t (R(text_i) - V_M(s_it)) · log π_M(a_it | s_it)
    return reinforce_loss(logp, rewards, values, response_mask)


def reinforce(
    model,
    tokenizer,
    config: ReinforceConfig = ReinforceConfig(),
    *,
    reward_fn: RewardFn | None = None,
    questions: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    critic=None,
    progress: bool = True,
) -> History:
    """Train ``model`` (the policy, e.g. the SFT checkpoint) in place with REINFORCE; return the History.

    - ``reward_fn(questions, responses) -> tensor (B,)``: R(text); default ``REWARDS[config.reward]``.
    - ``questions``: the prompt pool (default ``prompt_pool(config.prompts)``); ``eval_questions``: held out,
      answered greedily every ``eval_every`` steps (default ``heldout_questions(config.prompts)``).
    - ``critic``: with ``baseline="critic"``, a value model (``critic.build_critic``, ideally already fitted
      with ``critic.train_critic``); it is refit on every batch, since the policy it values keeps changing.

    Logged every step: ``reward/mean``, ``reward/std``, ``loss/policy``, ``baseline/mean`` (the mean V used),
    ``grad/norm`` (before clipping), ``response/length``; with a critic ``critic/loss``; every
    ``eval_every`` steps and at the end ``eval/gold_score`` and ``eval/accuracy``; step -1 is the start.
    """
    if not isinstance(config, ReinforceConfig):
        raise ValueError(f"config: expected a ReinforceConfig, got {type(config).__name__}")
    reward_fn = REWARDS[config.reward] if reward_fn is None else reward_fn
    if not callable(reward_fn):
        raise ValueError(f"reward_fn: expected a callable (questions, responses) -> tensor (B,), got {reward_fn!r:.60}")
    if config.baseline == "critic" and critic is None:
        raise ValueError("critic: expected a value model for baseline='critic' (see critic.build_critic), got None")
    questions = prompt_pool(config.prompts) if questions is None else list(questions)
    eval_questions = heldout_questions(config.prompts) if eval_questions is None else list(eval_questions)
    device = next(model.parameters()).device
    seed_everything(config.seed)
    draw_prompts = PromptSampler(questions, config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    if critic is not None and config.baseline == "critic":
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=config.critic_learning_rate, weight_decay=0.0)

    history = History()
    model.eval()  # no dropout: the sampled distribution and the trained one are the same
    if eval_questions:
        history.append({"step": -1, **heldout_scores(model, tokenizer, eval_questions)})
    running_mean = None
    bar = tqdm(range(config.steps), desc=f"reinforce ({config.baseline})", disable=not progress)
    for step in bar:
        batch = draw_prompts(config.prompts_per_step)
        rollout, responses = sample_responses(
            model, tokenizer, batch, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
            generator=generator,
        )
        rewards = score_responses(reward_fn, batch, responses).to(device)  # (B,)
        mask = rollout.response_mask  # (B, N)
        row = {"step": step}
        if config.baseline == "none":
            values = 0.0
        elif config.baseline == "mean":
            # a constant: the running mean of PAST rewards (the first step has no past, so it uses its own mean)
            values = rewards.mean().item() if running_mean is None else running_mean
        else:
            critic_out = critic_values(critic, rollout)  # (B, N) V(s_t), with gradients for the critic's own step
            values = critic_out.detach()  # the policy's baseline: a constant to the policy gradient
        row["baseline/mean"] = values if isinstance(values, float) else masked_sum(values, mask).item() / mask.sum().item()

        logp = policy_logprobs(model, rollout, temperature=config.temperature)  # (B, N), gradients flow
        loss = policy_gradient_loss(config.baseline, logp, rewards, values, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()

        if config.baseline == "critic":
            row["critic/loss"] = critic_update(critic, critic_optimizer, rollout, rewards, values=critic_out)
        batch_mean = rewards.mean().item()
        running_mean = batch_mean if running_mean is None else (
            config.mean_momentum * running_mean + (1 - config.mean_momentum) * batch_mean)
        row.update({
            "reward/mean": batch_mean,
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "loss/policy": loss.item(),
            "grad/norm": grad_norm.item(),
            "response/length": rollout.response_lengths.float().mean().item(),
        })
        if eval_questions and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
            row.update(heldout_scores(model, tokenizer, eval_questions))
        bar.set_postfix(reward=f"{batch_mean:.3f}")
        history.append(row)
    return history


# ---- what the baseline is for: the variance of the gradient --------------------------------------------------


def _flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).double()


def gradient_variance(
    model,
    tokenizer,
    questions: Sequence[Question],
    *,
    reward_fn: RewardFn = gold_reward,
    baselines: Sequence[str] = ("none", "mean"),
    critic=None,
    batches: int = 16,
    batch_size: int = 16,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """With the policy fixed, how much does one mini-batch's policy gradient scatter, for each baseline?

    Draws ``batches`` (K) mini-batches of ``batch_size`` prompts, samples a response to each, and computes the
    gradient g_k of each baseline's loss on the SAME samples (so the baselines are compared on equal footing).
    For each baseline it returns

    - ``variance``: the total variance (1/K) Σ_k ‖g_k − ḡ‖², with ḡ = (1/K) Σ_k g_k;
    - ``mean_norm``: ‖ḡ‖, the size of the estimated expected gradient;
    - ``cosine_to_none``: cos(ḡ, ḡ_none), 1 when the baseline leaves the expected gradient unchanged (only
      approximately measurable: ḡ_none itself is noisy);
    - ``split_half_cosine``: cos of the mean gradients of the first and the second K/2 batches: how
      reproducible this baseline's ḡ is (1 = no noise left);
    - ``standard_error``: √(variance / K), the typical size of ḡ's own noise;
    - ``noise_corrected_norm``: √max(0, ‖ḡ‖² − variance / K), an estimate of ‖E g‖. Since
      E‖ḡ‖² = ‖E g‖² + (total variance) / K, ‖ḡ‖ overstates the expected gradient's size by its noise.

    The "mean" baseline is a constant: the mean reward of one extra pilot batch drawn first, so that it does not
    depend on the samples it is applied to (reported as ``constant``). The "critic" baseline is ``critic``'s
    V(s_t).
    """
    for name in baselines:
        check_choice("baselines", name, BASELINES)
    if "critic" in baselines and critic is None:
        raise ValueError("critic: expected a value model when baselines include 'critic', got None")
    if not isinstance(batches, int) or batches < 2:
        raise ValueError(f"batches: expected an int >= 2 (a variance needs two draws), got {batches!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    draw_prompts = PromptSampler(questions, seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()

    def draw() -> tuple[Rollout, Tensor]:
        batch = draw_prompts(batch_size)
        rollout, responses = sample_responses(
            model, tokenizer, batch, temperature=temperature, max_new_tokens=max_new_tokens, generator=generator)
        return rollout, score_responses(reward_fn, batch, responses).to(device)

    _, pilot_rewards = draw()
    constant = pilot_rewards.mean().item()
    sums = {name: torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device) for name in baselines}
    halves = {name: torch.zeros_like(sums[name]) for name in baselines}
    squares = {name: 0.0 for name in baselines}
    for k in range(batches):
        rollout, rewards = draw()
        mask = rollout.response_mask
        baseline_values = {"none": 0.0, "mean": constant}
        if "critic" in baselines:
            with torch.no_grad():
                baseline_values["critic"] = critic_values(critic, rollout)  # (B, N)
        logp = policy_logprobs(model, rollout, temperature=temperature)  # (B, N)
        for i, name in enumerate(baselines):
            model.zero_grad(set_to_none=True)
            loss = policy_gradient_loss(name, logp, rewards, baseline_values[name], mask)
            loss.backward(retain_graph=i < len(baselines) - 1)
            g = _flat_grad(params)
            sums[name] += g
            squares[name] += float(g @ g)
            if k < batches // 2:
                halves[name] += g
    model.zero_grad(set_to_none=True)
    model.train(was_training)

    def cosine(a: Tensor, b: Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))

    results = {}
    for name in baselines:
        mean = sums[name] / batches
        first = halves[name] / (batches // 2)
        second = (sums[name] - halves[name]) / (batches - batches // 2)
        results[name] = {
            # total variance: (1/K) Σ_k ‖g_k − ḡ‖² = (1/K) Σ_k ‖g_k‖² − ‖ḡ‖²
            "variance": max(squares[name] / batches - float(mean @ mean), 0.0),
            "mean_norm": float(mean.norm()),
            "cosine_to_none": cosine(mean, sums["none"] / batches) if "none" in sums else math.nan,
            "split_half_cosine": cosine(first, second),
        }
        noise = results[name]["variance"] / batches  # E‖ḡ‖² − ‖E g‖²
        results[name]["standard_error"] = math.sqrt(noise)
        results[name]["noise_corrected_norm"] = math.sqrt(max(0.0, results[name]["mean_norm"] ** 2 - noise))
        if name == "mean":
            results[name]["constant"] = constant
    return results
