"""GRPO (Eq. 13-14) with the book's rewards, GRAPE's rubric reward (Eq. 15) by default, on TRL's GRPOTrainer.

One script for the tiny model of the book and for a real Hugging Face model on many GPUs: what changes is the
model, the precision and the launcher, never the rewards or the loss settings.

    # the committed tiny SFT model, on this machine's CPU (a few seconds per step)
    python examples/grpo_with_trl.py --steps 20

    # a real instruction-tuned model: 8 GPUs with DDP, generation on vLLM (colocated)
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/grpo_with_trl.py \\
        --model Qwen/Qwen2.5-0.5B-Instruct --steps 500 --questions 16 --group-size 8 --bf16 --use-vllm

    # a model too large for one GPU: DeepSpeed ZeRO-3 shards parameters, gradients and optimizer state
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/grpo_with_trl.py \\
        --model <a 7B instruct model> --bf16 --use-vllm --gradient-checkpointing

The toy world stays the judge: its verifiable checks grade the text, and the human-preference item is the
book's reward model (chapter 05), calibrated on the tiny SFT model's answers. ``--questions`` is per device.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model needs no hub; unset it to download a real one


def parse_args(argv=None):
    from rlmt_edu.paths import RUNS, SFT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SFT), help="an rlmt_edu checkpoint folder or a Hugging Face "
                        "causal LM name/path (default: the committed tiny SFT model)")
    parser.add_argument("--reward", choices=("grape", "exact_match", "gold"), default="grape")
    parser.add_argument("--prompts", default="train_pool", help="the toy world's prompt pool (rl.PROMPT_POOLS)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--questions", type=int, default=4, help="Q, questions per step and device")
    parser.add_argument("--group-size", type=int, default=4, help="G, responses per question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--system-prompts", action="store_true",
                        help="GRAPE's system prompt per category before each question (a model taught them, §6.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 (GPUs)")
    parser.add_argument("--use-vllm", action="store_true", help="generate with vLLM (pip install vllm)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(RUNS / "trl"), help="TRL's output_dir (default: runs/trl)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import trl  # noqa: F401  (fails here, with the extra to install, before anything loads)

    from rlmt_edu.algorithms.grape import reward_model_judge, rubric_reward
    from rlmt_edu.algorithms.grpo import GRPOConfig
    from rlmt_edu.algorithms.reward_model import load_reward_model
    from rlmt_edu.integrations.trl import prompt_dataset, reward_func, trl_grpo_config
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.paths import SFT
    from rlmt_edu.rl import REWARDS, prompt_pool
    from rlmt_edu.world.rubrics import SYSTEM_PROMPTS, world_rubrics

    questions = prompt_pool(args.prompts)
    tiny = (Path(args.model) / "rlmt_edu.json").exists()  # one of the book's checkpoints
    if tiny:
        model, tokenizer = load_checkpoint(args.model)
    else:  # a real model: TRL loads it, and its own chat template formats the prompts
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="bfloat16" if args.bf16 else "float32")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.reward == "grape":
        judge_policy, world_tokenizer = load_checkpoint(SFT)  # the judge belongs to the toy world
        reward_model, _ = load_reward_model()
        rubrics = world_rubrics(reward_model_judge(reward_model, world_tokenizer, judge_policy), seed=args.seed)
        reward = rubric_reward(rubrics)
    else:
        reward = REWARDS[args.reward]
    systems = SYSTEM_PROMPTS if args.system_prompts else None
    config = GRPOConfig(steps=args.steps, questions_per_step=args.questions, group_size=args.group_size,
                        max_new_tokens=args.max_new_tokens, beta=args.beta, epsilon=args.epsilon,
                        learning_rate=args.lr, seed=args.seed)
    trainer = trl.GRPOTrainer(
        model=model, processing_class=tokenizer,
        reward_funcs=reward_func(reward, questions, name=args.reward),
        train_dataset=prompt_dataset(questions, system_prompts=systems, conversational=not tiny),
        args=trl_grpo_config(config, output_dir=args.out, bf16=args.bf16, use_vllm=args.use_vllm,
                             gradient_checkpointing=args.gradient_checkpointing,
                             logging_strategy="steps", logging_steps=1),
    )
    trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    window = max(1, min(5, len(rewards) // 2))
    summary = {"steps": len(rewards), "reward_first": sum(rewards[:window]) / window,
               "reward_last": sum(rewards[-window:]) / window}
    if trainer.accelerator.is_main_process:
        print(f"{args.reward} reward, mean of the first {window} steps {summary['reward_first']:.3f}, "
              f"of the last {window} {summary['reward_last']:.3f} ({len(rewards)} steps)")
    return summary


if __name__ == "__main__":
    main()
