"""Where this process sits in the job: the one object that knows the world size.

Built once per run by `distributed.init` from the config and torchrun's environment (after
torchtitan's `ParallelDims` and picotron's process-group manager). The processes form a device
mesh with one named axis per kind of parallelism, outermost first: "dp" (data parallelism)
and, when `parallel.tp` > 1, "tp" (tensor parallelism) inside it, so the tp ranks of one dp
group are neighbours (on one node, where the per-layer all-reduces are cheapest). dp × tp is
the world size. Everyone else asks by axis name — `axis_size`, `axis_rank`, `axis_group`,
`axis_mesh` — never the world size: the dp axis decides the data order and the checkpoint
layout, the tp axis how each layer's weights are split. The loss and valid tokens are summed
over `loss_group` (the ranks that see different tokens), which the step and evaluation use
without naming an axis. Chapter: docs/11-architecture.md ("add a parallel axis").

Adding an axis is one more degree field named after it and one more entry in `AXES`; the mesh
and the per-axis answers follow (and `loss_group` widens if the axis splits the tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanotrain.errors import ConfigError

AXES = ("dp", "tp")  # every axis a job may split over, outermost first; each is a degree field of ParallelDims


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

        An axis of degree 1 other than dp is left out, so a data-parallel-only job keeps its
        one-axis mesh over the default process group.
        """
        return {axis: getattr(self, axis) for axis in AXES if axis == "dp" or getattr(self, axis) > 1}

    def build_mesh(self) -> None:
        """Arrange the processes of the joined process group into the device mesh (a collective).

        A one-axis mesh over the whole world reuses the default process group, so DDP and FSDP
        communicate exactly as they would without a mesh.
        """
        self.mesh = init_device_mesh(self.device.type, tuple(self.degrees.values()),
                                     mesh_dim_names=tuple(self.degrees))

    def axis_size(self, axis: str) -> int:
        """The degree of `axis`: how many processes it spans (1 for an axis this job does not split over)."""
        return getattr(self, self._known(axis))

    def axis_rank(self, axis: str) -> int:
        """This process's index along `axis` (0 for an axis of degree 1)."""
        return self._coordinate(axis) if self._known(axis) in self.degrees else 0

    def axis_group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group of `axis`; None in one process or for an axis of degree 1."""
        return self.mesh.get_group(axis) if self._on_mesh(axis) else None

    def axis_mesh(self, axis: str) -> DeviceMesh | None:
        """The one-axis sub-mesh of `axis` (what FSDP shards and tensor parallelism splits over), or None."""
        return self.mesh[axis] if self._on_mesh(axis) else None

    # The ranks that see different tokens: the loss and valid tokens are summed over them, and the
    # gradient wrappers average over them. Data parallelism today; with context parallelism, dp x cp.
    @property
    def loss_group(self) -> dist.ProcessGroup | None:
        """The process group the step's loss and valid tokens are summed over; None in one process."""
        return self.axis_group("dp")

    @property
    def loss_size(self) -> int:
        """How many ranks `loss_group` spans: the factor that turns the wrappers' gradient mean back into a sum."""
        return self.axis_size("dp")

    # Shorthands for the two axes the layers name today; a new axis needs none.
    dp_size = property(lambda self: self.axis_size("dp"))
    dp_rank = property(lambda self: self.axis_rank("dp"))
    dp_group = property(lambda self: self.axis_group("dp"))
    dp_mesh = property(lambda self: self.axis_mesh("dp"))
    tp_size = property(lambda self: self.axis_size("tp"))
    tp_rank = property(lambda self: self.axis_rank("tp"))
    tp_mesh = property(lambda self: self.axis_mesh("tp"))

    @property
    def is_main(self) -> bool:
        """Only the main process prints and writes files."""
        return self.rank == 0

    def _known(self, axis: str) -> str:
        if axis not in AXES:
            raise ValueError(f"unknown parallel axis '{axis}'; the axes are {', '.join(AXES)}")
        return axis

    def _on_mesh(self, axis: str) -> bool:
        return self._known(axis) in self.degrees and self.mesh is not None

    def _coordinate(self, axis: str) -> int:
        """This rank's index along `axis` of the row-major mesh (the layout init_device_mesh uses)."""
        degrees = list(self.degrees.values())
        inner = math.prod(degrees[list(self.degrees).index(axis) + 1:])
        return (self.rank // inner) % self.degrees[axis]

    def _describe_degrees(self) -> str:
        return " x ".join(f"{name}={degree}" for name, degree in self.degrees.items())
