"""The ``rlmt-edu`` command: regenerate data, train the chapter models, chat with a checkpoint.

    rlmt-edu data                      # rewrite data/*.jsonl from the toy world's seeded generators
    rlmt-edu pretrain                  # chapter 00: data/checkpoints/pretrained
    rlmt-edu sft                       # chapter 01: data/checkpoints/sft (from the pretrained checkpoint)
    rlmt-edu chat --question "what is 3 plus 4 ?"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "data" / "checkpoints"


def _print_table(title: str, metrics: dict) -> None:
    width = max(len(k) for k in metrics)
    print(f"\n{title}")
    print("-" * (width + 12))
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown:>9}")


def _replace(config, **overrides):
    """A frozen config with the overrides that are not None."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def cmd_data(args) -> int:
    from rlmt_edu.world.data import write_data

    written = write_data(args.out)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from rlmt_edu.chapters import PRETRAIN_CONFIG, run_pretrain

    config = _replace(PRETRAIN_CONFIG, steps=args.steps, seed=args.seed)
    _, _, metrics = run_pretrain(config, out=Path(args.out), device=args.device, progress=not args.quiet)
    _print_table(f"pretrained model saved to {args.out}", metrics)
    return 0


def cmd_sft(args) -> int:
    from rlmt_edu.chapters import SFT_CONFIG, run_sft

    config = _replace(SFT_CONFIG, steps=args.steps, seed=args.seed)
    _, _, metrics = run_sft(config, init=Path(args.init), out=Path(args.out), device=args.device,
                            progress=not args.quiet)
    _print_table(f"SFT model saved to {args.out}", metrics)
    return 0


def cmd_chat(args) -> int:
    import torch

    from rlmt_edu.evaluation import answer
    from rlmt_edu.model import load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint, device=args.device)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    greedy = args.temperature == 0

    def reply(question: str) -> str:
        return answer(model, tokenizer, [question], greedy=greedy, temperature=args.temperature or 1.0,
                      generator=generator, max_new_tokens=args.max_new_tokens)[0]

    if args.question is not None:
        print(reply(args.question))
        return 0
    print(f"chatting with {args.checkpoint} (empty line or Ctrl-D to stop)")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        try:
            print(f"model> {reply(question)}")
        except ValueError as error:
            print(f"(not asked: {error})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmt-edu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="regenerate the toy world's data files")
    p.add_argument("--out", default=str(REPO / "data"), help="folder to write to (default: the repo's data/)")
    p.set_defaults(func=cmd_data)

    for name, helptext, default_out in (
        ("pretrain", "pretrain a tiny GPT on the corpus (chapter 00)", CHECKPOINTS / "pretrained"),
        ("sft", "instruction-tune the pretrained model (chapter 01)", CHECKPOINTS / "sft"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", default=str(default_out), help=f"checkpoint folder (default: {default_out.relative_to(REPO)})")
        p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the chapter's)")
        p.add_argument("--seed", type=int, default=None, help="random seed (default: the chapter's)")
        p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda, then mps, then cpu)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "sft":
            p.add_argument("--init", default=str(CHECKPOINTS / "pretrained"), help="checkpoint to start from")
        p.set_defaults(func=cmd_pretrain if name == "pretrain" else cmd_sft)

    p = sub.add_parser("chat", help="ask a checkpoint questions")
    p.add_argument("--checkpoint", default=str(CHECKPOINTS / "sft"), help="checkpoint folder")
    p.add_argument("--question", default=None, help="ask one question and exit (non-interactive)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy answers (default)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"rlmt-edu {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
