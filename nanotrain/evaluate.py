"""Measure a checkpoint: `python -m nanotrain.evaluate --checkpoint PATH --data DIR`.

Prints the mean next-token loss (nats/token) and perplexity of the checkpoint on a split of a
dataset made by `nanotrain.prepare`; the work is inference/evaluation.py's `evaluate_checkpoint`, which
uses the training loop's batches and loss, so over the same windows (both lines name them) the
figure equals the val loss the run logged. Chapter: docs/10-generation-and-export.md.
"""

from __future__ import annotations

import argparse
import sys

from nanotrain.config import CHOICES
from nanotrain.data.loader import window_span
from nanotrain.errors import ArgumentParser, exit_on_error
from nanotrain.inference.evaluation import evaluate_checkpoint
from nanotrain.inference.sampling import check_device


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m nanotrain.evaluate",
                            description="Loss and perplexity of a checkpoint on a prepared dataset.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                        help="checkpoint directory, or a run directory or its checkpoints/ folder: the newest "
                             "complete checkpoint there")
    parser.add_argument("--data", required=True, default=argparse.SUPPRESS,
                        help="dataset directory made by nanotrain.prepare with the checkpoint's tokenizer")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="split to measure")
    parser.add_argument("--precision", default="fp32", choices=CHOICES["train.precision"], help="autocast precision")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward")
    parser.add_argument("--max_batches", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--seq_len", type=int, default=0, help="window length; 0 = the checkpoint's train.seq_len")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from nanotrain.checkpoint.inference import find_checkpoint  # lazily: `--help` needs no checkpoint code

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = check_device(args.device)
    r = evaluate_checkpoint(find_checkpoint(args.checkpoint), args.data, args.split, args.precision, device,
                            args.batch_size, args.max_batches, args.seq_len)
    print(f"{args.split} loss {r.loss:.4f} | perplexity {r.perplexity:.2f} | {r.tokens:,} tokens in "
          f"{window_span(r.windows, r.windows_total, args.split)} ({r.batches} batches) | "
          f"{args.precision} on {device} | {r.tokens / r.seconds:,.0f} tok/s")


if __name__ == "__main__":
    main()
