"""Where this process sits in the job: the one object that knows the world size.

Built once per run by `distributed.init` from the config and torchrun's environment (after
torchtitan's `ParallelDims` and picotron's process-group manager). The processes form a device
mesh with one named axis per kind of parallelism, outermost first; today there is one, "dp"
(data parallelism), and its degree is the world size. Everyone else asks for the degree, rank
and process group of the axis they care about — usually data parallelism (`dp_size`,
`dp_rank`, `dp_group`, `dp_mesh`), which decides the data order, the loss normalisation,
evaluation's reduction and the checkpoint layout — never for the world size.

Adding an axis (tensor parallelism, say) is one more degree field, one more entry in `degrees`
and its `*_size`/`*_rank`/`*_group` answers; the validation and the mesh follow from `degrees`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanotrain.config import ConfigError


@dataclass
class ParallelDims:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    strategy: str  # "none" | "ddp" | "fsdp": how the data-parallel axis holds the model
    dp: int = -1  # data-parallel degree; -1: every process the other axes leave (today: all of them)
    mesh: DeviceMesh | None = field(default=None, repr=False)  # set by build_mesh

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.dp == -1:
            self.dp = self.world_size
        if any(degree < 1 for degree in self.degrees.values()):
            raise ConfigError(f"parallel degrees must be positive, got {self._describe_degrees()}")
        if math.prod(self.degrees.values()) != self.world_size:
            raise ConfigError(
                f"parallel degrees {self._describe_degrees()} need {math.prod(self.degrees.values())} processes, "
                f"but {self.world_size} were launched; launch {math.prod(self.degrees.values())} "
                "(torchrun --nproc_per_node=N on each of the nodes) or change the degrees"
            )
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"RANK {self.rank} is outside the world of {self.world_size} processes; "
                              "launch with torchrun, which sets RANK and WORLD_SIZE consistently")

    @classmethod
    def single_process(cls, device: torch.device | str) -> "ParallelDims":
        """One process, no process group (generate, evaluate, bench)."""
        return cls(rank=0, local_rank=0, world_size=1, device=torch.device(device), strategy="none")

    @property
    def degrees(self) -> dict[str, int]:
        """Each named axis of the device mesh and its degree, outermost first: the mesh's shape."""
        return {"dp": self.dp}

    def build_mesh(self) -> None:
        """Arrange the processes of the joined process group into the device mesh (a collective).

        A one-axis mesh over the whole world reuses the default process group, so DDP and FSDP
        communicate exactly as they would without a mesh.
        """
        self.mesh = init_device_mesh(self.device.type, tuple(self.degrees.values()),
                                     mesh_dim_names=tuple(self.degrees))

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many different batches one optimizer step sees at once."""
        return self.dp

    @property
    def dp_rank(self) -> int:
        """This process's index on the data-parallel axis: which share of the global batch it takes."""
        return self._coordinate("dp")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The process group of the data-parallel axis (gradients and losses reduce over it); None in one process."""
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """The data-parallel axis of the mesh, which FSDP shards over; None in one process."""
        return self.mesh["dp"] if self.mesh is not None else None

    @property
    def is_main(self) -> bool:
        """Only the main process prints and writes files."""
        return self.rank == 0

    def _coordinate(self, axis: str) -> int:
        """This rank's index along `axis` of the row-major mesh (the layout init_device_mesh uses)."""
        inner = 1
        for name, degree in reversed(self.degrees.items()):
            if name == axis:
                return (self.rank // inner) % degree
            inner *= degree
        raise KeyError(axis)

    def _describe_degrees(self) -> str:
        return " x ".join(f"{name}={degree}" for name, degree in self.degrees.items())
