"""Preemption: SIGTERM or SIGINT asks the run to save and stop at the end of the current step.

The loop asks `requested()` once per step; every rank gets the same answer (a preemption notice
may reach only one rank), so all of them save together and leave the loop at the same step.
A second signal means "now": the default behaviour takes over.
"""

from __future__ import annotations

import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from nanotrain.parallel.dims import ParallelDims


class Preemption:
    """Installs SIGTERM/SIGINT handlers (when `enabled`) and tells the loop whether any rank got one."""

    def __init__(self, enabled: bool, dims: ParallelDims, timeout_s: float = 300.0):
        self.enabled = enabled
        self._signal_received = False
        self._group = None
        self._previous_handlers = {}
        if not enabled:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        if dist.is_initialized() and dims.world_size > 1:
            # Agreeing on the flag over gloo with a CPU tensor keeps the step free of device syncs. The side
            # group gets the run's collective timeout (parallel.timeout_s), not gloo's 30-minute default.
            self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                           if dist.get_backend() != "gloo" else dist.group.WORLD)

    def _on_signal(self, signum, frame) -> None:
        self._signal_received = True
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    def requested(self) -> bool:
        """Whether any rank was signalled; a collective when there are several ranks (all must call it)."""
        if not self.enabled:
            return False
        if self._group is None:
            return self._signal_received
        flag = torch.tensor([int(self._signal_received)])
        dist.all_reduce(flag, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        """Give SIGTERM/SIGINT back to whoever handled them before the run (a notebook, pytest)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
