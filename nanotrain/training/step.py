"""One optimizer step (library): micro-batches in; loss, gradient norm and whether the update was applied out.

The training loop (training/trainer.py) calls `train_step` once per iteration and the benchmark
(bench.py) times the same function, so what is benchmarked is what trains:

    schedule (forward_backward)  runs the micro-batches, accumulates the gradient, and returns the
                                 step's loss sum and valid tokens over the loss group, on every rank:
      global valid tokens          summed over the micro-batches and `dims.loss_group`
      per micro-batch              autocast forward -> loss_sum * loss_size / global valid tokens
                                   -> scaled backward (gradient sync on the last micro-batch only)
    unscale, clip                then one host sync reads the step's loss and gradient norm
    judge                        the divergence guard's verdict (optional): apply or skip
    optimizer step, zero_grad    through fp16's GradScaler, which may skip an overflowing step

Learning-rate scheduling, fetching the micro-batches (timed as data wait), logging and the
guard's count of skipped updates stay in the loop. A parallel axis that runs the micro-batches
otherwise (a pipeline schedule) passes its own `schedule` with `forward_backward`'s contract.
Chapter: docs/05-gradient-accumulation.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanotrain.data.loader import to_device
from nanotrain.model.loss import count_valid_tokens
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision

# Runs one step's micro-batches forward and backward: (model, micro_batches, dims, precision, *, fused_loss)
# -> (loss sum, valid tokens) of the whole step over `dims.loss_group`, 0-d float32 on dims.device, equal on every
# rank (a pipeline's last stage, which alone has the loss, must share it). The gradient it leaves is that of
# (loss sum) / (valid tokens), ready for the optimizer.
Schedule = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# Judges a step before its update from (mean loss, gradient norm): None to apply it, else what is wrong.
Judge = Callable[[float, float], str | None]


@dataclass
class StepOutcome:
    """What one optimizer step did, in plain numbers (read from the device in one sync)."""

    loss: float  # mean loss per valid token over all micro-batches and the loss group's ranks
    grad_norm: float  # global gradient norm before clipping
    valid_tokens: int  # valid (predicted) tokens of the step over the loss group's ranks
    rejected: str | None = None  # the judge's reason for not applying the update
    loss_scale_drop: tuple[float, float] | None = None  # fp16: (scale before, after) when an overflow skipped it

    @property
    def applied(self) -> bool:
        """Whether the update reached the weights."""
        return self.rejected is None and self.loss_scale_drop is None


def forward_backward(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], dims: ParallelDims,
                     precision: Precision, *, fused_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient accumulation over `micro_batches` on one model: the default `Schedule` (see its contract)."""
    # Normalising by the whole step's valid tokens on all ranks needs them before the first backward.
    valid_tokens = sum(count_valid_tokens(b["labels"]) for b in micro_batches)
    global_valid_tokens = distributed.all_reduce_sum(valid_tokens.to(dims.device, torch.float32), dims.loss_group)
    normaliser = global_valid_tokens.clamp(min=1)

    step_loss_sum = torch.zeros((), device=dims.device)
    for micro_step, batch in enumerate(micro_batches):
        batch = to_device(batch, dims.device)
        is_last = micro_step == len(micro_batches) - 1
        with distributed.gradient_sync(model, dims, enabled=is_last):
            with precision.autocast():
                _, loss_sum = model(  # fused_loss: head + loss in chunks, no (B, T, V) logits
                    batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"],
                    loss_reduction="sum", fused_loss=fused_loss,
                )
            # DDP and FSDP average gradients over the loss group; scaling by its size turns that mean
            # back into a sum, so the step's gradient is that of (all losses) / (all valid tokens).
            loss = loss_sum * (dims.loss_size / normaliser)
            precision.scaler.scale(loss).backward()
        step_loss_sum += loss_sum.detach()
    return distributed.all_reduce_sum(step_loss_sum, dims.loss_group), global_valid_tokens


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
               dims: ParallelDims, precision: Precision, *, grad_clip: float, fused_loss: bool,
               judge: Judge | None = None, schedule: Schedule = forward_backward) -> StepOutcome:
    """Accumulate the gradient of `micro_batches` (this rank's share of one step) and apply it unless judged bad.

    The gradient is that of (all ranks' summed losses) / (all ranks' valid tokens), as if the
    step were one big batch; `schedule` runs the micro-batches (default: `forward_backward`).
    `judge` (e.g. the divergence guard's check for this step) sees the loss and gradient norm
    before the update; without one, every update is applied unless fp16's GradScaler finds an
    overflow. Every rank must call this together.
    """
    loss_sum, valid_tokens = schedule(model, micro_batches, dims, precision, fused_loss=fused_loss)
    precision.scaler.unscale_(optimizer)
    grad_norm = distributed.clip_grad_norm(model, grad_clip)
    # One scalar host sync per step: the judge needs the loss and gradient norm before the update.
    step_loss = loss_sum / valid_tokens.clamp(min=1)
    loss_value, norm, tokens = torch.stack([step_loss, grad_norm, valid_tokens]).tolist()
    outcome = StepOutcome(loss_value, norm, int(tokens))
    # fp16's GradScaler judges the gradient itself: an overflow there calls for a lower loss
    # scale, not for the judge's skip policy.
    outcome.rejected = judge(loss_value, 0.0 if precision.scaler.is_enabled() else norm) if judge else None
    if outcome.rejected:
        precision.scaler.update()  # fp16: ends this step's unscale_ (and lowers the scale on overflow)
    else:
        scale_before = precision.scaler.get_scale() if precision.scaler.is_enabled() else None
        precision.scaler.step(optimizer)
        precision.scaler.update()
        if scale_before is not None and precision.scaler.get_scale() < scale_before:
            outcome.loss_scale_drop = (scale_before, precision.scaler.get_scale())
    optimizer.zero_grad(set_to_none=True)
    return outcome
