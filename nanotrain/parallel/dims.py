"""Where this process sits in the job: the one object that knows the world size.

Built once per run by `distributed.init` from the config and torchrun's environment (after
torchtitan's `ParallelDims` and picotron's process-group manager). The processes form a device
mesh with one named axis per kind of parallelism, outermost first: "dp" (data parallelism)
and, when `parallel.tp` > 1, "tp" (tensor parallelism) inside it, so the tp ranks of one dp
group are neighbours (on one node, where the per-layer all-reduces are cheapest). dp × tp is
the world size. Everyone else asks for the degree, rank and process group of the axis they care
about — data parallelism (`dp_size`, `dp_rank`, `dp_group`, `dp_mesh`) decides the data order,
the loss normalisation, evaluation's reduction and the checkpoint layout; tensor parallelism
(`tp_size`, `tp_rank`, `tp_mesh`) decides how each layer's weights are split — never the world size.

Adding an axis is one more degree field, one more entry in `degrees` and its
`*_size`/`*_rank`/`*_mesh` answers; the validation and the mesh follow from `degrees`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanotrain.errors import ConfigError


@dataclass
class ParallelDims:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    strategy: str  # "none" | "ddp" | "fsdp": how the data-parallel axis holds the model
    tp: int = 1  # tensor-parallel degree: how many processes share each layer's weights
    dp: int = -1  # data-parallel degree; -1: every process the other axes leave (world_size // tp)
    mesh: DeviceMesh | None = field(default=None, repr=False)  # set by build_mesh

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.tp < 1 or self.world_size % self.tp:
            raise ConfigError(
                f"parallel.tp = {self.tp} must divide the {self.world_size} launched processes (world = dp x tp); "
                f"launch a multiple of {max(self.tp, 1)} processes "
                f"or set --parallel.tp to a divisor of {self.world_size}"
            )
        if self.dp == -1:
            self.dp = self.world_size // self.tp
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
        """Each named axis of the device mesh and its degree, outermost first: the mesh's shape.

        An axis of degree 1 is left out, so a data-parallel-only job keeps its one-axis mesh over
        the default process group.
        """
        return {"dp": self.dp, **({"tp": self.tp} if self.tp > 1 else {})}

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
    def tp_size(self) -> int:
        """Tensor-parallel degree: how many processes hold the shards of one layer (1: no tensor parallelism)."""
        return self.tp

    @property
    def tp_rank(self) -> int:
        """This process's index on the tensor-parallel axis: which shard of each split weight it holds."""
        return self._coordinate("tp") if self.tp > 1 else 0

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The tensor-parallel axis of the mesh, which the layers' weights are split over; None without it."""
        return self.mesh["tp"] if self.mesh is not None and self.tp > 1 else None

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
