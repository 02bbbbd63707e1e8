"""Side-by-side training throughput, the library of `python -m nanotrain.bench` (docs/08-performance.md).

In one process, on one batch, it times full training steps (forward, loss, backward, clip,
AdamW step) of nanotrain's model and of a reference trained by a plain PyTorch loop:
- llama flavour: Hugging Face transformers' `LlamaForCausalLM` holding the same weights, built by
  the `llama_reference` the command passes in (training/ does not import hf/, docs/11; the
  first losses of both sides are printed: equal losses show both do the same work);
- gpt flavour: `ReferenceGPT` below, a plain mini-GPT of the same shape;
- reference "none": nanotrain alone (tokens/s, MFU, peak memory), e.g. for a model too large
  to time twice in the time at hand.
The two sides alternate, `steps` steps each per round, the first round is a warm-up, and
the medians over rounds are reported, so a machine's changing load hits both sides alike.
Both sides share the process and its settings (threads, allocator); nanotrain runs the training
loop's own `train_step` (fused loss, AdamW kernel per optim.implementation, and the one host sync
per step that reads the loss and gradient norm), the reference torch's defaults
(`torch.optim.AdamW(params, lr)`, mean loss from the model).
`shape` replaces the preset's model with a named shape (BENCH_SHAPES); `profile` adds the top
kernels (CUDA) or ops (CPU) of one step per side and their share of the step's time; `json` writes
every figure to a file (nanotrain/gpu_check.py reads it). docs/08-performance.md.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotrain.config import FEATURES, ModelConfig, load_config
from nanotrain.data.dataset_format import dataset_vocab_size
from nanotrain.model.transformer import build_model, flops_per_token
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision
from nanotrain.reporting.metrics import SpeedMeter, device_peak_tflops, peak_memory
from nanotrain.training.optim import build_optimizer
from nanotrain.training.step import train_step

# Model shapes to benchmark that no preset holds, as model overrides on top of --config.
BENCH_SHAPES = {
    # GPT-2 small's trunk (12 layers x 768, 12 heads of 64, tied embeddings, nanoGPT's 50,304-token
    # vocabulary) as a llama (RoPE, RMSNorm, SwiGLU with d_ff 2048): 123,587,328 parameters.
    "llama-125m": ["--model.flavour=llama", "--model.vocab_size=50304", "--model.d_model=768",
                   "--model.n_layers=12", "--model.n_heads=12", "--model.n_kv_heads=12", "--model.d_ff=2048",
                   "--model.tie_embeddings=true", "--model.max_position_embeddings=1024"],
}


class ReferenceGPT(nn.Module):
    """A plain GPT-2-style model (nanoGPT's shape): the gpt flavour's point of comparison."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout, activation="gelu",
                layer_norm_eps=cfg.norm_eps, batch_first=True, norm_first=True,
            )
            for _ in range(cfg.n_layers)
        )
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.size(1)
        x = self.token_embedding(input_ids) + self.position_embedding(torch.arange(T, device=input_ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        for layer in self.layers:
            x = layer(x, src_mask=causal, is_causal=True)
        return self.head(self.final_norm(x))  # (B, T, V)


class Side:
    """One contestant: a model, its optimizer and a function doing one full training step and returning its loss."""

    def __init__(self, name: str, step_fn):
        self.name, self.step_fn = name, step_fn
        self.round_tokens_per_sec: list[float] = []
        self.cpu_seconds, self.steps_run = 0.0, 0  # process CPU time: steadier than wall time on a busy machine
        self.page_faults = 0  # minor faults: fresh memory pages the step touched (CPU, Linux)
        self.first_loss: float | None = None
        self.peak_mem_gib = 0.0  # CUDA only: the max allocated while this side ran

    def run(self, steps: int, tokens_per_step: int, device: torch.device) -> float:
        """Run `steps` training steps; return their tokens/s."""
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, cpu_start, faults_start = time.perf_counter(), time.process_time(), minor_page_faults()
        for _ in range(steps):
            loss = self.step_fn()
            if self.first_loss is None:  # the very first step: both sides start from the same weights
                self.first_loss = float(loss)
        synchronize(device)
        seconds = time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start
        self.page_faults += minor_page_faults() - faults_start
        self.steps_run += steps
        if device.type == "cuda":
            self.peak_mem_gib = max(self.peak_mem_gib, torch.cuda.max_memory_allocated(device) / 2**30)
        return steps * tokens_per_step / seconds


def minor_page_faults() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nanotrain_side(model: nn.Module, cfg, dims: ParallelDims, precision: Precision, batch: torch.Tensor) -> Side:
    """nanotrain's step: `train_step`, as the training loop runs it with one process and no accumulation."""
    model = distributed.parallelize(model, cfg, dims, precision)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.lr)
    micro_batches = [{"input_ids": batch, "labels": batch}]

    def step():
        outcome = train_step(model, optimizer, micro_batches, dims, precision, grad_clip=cfg.optim.grad_clip,
                             fused_loss=cfg.train.fused_loss)
        return outcome.loss

    return Side("nanotrain", step)


def reference_side(name: str, model: nn.Module, cfg, dims: ParallelDims, precision: Precision, batch: torch.Tensor,
                   fused_adamw: bool = False) -> Side:
    """The plain PyTorch loop a user writes for an HF model or a hand-written GPT.

    `fused_adamw` gives it torch's fused AdamW kernel too, which isolates what nanotrain's model
    and loss buy from what its optimizer kernel buys.
    """
    model.to(dims.device).train()
    if cfg.train.compile:
        for layer in model.model.layers if hasattr(model, "model") else model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay, fused=fused_adamw or None)
    scaler = torch.amp.GradScaler(dims.device.type, enabled=precision.name == "fp16")
    is_hf = hasattr(model, "model")

    def step():
        with precision.autocast():
            if is_hf:
                loss = model(input_ids=batch, labels=batch).loss
            else:
                logits = model(batch)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Side(name, step)


