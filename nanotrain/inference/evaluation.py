"""Evaluation (library): the mean next-token loss of a model over batches, and of a checkpoint on a dataset.

`mean_loss` is what the training loop logs as val loss; `evaluate_checkpoint` is what the
command `python -m nanotrain.evaluate` (evaluate.py) runs: loss (nats/token) and perplexity
exp(loss) of a checkpoint on a split of a dataset made by `nanotrain.prepare`. Batches come
from data/loader.py's `evaluation_batches` (the samples, layout and order of training's loaders) and the
loss from `mean_loss`, the code the training loop uses, so over the same windows (which both name:
`data.window_span`) the figure equals the run's val loss. By default the whole split is used, as a
run evaluates a small one. Data tokenized otherwise than the checkpoint was trained is refused
with the command that prepares it again. Chapter: docs/10-generation-and-export.md.

Precision: fp32, or bf16 (autocast, CPU or CUDA), or fp16 (autocast, CUDA only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanotrain.config import validate
from nanotrain.data.loader import evaluation_batches, to_device
from nanotrain.data.sources import TokensSource
from nanotrain.errors import ConfigError, DataError, EvaluationError
from nanotrain.model.loss import count_valid_tokens
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.distributed import all_reduce_sum
from nanotrain.parallel.precision import Precision
from nanotrain.reporting.run_log import perplexity


@dataclass
class EvalResult:
    loss: float  # mean next-token loss over all valid tokens, nats
    perplexity: float
    tokens: int  # valid (predicted) tokens the mean is over
    batches: int
    seconds: float
    windows: int  # the split's samples the mean is over (data.window_span says which) ...
    windows_total: int  # ... of this many


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches, precision: Precision, dims: ParallelDims, *,
              fused_loss: bool) -> tuple[float, int]:
    """Mean next-token loss over this rank's `batches`, reduced over all ranks, and the valid tokens it covers.

    `fused_loss` is the run's train.fused_loss (head and loss in row chunks, no (B, T, V) logits),
    so evaluation computes the loss the way training does; every rank must call this together.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=dims.device, dtype=torch.float64)  # (loss sum, valid tokens)
    for batch in batches:
        batch = to_device(batch, dims.device)
        with precision.autocast():
            _, loss_sum = model(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"],
                                loss_reduction="sum", fused_loss=fused_loss)
        totals += torch.stack([loss_sum.double(), count_valid_tokens(batch["labels"]).double()])
    all_reduce_sum(totals, dims.loss_group)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str, split: str = "val", precision: str = "fp32",
                        device: str = "cpu", batch_size: int = 8, max_batches: int = 0,
                        seq_len: int = 0) -> EvalResult:
    """Loss and perplexity of `checkpoint` on a prepared dataset's split ("val" or "train").

    val: the split's first `max_batches` batches in order (0 = the whole split), as training
    evaluates. train: the first `max_batches` full batches of epoch 0 in training's shuffled order.
    `seq_len` 0 means the checkpoint's train.seq_len. A result over no predicted token is refused.
    """
    from nanotrain.checkpoint.inference import load_inference

    if split not in ("val", "train"):
        raise EvaluationError(f"--split must be val or train, got '{split}'")
    if batch_size <= 0 or max_batches < 0 or seq_len < 0:
        raise EvaluationError("--batch_size must be positive and --max_batches, --seq_len >= 0")
    if seq_len == 1:
        raise EvaluationError("--seq_len 1 leaves nothing to predict (a window of T tokens gives T-1 next-token "
                              "predictions); use --seq_len 2 or more, or 0 for the checkpoint's train.seq_len")
    model, cfg, tokenizer = load_inference(checkpoint, device=device)
    seq_len = seq_len or cfg.train.seq_len
    try:
        validate(replace(cfg, train=replace(cfg.train, seq_len=seq_len, batch_size=batch_size)))
        source = TokensSource(Path(data_dir))
        data_tokenizer = source.tokenizer
    except (ConfigError, DataError) as e:
        raise EvaluationError(str(e)) from None
    check_same_tokenizer(checkpoint, tokenizer, cfg.model.vocab_size, data_dir, data_tokenizer)

    chosen = evaluation_batches(source, split, seq_len, batch_size, cfg.data.mode == "padded", cfg.train.seed,
                                max_batches)
    if not chosen.count:
        raise EvaluationError(f"the {split} split of '{data_dir}' holds no full sequence of {seq_len} "
                              "tokens; lower --seq_len")

    dims = ParallelDims.single_process(device)
    try:
        amp = Precision(precision, dims.device, dims.strategy)
    except ConfigError as e:
        raise EvaluationError(str(e)) from None
    start = time.perf_counter()
    loss, tokens = mean_loss(model, chosen.batches, amp, dims, fused_loss=cfg.train.fused_loss)
    seconds = time.perf_counter() - start
    if tokens == 0:
        raise EvaluationError(f"the {split} windows of '{data_dir}' hold no token to predict at seq_len {seq_len} "
                              "(every label is padding); use a longer --seq_len")
    return EvalResult(loss, perplexity(loss), tokens, chosen.count, seconds, chosen.windows,
                      chosen.windows_total)


def check_same_tokenizer(
    checkpoint: str | Path, tokenizer, model_vocab_size: int, data_dir: str, data_tokenizer
) -> None:
    """Refuse data tokenized otherwise than the checkpoint's text was, naming the command that re-prepares it."""
    if tokenizer is None:  # trained on data.source = "random": any ids the model embeds are as good as its own
        if data_tokenizer.vocab_size > model_vocab_size:
            raise EvaluationError(
                f"dataset '{data_dir}' has a {data_tokenizer.vocab_size}-token vocabulary but checkpoint "
                f"'{checkpoint}' embeds {model_vocab_size} tokens and has no tokenizer (trained on random tokens); "
                f"it can only be evaluated on token ids below {model_vocab_size}")
        return
    if data_tokenizer.sha256 != tokenizer.sha256:
        sizes = (f" ({data_tokenizer.vocab_size:,} tokens there, {tokenizer.vocab_size:,} here)"
                 if data_tokenizer.vocab_size != tokenizer.vocab_size else "")
        raise EvaluationError(
            f"dataset '{data_dir}' was tokenized with another tokenizer than checkpoint '{checkpoint}'{sizes}; "
            f"prepare the text again with the checkpoint's tokenizer: python -m nanotrain.prepare INPUT ... "
            f"--out NEW_DIR --tokenizer {Path(checkpoint) / tokenizer.file_name}, then pass --data NEW_DIR"
        )
