"""Chapter 09: GRPO in its Dr. GRPO form (§4.8, Eq. 13–14): no critic, no reward model, a reward you can check.

One GRPO step, on the machinery every RL chapter shares (``rlmt_edu.rl``):

1. draw Q questions and sample G responses to each from the latest policy π0 (``rl.BatchDrawer`` with
   ``group_size=G``: the G responses of a question sit in consecutive rows);
2. score each with a verifiable reward R(text), e.g. ``rl.exact_match_reward`` (1 for the exact answer or the
   right refusal, else 0);
3. Eq. (13): A(text_qg) = R(text_qg) - mean_g R(text_qg), one advantage per response, no value model;
4. ``updates_per_batch`` gradient steps on Eq. (14), the ratio π1/π0 taken against the policy that sampled.

The first update of a batch is on-policy: π1 = π0, so every ratio is exactly 1 (``logp_old`` is the detached
``logp`` of that same forward pass, as TRL does with one iteration), the clip cannot act, and the loss is
-(1/QG) Σ_qg A_qg·T_qg: exactly 0 when all responses have the same length T, since each group's advantages sum
to 0. Its gradient is -(1/QG) Σ_qg A_qg Σ_t ∇log π(a_qgt|s_qgt), which is not 0. Later updates of the same batch
have ratios ≠ 1, and the clip starts to act.

Options (each named, none in Eq. 14 unless marked):

- ``normalization``: ``"paper"`` (Eq. 14: Σ_t, then / QG), ``"sequence_mean"`` (the original GRPO: each
  response's token mean, then the mean over responses) or ``"token_mean"`` (/ number of tokens);
- ``scale_by_std``: divide each group's advantages by its std (the original GRPO; Dr. GRPO drops it);
- ``beta`` > 0: add β·KL(π1‖π_SFT) estimated per token with k3 (``kl_estimator="k3"``), or with k3 multiplied by
  the ratio π1/π0, which corrects for the tokens having been sampled from π0, not π1 (``"k3_ratio_corrected"``,
  TRL's ``use_bias_correction_kl``). The KL term is normalised like the loss. β = 0 by default: Eq. 14 has none.

Beyond the paper: gradient-norm clipping, and the reference forward for the logged KL to the SFT model.

Shape legend: Q questions, G group size, B = Q·G samples, N response tokens (T in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlmt_edu.losses._checks import check_choice, check_non_negative, check_positive, masked_mean, masked_sum
from rlmt_edu.losses.grpo import NORMALIZATIONS, group_relative_advantage, grpo_loss
from rlmt_edu.losses.kl import kl_estimator_k3
from rlmt_edu.rl import (
    PROMPT_POOLS,
    BatchDrawer,
    RewardFn,
    frozen_reference,
    gold_reward,
    heldout_questions,
    heldout_report,
    prompt_pool,
)
from rlmt_edu.rollout import policy_logprobs
from rlmt_edu.utils import History, seed_everything
from rlmt_edu.world.tasks import Question

Tensor = torch.Tensor
KL_ESTIMATORS = ("k3", "k3_ratio_corrected")


@dataclass(frozen=True)
class GRPOConfig:
    """Settings of one GRPO run (defaults: chapter 09's; about 0.25 s per step on a 2-core CPU)."""

    seed: int = 0  #: seeds the prompt order and the sampling generator
    steps: int = 30  #: GRPO steps; each samples a fresh batch of Q × G responses from the latest policy
    questions_per_step: int = 8  #: Q, questions per step
    group_size: int = 8  #: G, responses sampled per question (≥ 2: a group of one has nothing to compare with)
    updates_per_batch: int = 1  #: gradient steps per batch (TRL's num_iterations, μ); 1: every step on-policy
    epsilon: float = 0.2  #: ε of Eq. 14's clip (inf: no clipping)
    normalization: str = "paper"  #: "paper" (Eq. 14, / QG), "sequence_mean" (original GRPO), "token_mean"
    scale_by_std: bool = False  #: divide advantages by the group's std (original GRPO), not in Eq. 13
    beta: float = 0.0  #: weight of a KL(π1‖π_SFT) term added to the loss (0: none, as in Eq. 14)
    kl_estimator: str = "k3"  #: "k3", or "k3_ratio_corrected" (k3 · π1/π0, TRL's use_bias_correction_kl)
    learning_rate: float = 3e-5  #: AdamW learning rate (1e-4 learns the practice sums as fast, and forgets more)
    max_grad_norm: float = 1.0  #: clip each step's gradient norm to this
    temperature: float = 1.0  #: sampling temperature; the ratios use the same softmax
    max_new_tokens: int = 16  #: longest sampled response (the reference answers have at most 10 words)
    prompts: str = "math_practice"  #: "math_practice" (held-out sums, never demonstrated), "math", "facts",
    #: "safety" or "train_pool" (all three categories); see ``rl.prompt_pool``
    eval_every: int = 10  #: steps between greedy held-out evaluations (and at the start and the end)

    def __post_init__(self):
        for name in ("seed", "steps", "questions_per_step", "group_size", "updates_per_batch", "max_new_tokens",
                     "eval_every"):
            value = getattr(self, name)
            low = {"seed": 0, "group_size": 2}.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                hint = " (a group of one response has no mean to compare with)" if name == "group_size" else ""
                raise ValueError(f"{name}: expected an int >= {low}{hint}, got {value!r}")
        check_positive("epsilon", self.epsilon, allow_inf=True)
        check_non_negative("beta", self.beta)
        for name in ("learning_rate", "max_grad_norm", "temperature"):
            check_positive(name, getattr(self, name))
        if not isinstance(self.scale_by_std, bool):
            raise ValueError(f"scale_by_std: expected True or False, got {self.scale_by_std!r}")
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("prompts", self.prompts, PROMPT_POOLS)


def grpo_kl_term(logp: Tensor, logp_old: Tensor, logp_ref: Tensor, response_mask: Tensor, *,
                 estimator: str = "k3", normalization: str = "paper") -> Tensor:
    """Beyond Eq. 14: the KL(π1‖π_SFT) term that TRL adds to the GRPO loss (times β), normalised like the loss.

        k3_t = r_t - 1 - log r_t,  r_t = π_SFT(a_qgt|s_qgt) / π1(a_qgt|s_qgt)       (``estimator="k3"``)
        k3_t · π1(a_qgt|s_qgt) / π0(a_qgt|s_qgt)                                    (``"k3_ratio_corrected"``)

    | symbol | argument | shape |
    |---|---|---|
    | log π1(a\\|s), the model being updated | ``logp`` | (Q, G, N) |
    | log π0(a\\|s), the model that sampled | ``logp_old`` | (Q, G, N) |
    | log π_SFT(a\\|s), the frozen reference | ``logp_ref`` | (Q, G, N) |

    k3 is unbiased for KL(π1‖π_SFT) on tokens drawn from π1; after the first update the tokens were drawn from
    π0, and the ratio π1/π0 (a constant in its denominator, detached) reweights them to π1. On the on-policy
    first update the two estimators are equal.
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    k3 = kl_estimator_k3(logp, logp_ref)  # (Q, G, N)
    if estimator == "k3_ratio_corrected":
        k3 = k3 * torch.exp(logp - logp_old.detach())  # (Q, G, N) importance weight π1/π0, gradient flows
    mask = response_mask.to(k3.dtype)
    if normalization == "paper":
        return masked_sum(k3, mask) / (k3.shape[0] * k3.shape[1])  # Σ_t, then / QG
    if normalization == "token_mean":
        return masked_mean(k3, mask)
    return masked_mean(k3, mask, dim=-1).mean()  # each response's token mean, then the mean over responses


def zero_signal_share(rewards: Tensor) -> float:
    """The share of groups (rows of ``rewards``, shape (Q, G)) whose G rewards are all equal: by Eq. 13 every
    advantage in such a group is 0, so it contributes nothing to the gradient."""
    return float((rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean())


def grpo_step(policy, optimizer: torch.optim.Optimizer, draw: BatchDrawer, config: GRPOConfig, *,
              reference=None, loss_fn=None) -> dict[str, float]:
    """One GRPO step (the module docstring's 1–4): sample Q × G from the latest policy, Eq. 13, then
    ``config.updates_per_batch`` gradient steps of Eq. 14 (plus β·KL when ``config.beta`` > 0). ``draw`` is a
    ``rl.BatchDrawer`` over ``policy`` with ``batch_size = Q`` and ``group_size = G`` (or any callable with those
    two attributes that returns the same four things, e.g. chapter 11's GRAPE drawer); ``reference`` is the frozen
    SFT model (needed when β > 0; when given, the KL to it is logged). ``loss_fn(logp, logp_old, advantages,
    mask)`` (shapes (Q, G, N), (Q, G, N), (Q, G), (Q, G, N)) replaces Eq. 14, e.g. by GRAPE's Eq. 17; it returns
    ``(loss, metrics)`` with ``grpo/clip_fraction``, ``grpo/ratio_min`` and ``grpo/ratio_max``. Returns the
    step's metrics."""
    num_questions, group_size = config.questions_per_step, config.group_size
    if draw.batch_size != num_questions or draw.group_size != group_size:
        raise ValueError(f"draw: expected a BatchDrawer of Q = {num_questions} questions × G = {group_size} "
                         f"responses (config), got {draw.batch_size} × {draw.group_size}")
    if config.beta > 0 and reference is None:
        raise ValueError(f"reference: expected the frozen SFT model for the KL term (beta = {config.beta}), got None")
    if reference is not None and any(p.requires_grad for p in reference.parameters()):
        raise ValueError("reference: expected a frozen model (requires_grad False on every parameter), "
                         "got one that requires grad")
    batch, rollout, responses, rewards = draw()  # B = Q·G rows, a question's G responses consecutive
    if rewards.shape != (num_questions * group_size,):
        raise ValueError(f"rewards: expected Q·G = {num_questions}·{group_size} = {num_questions * group_size} "
                         f"rewards, got shape {tuple(rewards.shape)}")
    device = rewards.device
    num_tokens = rollout.response_ids.shape[1]
    grouped = rewards.view(num_questions, group_size)  # (Q, G)
    advantages = group_relative_advantage(grouped, scale_by_std=config.scale_by_std)  # (Q, G) Eq. 13
    mask = rollout.response_mask.to(device).view(num_questions, group_size, num_tokens)  # (Q, G, N)
    lengths = mask.sum(-1).float()  # (Q, G) response tokens, <EOS> included
    row = {"reward/mean": rewards.mean().item(), "reward/gold": gold_reward(batch, responses).mean().item(),
           "groups/zero_signal": zero_signal_share(grouped),
           "response/length": sum(len(r.split()) for r in responses) / len(responses),
           "response/tokens": lengths.mean().item()}
    logp_ref = None
    if reference is not None:
        with torch.no_grad():
            logp_ref = policy_logprobs(reference, rollout, temperature=config.temperature, backend="auto")  # (B, N)
            logp_ref = logp_ref.view(num_questions, group_size, num_tokens)
            sampled = rollout.logp.to(device).view(num_questions, group_size, num_tokens)
            row["kl/sft"] = ((sampled - logp_ref) * mask).sum(-1).mean().item()  # k1 per response, as in PPO
    logp_old = None
    for update in range(config.updates_per_batch):
        logp = policy_logprobs(policy, rollout, temperature=config.temperature, backend="auto")  # (B, N), grads
        logp = logp.view(num_questions, group_size, num_tokens)  # (Q, G, N)
        if logp_old is None:
            # on-policy: π0 is the policy as it is now, so the ratio is exactly 1 on this first update
            logp_old = logp.detach()
            row["sampler/logp_gap"] = (logp_old - rollout.logp.to(device).view_as(logp_old)).abs().max().item()
        if loss_fn is None:
            loss, metrics = grpo_loss(logp, logp_old, advantages, mask, epsilon=config.epsilon,
                                      normalization=config.normalization)  # Eq. 14
        else:
            loss, metrics = loss_fn(logp, logp_old, advantages, mask)
        if config.beta > 0:
            kl = grpo_kl_term(logp, logp_old, logp_ref, mask, estimator=config.kl_estimator,
                              normalization=config.normalization)
            loss = loss + config.beta * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()
        if update == 0:
            row.update({"loss/grpo": loss.item(), "grad_norm": float(grad_norm)})
        row.update({"loss/grpo_last": loss.item(), "grpo/clip_fraction": metrics["grpo/clip_fraction"],
                    "grpo/ratio_max": metrics["grpo/ratio_max"], "grpo/ratio_min": metrics["grpo/ratio_min"]})
    return row


def grpo(
    policy,
    tokenizer,
    reward_fn: RewardFn,
    config: GRPOConfig = GRPOConfig(),
    *,
    reference=None,
    questions: Sequence[Question] | None = None,
    eval_questions: Sequence[Question] | None = None,
    extra_eval: Mapping[str, Sequence[Question]] | None = None,
    progress: bool = True,
) -> History:
    """Train ``policy`` (e.g. the SFT model) in place with GRPO against ``reward_fn``; return the History.

    - ``reward_fn``: ``(questions, responses) -> (B,)``, e.g. ``rl.exact_match_reward``;
    - ``reference``: the frozen SFT model for the KL term and the logged ``kl/sft`` (default: a frozen copy of
      ``policy`` as it is on entry);
    - ``questions``: the prompt pool (default ``prompt_pool(config.prompts)``); ``eval_questions``: held out,
      answered greedily at the start, every ``eval_every`` steps and at the end (default
      ``heldout_questions(config.prompts)``; ``[]`` for none); ``extra_eval``: more named question sets
      evaluated alongside, logged as ``<name>/accuracy``, ``<name>/gold_score``, ... (e.g. the prompts
      practised on, or the train pool, to see forgetting).

    Logged every step (on the sampled batch): ``reward/mean``, ``reward/gold``, ``groups/zero_signal``,
    ``response/length`` (words), ``response/tokens``, ``kl/sft``, ``loss/grpo`` (the first, on-policy update),
    ``loss/grpo_last``, ``grad_norm`` (of the first update, before clipping), ``grpo/clip_fraction`` and the
    ratio's range (last update); at evaluations ``rl.heldout_report``'s ``eval/...`` keys.
    """
    if not isinstance(config, GRPOConfig):
        raise ValueError(f"config: expected a GRPOConfig, got {type(config).__name__}")
    if not callable(reward_fn):
        raise ValueError(f"reward_fn: expected a callable (questions, responses) -> tensor (B,), got {reward_fn!r:.60}")
    reference = frozen_reference(policy, tokenizer, reference)
    eval_questions = heldout_questions(config.prompts) if eval_questions is None else list(eval_questions)
    seed_everything(config.seed)
    pool = prompt_pool(config.prompts) if questions is None else list(questions)
    draw = BatchDrawer(policy, tokenizer, pool, reward_fn, seed=config.seed, batch_size=config.questions_per_step,
                       group_size=config.group_size, temperature=config.temperature,
                       max_new_tokens=config.max_new_tokens)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
    policy.eval()  # no dropout: the distribution that sampled and the one the ratio scores are the same
    history = History()
    extra_eval = dict(extra_eval or {})
    for name, chosen in extra_eval.items():
        if not isinstance(name, str) or not name or name.startswith("eval") or len(chosen) == 0:
            raise ValueError(f"extra_eval: expected names (not starting with 'eval') mapped to non-empty question "
                             f"lists, got {name!r} with {len(chosen)} questions")

    def evaluate() -> dict[str, float]:
        scores = heldout_report(policy, tokenizer, reward_fn, eval_questions) if eval_questions else {}
        for name, chosen in extra_eval.items():
            scores.update({f"{name}/{key.removeprefix('eval/')}": value
                           for key, value in heldout_report(policy, tokenizer, reward_fn, chosen).items()})
        return scores

    if eval_questions or extra_eval:
        history.append({"step": -1, **evaluate()})
    bar = tqdm(range(config.steps), desc=f"grpo (Q={config.questions_per_step}, G={config.group_size})",
               disable=not progress)
    for step in bar:
        row = {"step": step, **grpo_step(policy, optimizer, draw, config, reference=reference)}
        if (eval_questions or extra_eval) and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
            row.update(evaluate())
        bar.set_postfix(reward=f"{row['reward/mean']:.2f}", zero=f"{row['groups/zero_signal']:.2f}")
        history.append(row)
    return history


# ---- the chapter's plots ------------------------------------------------------------------------------------


def plot_grpo(runs: Mapping[str, Sequence[History]], axes=None, *, accuracy_key: str = "eval/accuracy"):
    """Chapter 09's figure: per configuration (label -> one History per seed), mean and min-max band over seeds
    of the held-out accuracy (greedy, never smoothed), the reward of the sampled groups, the share of
    zero-signal groups and the response length. ``axes``: four Axes or None. Returns the axes."""
    from rlmt_edu.plots import panel_axes, plot_seeds

    axes = panel_axes(axes, 4)
    panels = [(accuracy_key, "held-out accuracy (greedy)", "accuracy", 1),
              ("reward/mean", "reward of the sampled groups", "R", 5),
              ("groups/zero_signal", "groups with no signal (all R equal)", "share", 5),
              ("response/length", "sampled response length", "words", 5)]
    for ax, (key, title, ylabel, smooth) in zip(axes, panels):
        plot_seeds(runs, key, ax=ax, smooth=smooth, title=title, ylabel=ylabel)
        ax.set_xlabel("GRPO step")
    return axes
