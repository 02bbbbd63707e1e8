"""Per-rank memory and step time of a parallel layout: `python -m nanotrain.bench --layouts` (docs/benchmarks.md).

The model is built and trained as `nanotrain.train` builds it (distributed.init, build_model,
parallelize, build_optimizer, train_step) from a preset (default tinystories-20m) at seq 256,
fp32, dropout 0, on random tokens (`data.source = "random"`: nothing is read or downloaded);
any `--section.key=value` override goes on top. The global batch is the same in every layout:
each data-parallel rank takes global_batch / dp sequences per step, and every tp rank of a dp
group the same ones.

Activations: the bytes the first warm-up step's forward saves for backward (local shards,
parameters left out), the memory that sequence parallelism divides.

Memory is counted, not sampled: right after the optimizer's step (when gradients and optimizer
state both exist) each rank sums the bytes of its LOCAL share of every parameter, gradient and
optimizer state tensor (`to_local()` of a DTensor; a tied weight once). Rank 0 also trains one
step of the same model in one process, unwrapped, and counts it the same way: the "% of 1
process" column. Step time is the mean over the timed steps after the warm-up steps, per rank,
with the CPU seconds per step beside it. Give each process cores / processes threads
(OMP_NUM_THREADS) to compare layouts on one thread budget; with more processes than cores the
step times are oversubscribed and are no speed figure.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanotrain.config import load_config
from nanotrain.data.dataset_format import dataset_vocab_size
from nanotrain.data.loader import build_data
from nanotrain.errors import NanotrainError
from nanotrain.model.transformer import build_model
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision
from nanotrain.reporting.metrics import peak_memory
from nanotrain.training.optim import build_optimizer
from nanotrain.training.step import train_step

BENCHMARK_DEFAULTS = ["--train.seq_len=256", "--train.precision=fp32", "--model.dropout=0.0",
                      "--data.source=random", "--train.device=cpu"]


@dataclass
class MemoryShare:
    """Bytes this rank holds of the model's parameters, their gradients and the optimizer's state."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of this rank's share of `tensor`: its local shard when it is a DTensor."""
    return local(tensor).numel() * local(tensor).element_size()


def count_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> MemoryShare:
    """This rank's parameter, gradient and optimizer-state bytes (call between the step and zero_grad)."""
    share = MemoryShare()
    for param in model.parameters():  # a tied weight is yielded once
        share.parameters += local_bytes(param)
        share.gradients += local_bytes(param.grad) if param.grad is not None else 0
    for state in optimizer.state.values():
        share.optimizer_state += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return share


def saved_activation_bytes(model: torch.nn.Module, step) -> int:
    """Bytes of the tensors `step()`'s forward saves for backward on this rank, parameters left out.

    Counted once per storage (views share one), local shards of DTensors: the activation memory
    that sequence parallelism divides. Under FSDP the gathered parameters count too.
    """
    parameters = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()

    def pack(tensor):
        storage = local(tensor).untyped_storage()
        if storage.data_ptr() not in parameters | seen:
            seen.add(storage.data_ptr())
            pack.total += storage.nbytes()
        return tensor

    pack.total = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return pack.total


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def record_memory_after_each_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[MemoryShare]:
    """A list that gains this rank's MemoryShare after every optimizer step (train_step zeroes gradients next)."""
    shares: list[MemoryShare] = []
    optimizer.register_step_post_hook(lambda *_: shares.append(count_memory(model, optimizer)))
    return shares


def one_process_memory(cfg, batch: dict[str, torch.Tensor]) -> MemoryShare:
    """The same model and optimizer trained one step in one process, unwrapped: the layouts' point of comparison."""
    dims = ParallelDims.single_process("cpu")
    model = distributed.parallelize(build_model(cfg.model, seed=cfg.train.seed), cfg, dims)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.lr)
    shares = record_memory_after_each_step(model, optimizer)
    train_step(model, optimizer, [batch], dims, Precision("fp32", dims.device, dims.strategy),
               grad_clip=cfg.optim.grad_clip, fused_loss=cfg.train.fused_loss)
    return shares[-1]


def describe_layout(dims: ParallelDims) -> str:
    if dims.world_size == 1:
        return "1 process"
    parts = [f"{dims.strategy.upper()} {dims.dp_size}"] if dims.dp_size > 1 else []
    parts += [f"TP {dims.tp_size}"] if dims.tp_size > 1 else []
    return " x ".join(parts)


