"""Divergence: which steps are unhealthy, when a run must stop, and which checkpoint to go back to.

Before each update the loop hands `DivergenceGuard.check` the step's loss (over all ranks and
micro-batches) and its gradient norm. A step is unhealthy when either is not finite, or when the
loss spikes: it rises above the running mean of recent healthy losses by more than
(`train.loss_spike_ratio` - 1) x max(mean, 1 nat). Above 1 nat/token that is "more than R times
the recent mean"; below it, a rise of more than R - 1 nats, because there a few hard tokens move
a batch's mean loss by a large fraction without anything being wrong.

An unhealthy step stops the run (`train.on_nonfinite = stop`) or has its update skipped (`skip`);
`train.max_consecutive_skips` skipped updates in a row (fp16's own overflow skips included) stop
it too. The loss at step k measures the weights after step k - 1, so the guard also knows which
checkpoints hold weights it has seen healthy, and the stop message names the newest of them.
"""

from __future__ import annotations

import math
from pathlib import Path

from nanotrain.checkpoint.manifest import list_checkpoints
from nanotrain.config import TrainConfig
from nanotrain.errors import DivergenceError

# The running mean covers about the last 20 healthy steps: long enough that a model blowing up over
# a few steps is still compared with its healthy past. During the early fast drop it lags above the
# loss, which only makes the check more lenient there.
MEAN_SMOOTHING = 1 / 20


class DivergenceGuard:
    """Judges each step before its update and counts skipped updates; raises DivergenceError to stop.

    `start_step` is the step the run starts (or resumes) from: its weights count as healthy.
    `checkpoint_root` is where the run's checkpoints are published.
    """

    def __init__(self, t: TrainConfig, start_step: int, checkpoint_root: Path):
        self.t = t
        self.checkpoint_root = checkpoint_root
        self.mean_loss: float | None = None  # running mean of healthy losses; None until the first one
        self.healthy = True  # whether the newest check passed (a checkpoint of the weights is safe)
        self.verified_step = start_step  # newest step whose weights gave a healthy loss
        self.consecutive_skips = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Judge step `step` (1-based) before its update: None if healthy, else what is wrong.

        Stops the run here under `train.on_nonfinite = stop`. Pass a grad_norm of 0 when fp16's
        GradScaler judges the gradient itself (an overflow there is a loss-scale matter).
        """
        problem, remedy = None, "or set train.on_nonfinite=skip to skip such steps"
        if not math.isfinite(loss):
            problem = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            problem = f"non-finite gradient norm ({grad_norm}) at loss {loss:.4g}"
        elif self._is_spike(loss):
            problem = (f"loss spike to {loss:.4g} from a recent mean of {self.mean_loss:.4g} "
                       f"(train.loss_spike_ratio={self.t.loss_spike_ratio:g})")
            remedy = "or raise train.loss_spike_ratio (0 turns the spike check off) if such spikes are expected"
        self.healthy = problem is None
        if self.healthy:
            self.verified_step = step - 1
            previous = loss if self.mean_loss is None else self.mean_loss
            self.mean_loss = previous + MEAN_SMOOTHING * (loss - previous)
        elif self.t.on_nonfinite == "stop":
            raise DivergenceError(f"step {step}: {problem}; {self._way_back()}, {remedy}")
        return problem

    def _is_spike(self, loss: float) -> bool:
        ratio = self.t.loss_spike_ratio
        if not ratio or self.mean_loss is None:
            return False
        return loss - self.mean_loss > (ratio - 1) * max(self.mean_loss, 1.0)

    def update_applied(self) -> None:
        """The step's update reached the weights."""
        self.consecutive_skips = 0

    def update_skipped(self, step: int, why: str) -> None:
        """The step's update was dropped (by the skip policy or fp16's GradScaler); stop after too many in a row."""
        self.consecutive_skips += 1
        limit = self.t.max_consecutive_skips
        if self.consecutive_skips >= limit:
            first = step - limit + 1
            raise DivergenceError(
                f"step {step}: the run has diverged: {limit} updates in a row were skipped (steps {first}-{step}, "
                f"train.max_consecutive_skips={limit}; the last: {why}); {self._way_back()}"
            )

    def _way_back(self) -> str:
        """How to go on: resume from the newest checkpoint whose weights were seen healthy."""
        good = [path for step, path in list_checkpoints(self.checkpoint_root) if step <= self.verified_step]
        if good:
            return f"lower train.lr and resume from the last healthy checkpoint with --checkpoint.resume={good[0]}"
        return "lower train.lr and start afresh in a new --train.out_dir (no checkpoint holds healthy weights)"
