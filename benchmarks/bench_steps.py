"""Seconds per GRPO step and per DPO step: rlmt_edu against TRL's ``GRPOTrainer`` / ``DPOTrainer``.

Run on demand (never in tests); needs the ``bench`` extra (``pip install -e ".[bench]"``, i.e. TRL):

    python benchmarks/bench_steps.py                    # CPU (or cuda when available), 11 steps each
    python benchmarks/bench_steps.py --steps 21 --threads 1
    python benchmarks/bench_steps.py --device cuda
    python benchmarks/bench_steps.py --dpo-reference precomputed   # skip TRL's default per-step reference row

Both sides train deep copies of ONE loaded model, the committed SFT GPT-2 (``rlmt_edu.paths.SFT``: 4 layers,
fp32), with the same settings: GRPO on 2 math prompts x 4 samples x at most 16 new tokens (plain softmax at
temperature 1, stopping at ``<EOS>``), exact-match reward, Dr. GRPO loss (no std scaling, beta = 0, one
update per batch), AdamW at lr 1e-5, gradient norm clipped to 1; DPO on 8 preference pairs, beta = 0.1.
TRL is told to match: fp32 (``bf16=False``), no gradient checkpointing (TRL turns it on by default), no
logging, reporting or saving, ``dataloader_num_workers=0``, the same ``torch.optim.AdamW`` (passed in) and a
constant learning rate.

A TRL step is the wall time of one optimizer step inside ``trainer.train()``, everything TRL does per step
included (dataloader, tokenizing, generation, rewards, loss, backward, clipping, optimizer and scheduler step,
callbacks); trainer construction is not timed. The two contestants are interleaved step by step in one
process: a ``TrainerCallback`` runs one rlmt_edu step at each TRL ``on_step_end`` and that time is excluded
from TRL's next step, so load from other processes on a shared machine hits both alike. The first step of
each is a warm-up; the table gives the median and the minimum over the rest.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute shows a progress bar otherwise
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # and datasets' map, at trainer construction

import torch
import transformers

from rlmt_edu import rl
from rlmt_edu.algorithms.preference_data import load_preference_pairs
from rlmt_edu.model import load_checkpoint
from rlmt_edu.paths import SFT
from rlmt_edu.rl import BatchDrawer
from rlmt_edu.tokenizer import encode_chat, encode_prompt, format_prompt

try:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
except ImportError as error:  # pragma: no cover - only without the bench extra
    raise SystemExit(f"bench_steps.py needs TRL: pip install -e '.[bench]' ({error})") from error

QUESTIONS_PER_STEP, GROUP_SIZE, NEW_TOKENS = 2, 4, 16  # GRPO: 2 prompts x 4 samples x 16 new tokens
PAIRS_PER_STEP, DPO_BETA = 8, 0.1
LEARNING_RATE, MAX_GRAD_NORM, SEED = 1e-5, 1.0, 0


# ---- timing ----------------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class Interleaved(TrainerCallback):
    """Times TRL's optimizer steps and runs one of ours after each.

    TRL step k = from the moment our step k-1 returned (or training began) to TRL's ``on_step_end`` k: all
    that TRL does between two optimizer steps, minus our interleaved step.
    """

    def __init__(self, ours: Callable[[], object], sync: Callable[[], None]):
        self.ours, self.sync = ours, sync
        self.trl: list[float] = []
        self.rlmt: list[float] = []
        self.resumed = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.sync()
        self.resumed = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        ended = time.perf_counter()
        self.trl.append(ended - self.resumed)
        start = time.perf_counter()
        self.ours()
        self.sync()
        self.rlmt.append(time.perf_counter() - start)
        self.resumed = time.perf_counter()


class RecordingDrawer(BatchDrawer):
    """``rl.BatchDrawer`` that keeps each rollout's response mask, for the fairness checks after timing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks: list[torch.Tensor] = []

    def __call__(self):
        batch, rollout, responses, rewards = super().__call__()
        self.masks.append(rollout.response_mask)  # a reference only; summed after timing
        return batch, rollout, responses, rewards


def common_trl_args(args, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir, max_steps=args.steps, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, gradient_accumulation_steps=1,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=args.device.type == "cpu",
        dataloader_num_workers=0, logging_strategy="no", report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, seed=SEED,
    )


