"""One torchrun rank for tests/test_distributed.py (run it through torchrun, not pytest).

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py layouts SPEC.json OUT_DIR
        Joins the process group once, then for each {"name", "overrides"} in SPEC.json runs
        nanotrain.trainer.train() and has rank 0 save {losses, val_losses, state} to OUT_DIR/name.pt,
        state being the full (gathered, unwrapped) parameters. Runs whose name starts with "init-"
        save the parallelized model's parameters before any step instead of training.
    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py raise OVERRIDE ...
        The real entry point `nanotrain.train.main`, except that rank 1's third training
        micro-batch raises: the job must end promptly with that error shown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import nanotrain.train
import nanotrain.trainer
from nanotrain import distributed
from nanotrain.config import load_config
from nanotrain.model import build_model

INJECTED_ERROR = "injected failure on rank 1 at micro-batch 3"


def run_layouts(spec_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")  # held across runs: train() leaves a caller's group alone
    for run in json.loads(Path(spec_file).read_text()):
        cfg = load_config(None, run["overrides"])
        dims = distributed.init(cfg)
        if run["name"].startswith("init-"):
            model = distributed.parallelize(build_model(cfg.model, seed=cfg.train.seed), cfg, dims)
            record = {"state": distributed.full_state_dict(model, dims)}
        else:
            result = nanotrain.trainer.train(cfg)
            record = {"losses": result.losses, "val_losses": result.val_losses,
                      "state": distributed.full_state_dict(result.model, dims)}
        if dist.get_rank() == 0:
            torch.save(record, Path(out_dir) / f"{run['name']}.pt")
    dist.destroy_process_group()


def raise_on_rank_1(overrides: list[str]) -> None:
    real_build_data = nanotrain.trainer.build_data

    def build_data_that_fails(cfg, rank, world_size):
        data = real_build_data(cfg, rank, world_size)
        if rank == 1:
            batches = data.train

            class FailingBatches:
                def __iter__(self):
                    return self

                def __next__(self):
                    if batches.micro_batches == 2:
                        raise RuntimeError(INJECTED_ERROR)
                    return next(batches)

                def __getattr__(self, name):  # state_dict() and friends for the checkpointer
                    return getattr(batches, name)

            data.train = FailingBatches()
        return data

    nanotrain.trainer.build_data = build_data_that_fails
    nanotrain.train.main(overrides)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "layouts":
        run_layouts(*args)
    elif mode == "raise":
        raise_on_rank_1(args)
    else:
        raise SystemExit(f"unknown mode {mode!r}: use 'layouts' or 'raise'")
