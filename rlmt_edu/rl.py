"""What every RL chapter shares: prompt pools, the prompt sampler, sampled responses, and the rewards R(text).

REINFORCE (chapter 03), the critic (04), TRPO (07), PPO (08), GRPO (09) and GRAPE (11) all draw prompts from
the toy world, sample responses from the current policy (Figure 1, ``rlmt_edu.rollout.sample``), score them
with a reward function, and report the held-out gold score. Those parts live here, below the procedures in
``rlmt_edu.algorithms``, so that each chapter uses them rather than copies them.

A reward function maps ``(questions, responses)`` (a list of ``world.tasks.Question`` and a list of response
texts) to a float tensor of shape (B,). ``gold_reward`` is the toy world's hidden gold score in [0, 1];
``exact_match_reward`` is 1 for an exactly correct answer (or the right refusal) and 0 otherwise.

Shape legend: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from rlmt_edu.evaluation import answer
from rlmt_edu.losses._checks import check_choice
from rlmt_edu.losses.kl import kl_divergence
from rlmt_edu.rollout import Rollout, policy_logits, sample
from rlmt_edu.tokenizer import encode_prompt
from rlmt_edu.world.grading import grade
from rlmt_edu.world.preference import gold_score
from rlmt_edu.world.tasks import CATEGORIES, Question, make_split

Tensor = torch.Tensor
RewardFn = Callable[[Sequence[Question], Sequence[str]], Tensor]

PROMPT_POOLS = ("train_pool", *CATEGORIES, "math_practice")


# ---- reward functions R(text) -------------------------------------------------------------------------------


def gold_reward(questions: Sequence[Question], responses: Sequence[str]) -> Tensor:
    """R(text) = the world's gold score in [0, 1] (correct, complete, safe, concise): shape (B,)."""
    return torch.tensor([gold_score(q, r) for q, r in zip(questions, responses)], dtype=torch.float32)


def exact_match_reward(questions: Sequence[Question], responses: Sequence[str]) -> Tensor:
    """R(text) = 1 if the response is graded correct (exact answer, or the right refusal), else 0: shape (B,)."""
    return torch.tensor([float(grade(q, r).correct) for q, r in zip(questions, responses)], dtype=torch.float32)


REWARDS: dict[str, RewardFn] = {"gold": gold_reward, "exact_match": exact_match_reward}


def score_responses(reward_fn: RewardFn, questions: Sequence[Question], responses: Sequence[str]) -> Tensor:
    """Call ``reward_fn(questions, responses)`` and check what it returns: a finite float tensor of shape (B,).

    A reward function written by a user is a boundary: a NaN or a missing reward would silently poison the
    loss, so this raises a ``ValueError`` naming ``reward_fn`` instead.
    """
    if not callable(reward_fn):
        raise ValueError(f"reward_fn: expected a callable (questions, responses) -> tensor (B,), got {reward_fn!r:.60}")
    rewards = reward_fn(questions, responses)
    batch = len(responses)
    if not isinstance(rewards, Tensor):
        raise ValueError(f"reward_fn: expected it to return a torch.Tensor of shape ({batch},), got {type(rewards).__name__}")
    if rewards.shape != (batch,):
        raise ValueError(
            f"reward_fn: expected one reward per response, shape ({batch},), got shape {tuple(rewards.shape)}"
        )
    if not torch.is_floating_point(rewards):
        rewards = rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        bad = int((~torch.isfinite(rewards)).sum())
        raise ValueError(f"reward_fn: expected finite rewards, got {bad} NaN or inf of {batch}")
    return rewards.detach().float().cpu()  # (B,)


# ---- prompts and samples -------------------------------------------------------------------------------------


def _math_practice_split() -> tuple[list[Question], list[Question]]:
    """The held-out math questions cut in two by a fixed seeded shuffle: (practice, never practised)."""
    held = [q for q in make_split(0).eval if q.category == "math"]
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(0)).tolist()
    half = len(held) // 2
    return [held[i] for i in sorted(order[:half])], [held[i] for i in sorted(order[half:])]