def profile_table(step, rows: int) -> str:
    """torch.profiler's table of one call of `step`, ops sorted by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@dataclass(frozen=True)
class BenchmarkSettings:
    """The command's options: the preset, sequences per optimizer step over all dp ranks, untimed
    and timed steps, and whether rank 0 profiles one more step."""

    config: str
    global_batch: int
    warmup: int
    steps: int
    profile: bool


def benchmark_layout(settings: BenchmarkSettings, overrides: list[str]) -> None:
    """Measure the layout that torchrun and `overrides` (--section.key=value) give; rank 0 prints the table."""
    cfg = load_config(settings.config, BENCHMARK_DEFAULTS + overrides, dataset_vocab_size)
    with distributed.process_group(cfg) as dims:
        measure(cfg, dims, settings)


def measure(cfg, dims: ParallelDims, settings: BenchmarkSettings) -> None:
    if settings.global_batch % dims.dp_size:
        raise NanotrainError(f"--global_batch {settings.global_batch} must be a multiple of the {dims.dp_size} "
                             "data-parallel ranks")
    cfg.train.batch_size = settings.global_batch // dims.dp_size
    cfg.train.grad_accum_steps = 1
    data = build_data(cfg, dims.dp_rank, dims.dp_size)
    precision = Precision(cfg.train.precision, dims.device, dims.strategy)
    model = build_model(cfg.model, seed=cfg.train.seed)
    parameter_count = sum(p.numel() for p in model.parameters())
    model = distributed.parallelize(model, cfg, dims, precision)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.lr)
    shares = record_memory_after_each_step(model, optimizer)
    batches = [next(data.train) for _ in range(settings.warmup + settings.steps + settings.profile)]  # not timed

    def step(batch):
        return train_step(model, optimizer, [batch], dims, precision, grad_clip=cfg.optim.grad_clip,
                          fused_loss=cfg.train.fused_loss)

    activations = saved_activation_bytes(model, lambda: step(batches[0]))  # the first warm-up step
    seconds, cpu_seconds = [], []
    for i, batch in enumerate(batches[1: settings.warmup + settings.steps], start=1):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(batch)
        if i >= settings.warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)  # all this process's threads, gloo's included
    rss_gib, _ = peak_memory(dims.device)
    table = profile_table(lambda: step(batches[-1]), rows=20) if settings.profile and dims.is_main else None
    if settings.profile and not dims.is_main:
        step(batches[-1])  # the profiled step's collectives need every rank
    row = {"rank": dims.rank, "dp_rank": dims.dp_rank, "tp_rank": dims.tp_rank, **asdict(shares[-1]),
           "step_s": statistics.mean(seconds), "min_s": min(seconds), "max_s": max(seconds),
           "cpu_s": statistics.mean(cpu_seconds), "activations": activations,
           "threads": torch.get_num_threads(), "rss_gib": rss_gib}
    rows = [None] * dims.world_size
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if not dims.is_main:
        return
    reference = one_process_memory(cfg, {"input_ids": batches[0]["input_ids"][:1], "labels": batches[0]["labels"][:1]})
    print_table(cfg, dims, settings, parameter_count, rows, reference)
    if table:
        print(f"\nprofile of one step on rank 0 (self CPU time):\n{table}")


def print_table(cfg, dims: ParallelDims, settings: BenchmarkSettings, parameter_count: int, rows: list[dict],
                reference: MemoryShare) -> None:
    m = cfg.model
    print(f"layouts: {settings.config} ({m.flavour}, {parameter_count:,} parameters)"
          f" | {describe_layout(dims)}: {dims.world_size} process(es), dp {dims.dp_size} x tp {dims.tp_size}"
          f" | global batch {settings.global_batch} x seq {cfg.train.seq_len} ({cfg.train.batch_size} per dp rank)"
          f" | {cfg.train.precision} | {rows[0]['threads']} thread(s) per process | torch {torch.__version__}"
          f" | load average {os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} (1 min)"
          f" on {os.cpu_count()} CPUs")
    print(f"1 process: parameters {reference.parameters:,} B | gradients {reference.gradients:,} B"
          f" | optimizer state {reference.optimizer_state:,} B | total {reference.total:,} B")
    header = (f"{'rank':>4} {'dp':>3} {'tp':>3} {'parameters B':>14} {'gradients B':>14} {'optimizer B':>14}"
              f" {'total B':>14} {'% of 1 proc':>11} {'step s (mean)':>13} {'min-max s':>11} {'CPU s/step':>10}"
              f" {'peak RSS GiB':>12} {'activations B':>14}")
    print(header)
    for r in rows:
        total = r["parameters"] + r["gradients"] + r["optimizer_state"]
        print(f"{r['rank']:>4} {r['dp_rank']:>3} {r['tp_rank']:>3} {r['parameters']:>14,} {r['gradients']:>14,}"
              f" {r['optimizer_state']:>14,} {total:>14,} {100 * total / reference.total:>10.1f}%"
              f" {r['step_s']:>13.3f} {r['min_s']:>5.2f}-{r['max_s']:<5.2f} {r['cpu_s']:>10.2f} {r['rss_gib']:>12.2f}"
              f" {r['activations']:>14,}")
    print(f"mean step over {settings.steps} timed steps after {settings.warmup} warm-up: "
          f"{statistics.mean(r['step_s'] for r in rows):.3f} s (mean over ranks); CPU time "
          f"{sum(r['cpu_s'] for r in rows):.2f} s per step (sum over ranks)")

