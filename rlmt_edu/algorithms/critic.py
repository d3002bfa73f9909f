"""Chapter 04: the value function V_M(s_t) of §4.2, learned by a critic, and the advantage of §4.3 (Eq. 4).

The critic is the policy's own GPT-2 trunk (copied from a checkpoint, trained separately) with a scalar head
on every token (``model.build_value_model``): its output at the last token of s_t is V(s_t), the reward the
policy is expected to earn from there on. §4.2 says why we learn it instead of computing it: the exact value
needs every continuation of s_t played out. Instead we regress it on sampled outcomes,

    critic loss = mean over response tokens of (V(s_it) − R(text_i))²

so that at each prefix V(s_t) tends to the mean reward of the responses that pass through it. With the
fitted critic, Eq. (4) gives every token its own weight A(a_t, s_t) = R(text) − V(s_t) (``losses.advantage``).

The regression is not one of the paper's equations (the paper only says "train another neural network"), so
it lives here, next to the procedure, not in ``rlmt_edu.losses``.

Shape legend: B batch, T tokens (N response tokens of a rollout; P the left-padded prompt length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlmt_edu.rl import (
    RewardFn,
    PromptSampler,
    gold_reward,
    sample_responses,
    score_responses,
)
from rlmt_edu.losses._checks import check_mask, check_tensor, masked_mean
from rlmt_edu.model import build_value_model, position_ids_from_mask
from rlmt_edu.rollout import Rollout
from rlmt_edu.utils import History, seed_everything
from rlmt_edu.world.tasks import Question

Tensor = torch.Tensor


def build_critic(init: str | Path, *, device=None):
    """The critic: the GPT-2 trunk of checkpoint ``init`` (e.g. the SFT model) and a fresh scalar head per token.

    Returned in eval mode and kept there: the trunk has no dropout in this book, and eval mode also turns off
    the 0.1 dropout ``transformers`` puts before the head, so the critic gives the same V when it is trained and
    when it is used. Gradients flow in eval mode all the same.
    """
    return build_value_model(init, device=device).eval()


def critic_values(critic, rollout: Rollout) -> Tensor:
    """V(s_t) for every response token of ``rollout``: (B, N), 0 where ``rollout.response_mask`` is 0.

    s_t is the prompt plus the response tokens before token t, so V(s_t) is the critic's output at the token
    just before a_t: the last prompt token (<MODEL>) for t = 0. Gradients flow into ``critic``.
    """
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout: expected a Rollout, got {type(rollout).__name__}")
    device = next(critic.parameters()).device
    input_ids, attention_mask = (x.to(device) for x in rollout.sequences())  # (B, P+N) each
    out = critic(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    values = out.logits[..., 0].float()  # (B, P+N): the value after reading tokens 0..j
    values = values[:, rollout.response_slice]  # (B, N): column P-1+t has read s_t, the state before a_t
    mask = rollout.response_mask.to(device)
    return torch.where(mask != 0, values, torch.zeros_like(values))  # (B, N)


def value_loss(values: Tensor, rewards: Tensor, response_mask: Tensor) -> Tensor:
    """The critic's regression loss: the mean over response tokens of (V(s_it) − R(text_i))².

    | symbol | argument | shape |
    |---|---|---|
    | V(s_it), the critic's value before token t | ``values`` | (B, T) |
    | R(text_i), the regression target at every token of text i | ``rewards`` | (B,) |
    | the response tokens | ``response_mask`` (0/1) | (B, T) |
    | the loss | returned | () |
    """
    check_tensor("values", values, ndim=2)
    mask = check_mask("response_mask", response_mask, "values", values)
    check_tensor("rewards", rewards, ndim=1)
    if rewards.shape[0] != values.shape[0]:
        raise ValueError(f"rewards: expected shape ({values.shape[0]},), one per row of values, got {tuple(rewards.shape)}")
    targets = rewards.detach().to(values.dtype).unsqueeze(1).expand_as(values)  # (B, T)
    return masked_mean((values - targets) ** 2, mask)


def explained_variance(values: Tensor, rewards: Tensor, response_mask: Tensor) -> float:
    """How much of the reward's variance the critic explains, over the response tokens:

        1 − mean((R − V)²) / Var(R)

    1 is a perfect critic, 0 is no better than predicting the mean reward, below 0 is worse than that. (This is
    the coefficient of determination. Some PPO codes use 1 − Var(R − V) / Var(R) instead, which forgives a
    constant bias; a biased baseline is a worse baseline, so we count it.) (B, T), (B,), (B, T) in; a float out.
    """
    mask = response_mask != 0  # (B, T)
    targets = rewards.to(values.dtype).unsqueeze(1).expand_as(values)[mask]  # (M,) one per response token
    spread = targets.var(unbiased=False)
    if float(spread) == 0.0:
        return float("nan")
    return 1.0 - float(((targets - values[mask]) ** 2).mean() / spread)


def critic_update(critic, optimizer: torch.optim.Optimizer, rollout: Rollout, rewards: Tensor,
                  values: Tensor | None = None) -> float:
    """One regression step of the critic on one batch of rollouts and their rewards. Returns the loss.

    ``values``: the critic's ``critic_values(critic, rollout)`` if already computed WITH gradients (REINFORCE
    uses them as its baseline first), so the critic does not read the batch twice.
    """
    if values is None:
        values = critic_values(critic, rollout)  # (B, N)
    elif not values.requires_grad:
        raise ValueError("values: expected critic_values computed with gradients (not under torch.no_grad)")
    mask = rollout.response_mask.to(values.device)
    loss = value_loss(values, rewards.to(values.device), mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
    optimizer.step()
    return loss.item()


@dataclass(frozen=True)
class CriticConfig:
    """Settings of one critic fit (defaults: well under a minute on a 2-core CPU)."""

    seed: int = 0  #: seeds the prompt order and the sampling
    steps: int = 60  #: regression steps, each on a fresh batch sampled from the (fixed) policy
    prompts_per_step: int = 32  #: sampled responses per step
    learning_rate: float = 3e-4  #: AdamW learning rate of the critic
    temperature: float = 1.0  #: the policy's sampling temperature (the critic values THAT policy)
    max_new_tokens: int = 16  #: longest sampled response
    heldout_rollouts: int = 128  #: responses sampled once on the held-out questions to measure the fit
    eval_every: int = 10  #: steps between held-out measurements (and at the end)

    def __post_init__(self):
        for name in ("seed", "steps", "prompts_per_step", "max_new_tokens", "heldout_rollouts", "eval_every"):
            value = getattr(self, name)
            low = 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")


@torch.no_grad()
def evaluate_critic(critic, rollout: Rollout, rewards: Tensor) -> dict[str, float]:
    """Fit of the critic on fixed rollouts: ``critic/heldout_loss`` (the regression loss),
    ``critic/explained_variance`` over every response token, ``critic/explained_variance_first`` at the
    first response token only (where the critic has seen the prompt and nothing of the answer) and
    ``critic/explained_variance_last`` at the last response token only (where it has read the whole answer but
    its final token, usually <EOS>)."""
    values = critic_values(critic, rollout)  # (B, N)
    mask = rollout.response_mask.to(values.device)
    rewards = rewards.to(values.device)
    first = torch.zeros_like(mask)
    first[:, 0] = 1
    last = torch.zeros_like(mask)
    last[torch.arange(len(mask), device=mask.device), mask.sum(dim=1).long() - 1] = 1  # each row's last token
    return {
        "critic/heldout_loss": value_loss(values, rewards, mask).item(),
        "critic/explained_variance": explained_variance(values, rewards, mask),
        "critic/explained_variance_first": explained_variance(values, rewards, first),
        "critic/explained_variance_last": explained_variance(values, rewards, last),
    }


def train_critic(
    critic,
    policy,
    tokenizer,
    questions: Sequence[Question],
    config: CriticConfig = CriticConfig(),
    *,
    reward_fn: RewardFn = gold_reward,
    heldout: Sequence[Question] | None = None,
    progress: bool = True,
) -> tuple[History, tuple[Rollout, Tensor]]:
    """Fit ``critic`` in place to the value of the fixed ``policy`` on prompts drawn from ``questions``.

    Each step samples one response per prompt from ``policy``, scores it with ``reward_fn`` and takes one step on
    ``value_loss`` (every response token regresses on its text's reward). The fit is measured on responses
    sampled once to ``heldout`` questions (default: ``questions``, with a different seed), logged as
    ``critic/heldout_loss`` and ``critic/explained_variance`` (``_first``, ``_last``: at the first and the last
    response token only; see ``evaluate_critic``); ``critic/loss`` is logged every step.

    Returns the History and the held-out ``(rollout, rewards)``, for plotting predicted against actual.
    """
    if not isinstance(config, CriticConfig):
        raise ValueError(f"config: expected a CriticConfig, got {type(config).__name__}")
    if len(questions) == 0:
        raise ValueError("questions: expected at least one prompt, got none")
    device = next(policy.parameters()).device
    seed_everything(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    heldout_pool = list(questions) if heldout is None else list(heldout)
    heldout_batch = PromptSampler(heldout_pool, config.seed + 1)(config.heldout_rollouts)
    heldout_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    heldout_rollout, heldout_texts = sample_responses(
        policy, tokenizer, heldout_batch, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
        generator=heldout_generator,
    )
    heldout_rewards = score_responses(reward_fn, heldout_batch, heldout_texts)  # (B,)

    draw_prompts = PromptSampler(questions, config.seed)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=config.learning_rate, weight_decay=0.0)
    critic.eval()  # see build_critic: no dropout, gradients still flow
    history = History([{"step": -1, **evaluate_critic(critic, heldout_rollout, heldout_rewards)}])
    bar = tqdm(range(config.steps), desc="critic", disable=not progress)
    for step in bar:
        batch = draw_prompts(config.prompts_per_step)
        rollout, responses = sample_responses(
            policy, tokenizer, batch, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
            generator=generator,
        )
        rewards = score_responses(reward_fn, batch, responses)  # (B,)
        row = {"step": step, "critic/loss": critic_update(critic, optimizer, rollout, rewards),
               "reward/mean": rewards.mean().item()}
        if (step + 1) % config.eval_every == 0 or step == config.steps - 1:
            row.update(evaluate_critic(critic, heldout_rollout, heldout_rewards))
        bar.set_postfix(loss=f"{row['critic/loss']:.4f}")
        history.append(row)
    return history, (heldout_rollout, heldout_rewards)
