"""Chapter 08: PPO with the KL penalty inside the reward (§4.6–4.7, Eq. 11–12): the full RLHF loop.

One PPO iteration, on the machinery every RL chapter shares (``rlmt_edu.rl``):

1. sample one response per prompt from the latest policy π_old (Figure 1); keep its log-probs log π_old(a_t|s_t);
2. score each response with the reward model, R(text) (``reward_model.reward_model_reward``; the gold score is
   measured beside it and never trained on);
3. Eq. (12): the per-token reward R'(a_t, s_t) = R(text) - β·log(π_old(a_t|s_t) / π_SFT(a_t|s_t)), with the
   frozen SFT model in the denominator for the whole run;
4. the advantage A' = R' - V(s_t) (Eq. 4 on R', §4.7), V from the critic of chapter 04; or GAE (§4.3) as an
   option, with R on the last response token;
5. ``epochs`` passes of Eq. (11) over shuffled mini-batches of the batch, the ratio always taken against π_old,
   the model that sampled; the critic regresses V(s_t) on R(text) on the same mini-batches (its loss beside).

Normalisation (``PPOConfig.loss_normalization``): Eq. (11) sums a sample's tokens and divides by S
(``"per_sample"``, the paper's, the default). TRL's PPO trainer takes the mean over all response tokens of the
mini-batch instead (``"token_mean"``): the same terms, divided by the number of tokens rather than by S,
so a long response's tokens weigh no more than a short one's in total. Beyond the paper: mini-batches, the
epochs over one batch, gradient clipping, and GAE as an option.

Shape legend: B batch (S in the paper), N response tokens (T in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.algorithms.critic import critic_values, explained_variance, value_loss
from rlmt_edu.losses._checks import check_choice, check_non_negative, check_positive
from rlmt_edu.losses.advantage import gae
from rlmt_edu.losses.ppo import kl_shaped_advantage, kl_shaped_rewards, ppo_clip_loss
from rlmt_edu.rl import (
    PROMPT_POOLS,
    BatchDrawer,
    RewardFn,
    check_same_vocabulary,
    gold_reward,
    heldout_questions,
    heldout_report,
    prompt_pool,
)
from rlmt_edu.rollout import Rollout, policy_logprobs
from rlmt_edu.utils import History, seed_everything
from rlmt_edu.world.tasks import Question

Tensor = torch.Tensor
ADVANTAGES = ("eq4", "gae")
NORMALIZATIONS = ("per_sample", "token_mean")


@dataclass(frozen=True)
class PPOConfig:
    """Settings of one PPO run (defaults: chapter 08's; about 0.55 s per iteration on a 2-core CPU)."""

    seed: int = 0  #: seeds the prompt order, the sampling generator and the mini-batch shuffles
    iterations: int = 30  #: PPO iterations; each samples a fresh batch from the latest policy
    prompts_per_iteration: int = 32  #: S, one sampled response per prompt
    epochs: int = 4  #: passes of Eq. 11 over each batch (1: every step is on-policy, the clip never acts)
    critic_warmup: int = 10  #: batches of the SFT policy the critic is fitted on before the first policy step
    minibatch_size: int = 16  #: samples per gradient step; at most prompts_per_iteration
    epsilon: float = 0.2  #: ε of Eq. 11's clip (inf: no clipping, Eq. 7)
    beta: float = 1.0  #: β of Eq. 12, the KL penalty to the SFT model inside the reward (0: none)
    advantage: str = "eq4"  #: "eq4" (A' = R' - V, §4.7) or "gae" (R on the last token; γ, λ below)
    gamma: float = 1.0  #: GAE's γ (only with advantage="gae")
    lam: float = 0.95  #: GAE's λ (only with advantage="gae")
    loss_normalization: str = "per_sample"  #: "per_sample" (Eq. 11: Σ_t, then / S) or "token_mean" (TRL)
    learning_rate: float = 1e-4  #: AdamW learning rate of the policy (3e-5: 30 iterations barely move the proxy)
    critic_learning_rate: float = 3e-4  #: AdamW learning rate of the critic
    max_grad_norm: float = 1.0  #: clip each step's gradient norm (policy and critic) to this
    temperature: float = 1.0  #: sampling temperature; Eq. 11's ratio and Eq. 12's log-ratio use the same softmax
    max_new_tokens: int = 16  #: longest sampled response (the reference answers have at most 10 words)
    prompts: str = "train_pool"  #: "train_pool" (every category) or one category: "math", "facts", "safety"
    eval_every: int = 30  #: iterations between greedy held-out evaluations (and at the start and the end)

    def __post_init__(self):
        for name in ("seed", "critic_warmup", "iterations", "prompts_per_iteration", "epochs", "minibatch_size", "max_new_tokens",
                     "eval_every"):
            value = getattr(self, name)
            low = 0 if name in ("seed", "critic_warmup") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.minibatch_size > self.prompts_per_iteration:
            raise ValueError(f"minibatch_size: expected at most the batch, prompts_per_iteration = "
                             f"{self.prompts_per_iteration}, got {self.minibatch_size}")
        check_positive("epsilon", self.epsilon, allow_inf=True)
        check_non_negative("beta", self.beta)
        for name in ("learning_rate", "critic_learning_rate", "max_grad_norm", "temperature"):
            check_positive(name, getattr(self, name))
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
        check_choice("advantage", self.advantage, ADVANTAGES)
        check_choice("loss_normalization", self.loss_normalization, NORMALIZATIONS)
        check_choice("prompts", self.prompts, PROMPT_POOLS)


def ppo_advantages(rewards: Tensor, logp_old: Tensor, logp_ref: Tensor, values: Tensor, response_mask: Tensor,
                   config: PPOConfig) -> tuple[Tensor, Tensor]:
    """Eq. (12) and the advantage on it: returns (R', A'), each (B, N), 0 outside ``response_mask``.

    | symbol | argument | shape |
    |---|---|---|
    | R(text_i), the reward model's score | ``rewards`` | (B,) |
    | log π_old(a_t\\|s_t), the policy that sampled (π1 of Eq. 12) | ``logp_old`` | (B, N) |
    | log π_SFT(a_t\\|s_t), the frozen reference (π0 of Eq. 12) | ``logp_ref`` | (B, N) |
    | V(s_t), the critic | ``values`` | (B, N) |

    ``advantage="eq4"``: R' puts R on every response token (§4.7) and A' = R' - V. ``advantage="gae"``: R on the
    last response token only, -β·log-ratio on every token, and A' = GAE(R', V; γ, λ) (with γ = λ = 1 this is the
    return-to-go minus V).
    """
    if values.shape != logp_old.shape:
        raise ValueError(f"values: expected the critic's values in the response's shape {tuple(logp_old.shape)}, "
                         f"got {tuple(values.shape)}")
    if config.advantage == "eq4":
        shaped = kl_shaped_rewards(rewards, logp_old, logp_ref, response_mask, beta=config.beta)  # (B, N) Eq. 12
        return shaped, kl_shaped_advantage(shaped, values, response_mask)  # (B, N) A' = R' - V
    shaped = kl_shaped_rewards(rewards, logp_old, logp_ref, response_mask, beta=config.beta, reward_at="last_token")
    return shaped, gae(shaped, values, response_mask, gamma=config.gamma, lam=config.lam)


def ppo_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, response_mask: Tensor, *, epsilon: float,
             normalization: str = "per_sample") -> tuple[Tensor, dict[str, float]]:
    """Eq. (11) on a mini-batch, with the paper's normalisation or TRL's (see the module docstring).

    ``"per_sample"``: ``ppo_clip_loss`` as written, -(1/S) Σ_i Σ_t min(...). ``"token_mean"``: the same sum
    divided by the number of response tokens instead of by S (TRL's PPO). Returns (loss, metrics).
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    loss, metrics = ppo_clip_loss(logp, logp_old, advantages, response_mask, epsilon=epsilon)
    if normalization == "token_mean":
        loss = loss * logp.shape[0] / response_mask.sum().clamp_min(1)  # × S / (tokens): a mean over tokens
    return loss, metrics


def ppo(
    policy,
    tokenizer,
    reward_fn: RewardFn,
    config: PPOConfig = PPOConfig(),
    *,
    reference=None,
    critic=None,
    questions: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    progress: bool = True,
) -> History:
    """Train ``policy`` (e.g. the SFT model) in place with PPO against ``reward_fn``; return the History.

    - ``reward_fn``: ``(questions, responses) -> (B,)``, e.g. ``reward_model_reward(*load_reward_model())``;
    - ``reference``: the frozen π_SFT of Eq. 12 (default: a copy of ``policy`` as it is on entry);
    - ``critic``: V(s_t) (default: ``critic.build_critic`` on a copy of ``policy``'s checkpoint weights: the SFT
      trunk with a fresh head), trained alongside;
    - ``questions``: the prompt pool (default ``prompt_pool(config.prompts)``); ``eval_questions``: held out,
      answered greedily at the start, every ``eval_every`` iterations and at the end (default
      ``heldout_questions(config.prompts)``; ``[]`` for none).

    Logged every iteration (on the sampled batch): ``reward/proxy`` (mean R), ``reward/gold`` (mean gold score of
    the same samples, measured, never trained on), ``kl/sft`` (the mean over samples of Σ_t log π_old/π_SFT,
    the k1 estimate of KL(π_old‖π_SFT) per response), ``response/length`` (words), ``reward/shaped`` (mean
    Σ_t R' per sample), and averaged over the iteration's gradient steps: ``loss/ppo``, ``loss/value``,
    ``ppo/clip_fraction``, ``ppo/approx_kl`` (k3 of KL(π_old‖π) on the batch), ``value/explained_variance``.
    At evaluations: ``eval/gold_score`` (and per category), ``eval/accuracy``, ``eval/proxy``, ``eval/length``.
    """
    import copy

    from rlmt_edu.algorithms.critic import build_critic

    if not isinstance(config, PPOConfig):
        raise ValueError(f"config: expected a PPOConfig, got {type(config).__name__}")
    if not callable(reward_fn):
        raise ValueError(f"reward_fn: expected a callable (questions, responses) -> tensor (B,), got {reward_fn!r:.60}")
    device = next(policy.parameters()).device
    if reference is None:
        reference = copy.deepcopy(policy)
    if critic is None:
        critic = _critic_from(policy, build_critic, device)
    check_same_vocabulary(policy, tokenizer, reference=reference, critic=critic,
                          reward_model=getattr(reward_fn, "model", None))
    if reference is policy:
        raise ValueError("reference: expected a frozen copy of the start model, got the policy itself "
                         "(its log-ratio would always be 0)")
    reference.eval()  # used under torch.no_grad only: it is never updated
    eval_questions = heldout_questions(config.prompts) if eval_questions is None else list(eval_questions)

    seed_everything(config.seed)
    pool = prompt_pool(config.prompts) if questions is None else list(questions)
    draw = BatchDrawer(policy, tokenizer, pool, reward_fn, seed=config.seed,
                       batch_size=config.prompts_per_iteration, temperature=config.temperature,
                       max_new_tokens=config.max_new_tokens)
    shuffle = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=config.critic_learning_rate)
    history = History()
    policy.eval()  # no dropout: the distribution that sampled and the one the ratio scores are the same
    start = {"step": -1}
    # a fresh critic predicts V ≈ 0 for every state, so A' = R - V would be R itself: all of one sign when the
    # rewards are, pushing every sampled token down (or up) at once. Fit it to the SFT policy's rewards first.
    for _ in tqdm(range(config.critic_warmup), desc="critic warm-up", disable=not progress):
        _, rollout, _, rewards = draw()
        mask = rollout.response_mask.to(device)
        for _ in range(config.epochs):
            order = torch.randperm(len(rewards), generator=shuffle)
            for first in range(0, len(rewards), config.minibatch_size):
                rows = order[first:first + config.minibatch_size]
                _critic_step(critic, critic_optimizer, rollout.select(rows), rewards[rows.to(device)],
                             mask[rows.to(device)], config.max_grad_norm)
        with torch.no_grad():
            start["value/explained_variance"] = explained_variance(critic_values(critic, rollout), rewards, mask)
    if eval_questions:
        start.update(heldout_report(policy, tokenizer, reward_fn, eval_questions))
    if len(start) > 1:
        history.append(start)
    bar = tqdm(range(config.iterations), desc=f"ppo (β={config.beta:g}, ε={config.epsilon:g})", disable=not progress)
    for step in bar:
        batch, rollout, responses, rewards = draw()
        mask = rollout.response_mask.to(device)  # (B, N)
        with torch.no_grad():
            logp_old = rollout.logp.to(device)  # (B, N) log π_old(a_t|s_t), recorded while sampling
            logp_ref = policy_logprobs(reference, rollout, temperature=config.temperature)  # (B, N) π_SFT
            values = critic_values(critic, rollout)  # (B, N)
            shaped, advantages = ppo_advantages(rewards, logp_old, logp_ref, values, mask, config)  # (B, N) each
        row = {"step": step, "reward/proxy": rewards.mean().item(),
               "reward/gold": gold_reward(batch, responses).mean().item(),
               "kl/sft": ((logp_old - logp_ref) * mask).sum(1).mean().item(),
               "response/length": sum(len(r.split()) for r in responses) / len(responses),
               "reward/shaped": (shaped * mask).sum(1).mean().item(),
               "value/explained_variance": explained_variance(values, rewards, mask)}
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(config.epochs):
            order = torch.randperm(len(batch), generator=shuffle)
            for start in range(0, len(batch), config.minibatch_size):
                rows = order[start:start + config.minibatch_size]
                part = rollout.select(rows)
                rows = rows.to(device)
                logp = policy_logprobs(policy, part, temperature=config.temperature)  # (b, N), gradients flow
                # Eq. 11, ratio against π_old (the sampler), advantages A' of Eq. 12 fixed for the batch
                loss, metrics = ppo_loss(logp, logp_old[rows], advantages[rows], mask[rows], epsilon=config.epsilon,
                                         normalization=config.loss_normalization)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
                # the critic beside it: V(s_t) regressed on R(text)
                critic_loss = _critic_step(critic, critic_optimizer, part, rewards[rows], mask[rows],
                                           config.max_grad_norm)
                for key, value in (("loss/ppo", loss.item()), ("loss/value", critic_loss),
                                   ("ppo/clip_fraction", metrics["ppo/clip_fraction"]),
                                   ("ppo/approx_kl", metrics["ppo/approx_kl"])):
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        row.update({key: value / steps for key, value in sums.items()})
        if eval_questions and ((step + 1) % config.eval_every == 0 or step == config.iterations - 1):
            row.update(heldout_report(policy, tokenizer, reward_fn, eval_questions))
        bar.set_postfix(proxy=f"{row['reward/proxy']:.2f}", gold=f"{row['reward/gold']:.2f}", kl=f"{row['kl/sft']:.2f}")
        history.append(row)
    return history


def _critic_step(critic, optimizer, rollout: Rollout, rewards: Tensor, mask: Tensor, max_grad_norm: float) -> float:
    """One regression step of V(s_t) on R(text) over a mini-batch (the value loss beside Eq. 11)."""
    loss = value_loss(critic_values(critic, rollout), rewards, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


def _critic_from(policy, build_critic, device):
    """A fresh critic on the policy's current trunk: its weights saved to a temporary folder, loaded as a value
    model (the trunk, and a new head per token)."""
    import tempfile

    from rlmt_edu.model import _no_progress_bars

    with tempfile.TemporaryDirectory() as folder:
        with _no_progress_bars():
            policy.save_pretrained(folder)
        return build_critic(folder, device=device)


# ---- the chapter's plot -------------------------------------------------------------------------------------


def plot_ppo(runs: Mapping[str, Sequence[History]], axes=None):
    """Chapter 08's figure: for each configuration (label -> one History per seed), mean and min-max band of
    the proxy reward, the gold score of the same samples, KL to the SFT model and response length per
    iteration. ``axes``: four Axes, or None for a new 1 × 4 figure. Returns the axes."""
    from rlmt_edu.plots import panel_axes, plot_seeds

    axes = panel_axes(axes, 4)
    panels = [("reward/proxy", "proxy reward R (reward model)", "R"),
              ("reward/gold", "gold score of the same samples", "gold"),
              ("kl/sft", "KL(π‖π_SFT) per response (k1, summed)", "nats"),
              ("response/length", "response length", "words")]
    for ax, (key, title, ylabel) in zip(axes, panels):
        plot_seeds(runs, key, ax=ax, smooth=5, title=title, ylabel=ylabel)
        ax.set_xlabel("PPO iteration")
    return axes


def overoptimisation_points(runs: Mapping[str, Sequence[History]]) -> dict[str, tuple[list[float], list[float]]]:
    """For the reward-model overoptimisation curve: per label, every iteration's (KL to SFT, gold) pairs of
    all its seeds, each a running mean over 5 iterations (the per-batch numbers are noisy)."""
    import numpy as np

    out = {}
    for label, histories in runs.items():
        kls, golds = [], []
        for history in histories:
            rows = [r for r in history if r["step"] >= 0]
            kl = np.array([r["kl/sft"] for r in rows])
            gold = np.array([r["reward/gold"] for r in rows])
            window = min(5, len(rows))
            kernel = np.ones(window) / window
            kls += list(np.convolve(kl, kernel, mode="valid"))
            golds += list(np.convolve(gold, kernel, mode="valid"))
        out[label] = (kls, golds)
    return out



def plot_clip_region(epsilon: float = 0.2, *, axes=None):
    """Eq. (11)'s clipped objective of ONE token, min(r·A, CLIP(r, 1-ε, 1+ε)·A), and its gradient d/dr, against
    the ratio r = π1/π0, for A = +1 and A = -1. The gradient is computed by autograd through ``ppo_clip_loss``
    itself (one token, S = 1), so the plot shows the library's function, not a re-derivation.

    Where the min keeps the clipped branch the gradient is exactly zero: a token whose ratio has already moved
    past 1 + ε in the direction its advantage rewards (or past 1 - ε for A < 0) stops pulling. ``axes``: two
    Axes or None. Returns the axes.
    """
    import matplotlib.pyplot as plt

    epsilon = check_positive("epsilon", epsilon)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
    ratios = torch.linspace(0.05, 2.0, 400, dtype=torch.float64)
    for sign, colour in ((1.0, "tab:green"), (-1.0, "tab:red")):
        log_ratio = ratios.log().clone().requires_grad_(True)  # log r = logp - logp_old
        offset = torch.full((1, 1), -3.0, dtype=torch.float64)  # log π0 = -3, so that log π1 = log r - 3 <= 0
        objective = []
        for k in range(len(ratios)):  # one token per call: (1, 1) tensors
            loss, _ = ppo_clip_loss(log_ratio[k].view(1, 1) + offset, offset,
                                    torch.full((1, 1), sign, dtype=torch.float64), torch.ones(1, 1), epsilon=epsilon)
            objective.append(-loss)
        objective = torch.stack(objective)  # (R,)
        (grad_log,) = torch.autograd.grad(objective.sum(), log_ratio)  # d objective / d log r
        grad_ratio = (grad_log / ratios).detach().numpy()  # chain rule: d/dr = (d/d log r) / r
        x = ratios.numpy()
        axes[0].plot(x, objective.detach().numpy(), color=colour, label=f"A = {sign:+.0f}")
        axes[0].plot(x, sign * x, color=colour, linestyle=":", alpha=0.6, linewidth=1)
        axes[1].plot(x, grad_ratio, color=colour, label=f"A = {sign:+.0f}")
    for ax in axes:
        for edge in (1 - epsilon, 1 + epsilon):
            ax.axvline(edge, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("ratio r = π1 / π0")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    axes[0].set_title(f"clipped objective min(r·A, clip(r)·A), ε = {epsilon:g} (dotted: r·A, Eq. 7)")
    axes[1].set_title("its gradient d/dr: zero where the clip acts")
    axes[1].set_ylim(-1.5, 1.5)
    return axes