def quiet(trainer):
    """No printing of the end-of-training summary (it happens after the last timed step anyway)."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ---- GRPO ------------------------------------------------------------------------------------------------


def bench_grpo(args, sft, tokenizer, output_dir: str) -> tuple[dict, list[str]]:
    from rlmt_edu.algorithms.grpo import GRPOConfig, grpo_step

    questions = rl.prompt_pool("math")
    by_prompt = {format_prompt(q.question): q for q in questions}
    checks: list[str] = []

    # ours
    ours_model = copy.deepcopy(sft).to(args.device).eval()
    draw = RecordingDrawer(ours_model, tokenizer, questions, rl.exact_match_reward, seed=SEED,
                           batch_size=QUESTIONS_PER_STEP, group_size=GROUP_SIZE, temperature=1.0,
                           max_new_tokens=NEW_TOKENS)
    config = GRPOConfig(questions_per_step=QUESTIONS_PER_STEP, group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS,
                        learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, temperature=1.0)
    optimizer = torch.optim.AdamW(ours_model.parameters(), lr=LEARNING_RATE)

    # TRL
    trl_model = copy.deepcopy(sft)
    trl_tokenizer = copy.deepcopy(tokenizer)
    trl_lengths: list[list[int]] = []

    def exact_match(prompts, completions, completion_ids, **kwargs) -> list[float]:
        trl_lengths.append([len(ids) for ids in completion_ids])
        return rl.exact_match_reward([by_prompt[p] for p in prompts], completions).tolist()

    trl_config = trl.GRPOConfig(
        **common_trl_args(args, output_dir), per_device_train_batch_size=QUESTIONS_PER_STEP * GROUP_SIZE,
        num_generations=GROUP_SIZE, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dr_grpo", scale_rewards="none",
    )
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in by_prompt])
    timer = Interleaved(lambda: grpo_step(ours_model, optimizer, draw, config), synchronizer(args.device))
    trainer = quiet(trl.GRPOTrainer(
        model=trl_model, reward_funcs=exact_match, args=trl_config, train_dataset=dataset,
        processing_class=trl_tokenizer, callbacks=[timer],
        optimizers=(torch.optim.AdamW(trl_model.parameters(), lr=LEARNING_RATE), None),
    ))

    # checks before training: same prompts' token ids, same settings
    ours_ids = [encode_prompt(tokenizer, q.question) for q in questions]
    trl_ids = trainer.processing_class(text=list(by_prompt))["input_ids"]
    checks.append(f"GRPO prompt token ids, TRL tokenizing the prompt string vs encode_prompt: "
                  f"{'identical' if trl_ids == ours_ids else 'DIFFERENT'} on all {len(questions)} math prompts")
    checks.append(
        f"GRPO prompts x samples x max new tokens: rlmt_edu {draw.batch_size} x {draw.group_size} x "
        f"{draw.max_new_tokens} (config {config.questions_per_step} x {config.group_size} x {config.max_new_tokens}); "
        f"TRL {trl_config.generation_batch_size // trl_config.num_generations} x {trl_config.num_generations} x "
        f"{trl_config.max_completion_length}")
    gen = trainer.generation_config
    checks.append(f"GRPO TRL sampling: do_sample={gen.do_sample} temperature={gen.temperature} top_k={gen.top_k} "
                  f"top_p={gen.top_p} eos_token_id={gen.eos_token_id} (tokenizer.eos_token_id="
                  f"{tokenizer.eos_token_id}); loss_type={trl_config.loss_type} scale_rewards="
                  f"{trl_config.scale_rewards} beta={trl_config.beta} num_iterations={trl_config.num_iterations} "
                  f"gradient_checkpointing={trl_config.gradient_checkpointing} bf16={trl_config.bf16}")
    checks.append(f"GRPO same starting weights: {same_weights(ours_model, trainer.model)}")

    trainer.train()

    ours_lengths = [int(n) for mask in draw.masks for n in mask.sum(1).tolist()]
    ours_width = max(mask.shape[1] for mask in draw.masks)
    trl_flat = [n for step in trl_lengths for n in step]
    for name, lengths in (("rlmt_edu", ours_lengths), ("TRL", trl_flat)):
        steps = len(lengths) // (QUESTIONS_PER_STEP * GROUP_SIZE)
        checks.append(f"GRPO {name} completions: {len(lengths)} over {steps} steps, tokens (EOS included) mean "
                      f"{statistics.mean(lengths):.1f}, max {max(lengths)} "
                      f"(<= {NEW_TOKENS}: {max(lengths) <= NEW_TOKENS}), ended at <EOS> before the {NEW_TOKENS}-token "
                      f"limit: {sum(n < NEW_TOKENS for n in lengths)}")
    checks.append(f"GRPO rlmt_edu widest response tensor: {ours_width} columns (<= {NEW_TOKENS}: "
                  f"{ours_width <= NEW_TOKENS})")
    checks.append(f"GRPO dtypes after training: rlmt_edu {next(ours_model.parameters()).dtype}, "
                  f"TRL {next(trainer.model.parameters()).dtype}")
    return {"GRPO (2 prompts x 4 samples x 16 new tokens)": (timer.rlmt, timer.trl)}, checks


# ---- DPO -------------------------------------------------------------------------------------------------


def bench_dpo(args, sft, tokenizer, output_dir: str, reference_mode: str) -> tuple[dict, list[str]]:
    from rlmt_edu.algorithms.dpo import DPOConfig, dpo_step, encode_pair_batch

    pairs = load_preference_pairs("train")[:PAIRS_PER_STEP]
    checks: list[str] = []

    # ours: the frozen reference's sequence log-probs are computed once, in encode_pair_batch
    ours_model = copy.deepcopy(sft).to(args.device).eval()
    # (the reference stays on the CPU: encode_pair_batch feeds it the CPU tensors it makes; then the batch moves)
    reference = copy.deepcopy(sft).eval().requires_grad_(False)
    batch = encode_pair_batch(tokenizer, pairs, reference=reference)
    for name in ("input_ids", "attention_mask", "response_mask", "logp_ref_chosen", "logp_ref_rejected"):
        setattr(batch, name, getattr(batch, name).to(args.device))
    config = DPOConfig(beta=DPO_BETA, batch_size=PAIRS_PER_STEP, learning_rate=LEARNING_RATE,
                       max_grad_norm=MAX_GRAD_NORM)
    optimizer = torch.optim.AdamW(ours_model.parameters(), lr=LEARNING_RATE)

    # TRL: "precomputed" matches ours (reference log-probs once, before training); "per_step" is TRL's default
    trl_model = copy.deepcopy(sft)
    trl_tokenizer = copy.deepcopy(tokenizer)
    context = sft.config.n_positions
    trl_config = trl.DPOConfig(
        **common_trl_args(args, output_dir), per_device_train_batch_size=PAIRS_PER_STEP,
        beta=DPO_BETA, loss_type=["sigmoid"], max_length=context,
        precompute_ref_log_probs=reference_mode == "precomputed",
    )
    records = [{"prompt": format_prompt(p.question.question), "chosen": " " + p.chosen.strip(),
                "rejected": " " + p.rejected.strip()} for p in pairs]
    timer = Interleaved(lambda: dpo_step(ours_model, optimizer, batch, config), synchronizer(args.device))
    trainer = quiet(trl.DPOTrainer(
        model=trl_model, ref_model=None if reference_mode == "precomputed" else copy.deepcopy(sft),
        args=trl_config, train_dataset=Dataset.from_list(records), processing_class=trl_tokenizer,
        callbacks=[timer], optimizers=(torch.optim.AdamW(trl_model.parameters(), lr=LEARNING_RATE), None),
    ))

    rows = trainer.train_dataset
    trl_texts = [row["prompt_ids"] + row["chosen_ids"] for row in rows] + [
        row["prompt_ids"] + row["rejected_ids"] for row in rows]
    ours_texts = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]
    expected = [encode_chat(tokenizer, p.question.question, p.chosen)[0] for p in pairs] + [
        encode_chat(tokenizer, p.question.question, p.rejected)[0] for p in pairs]
    same_ids = trl_texts == ours_texts == expected  # TRL's dataset, our PairBatch, and encode_chat agree
    trl_scored = sum(len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in rows)
    ours_scored = int(batch.response_mask.sum())
    longest = max(len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in rows)
    checks.append(f"DPO ({reference_mode} TRL reference) pairs per step: rlmt_edu {len(pairs)}, TRL "
                  f"{trl_config.per_device_train_batch_size} of a dataset of {len(rows)}; token ids (prompt + response "
                  f"+ <EOS>) {'identical' if same_ids else 'DIFFERENT'}; scored response tokens rlmt_edu "
                  f"{ours_scored}, TRL {trl_scored}; longest sequence {longest} <= max_length "
                  f"{trl_config.max_length}: {longest <= trl_config.max_length}")
    how = ("precomputed once before training" if trl_config.precompute_ref_log_probs
           else "a reference forward every step")
    checks.append(f"DPO ({reference_mode}) TRL reference log-probs: {how}; gradient_checkpointing="
                  f"{trl_config.gradient_checkpointing} bf16={trl_config.bf16}; max_grad_norm rlmt_edu "
                  f"{config.max_grad_norm}, TRL {trl_config.max_grad_norm}; same starting weights: "
                  f"{same_weights(ours_model, trainer.model)}")

    trainer.train()

    label = ("DPO (8 pairs, reference log-probs precomputed on both sides)" if reference_mode == "precomputed"
             else "DPO (8 pairs) vs TRL's default: reference forward every step")
    return {label: (timer.rlmt, timer.trl)}, checks


# ---- main ------------------------------------------------------------------------------------------------


def load_average() -> str:
    """The 1-minute load average (other processes on a shared CPU make every time here noisy)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def summary(times: list[float]) -> tuple[float, float]:
    timed = times[1:]  # the first step is a warm-up
    return statistics.median(timed), min(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per contestant (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads, called only if it differs from torch's default count")
    parser.add_argument("--dpo-reference", choices=("precomputed", "per_step", "both"), default="both",
                        help="TRL DPO reference: precomputed (as ours), per_step (TRL's default), or both rows")
    parser.add_argument("--skip", choices=("grpo", "dpo"), action="append", default=[], help="leave a benchmark out")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: expected at least 2 (the first is a warm-up)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads: expected at least 1")
        if args.threads != torch.get_num_threads():
            # Only when it changes the count: with the OpenMP backend, torch.set_num_threads also turns off MKL's
            # dynamic thread count (mkl_set_dynamic(false)), which is not what torch's default does. On this busy
            # 2-core CPU a small Linear forward + backward once ran ~20x slower after set_num_threads(2) (the
            # default count) than without the call; later A/Bs under heavier load were too noisy to confirm it.
            torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"trl\..*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    transformers.logging.set_verbosity_error()

    sft, tokenizer = load_checkpoint(SFT)
    threads = torch.get_num_threads()
    print(f"device={args.device} torch={torch.__version__} transformers={transformers.__version__} "
          f"trl={trl.__version__} threads={threads} cpu={platform.processor() or platform.machine()} "
          f"model={type(sft).__name__} n_layer={sft.config.n_layer} n_embd={sft.config.n_embd} "
          f"dtype={sft.dtype} steps={args.steps} (first = warm-up) load_avg_1min={load_average()}")

    results: dict[str, tuple[list[float], list[float]]] = {}
    checks: list[str] = []
    output_dir = tempfile.mkdtemp(prefix="bench_steps_")
    try:
        if "grpo" not in args.skip:
            rows, notes = bench_grpo(args, sft, tokenizer, output_dir)
            results.update(rows)
            checks += notes
        if "dpo" not in args.skip:
            modes = ("precomputed", "per_step") if args.dpo_reference == "both" else (args.dpo_reference,)
            for mode in modes:
                try:
                    rows, notes = bench_dpo(args, sft, tokenizer, output_dir, mode)
                except ImportError as error:  # rlmt_edu.algorithms.dpo not written yet
                    checks.append(f"DPO skipped: {error}")
                    break
                results.update(rows)
                checks += notes
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    checks.append(f"threads: {threads} at the start, {torch.get_num_threads()} at the end (one process, both sides)")

    print("\nFairness checks:")
    for line in checks:
        print(f"- {line}")
    print()
    print("| step | rlmt_edu s/step (median / min) | TRL s/step (median / min) | rlmt_edu / TRL (median) |")
    print("|---|---|---|---|")
    for label, (ours, theirs) in results.items():
        (om, olow), (tm, tlow) = summary(ours), summary(theirs)
        print(f"| {label} | {om:.3f} / {olow:.3f} | {tm:.3f} / {tlow:.3f} | {om / tm:.2f} |")
    print(f"\n({args.steps - 1} timed steps each after one warm-up; goal: rlmt_edu / TRL <= 0.5; "
          f"1-minute load average at the end: {load_average()})")


if __name__ == "__main__":
    main()
