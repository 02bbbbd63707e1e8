"""Measure a checkpoint: `python -m nanotrain.evaluate --checkpoint PATH --data DIR`.

Prints the mean next-token loss (nats/token) and perplexity of the checkpoint on a split of a
dataset made by `nanotrain.prepare`; the work is evaluation.py's `evaluate_checkpoint`, which
uses the training loop's batches and loss, so the figure equals the val loss the run logged.
"""

from __future__ import annotations

import argparse
import sys

from nanotrain.config import CHOICES
from nanotrain.errors import ArgumentParser, exit_on_error
from nanotrain.evaluation import evaluate_checkpoint
from nanotrain.sampling import check_device


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m nanotrain.evaluate",
                            description="Loss and perplexity of a checkpoint on a prepared dataset.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--data", required=True, help="dataset directory made by nanotrain.prepare")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--precision", default="fp32", choices=CHOICES["train.precision"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_batches", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--seq_len", type=int, default=0, help="0 = the checkpoint's train.seq_len")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    r = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.precision, check_device(args.device),
                            args.batch_size, args.max_batches, args.seq_len)
    print(f"{args.split} loss {r.loss:.4f} | perplexity {r.perplexity:.2f} | {r.tokens:,} tokens in "
          f"{r.batches} batches | {args.precision} on {args.device} | {r.tokens / r.seconds:,.0f} tok/s")


if __name__ == "__main__":
    main()
