"""The path to scale: the book's GRPO and GRAPE choices as settings of TRL's ``GRPOTrainer``.

Chapters 09 and 11 train with ``rlmt_edu.algorithms``, one readable loop on one device. TRL trains the same
losses on real models across many GPUs (``accelerate launch``, DDP or DeepSpeed ZeRO, vLLM generation). This
module carries the book's pieces across, so that nothing has to be rewritten:

- ``prompt_dataset``: the toy world's questions as a ``datasets.Dataset`` of prompt strings in the chat
  format (``tokenizer.format_prompt``), with a ``question_index`` column that TRL hands back to the rewards;
- ``reward_func``: any ``rl.RewardFn`` (``gold_reward``, ``exact_match_reward``, the reward model, GRAPE's
  ``grape.rubric_reward``) as a TRL reward function ``f(prompts, completions, **columns) -> list[float]``;
- ``trl_grpo_config``: a ``GRPOConfig`` of ``rlmt_edu.algorithms.grpo`` translated into ``trl.GRPOConfig``,
  following ``MAPPING`` (what maps exactly, what maps up to a constant, what has no counterpart).

Needs the ``trl`` extra: ``pip install -e ".[trl]"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

try:
    import trl
    from datasets import Dataset
except ImportError as error:  # pragma: no cover - exercised by a test that hides trl
    raise ImportError(f"rlmt_edu.integrations.trl needs TRL ({error.name} is missing): "
                      "pip install -e \".[trl]\"") from error

from rlmt_edu.algorithms.grpo import GRPOConfig
from rlmt_edu.rl import score_responses
from rlmt_edu.tokenizer import format_prompt
from rlmt_edu.world.tasks import Question

#: the paper's choice -> rlmt_edu -> TRL, and how well it maps ("exact", "up to a constant", "none")
MAPPING: tuple[dict[str, str], ...] = (
    {"paper": "Eq. 13, A = R - mean of the group", "rlmt_edu": "scale_by_std=False",
     "trl": 'scale_rewards="none"', "maps": "exact"},
    {"paper": "original GRPO, A / std of the group (beyond the paper)", "rlmt_edu": "scale_by_std=True",
     "trl": 'scale_rewards="group"', "maps": "up to ε in the denominator (1e-6 here, 1e-4 in TRL)"},
    {"paper": "Eq. 14, Σ_t over each response, / QG", "rlmt_edu": 'normalization="paper"',
     "trl": 'loss_type="dr_grpo"',
     "maps": "up to a constant: TRL divides by QG · max_completion_length (same gradient direction)"},
    {"paper": "per-response token mean (original GRPO, beyond the paper)", "rlmt_edu": 'normalization="sequence_mean"',
     "trl": 'loss_type="grpo"', "maps": "exact"},
    {"paper": "token mean over the batch (beyond the paper)", "rlmt_edu": 'normalization="token_mean"',
     "trl": 'loss_type="bnpo"', "maps": "exact on one device, one accumulation step"},
    {"paper": "ε of the clip in Eq. 11 / 14", "rlmt_edu": "epsilon", "trl": "epsilon", "maps": "exact"},
    {"paper": "μ updates per sampled batch (π0 fixed during them)", "rlmt_edu": "updates_per_batch",
     "trl": "num_iterations", "maps": "exact"},
    {"paper": "β · KL(π1 ‖ π_SFT) added to the loss (§4.7 puts it in the reward)", "rlmt_edu": "beta",
     "trl": "beta", "maps": "exact for the loss term; TRL has no KL-in-the-reward form of Eq. 12"},
    {"paper": "KL estimator k3 = r - 1 - log r", "rlmt_edu": 'kl_estimator="k3"',
     "trl": "use_bias_correction_kl=False", "maps": "exact"},
    {"paper": "k3 · π1/π0 (beyond the paper)", "rlmt_edu": 'kl_estimator="k3_ratio_corrected"',
     "trl": "use_bias_correction_kl=True (TRL's default)", "maps": "exact"},
    {"paper": "Q questions × G responses per step", "rlmt_edu": "questions_per_step, group_size",
     "trl": "per_device_train_batch_size = Q·G, num_generations = G", "maps": "exact on one device"},
    {"paper": "sampling (Figure 1): softmax at a temperature, up to N new tokens", "rlmt_edu":
     "temperature, max_new_tokens", "trl": "temperature, top_k=0, top_p=1, max_completion_length",
     "maps": "exact in distribution (TRL samples with transformers' generate: other random numbers)"},
    {"paper": "the optimiser", "rlmt_edu": "AdamW(lr), gradient norm clipped", "trl":
     "learning_rate, max_grad_norm, weight_decay=0.01, constant schedule", "maps": "exact"},
    {"paper": "Eq. 15, GRAPE's confidence-weighted rubric reward", "rlmt_edu": "grape.rubric_reward(rubrics)",
     "trl": "reward_funcs=[reward_func(...)]", "maps": "exact (φ̄ over the batch TRL scores together)"},
    {"paper": "Eq. 17, GRAPE's sequence-level clipped loss", "rlmt_edu": 'GRAPEConfig(loss="eq17")',
     "trl": 'importance_sampling_level="sequence" is GSPO (a length-normalised ratio)', "maps": "none"},
    {"paper": "GRAPE's revision mode and SFT rows in the group (§6)", "rlmt_edu":
     "GRAPEConfig(revision_probability, sft_in_group)", "trl": "—", "maps": "none"},
    {"paper": "Eq. 4's critic, PPO (§4.6)", "rlmt_edu": "algorithms.ppo", "trl": "— (GRPOTrainer has no critic)",
     "maps": "none"},
)

_LOSS_TYPES = {"paper": "dr_grpo", "sequence_mean": "grpo", "token_mean": "bnpo"}


def mapping_markdown() -> str:
    """``MAPPING`` as a markdown table (for the docs and chapter 13)."""
    lines = ["| paper | rlmt_edu | TRL | maps |", "|---|---|---|---|"]
    lines += [f"| {row['paper']} | `{row['rlmt_edu']}` | `{row['trl']}` | {row['maps']} |" for row in MAPPING]
    return "\n".join(lines).replace("`—`", "—") + "\n"


def prompt_dataset(questions: Sequence[Question], *, system_prompts: Mapping[str, str] | None = None,
                   conversational: bool = False) -> "Dataset":
    """The questions as TRL's prompt dataset: columns ``prompt``, ``question_index`` (the row of ``questions``,
    which TRL hands back to the rewards) and ``category``.

    ``prompt`` is the book's chat-format string (``tokenizer.format_prompt``: TRL's tokenizer then gives the
    same ids as ``encode_prompt``), or with ``conversational=True`` a list of messages for a real model's own
    chat template. ``system_prompts`` (category -> text) puts GRAPE's system prompt before each question."""
    if len(questions) == 0:
        raise ValueError("questions: expected at least one question, got none")
    if system_prompts is not None:
        missing = sorted({q.category for q in questions} - set(system_prompts))
        if missing:
            raise ValueError(f"system_prompts: expected a system prompt for every category, got none for {missing}")
    rows = []
    for i, q in enumerate(questions):
        system = None if system_prompts is None else system_prompts[q.category]
        if conversational:
            prompt = ([] if system is None else [{"role": "system", "content": system}]) + \
                [{"role": "user", "content": q.question}]
        else:
            prompt = format_prompt(q.question, system=system)
        rows.append({"prompt": prompt, "question_index": i, "category": q.category})
    return Dataset.from_list(rows)


