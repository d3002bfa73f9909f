"""Time ``rlmt_edu.rollout.sample`` against ``model.generate(do_sample=True)`` on the same tiny GPT-2.

Run on demand (never in tests):

    python benchmarks/bench_sampler.py                 # CPU, batch 8 and 64, 16 new tokens
    python benchmarks/bench_sampler.py --device cuda   # on a GPU
    python benchmarks/bench_sampler.py --repeats 21 --batch-sizes 8 64 256

Fairness: the same model (``ModelConfig`` defaults, vocabulary of 300), the same left-padded prompts, fp32,
``torch.set_num_threads`` left at its default. Both draw from the plain softmax (``generate`` is given
``top_k=0``, turning off its default top-50 filter) and both generate exactly ``--new-tokens`` tokens (no
EOS: ``eos_token_id=None`` / ``eos_id=None``). Each repeat runs the contestants back to back in the same
order, after one warm-up call each, so that load on a shared machine hits them alike; the table shows the
median (and min) over repeats. It also checks that greedy decoding gives identical tokens.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from rlmt_edu.model import ModelConfig, build_model
from rlmt_edu.rollout import sample
from rlmt_edu.tokenizer import build_tokenizer


def make_prompts(batch_size: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``<USER> w w ... w <MODEL>`` with 4 to 10 random words: different lengths, so left padding is exercised."""
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 11, (batch_size,), generator=rng).tolist()
    user, model_token, first_word = 3, 4, 7  # ids of <USER>, <MODEL> and the first ordinary word
    return [[user, *torch.randint(first_word, vocab_size, (n,), generator=rng).tolist(), model_token] for n in lengths]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3  # ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per contestant (>= 7)")
    parser.add_argument("--no-hf-loop", action="store_true", help="skip our loop through the transformers forward")
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats: expected at least 7")
    device = torch.device(args.device)

    tokenizer = build_tokenizer([f"word{i}" for i in range(300 - 7)])  # 7 special tokens + 293 words = 300
    model = build_model(tokenizer, ModelConfig(), seed=0).to(device).eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    n = args.new_tokens
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()} vocab={len(tokenizer)} config={ModelConfig()}")

    rows = []
    for batch_size in args.batch_sizes:
        prompts = make_prompts(batch_size, len(tokenizer), seed=batch_size)
        generator = torch.Generator(device).manual_seed(0)
        # greedy: identical tokens (with the normal EOS stopping)
        ours = sample(model, prompts, max_new_tokens=n, greedy=True, eos_id=eos_id, pad_id=pad_id)
        theirs = model.generate(input_ids=ours.prompt_ids, attention_mask=ours.prompt_mask, max_new_tokens=n,
                                do_sample=False)[:, ours.prompt_ids.shape[1]:]
        greedy_identical = torch.equal(ours.response_ids, theirs)

        prompt_ids, prompt_mask = ours.prompt_ids, ours.prompt_mask
        contestants = {
            "generate": lambda: model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=n, do_sample=True, top_k=0,
                eos_token_id=None, pad_token_id=pad_id,
            ),
            "sample": lambda: sample(model, prompts, max_new_tokens=n, generator=generator, eos_id=None, pad_id=pad_id),
        }
        if not args.no_hf_loop:
            contestants["sample_hf_loop"] = lambda: sample(
                model, prompts, max_new_tokens=n, generator=generator, eos_id=None, pad_id=pad_id, backend="hf"
            )
        for fn in contestants.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in contestants}
        for _ in range(args.repeats):
            for name, fn in contestants.items():
                times[name].append(timed(fn, device))
        out = contestants["generate"]()
        assert out.shape[1] - prompt_ids.shape[1] == n, "generate stopped early"
        assert contestants["sample"]().response_ids.shape[1] == n, "sample stopped early"
        rows.append((batch_size, times, greedy_identical))

    print()
    header = "| batch x new tokens | generate ms (median / min) | sample ms (median / min) | speed-up (median) |"
    if not args.no_hf_loop:
        header += " sample via HF forward ms |"
    header += " greedy identical |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for batch_size, times, greedy_identical in rows:
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        line = (f"| {batch_size} x {n} | {med['generate']:.1f} / {low['generate']:.1f} "
                f"| {med['sample']:.1f} / {low['sample']:.1f} | {med['generate'] / med['sample']:.2f}x |")
        if not args.no_hf_loop:
            line += f" {med['sample_hf_loop']:.1f} / {low['sample_hf_loop']:.1f} |"
        line += f" {'yes' if greedy_identical else 'NO'} |"
        print(line)


if __name__ == "__main__":
    main()