def prompt_pool(name: str = "train_pool") -> list[Question]:
    """Questions RL may train on: the world's train pool (outside the eval set), or one category of it.

    ``"math_practice"`` is different: half of the HELD-OUT math questions (40 of 81, a fixed split), sums that no
    training source (corpus, SFT data, preference pairs) ever shows. RL with a verifiable reward needs only the
    question and a checker, never a demonstrated answer, so chapter 09 practises on them; its held-out set is
    then the other half (``heldout_questions("math_practice")``), which nothing trains on.
    """
    check_choice("prompts", name, PROMPT_POOLS)
    if name == "math_practice":
        return _math_practice_split()[0]
    pool = make_split(0).train_pool
    return list(pool) if name == "train_pool" else [q for q in pool if q.category == name]


def heldout_questions(name: str = "train_pool") -> list[Question]:
    """The held-out evaluation questions that match a prompt pool (all of them, or one category; for
    ``"math_practice"`` the held-out math questions outside the practice half)."""
    check_choice("prompts", name, PROMPT_POOLS)
    if name == "math_practice":
        return _math_practice_split()[1]
    held = make_split(0).eval
    return list(held) if name == "train_pool" else [q for q in held if q.category == name]


def sample_responses(
    model, tokenizer, questions: Sequence[Question], *, temperature: float, max_new_tokens: int,
    generator: torch.Generator | None,
) -> tuple[Rollout, list[str]]:
    """One sampled response per question (Figure 1): the rollout (token ids, mask, log-probs) and the texts."""
    prompts = [encode_prompt(tokenizer, q.question) for q in questions]
    rollout = sample(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
    )
    return rollout, rollout.decode(tokenizer)


def prompts_answered_wrong(
    model, tokenizer, questions: Sequence[Question], *, reward_fn: RewardFn = gold_reward, below: float = 1.0,
) -> list[Question]:
    """The ``questions`` whose greedy answer earns a reward below ``below``: where the model has room to learn.

    REINFORCE learns only where its samples differ in reward. A model that already answers a prompt perfectly
    gives every sample of it the same reward, and the baseline cancels it; so a short run learns most on the
    prompts it still gets wrong.
    """
    responses = answer(model, tokenizer, [q.question for q in questions])
    rewards = score_responses(reward_fn, questions, responses)  # (B,)
    return [q for q, r in zip(questions, rewards.tolist()) if r < below]


def heldout_scores(model, tokenizer, questions: Sequence[Question], *, max_new_tokens: int = 24) -> dict[str, float]:
    """Greedy answers to held-out ``questions``: mean gold score and the share graded correct."""
    responses = answer(model, tokenizer, [q.question for q in questions], max_new_tokens=max_new_tokens)
    gold = gold_reward(questions, responses)
    correct = exact_match_reward(questions, responses)
    return {"eval/gold_score": gold.mean().item(), "eval/accuracy": correct.mean().item()}


def heldout_scores_by_category(
    model, tokenizer, questions: Sequence[Question], *, max_new_tokens: int = 24,
    responses: Sequence[str] | None = None,
) -> dict[str, float]:
    """``heldout_scores``, and the same two numbers for each category present: ``eval/gold_score/math``,
    ``eval/accuracy/math``, ... (one greedy pass over all ``questions``, or the greedy ``responses`` given)."""
    if responses is None:
        responses = answer(model, tokenizer, [q.question for q in questions], max_new_tokens=max_new_tokens)
    elif len(responses) != len(questions):
        raise ValueError(f"responses: expected one per question ({len(questions)}), got {len(responses)}")
    gold = gold_reward(questions, responses)  # (B,)
    correct = exact_match_reward(questions, responses)  # (B,)
    scores = {"eval/gold_score": gold.mean().item(), "eval/accuracy": correct.mean().item()}
    for category in CATEGORIES:
        rows = [i for i, q in enumerate(questions) if q.category == category]
        if rows:
            scores[f"eval/gold_score/{category}"] = gold[rows].mean().item()
            scores[f"eval/accuracy/{category}"] = correct[rows].mean().item()
    return scores


