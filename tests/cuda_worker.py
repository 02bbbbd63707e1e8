"""One torchrun rank for tests/test_cuda.py (run it through torchrun, not pytest).

    torchrun --standalone --nproc_per_node=1 tests/cuda_worker.py tensor-parallel-1 DEVICE OUT.json
        Joins a one-process group through nanotrain's own `distributed.init` (NCCL on cuda, gloo
        on cpu), splits a tiny llama over a one-process tensor-parallel mesh on DEVICE with
        nanotrain's plan (tensor_parallel.apply_tensor_parallel), and writes to OUT.json the
        backend, the mesh's device type, how many parameters became DTensors, and how far the
        split model's loss and gradients are from the same model's unsplit (relative).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from nanotrain.config import load_config
from nanotrain.model.transformer import build_model
from nanotrain.parallel import distributed
from nanotrain.parallel.tensor_parallel import apply_tensor_parallel


def tensor_parallel_1(device_type: str, out_file: Path) -> None:
    cfg = load_config(None, ["--data.source=random", "--model.vocab_size=67", "--model.d_model=64",
                             "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=128",
                             "--train.seq_len=32", f"--train.device={device_type}"])
    dims = distributed.init(cfg)  # set_device, init_process_group(device_id=...), the one-axis mesh
    try:
        tp_mesh = init_device_mesh(dims.device.type, (1,), mesh_dim_names=("tp",))
        plain = build_model(cfg.model, seed=0).to(dims.device)
        split = build_model(cfg.model, seed=0).to(dims.device)
        apply_tensor_parallel(split, tp_mesh)
        ids = torch.randint(0, 67, (4, 32), generator=torch.Generator().manual_seed(0)).to(dims.device)

        def loss_and_grads(model):
            _, loss = model(ids, labels=ids, fused_loss=True)
            loss.backward()
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                     for n, p in model.named_parameters()}
            return loss.detach(), grads

        plain_loss, plain_grads = loss_and_grads(plain)
        split_loss, split_grads = loss_and_grads(split)
        record = {
            "backend": dist.get_backend(),
            "mesh": tp_mesh.device_type,
            "parameters": sum(1 for _ in split.parameters()),
            "dtensor_parameters": sum(hasattr(p, "full_tensor") for p in split.parameters()),
            "loss_difference": abs(split_loss.item() - plain_loss.item()) / plain_loss.item(),
            "largest_gradient_difference": max(((split_grads[n] - g).abs().max() / g.abs().max()).item()
                                               for n, g in plain_grads.items()),
        }
        out_file.write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "tensor-parallel-1":
        tensor_parallel_1(sys.argv[2], Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown check {sys.argv[1]!r}")
