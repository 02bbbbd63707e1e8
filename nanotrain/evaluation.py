"""Evaluation (library): the mean next-token loss of a model over batches, and of a checkpoint on a dataset.

`mean_loss` is what the training loop logs as val loss; `evaluate_checkpoint` is what the
command `python -m nanotrain.evaluate` (evaluate.py) runs: loss (nats/token) and perplexity
exp(loss) of a checkpoint on a split of a dataset made by `nanotrain.prepare`. Batches come
from data.py's `build_data` and the loss from `mean_loss`, the same code the training loop
uses, so with the run's seq_len, batch size and eval_steps the figure equals its val loss.
By default every full batch of the split is used.

Precision: fp32, or bf16 (autocast, CPU or CUDA), or fp16 (autocast, CUDA only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from nanotrain.config import ConfigError, validate
from nanotrain.data import DataError, build_data, to_device
from nanotrain.distributed import all_reduce_sum
from nanotrain.errors import NanotrainError
from nanotrain.loss import count_valid_tokens
from nanotrain.parallel_dims import ParallelDims
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
def mean_loss(model: torch.nn.Module, batches, precision: Precision, dims: ParallelDims) -> tuple[float, int]:
    """Mean next-token loss over this rank's `batches`, reduced over all ranks, and the valid tokens it covers.

    The head and the loss run fused (no (B, T, V) logits); every rank must call this together.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=dims.device, dtype=torch.float64)  # (loss sum, valid tokens)
    for batch in batches:
        batch = to_device(batch, dims.device)
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

    dims = ParallelDims.single_process(device)
    try:
        amp = Precision(precision, dims.device, dims.strategy)
    except ConfigError as e:
        raise EvaluationError(str(e)) from None
    start = time.perf_counter()
    loss, tokens = mean_loss(model, batches, amp, dims)
    seconds = time.perf_counter() - start
    return EvalResult(loss, math.exp(min(loss, 50.0)), tokens, batch_count, seconds)