def heldout_report(policy, tokenizer, reward_fn: RewardFn | None, questions: Sequence[Question], *,
                   system_prompts: Mapping[str, str] | None = None) -> dict[str, float]:
    """Greedy answers to held-out ``questions``: ``heldout_scores_by_category`` (gold and accuracy, overall and
    per category), the proxy reward ``reward_fn`` gives the same answers (``eval/proxy``; left out when
    ``reward_fn`` is None) and their mean length in words (``eval/length``). Every RL procedure evaluates with
    it, so their numbers compare. ``system_prompts``: category -> system prompt put before each question
    (GRAPE's generation mode)."""
    systems = None
    if system_prompts is not None:
        missing = sorted({q.category for q in questions} - set(system_prompts))
        if missing:
            raise ValueError(f"system_prompts: expected a system prompt for every category of questions, "
                             f"got none for {missing}")
        systems = [system_prompts[q.category] for q in questions]
    responses = answer(policy, tokenizer, [q.question for q in questions], systems=systems)
    scores = heldout_scores_by_category(policy, tokenizer, questions, responses=responses)
    if reward_fn is not None:
        scores["eval/proxy"] = score_responses(reward_fn, questions, responses).mean().item()
    scores["eval/length"] = sum(len(r.split()) for r in responses) / len(responses)
    return scores


def check_same_vocabulary(policy, tokenizer, **models) -> None:
    """Raise ``ValueError`` naming the argument unless ``tokenizer`` and every model of ``models`` (e.g. the
    reference, the critic, the reward model; None is skipped) share the policy's vocabulary: a log-ratio, a
    KL or a reward of token ids from another vocabulary would be silently meaningless."""
    vocabulary = policy.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) != vocabulary:
        raise ValueError(f"tokenizer: expected the policy's vocabulary of {vocabulary} tokens, got {len(tokenizer)}")
    for name, model in models.items():
        if model is not None and model.get_input_embeddings().num_embeddings != vocabulary:
            raise ValueError(f"{name}: expected the policy's vocabulary of {vocabulary} tokens, "
                             f"got a model of {model.get_input_embeddings().num_embeddings}")


def frozen_reference(policy, tokenizer, reference=None):
    """The frozen reference π_SFT (or π0) of a run that trains ``policy``: a frozen copy of ``policy`` as it is now
    when ``reference`` is None, else ``reference`` itself, checked: not the policy, no parameter requiring grad,
    the policy's vocabulary. Returned in eval mode. GRPO (chapter 09) and DPO (chapter 10) take theirs here."""
    import copy

    if reference is None:
        reference = copy.deepcopy(policy).requires_grad_(False)
    if reference is policy:
        raise ValueError("reference: expected a frozen copy of the start model, got the policy itself")
    if any(p.requires_grad for p in reference.parameters()):
        raise ValueError("reference: expected a frozen model (requires_grad False on every parameter), got one "
                         "that requires grad: call reference.requires_grad_(False)")
    check_same_vocabulary(policy, tokenizer, reference=reference)
    return reference.eval()


