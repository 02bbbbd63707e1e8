"""ParallelDims: validated degrees, sizes/ranks/groups/meshes by axis name, and the loss group (dp's) everyone uses.

The 2-rank checks run this file as a torchrun worker (gloo, CPU): each rank writes what it saw
to a JSON file and the test compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanotrain.config import load_config
from nanotrain.errors import ConfigError
from nanotrain.model.transformer import build_model
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import AXES, ParallelDims
from nanotrain.parallel.precision import Precision

REPO = Path(__file__).resolve().parent.parent
TINY = ["--data.source=random", "--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=64", "--train.device=cpu"]


def test_one_process_has_no_mesh_and_reduces_nothing():
    dims = ParallelDims.single_process("cpu")
    assert (dims.dp_size, dims.dp_rank, dims.is_main) == (1, 0, True)
    assert dims.mesh is None and dims.dp_mesh is None and dims.loss_group is None
    total = torch.tensor([2.0, 3.0])
    assert distributed.all_reduce_sum(total, dims.loss_group).tolist() == [2.0, 3.0]


def test_data_parallel_degree_is_the_world_size_and_rank_the_dp_rank():
    dims = ParallelDims(rank=3, local_rank=1, world_size=4, device="cpu", strategy="ddp")
    assert dims.degrees == {"dp": 4}
    assert (dims.dp_size, dims.dp_rank, dims.is_main) == (4, 3, False)


@pytest.mark.parametrize("rank, expected", [(0, {"dp": (2, 0), "tp": (2, 0)}), (1, {"dp": (2, 0), "tp": (2, 1)}),
                                             (2, {"dp": (2, 1), "tp": (2, 0)}), (3, {"dp": (2, 1), "tp": (2, 1)})])
def test_every_axis_answers_its_size_and_rank_by_name(rank, expected):
    dims = ParallelDims(rank=rank, local_rank=rank, world_size=4, device="cpu", strategy="ddp", tp=2)
    assert {axis: (dims.axis_size(axis), dims.axis_rank(axis)) for axis in AXES} == expected
    assert (dims.dp_size, dims.dp_rank, dims.tp_size, dims.tp_rank) == expected["dp"] + expected["tp"]  # shorthands
    assert dims.loss_size == 2  # the loss is summed over the dp ranks, not the world
    # before the mesh exists (and in one process) there is no group or sub-mesh to name
    assert [dims.axis_group(axis) for axis in AXES] + [dims.axis_mesh(axis) for axis in AXES] == [None] * 4
    assert dims.loss_group is None
    dp_only = ParallelDims(rank=rank, local_rank=rank, world_size=4, device="cpu", strategy="ddp")
    assert (dp_only.axis_size("tp"), dp_only.axis_rank("tp"), dp_only.axis_size("dp")) == (1, 0, 4)


@pytest.mark.parametrize("ask", ["axis_size", "axis_rank", "axis_group", "axis_mesh"])
def test_an_unknown_axis_is_refused_by_name(ask):
    dims = ParallelDims(rank=0, local_rank=0, world_size=2, device="cpu", strategy="ddp", tp=2)
    with pytest.raises(ValueError, match="unknown parallel axis 'cp'; the axes are dp, tp"):
        getattr(dims, ask)("cp")


@pytest.mark.parametrize("dp, rank, message", [
    (3, 0, "parallel degrees dp=3 need 3 processes, but 4 were launched"),
    (0, 0, "parallel degrees must be positive, got dp=0"),
    (4, 4, "RANK 4 is outside the world of 4 processes"),
])
def test_inconsistent_degrees_are_refused_in_one_line(dp, rank, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims(rank=rank, local_rank=0, world_size=4, device="cpu", strategy="ddp", dp=dp)


def test_fsdp_policy_comes_from_precision():
    bf16 = Precision("bf16", torch.device("cpu"), "fsdp").fsdp_policy()
    fp32 = Precision("fp32", torch.device("cpu"), "fsdp").fsdp_policy()
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, torch.float32)
    assert Precision("bf16", torch.device("cpu"), "fsdp").kv_cache_dtype == torch.bfloat16
    assert Precision("bf16", torch.device("cpu"), "none").kv_cache_dtype is None


def test_full_state_dict_in_one_process_is_the_plain_state_on_cpu():
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, seed=0)
    full = distributed.full_state_dict(model, ParallelDims.single_process("cpu"))
    assert full.keys() == model.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


def test_two_ranks_share_a_dp_mesh_that_ddp_fsdp_and_reductions_use(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(seen):
        assert report["dp"] == {"size": 2, "rank": rank, "mesh": ["dp"], "mesh_size": 2, "group_size": 2}
        assert report["sum_over_dp"] == [3.0, 2.0]  # (rank + 1, 1) summed over both ranks
        assert report["ddp_uses_dp_group"] is True
        assert report["fsdp_params_on_dp_mesh"] is True
        assert report["fsdp_bf16_logits"] == "torch.bfloat16"  # the policy parallel/precision.py produced was applied
        # dp 1 x tp 2: each axis's group and sub-mesh by name; the loss group is dp's, so a sum over it is this rank's
        assert report["tp2"] == {"group_sizes": {"dp": 1, "tp": 2}, "mesh_sizes": {"dp": 1, "tp": 2},
                                 "ranks": {"dp": 0, "tp": rank}, "loss_group_is_dp": True, "sum_over_loss": rank + 1.0}
    # gathered on rank 0 only, and equal to the unsharded model bit for bit
    assert seen[0]["full_state_equals_build_model"] is True and seen[1]["full_state_keys"] == 0


def _worker(out_dir: Path) -> None:
    """One rank of the 2-rank test: build the dims and the wrapped models, record what it sees."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    ddp_cfg = load_config(None, TINY + ["--parallel.strategy=ddp"])
    dims = distributed.init(ddp_cfg)
    report = {"dp": {"size": dims.dp_size, "rank": dims.dp_rank, "mesh": list(dims.mesh.mesh_dim_names),
                     "mesh_size": dims.dp_mesh.size(), "group_size": dist.get_world_size(dims.dp_group)}}
    report["sum_over_dp"] = distributed.all_reduce_sum(torch.tensor([dims.rank + 1.0, 1.0]), dims.dp_group).tolist()
    ddp_model = distributed.parallelize(build_model(ddp_cfg.model, seed=0), ddp_cfg, dims)
    report["ddp_uses_dp_group"] = ddp_model.process_group == dims.dp_group

    fsdp_cfg = load_config(None, TINY + ["--parallel.strategy=fsdp", "--train.precision=bf16"])
    dims = distributed.init(fsdp_cfg)
    reference = build_model(fsdp_cfg.model, seed=0).state_dict()
    model = distributed.parallelize(build_model(fsdp_cfg.model, seed=0), fsdp_cfg, dims,
                                    Precision("bf16", dims.device, dims.strategy))
    report["fsdp_params_on_dp_mesh"] = all(p.device_mesh == dims.dp_mesh for p in model.parameters())
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    report["fsdp_bf16_logits"] = str(logits.dtype)
    full = distributed.full_state_dict(model, dims)
    report["full_state_keys"] = len(full)
    report["full_state_equals_build_model"] = (full.keys() == reference.keys()
                                               and all(torch.equal(full[k], v) for k, v in reference.items()))

    tp2 = ParallelDims(rank=dims.rank, local_rank=dims.local_rank, world_size=2, device="cpu", strategy="none", tp=2)
    tp2.build_mesh()
    report["tp2"] = {"group_sizes": {axis: dist.get_world_size(tp2.axis_group(axis)) for axis in AXES},
                     "mesh_sizes": {axis: tp2.axis_mesh(axis).size() for axis in AXES},
                     "ranks": {axis: tp2.axis_rank(axis) for axis in AXES},
                     "loss_group_is_dp": tp2.loss_group == tp2.axis_group("dp"),
                     "sum_over_loss": distributed.all_reduce_sum(torch.tensor(dims.rank + 1.0), tp2.loss_group).item()}
    (out_dir / f"rank_{dims.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