def _text(completion) -> str:
    """A completion as text: TRL passes a string, or for conversational prompts a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role") == "assistant")


def reward_func(reward_fn, questions: Sequence[Question], *, name: str | None = None):
    """``reward_fn`` (an ``rl.RewardFn``: (questions, responses) -> tensor (B,)) as a TRL reward function.

    TRL calls it with the prompts, the decoded completions and the dataset's columns; the ``question_index``
    column of ``prompt_dataset(questions)`` finds each completion's question. The rewards are checked by
    ``rl.score_responses`` (finite, one per completion) and returned as a list of floats."""
    questions = list(questions)
    if not callable(reward_fn):
        raise ValueError(f"reward_fn: expected a callable (questions, responses) -> tensor (B,), got {reward_fn!r:.60}")

    def reward(prompts, completions, question_index=None, **columns) -> list[float]:
        if question_index is None:
            raise ValueError("question_index: expected the column of prompt_dataset(questions) in TRL's "
                             "train_dataset, got a dataset without it")
        batch = [questions[i] for i in question_index]
        return score_responses(reward_fn, batch, [_text(c) for c in completions]).tolist()

    reward.__name__ = name or getattr(reward_fn, "__name__", "reward")  # TRL logs rewards/<name>
    return reward


def trl_grpo_config(config: GRPOConfig = GRPOConfig(), *, output_dir: str, **overrides) -> "trl.GRPOConfig":
    """``config`` (rlmt_edu's GRPO settings) as a ``trl.GRPOConfig``, row by row of ``MAPPING``.

    ``overrides`` are passed to ``trl.GRPOConfig`` last (e.g. ``bf16=True``, ``use_vllm=True`` on a real
    model); they win over the translation. Logging, saving and reporting are off unless overridden.
    """
    if not isinstance(config, GRPOConfig):
        raise ValueError(f"config: expected rlmt_edu.algorithms.grpo.GRPOConfig, got {type(config).__name__}")
    settings = dict(
        output_dir=output_dir, max_steps=config.steps, seed=config.seed,
        per_device_train_batch_size=config.questions_per_step * config.group_size,
        num_generations=config.group_size, num_iterations=config.updates_per_batch,
        epsilon=config.epsilon, loss_type=_LOSS_TYPES[config.normalization],
        scale_rewards="group" if config.scale_by_std else "none",
        beta=config.beta, use_bias_correction_kl=config.kl_estimator == "k3_ratio_corrected",
        learning_rate=config.learning_rate, max_grad_norm=config.max_grad_norm, weight_decay=0.01,
        lr_scheduler_type="constant", warmup_steps=0, gradient_accumulation_steps=1,
        temperature=config.temperature, top_k=0, top_p=1.0, max_completion_length=config.max_new_tokens,
        gradient_checkpointing=False, bf16=False, fp16=False,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def config_rows(config: GRPOConfig, trl_config) -> list[tuple[str, object, object]]:
    """(setting, rlmt_edu's value, TRL's value) for the settings ``trl_grpo_config`` translates: a table to
    check a translation by eye."""
    return [
        ("Q·G (batch of responses)", config.questions_per_step * config.group_size, trl_config.per_device_train_batch_size),
        ("G", config.group_size, trl_config.num_generations),
        ("μ", config.updates_per_batch, trl_config.num_iterations),
        ("ε", config.epsilon, trl_config.epsilon),
        ("β", config.beta, trl_config.beta),
        ("loss normalisation", config.normalization, trl_config.loss_type),
        ("std scaling", config.scale_by_std, trl_config.scale_rewards),
        ("KL estimator", config.kl_estimator, f"use_bias_correction_kl={trl_config.use_bias_correction_kl}"),
        ("learning rate", config.learning_rate, trl_config.learning_rate),
        ("max new tokens", config.max_new_tokens, trl_config.max_completion_length),
        ("temperature", config.temperature, trl_config.temperature),
    ]


__all__ = ["MAPPING", "config_rows", "mapping_markdown", "prompt_dataset", "reward_func", "trl_grpo_config"]