class BatchDrawer:
    """One batch of an on-policy RL loop: ``batch_size`` prompts from a seeded ``PromptSampler``, ``group_size``
    responses each sampled from the CURRENT ``model`` (a seeded generator on its device), and their rewards.

    ``draw()`` returns ``(questions, rollout, responses, rewards)`` with B = batch_size · group_size rows, the
    G responses of one prompt in consecutive rows (so ``rewards.view(Q, G)`` is Eq. 13's grouping), rewards a
    (B,) tensor on the model's device, checked by ``score_responses``. TRPO (chapter 07) and PPO (chapter 08)
    draw one response per prompt; GRPO (chapter 09) and GRAPE (11) draw groups.
    """

    def __init__(self, model, tokenizer, questions: Sequence[Question], reward_fn: RewardFn, *, seed: int,
                 batch_size: int, temperature: float, max_new_tokens: int, group_size: int = 1):
        for name, value in (("batch_size", batch_size), ("group_size", group_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.draw_prompts = PromptSampler(questions, seed)
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.model, self.tokenizer, self.reward_fn = model, tokenizer, reward_fn
        self.batch_size, self.temperature, self.max_new_tokens = batch_size, temperature, max_new_tokens
        self.group_size = group_size

    def __call__(self) -> tuple[list[Question], Rollout, list[str], Tensor]:
        batch = [q for q in self.draw_prompts(self.batch_size) for _ in range(self.group_size)]  # (Q·G,)
        rollout, responses = sample_responses(self.model, self.tokenizer, batch, temperature=self.temperature,
                                              max_new_tokens=self.max_new_tokens, generator=self.generator)
        rewards = score_responses(self.reward_fn, batch, responses).to(self.device)  # (B,) R(text)
        return batch, rollout, responses, rewards


@torch.no_grad()
def drift_from_reference(
    model, reference, tokenizer, questions: Sequence[Question], *, max_new_tokens: int = 24, batch_size: int = 128,
) -> dict[str, float]:
    """How far ``model`` has moved from ``reference`` (e.g. the SFT model) on ``questions``: per category.

    The reference answers every question greedily; on those responses' states s_t the exact Eq. (8) KL
    D_KL(π_ref(·|s_t) ‖ π(·|s_t)) is taken over the vocabulary. Returned: ``drift/kl`` (mean over all response
    tokens), ``drift/kl_first`` (mean over the first response token only: the decision of how to begin, which
    for this world is whether to refuse), and both per category (``drift/kl/math``, ...). The direction and
    the states are those of TRPO's constraint with π_old = the reference, so the number is comparable with δ.
    """
    check_same_vocabulary(model, None, reference=reference)
    if len(questions) == 0:
        raise ValueError("questions: expected at least one question, got none")
    summed, counts, first = [], [], []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, q.question) for q in chunk]
        rollout = sample(reference, prompts, max_new_tokens=max_new_tokens, greedy=True,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
        kl = kl_divergence(policy_logits(reference, rollout), policy_logits(model, rollout))  # (B, N) Eq. 8
        mask = rollout.response_mask.to(kl.device, kl.dtype)  # (B, N)
        summed.append((kl * mask).sum(1).cpu())  # (B,) KL summed over each response
        counts.append(mask.sum(1).cpu())  # (B,) its tokens
        first.append(kl[:, 0].cpu())  # (B,) the first response token
    summed, counts, first = torch.cat(summed), torch.cat(counts), torch.cat(first)  # (B,) each
    scores: dict[str, float] = {}
    for category in (None, *CATEGORIES):
        rows = [i for i, q in enumerate(questions) if category is None or q.category == category]
        if not rows:
            continue
        suffix = "" if category is None else f"/{category}"
        scores[f"drift/kl{suffix}"] = float(summed[rows].sum() / counts[rows].sum())  # the token mean
        scores[f"drift/kl_first{suffix}"] = float(first[rows].mean())
    return scores


class PromptSampler:
    """Draws batches of questions: a seeded shuffle of the pool, reshuffled after each pass (each prompt once
    per pass)."""

    def __init__(self, pool: Sequence[Question], seed: int):
        if len(pool) == 0:
            raise ValueError("questions: expected at least one prompt, got none")
        self.pool = list(pool)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def __call__(self, n: int) -> list[Question]:
        batch = []
        while len(batch) < n:
            if not self.order:
                self.order = torch.randperm(len(self.pool), generator=self.generator).tolist()
            batch.append(self.pool[self.order.pop()])
        return batch
