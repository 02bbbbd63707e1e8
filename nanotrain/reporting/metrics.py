"""Speed figures: throughput, MFU, peak memory and the data/compute split of a training run.

Every training log record carries, besides loss and lr: tokens/s (total and per rank), MFU
(model FLOPs utilisation: achieved training FLOP/s over the device's peak), peak memory, and
how the time since the last log step split between waiting for data and computing. The loop
hands the record to nanotrain.reporting.run_log, whose sinks print and store it.

The peak comes from `train.peak_tflops` when set, else from a table of known GPUs (dense
data-sheet figures, no sparsity, for the precision the matmuls run in), else, on CPU, from the
best of many matmuls timed once per process at start (half a second). An unknown GPU gets no
MFU and a note saying how to give its peak. A logged MFU never exceeds 100%: when a run computes
faster than the peak it was given (a CPU peak measured while other jobs held the cores), the
peak is raised to the run's own rate, and the run says so once. docs/08-performance.md.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanotrain.model.transformer import flops_per_token

# Dense peak TFLOP/s from NVIDIA's data sheets (the "with sparsity" figures halved):
# (bf16/fp16 tensor core, tf32 tensor core, fp32). A key matches a whole word of the device name
# ("L4" is not "L40S", "H200" is not "GH200"); the first match wins, so the more specific names
# come first. Other GPUs: set train.peak_tflops.
GPU_PEAK_TFLOPS = [
    ("H100 NVL", (835.5, 417.5, 60.0)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM: device name "NVIDIA H100 80GB HBM3"
    ("H200 NVL", (835.5, 417.5, 60.0)),
    ("H200", (989.4, 494.7, 66.9)),  # SXM: "NVIDIA H200"
    ("GH200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),  # SXM4 and PCIe, 40 and 80 GB alike
    ("L40S", (362.05, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)),  # bf16/fp16 with fp32 accumulation, as torch's matmuls run
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("V100", (125.0, 15.7, 15.7)),  # fp16 tensor cores; no bf16 or tf32
    ("T4", (65.0, 8.1, 8.1)),
]


def gpu_peak_tflops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The table's peak for a CUDA device name and the precision its matmuls run in, or None.

    bf16 and fp16 run their matmuls on the 16-bit tensor cores; fp32 on the TF32 tensor cores
    when `tf32` (train.tf32) allows it, else on the plain fp32 units.
    """
    for key, (low_precision, tf32_peak, fp32_peak) in GPU_PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            if precision != "fp32":
                return low_precision
            return tf32_peak if tf32 else fp32_peak
    return None


