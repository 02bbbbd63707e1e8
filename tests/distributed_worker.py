"""One torchrun rank for tests/test_distributed.py (run it through torchrun, not pytest).

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py layouts SPEC.json OUT_DIR
        Joins the process group once, then for each {"name", "overrides"} in SPEC.json runs
        nanotrain.training.trainer.train() and has rank 0 save {losses, val_losses, state} to OUT_DIR/name.pt,
        state being the full (gathered, unwrapped) parameters. Runs whose name starts with "init-"
        save the parallelized model's parameters before any step instead of training. The entry
        named "tensor-parallel-checks" (2 ranks) splits a tiny llama (vocabulary 67: an uneven
        split) over 2 tensor-parallel ranks instead, and has rank 0 write to OUT_DIR/that name.json
        how far its loss, gradients and cached-generation logits are from the same model's in one
        process, and how many whole-vocabulary tensors each made.
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
import nanotrain.training.trainer
from nanotrain.config import load_config
from nanotrain.model.transformer import build_model
from nanotrain.parallel import distributed

INJECTED_ERROR = "injected failure on rank 1 at micro-batch 3"


def run_layouts(spec_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")  # held across runs: train() leaves a caller's group alone
    for run in json.loads(Path(spec_file).read_text()):
        if run["name"] == "tensor-parallel-checks":
            tensor_parallel_checks(Path(out_dir) / f"{run['name']}.json")
            continue
        cfg = load_config(None, run["overrides"])
        dims = distributed.init(cfg)
        if run["name"].startswith("init-"):
            model = distributed.parallelize(build_model(cfg.model, seed=cfg.train.seed), cfg, dims)
            record = {"state": distributed.full_state_dict(model, dims)}
        else:
            result = nanotrain.training.trainer.train(cfg)
            record = {"losses": result.losses, "val_losses": result.val_losses,
                      "state": distributed.full_state_dict(result.model, dims)}
        if dist.get_rank() == 0:
            torch.save(record, Path(out_dir) / f"{run['name']}.pt")
    dist.destroy_process_group()


def tensor_parallel_checks(out_file: Path) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from nanotrain.parallel.tensor_parallel import VocabParallelHead

    class VocabularyWideTensors(TorchDispatchMode):
        """Counts the tensors operations produce with a dimension as long as the whole vocabulary (67)."""

        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                self.count += isinstance(t, torch.Tensor) and 67 in t.shape
            return out

    overrides = ["--data.source=random", "--model.vocab_size=67", "--model.d_model=32", "--model.n_layers=2",
                 "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=64", "--train.device=cpu",
                 "--parallel.tp=2", "--train.seq_len=16"]
    cfg = load_config(None, overrides)
    dims = distributed.init(cfg)
    plain = build_model(cfg.model, seed=0)
    split = {"tp": distributed.parallelize(build_model(cfg.model, seed=0), cfg, dims)}
    sequence_cfg = load_config(None, overrides + ["--parallel.sequence_parallel=true"])
    split["sequence-parallel"] = distributed.parallelize(build_model(cfg.model, seed=0), sequence_cfg, dims)
    assert all(isinstance(model.lm_head, VocabParallelHead) for model in split.values())
    with torch.no_grad():  # under sequence parallelism the residual stream is split by position
        assert split["sequence-parallel"].tok_embeddings(torch.zeros(1, 4, dtype=torch.long)).placements[0].is_shard(1)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 67, (4, 15), generator=generator)  # 15 positions: an uneven split by position too
    labels = ids.clone()
    labels[0, :5] = -100  # prompt-like positions that carry no loss
    labels[3, 10:] = -100

    def loss_and_grads(model):
        model.zero_grad()
        _, loss_sum = model(ids, labels=labels, loss_reduction="sum")
        loss_sum.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in model.named_parameters()}
        return loss_sum.detach(), grads

    def cached_logits(model):  # prefill 10 tokens, then 3 one-token steps, through the KV cache
        cache = model.new_kv_cache(4, 16)
        with torch.no_grad():
            return [model(chunk, kv_cache=cache)[0]
                    for chunk in (ids[:, :10], ids[:, 10:11], ids[:, 11:12], ids[:, 12:13])]

    plain_loss, plain_grads = loss_and_grads(plain)
    plain_logits = cached_logits(plain)
    probes = {}
    record = {}
    for name, model in (("plain", plain), *split.items()):
        with torch.no_grad(), VocabularyWideTensors() as probes[name]:
            model(ids, labels=labels, loss_reduction="sum")
    for name, model in split.items():
        loss, grads = loss_and_grads(model)
        record[name] = {
            "loss": abs(loss.item() - plain_loss.item()) / plain_loss.item(),
            "grads": max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in plain_grads.items()),
            "generation_logits": max((a - b).abs().max().item() for a, b in zip(cached_logits(model), plain_logits)),
        }
    record["vocabulary_wide_tensors"] = {name: probe.count for name, probe in probes.items()}
    if dist.get_rank() == 0:
        out_file.write_text(json.dumps(record))


def raise_on_rank_1(overrides: list[str]) -> None:
    real_build_data = nanotrain.training.trainer.build_data

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

    nanotrain.training.trainer.build_data = build_data_that_fails
    nanotrain.train.main(overrides)


@distributed.torchrun_entry  # a rank exits the way nanotrain.train's ranks do (no crash at interpreter exit)
def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "layouts":
        run_layouts(*args)
    elif mode == "raise":
        raise_on_rank_1(args)
    else:
        raise SystemExit(f"unknown mode {mode!r}: use 'layouts' or 'raise'")


if __name__ == "__main__":
    main()