def self_time_us(event, on_device: bool) -> float:
    """An averaged profiler event's own time in microseconds, on the device or on the CPU."""
    if not on_device:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_summary(side: Side, on_cuda: bool, rows: int = 10) -> list[dict]:
    """One profiled step of `side`: its top kernels (CUDA) or ops (CPU) by own time, with their share.

    On CUDA the rows are GPU kernels and the share is of all kernel time in the step; on CPU they
    are operators and the share is of all operators' own CPU time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        side.step_fn()
        if on_cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages()
              if (e.device_type == DeviceType.CUDA) == on_cuda and self_time_us(e, on_cuda) > 0]
    total = sum(self_time_us(e, on_cuda) for e in events) or 1.0
    events.sort(key=lambda e: self_time_us(e, on_cuda), reverse=True)
    return [{"name": e.key, "share_pct": 100.0 * self_time_us(e, on_cuda) / total,
             "ms": self_time_us(e, on_cuda) / 1000.0, "calls": e.count} for e in events[:rows]]


def format_profile(side_name: str, summary: list[dict], on_cuda: bool) -> str:
    what = "GPU kernels, share of all kernel time" if on_cuda else "operators, share of all operators' CPU time"
    lines = [f"profile of one {side_name} step, top {len(summary)} {what}:"]
    lines += [f"  {row['share_pct']:5.1f}%  {row['ms']:9.3f} ms  {row['calls']:>5}x  {row['name'][:90]}"
              for row in summary]
    return "\n".join(lines)


@dataclass
class ThroughputSettings:
    """The command's options: the preset and shape, the batch, steps per side per round and rounds
    after the warm-up, precision, compile, device, the reference ("auto" or "none", with or without
    torch's fused AdamW), and whether to profile one step per side and write a JSON report."""

    config: str
    shape: str | None
    seq_len: int
    batch_size: int
    steps: int
    rounds: int
    precision: str
    compile: bool
    device: str
    reference: str
    reference_fused_adamw: bool
    profile: bool
    json: Path | None


def benchmark_throughput(settings: ThroughputSettings,
                         llama_reference: Callable[[nn.Module, ModelConfig], nn.Module]) -> None:
    """Time nanotrain against its reference in alternating rounds and print (and optionally write) the figures.

    `llama_reference(model, model_cfg)` builds the llama flavour's reference holding `model`'s weights.
    """
    cfg = load_config(settings.config, [
        *BENCH_SHAPES.get(settings.shape, []),
        f"--train.seq_len={settings.seq_len}", f"--train.batch_size={settings.batch_size}",
        f"--train.precision={settings.precision}", f"--train.compile={str(settings.compile).lower()}",
        f"--train.device={settings.device}", "--model.dropout=0.0",
    ], dataset_vocab_size)
    dims = ParallelDims.single_process(distributed.pick_device(cfg.train.device, 0))
    if dims.device.type == "cuda":
        torch.cuda.set_device(dims.device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    precision = Precision(cfg.train.precision, dims.device, dims.strategy)
    m = cfg.model
    batch = torch.randint(0, m.vocab_size, (settings.batch_size, settings.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(dims.device)

    ours = build_model(m, seed=0)
    sides = []
    if settings.reference == "auto" and m.features == FEATURES["llama"]:  # what LlamaForCausalLM implements
        sides.append(reference_side("HF LlamaForCausalLM", llama_reference(ours, m), cfg, dims, precision,
                                    batch, settings.reference_fused_adamw))
    elif settings.reference == "auto":  # otherwise a plain GPT
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sides.append(reference_side("ReferenceGPT", ReferenceGPT(m), cfg, dims, precision, batch,
                                        settings.reference_fused_adamw))
    sides.insert(0, nanotrain_side(ours, cfg, dims, precision, batch))

    tokens_per_step = settings.batch_size * settings.seq_len
    flops = flops_per_token(m, settings.seq_len)
    peak, peak_source = device_peak_tflops(dims.device, settings.precision, cfg.train.tf32)
    meter = SpeedMeter(dims.device, 1, tokens_per_step, flops, peak, peak_source)  # MFU never above 100%
    threads = f", {torch.get_num_threads()} threads" if dims.device.type == "cpu" else ""
    gpu = f" ({torch.cuda.get_device_name(dims.device)})" if dims.device.type == "cuda" else ""
    model_name = settings.shape or settings.config
    compiled = " + compile" if settings.compile else ""
    print(f"bench: {model_name} ({m.flavour}, {sum(p.numel() for p in ours.parameters()):,} parameters) | "
          f"batch {settings.batch_size} x seq {settings.seq_len} | {settings.precision}{compiled} | "
          f"{dims.device}{gpu}{threads} | torch {torch.__version__}")
    print(f"peak {peak:.3g} TFLOP/s ({peak_source}) | {flops / 1e6:.1f} MFLOP per token" if peak
          else f"peak unknown ({peak_source})")

    for round_index in range(settings.rounds + 1):  # round 0 warms up (allocations, compile) and is not counted
        order = sides if round_index % 2 == 0 else sides[::-1]
        figures = {side.name: side.run(settings.steps, tokens_per_step, dims.device) for side in order}
        label = "warm-up" if round_index == 0 else f"round {round_index}"
        print(f"{label:>9}: " + " | ".join(f"{name} {tps:,.0f} tok/s" for name, tps in figures.items()), flush=True)
        for side in sides:
            if round_index == 0:
                side.cpu_seconds, side.steps_run, side.page_faults = 0.0, 0, 0
            else:
                side.round_tokens_per_sec.append(figures[side.name])

    print("first-step loss: " + " | ".join(f"{s.name} {s.first_loss:.4f}" for s in sides))
    report = {"model": model_name, "flavour": m.flavour, "parameters": sum(p.numel() for p in ours.parameters()),
              "batch_size": settings.batch_size, "seq_len": settings.seq_len, "precision": settings.precision,
              "compile": settings.compile, "device": str(dims.device), "gpu": gpu.strip(" ()"),
              "torch": torch.__version__, "flops_per_token": flops, "sides": []}
    for side in sides:
        tps = statistics.median(side.round_tokens_per_sec)
        mfu = meter.mfu_pct(tps * flops / 1e12)
        cpu = ""
        if dims.device.type == "cpu":
            cpu = (f" | {side.cpu_seconds / side.steps_run:.2f} CPU-s/step"
                   f" | {side.page_faults / side.steps_run:,.0f} page faults/step")
        print(f"{side.name:>20}: {tps:>10,.0f} tok/s (median of {settings.rounds})"
              f"{f' | MFU {mfu:.1f}%' if mfu is not None else ''}{cpu}")
        report["sides"].append({"name": side.name, "tokens_per_sec": tps, "mfu_pct": mfu,
                                "first_loss": side.first_loss,
                                "peak_mem_gib": side.peak_mem_gib if dims.device.type == "cuda" else None})
    report["peak_tflops"], report["peak_source"] = meter.peak_tflops, meter.peak_source
    if len(sides) == 2:
        per_round = [a / b for a, b in zip(sides[0].round_tokens_per_sec, sides[1].round_tokens_per_sec)]
        ratio = statistics.median(per_round)
        print(f"nanotrain / {sides[1].name}: {ratio:.2f}x (median of per-round ratios; "
              f"range {min(per_round):.2f}-{max(per_round):.2f})")
        report["ratio"], report["ratio_range"] = ratio, [min(per_round), max(per_round)]
    if dims.device.type == "cuda":
        print("peak memory (CUDA max allocated): " + " | ".join(f"{s.name} {s.peak_mem_gib:.2f} GiB" for s in sides))
    else:
        memory_gib, _ = peak_memory(dims.device)
        together = ", both sides together" if len(sides) == 2 else ""
        print(f"peak memory {memory_gib:.2f} GiB (process peak RSS{together})")
        report["process_peak_rss_gib"] = memory_gib
    if settings.profile:
        report["profile"] = {}
        for side in sides:
            summary = profile_summary(side, dims.device.type == "cuda")
            report["profile"][side.name] = summary
            print("\n" + format_profile(side.name, summary, dims.device.type == "cuda"))
    if settings.json:
        settings.json.write_text(json.dumps(report, indent=1) + "\n")


