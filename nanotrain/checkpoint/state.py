"""The loop's own state, apart from checkpoint I/O: its counters and this process's random streams.

Both are Stateful in torchtitan's sense (`state_dict()` / `load_state_dict()`), like the data
loader, so the checkpointer saves and restores them without knowing what is inside:
`TrainState` goes to trainer_state.json, `RandomState` to the per-rank `rank_NNNNN.pt`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from one integer (any size)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy takes 32-bit seeds only
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken, tokens trained on, updates skipped as unhealthy."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped by training/divergence.py's policy (train.on_nonfinite = skip)

    def advance(self, tokens: int) -> int:
        """Count one optimizer step over `tokens` tokens; return the new step."""
        self.step += 1
        self.tokens_seen += tokens
        return self.step

    def state_dict(self) -> dict:
        """The counters, in trainer_state.json's order."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        """Take the counters from `state_dict()`'s output (a checkpoint's trainer_state.json)."""
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]


class RandomState:
    """Every random stream this process draws from (Python, NumPy, torch CPU and, on a GPU, CUDA).

    The state dict holds only tensors, numbers and tuples, so `torch.load(weights_only=True)` reads it.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        """A snapshot of every stream."""
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
            "torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Put every stream back where `state_dict()` found it."""
        random.setstate(state["python"])
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_gauss"]))
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    @staticmethod
    def reseed(seed: int, step: int, rank: int) -> None:
        """Fresh streams for `rank` at `step`, for a resume whose saved streams belong to another layout."""
        seed_everything(seed + 1_000_003 * step + rank)
