"""Measure a checkpoint: `python -m nanotrain.evaluate --checkpoint PATH --data DIR`.

Prints the mean next-token loss (nats/token) and perplexity exp(loss) of the checkpoint on a
split of a dataset made by `nanotrain.prepare`. Batches come from data.py's `build_data`, the
same code the training loop uses, and the loss from train.py's `evaluate`, so with the training
run's seq_len, batch size and eval_steps the figure equals the val loss the run logged.
By default every full batch of the split is used.

Precision: fp32, or bf16 (autocast, CPU or CUDA), or fp16 (autocast, CUDA only).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch

from nanotrain.config import ConfigError, validate
from nanotrain.data import DataError, build_data, to_device
from nanotrain.distributed import DistEnv, all_reduce_sum
from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error
from nanotrain.generate import check_device
from nanotrain.loss import count_valid_tokens
from nanotrain.precision import Precision

ALL_BATCHES = 10**9  # "as many eval steps as the split holds"; build_data caps it at the split's size


class EvaluationError(NanotrainError):
    """Evaluation input that does not fit together, in one line."""


@dataclass
class EvalResult:
    loss: float  # mean next-token loss over all valid tokens, nats
    perplexity: float
    tokens: int  # valid (predicted) tokens the mean is over
    batches: int
    seconds: float


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches, precision: Precision, env: DistEnv) -> tuple[float, int]:
    """Mean next-token loss over this rank's `batches`, reduced over all ranks, and the valid tokens it covers.

    The head and the loss run fused (no (B, T, V) logits); every rank must call this together.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=env.device, dtype=torch.float64)  # (loss sum, valid tokens)
    for batch in batches:
        batch = to_device(batch, env.device)
        with precision.autocast():
            _, loss_sum = model(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"],
                                loss_reduction="sum", fused_loss=True)
        totals += torch.stack([loss_sum.double(), count_valid_tokens(batch["labels"]).double()])
    all_reduce_sum(totals)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())


def evaluate_checkpoint(checkpoint: str, data_dir: str, split: str = "val", precision: str = "fp32",
                        device: str = "cpu", batch_size: int = 8, max_batches: int = 0,
                        seq_len: int = 0) -> EvalResult:
    """Loss and perplexity of `checkpoint` on a prepared dataset's split ("val" or "train").

    val: the split's first `max_batches` full batches in order (0 = all of them), as training
    evaluates. train: the first `max_batches` batches of epoch 0 in training's shuffled order.
    `seq_len` 0 means the checkpoint's train.seq_len.
    """
    from nanotrain.checkpoint import load_inference

    if split not in ("val", "train"):
        raise EvaluationError(f"--split must be val or train, got '{split}'")
    if batch_size <= 0 or max_batches < 0 or seq_len < 0:
        raise EvaluationError("--batch_size must be positive and --max_batches, --seq_len >= 0")
    model, cfg, tokenizer = load_inference(checkpoint, device=device)
    cfg.data.source, cfg.data.path, cfg.data.num_workers = "tokens", str(data_dir), 0
    cfg.train.batch_size, cfg.train.grad_accum_steps = batch_size, 1
    cfg.train.seq_len = seq_len or cfg.train.seq_len
    cfg.train.eval_steps = max_batches if (split == "val" and max_batches) else ALL_BATCHES
    try:
        validate(cfg)
        data = build_data(cfg)
    except (ConfigError, DataError) as e:
        raise EvaluationError(str(e)) from None
    if tokenizer is not None and data.tokenizer.sha256 != tokenizer.sha256:
        raise EvaluationError(
            f"dataset '{data_dir}' was tokenized with a different tokenizer than checkpoint '{checkpoint}' "
            "(sha256 differs); prepare the data with --tokenizer CHECKPOINT/tokenizer.model"
        )

    if split == "val":
        batch_count, batches = data.num_val_batches, data.val_batches()
    else:  # one pass over epoch 0 of the shuffled order (or its first max_batches batches)
        per_epoch = data.train.order.num_samples // batch_size
        batch_count = min(max_batches or per_epoch, per_epoch)
        batches = (next(data.train) for _ in range(batch_count))
    if not batch_count:
        raise EvaluationError(f"the {split} split of '{data_dir}' holds no full sequence of {cfg.train.seq_len} "
                              "tokens; lower --seq_len")

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device(device), strategy="none")
    try:
        amp = Precision(precision, env.device, env.strategy)
    except ConfigError as e:
        raise EvaluationError(str(e)) from None
    start = time.perf_counter()
    loss, tokens = mean_loss(model, batches, amp, env)
    seconds = time.perf_counter() - start
    return EvalResult(loss, math.exp(min(loss, 50.0)), tokens, batch_count, seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m nanotrain.evaluate",
                            description="Loss and perplexity of a checkpoint on a prepared dataset.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--data", required=True, help="dataset directory made by nanotrain.prepare")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
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
