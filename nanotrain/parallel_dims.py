"""Where this process sits in the job: the one object that knows the world size.

Built once per run by `distributed.init` from the config and torchrun's environment. Everyone
else asks it for the degree and rank of the axis they care about — usually data parallelism
(`dp_size`, `dp_rank`), which decides the data order, the loss normalisation, evaluation's
reduction and the checkpoint layout — never for the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ParallelDims:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    strategy: str  # "none" | "ddp" | "fsdp": how the data-parallel axis holds the model

    @classmethod
    def single_process(cls, device: torch.device | str) -> "ParallelDims":
        """One process, no process group (generate, evaluate, bench)."""
        return cls(rank=0, local_rank=0, world_size=1, device=torch.device(device), strategy="none")

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many different batches one optimizer step sees at once."""
        return self.world_size

    @property
    def dp_rank(self) -> int:
        """This process's index on the data-parallel axis: which share of the global batch it takes."""
        return self.rank

    @property
    def is_main(self) -> bool:
        """Only the main process prints and writes files."""
        return self.rank == 0