@functools.cache  # once per process: tests and notebooks that train many times pay once
def measure_matmul_tflops(dtype: torch.dtype = torch.float32, seconds: float = 0.5, size: int = 1024) -> float:
    """The CPU's practical matmul peak in TFLOP/s: the fastest of the (size x size) matmuls run in `seconds`.

    The best of many short timings, so a few slices lost to other processes do not count; a
    machine busy for the whole half second still reads low, which SpeedMeter's floor corrects.
    """
    # A private generator: drawing from the global RNG here would shift every later dropout mask,
    # so a run's losses would depend on whether (and where) the peak was measured.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, dtype=dtype, generator=generator) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool and kernel selection
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(
    device: torch.device, precision: str, tf32: bool, override: float = 0.0
) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where the figure came from) for MFU; peak None when unknown."""
    if override > 0:
        return override, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, precision, tf32)
        if peak is None:
            return None, (f"{name} is not in metrics.GPU_PEAK_TFLOPS, so MFU is not reported: "
                          "set train.peak_tflops to its dense peak for the run's precision")
        units = "16-bit tensor cores" if precision != "fp32" else "TF32 tensor cores" if tf32 else "fp32 units"
        return peak, f"{name} data sheet, dense, {precision} on the {units}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = measure_matmul_tflops(dtype)
    return peak, (f"best {str(dtype).removeprefix('torch.')} 1024x1024 matmul over 0.5 s at start, "
                  f"{torch.get_num_threads()} CPU threads; raised to the run's own rate if the run is faster")


def peak_memory(device: torch.device) -> tuple[float | None, float | None]:
    """(peak GiB, % of the device's memory): CUDA max allocated, or this process's peak RSS on CPU.

    On CUDA this is the most memory tensors held at once, what the model and batch need; the
    caching allocator reserves more (`peak_reserved_gib`), and it is the reserve that meets an
    out-of-memory error.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.max_memory_allocated(device)
        return used / 2**30, 100.0 * used / total
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    used = max_rss if sys.platform == "darwin" else max_rss * 1024  # bytes on macOS, KiB on Linux
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return used / 2**30, 100.0 * used / total


def peak_reserved_gib(device: torch.device) -> float | None:
    """CUDA: the most memory the caching allocator has held (allocated plus cached blocks); None elsewhere."""
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


def on_main_rank() -> bool:
    """True in a single process and on rank 0 of a process group: the one that prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


class SpeedMeter:
    """Throughput, MFU, peak memory and the data/compute split between two log steps.

    Wrap the loop's batch fetching in `waiting_for_data()`; at a log step (which has already
    synchronised with the device by reading the loss) `report()` turns the wall time since the
    last report into the record's speed fields. Nothing here synchronises the device.
    MFU is against `peak_tflops`, raised (with one line through `log`) when the run computes faster.
    """

    def __init__(self, device: torch.device, world_size: int, tokens_per_step: int, flops_per_token: float,
                 peak_tflops: float | None, peak_source: str = "", log=print):
        self.device, self.world_size = device, world_size
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_tflops, self.peak_source = peak_tflops, peak_source
        self.log = log
        self.data_seconds = 0.0

    @classmethod
    def for_run(cls, cfg, device: torch.device, world_size: int, tokens_per_step: int) -> "SpeedMeter":
        """A meter for a training run: FLOPs per token from the model, the device peak looked up or measured."""
        t = cfg.train
        peak, source = device_peak_tflops(device, t.precision, t.tf32, t.peak_tflops)
        log = print if on_main_rank() else (lambda *args, **kwargs: None)
        return cls(device, world_size, tokens_per_step, flops_per_token(cfg.model, t.seq_len), peak, source, log)

    def describe(self) -> str:
        peak = f"{self.peak_tflops:.3g} TFLOP/s per device" if self.peak_tflops else "unknown"
        return f"MFU peak {peak} ({self.peak_source}) | {self.flops_per_token / 1e6:.1f} MFLOP per token"

    def mfu_pct(self, achieved_tflops: float) -> float | None:
        """Achieved over peak, in percent; never above 100: a faster run raises the peak to its own rate."""
        if not self.peak_tflops:
            return None
        if achieved_tflops > self.peak_tflops:
            self.log(f"note: this run computes {achieved_tflops:.3g} TFLOP/s per device, above the MFU peak of "
                     f"{self.peak_tflops:.3g} ({self.peak_source}); MFU is now against {achieved_tflops:.3g}")
            self.peak_tflops = achieved_tflops
            self.peak_source = "raised to this run's own rate"
        return 100.0 * min(1.0, achieved_tflops / self.peak_tflops)

    @contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_seconds += time.perf_counter() - start

    def report(self, steps: int, seconds: float) -> dict:
        """The speed fields for `steps` optimizer steps that took `seconds` of wall time."""
        step_time = seconds / steps
        tokens_per_sec = self.tokens_per_step / step_time
        per_rank = tokens_per_sec / self.world_size
        mfu = self.mfu_pct(per_rank * self.flops_per_token / 1e12)
        memory_gib, memory_pct = peak_memory(self.device)
        data_ms = 1000.0 * self.data_seconds / steps
        self.data_seconds = 0.0
        record = {
            "tokens_per_sec": tokens_per_sec,
            "tokens_per_sec_per_rank": per_rank,
            "mfu_pct": mfu,
            "peak_mem_gib": memory_gib,
            "peak_mem_pct": memory_pct,
            "data_ms": data_ms,
            "compute_ms": 1000.0 * step_time - data_ms,
        }
        if self.device.type == "cuda":
            record["peak_mem_reserved_gib"] = peak_reserved_gib(self.device)
        return record
