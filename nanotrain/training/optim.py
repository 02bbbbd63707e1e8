"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule.

Chapter: docs/02-loss-and-train-loop.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nanotrain.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weight matrices; never norms, biases or embeddings (decaying those hurts)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters are yielded once
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the model's parameters; `implementation` picks the kernel.

    "auto" takes the fused kernel (one pass over all parameters, on CUDA and on CPU: on this
    2-core CPU it steps tinystories-20m in 77 ms against foreach's 328 ms, docs/08-performance.md);
    all three compute the same update as the per-parameter "for-loop".
    """
    implementation = cfg.implementation
    if implementation == "auto":
        implementation = "fused"
    kernel = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }[implementation]
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **kernel,
    )


# The keys the learning rate of a step depends on, as `--section.key` names for messages.
SCHEDULE_KEYS = ("train.lr", "train.max_steps", "optim.warmup_steps", "optim.decay_steps", "optim.min_lr_ratio")


@dataclass(frozen=True)
class Schedule:
    """Linear warmup over `warmup_steps` to `peak_lr`, then cosine decay to `peak_lr * min_lr_ratio` at `decay_end`.

    `decay_end` is `optim.decay_steps`, or `train.max_steps` when that is 0; after it the rate
    stays at its floor, so a run continued past its first end keeps the floor instead of a
    re-stretched cosine (docs/02-loss-and-train-loop.md).
    """

    peak_lr: float
    warmup_steps: int
    decay_end: int
    min_lr_ratio: float

    @classmethod
    def of(cls, config: dict) -> "Schedule":
        """The schedule of a config in `Config.to_dict()` form (a checkpoint's saved copy may predate decay_steps)."""
        train, optim = config["train"], config["optim"]
        return cls(train["lr"], optim["warmup_steps"], optim.get("decay_steps", 0) or train["max_steps"],
                   optim["min_lr_ratio"])

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that takes the weights from `step` to `step + 1`."""
        min_lr = self.peak_lr * self.min_lr_ratio
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step >= self.decay_end:
            return min_lr
        progress = (step - self.warmup_steps) / max(1, self.decay_end - self.warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak_lr - min_lr)

    def warmup_note(self, max_steps: int) -> str | None:
        """A line for a warmup that does not end before the run or the cosine does (None when it does)."""
        if self.warmup_steps >= max_steps:
            return (f"optim.warmup_steps = {self.warmup_steps} is not shorter than the run (train.max_steps = "
                    f"{max_steps}): the learning rate only ramps up, to {self.lr_at(max_steps - 1):.2e} at the last "
                    f"step (train.lr = {self.peak_lr:.2e}), and never decays; lower optim.warmup_steps")
        if self.warmup_steps >= self.decay_end:
            return (f"optim.warmup_steps = {self.warmup_steps} is not shorter than optim.decay_steps = "
                    f"{self.decay_end}: after warmup the learning rate drops from {self.peak_lr:.2e} straight to "
                    f"its floor {self.peak_lr * self.min_lr_ratio:.2e}, with no cosine; "
                    "lower optim.warmup_steps or raise optim.decay_steps")
        return None


def schedule_change(saved: dict, now: dict, step: int) -> str | None:
    """One line when a run resumed at `step` trains at other learning rates than its checkpoint's schedule gives.

    `saved` and `now` are configs in `Config.to_dict()` form: the checkpoint's and this run's.
    None when every step left to train (up to this run's train.max_steps) gets the same rate.
    """
    before, after = Schedule.of(saved), Schedule.of(now)
    first = next((s for s in range(step, now["train"]["max_steps"])
                  if not math.isclose(before.lr_at(s), after.lr_at(s), rel_tol=1e-9)), None)
    if first is None:
        return None
    changed = []
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        old, new = saved[section].get(name, 0), now[section][name]  # decay_steps: 0 before it existed
        if old != new:
            changed.append(f"{key} {old} -> {new}")
    line = (f"resume: the learning-rate schedule differs from the checkpoint's ({', '.join(changed)}): step "
            f"{first + 1} trains at lr {after.lr_at(first):.2e} where the checkpoint's schedule gives "
            f"{before.lr_at(first):.2e}")
    if before.decay_end != after.decay_end:
        line += (f"; the cosine now ends at step {after.decay_end}, not {before.decay_end} "
                 f"(--optim.decay_steps={before.decay_end} keeps the checkpoint's)")
    return line


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
