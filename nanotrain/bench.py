"""Side-by-side training throughput: nanotrain against what a user would write instead; or, with
`--layouts`, the per-rank memory and step time of a parallel layout (training/layout_benchmark.py).

    python -m nanotrain.bench [--config tinystories-20m] [--shape llama-125m] [--seq_len 256]
                              [--batch_size 8] [--steps 3] [--rounds 5] [--precision fp32]
                              [--compile] [--reference auto|none] [--profile] [--json FILE]
    python -m nanotrain.bench --layouts [--config tinystories-20m] [--global_batch 8] [--warmup 2]
                                        [--steps 5] [--profile] [--section.key=value ...]
    torchrun --nproc_per_node=N -m nanotrain.bench --layouts [the same options]

The two modes take their own options; an option of the other mode is refused in one line.

In one process, on one batch, it times full training steps (forward, loss, backward, clip,
AdamW step) of nanotrain's model and of a reference trained by a plain PyTorch loop:
- llama flavour: Hugging Face transformers' `LlamaForCausalLM` holding the same weights (the
  first losses of both sides are printed: equal losses show both do the same work);
- gpt flavour: `ReferenceGPT` below, a plain mini-GPT of the same shape;
- `--reference none`: nanotrain alone (tokens/s, MFU, peak memory), e.g. for a model too large
  to time twice in the time at hand.
The two sides alternate, `--steps` steps each per round, the first round is a warm-up, and
the medians over rounds are reported, so a machine's changing load hits both sides alike.
Both sides share the process and its settings (threads, allocator); nanotrain runs the training
loop's own `train_step` (fused loss, AdamW kernel per optim.implementation, and the one host sync
per step that reads the loss and gradient norm), the reference torch's defaults
(`torch.optim.AdamW(params, lr)`, mean loss from the model).
`--shape` replaces the preset's model with a named shape (BENCH_SHAPES); `--profile` adds the
top kernels (CUDA) or ops (CPU) of one step per side and their share of the step's time;
`--json` writes every figure to a file (nanotrain/gpu_check.py reads it). docs/08-performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotrain.config import CHOICES, ModelConfig, load_config
from nanotrain.data.dataset_format import dataset_vocab_size
from nanotrain.errors import ArgumentParser, NanotrainError, UsageError, exit_on_error
from nanotrain.hf.llama import LLAMA_FEATURES, hf_llama_config, hf_llama_name
from nanotrain.model.transformer import build_model, flops_per_token
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision
from nanotrain.reporting.metrics import SpeedMeter, device_peak_tflops, peak_memory
from nanotrain.training import layout_benchmark
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


def hf_llama_with_weights_of(model: nn.Module, cfg: ModelConfig):
    """transformers' LlamaForCausalLM with the same configuration and weights as `model`."""
    try:
        import transformers
    except ImportError:
        raise NanotrainError(
            "the llama benchmark compares with Hugging Face transformers: pip install transformers"
        ) from None
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg))  # attention through SDPA, transformers' default
    hf.load_state_dict({hf_llama_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf


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


LAYOUTS = "--layouts"
LAYOUTS_EXAMPLES = """Per-rank memory and step time of a parallel layout (one process, TP, FSDP, FSDP x TP, DDP x TP).

    OMP_NUM_THREADS=2 python -m nanotrain.bench --layouts                              one process
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m nanotrain.bench --layouts --parallel.tp=2
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m nanotrain.bench --layouts --parallel.strategy=fsdp
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 -m nanotrain.bench --layouts --parallel.tp=2 \\
        --parallel.strategy=fsdp                                                       (or ddp)
"""


def build_parser() -> ArgumentParser:
    """The throughput benchmark's options."""
    parser = ArgumentParser(prog="python -m nanotrain.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(LAYOUTS, action="store_true",
                        help="measure per-rank memory and step time of a parallel layout instead, with its own "
                             "options (python -m nanotrain.bench --layouts --help)")
    parser.add_argument("--config", default="tinystories-20m", help="preset name or .toml path (model shape)")
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES), help="a model shape of BENCH_SHAPES instead of the preset's")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds after the warm-up round")
    parser.add_argument("--precision", default="fp32", choices=CHOICES["train.precision"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each block, both sides")
    parser.add_argument("--device", default="auto", choices=CHOICES["train.device"])
    parser.add_argument("--reference", default="auto", choices=["auto", "none"],
                        help="auto: HF LlamaForCausalLM (llama) or ReferenceGPT (gpt); none: nanotrain alone")
    parser.add_argument("--profile", action="store_true",
                        help="also show the top kernels (CUDA) or ops (CPU) of one step per side and their share")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--reference_fused_adamw", action="store_true",
                        help="give the reference torch's fused AdamW too (compares model + loss alone)")
    return parser


def build_layouts_parser() -> ArgumentParser:
    """The layouts benchmark's options; any config key is overridden on top as --section.key=value."""
    parser = ArgumentParser(prog=f"python -m nanotrain.bench {LAYOUTS}",
                            description=LAYOUTS_EXAMPLES + "\n" + layout_benchmark.__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the command examples' layout
                            epilog="Any config key can be overridden as --section.key=value (e.g. --parallel.tp=2).")
    parser.add_argument("--config", default="tinystories-20m", help="preset name or .toml path (model shape)")
    parser.add_argument("--global_batch", type=int, default=8, help="sequences per optimizer step over all dp ranks")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, optimizer state)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--profile", action="store_true",
                        help="then profile one more step on rank 0 and print its top ops")
    return parser


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}  # argparse lists them nowhere public


def refuse_the_other_modes_options(argv: list[str], layouts: bool) -> None:
    """One error line for an option only the other mode takes, where argparse would call it unknown."""
    throughput_only = option_names(build_parser()) - option_names(build_layouts_parser())
    layouts_only = option_names(build_layouts_parser()) - option_names(build_parser())
    for item in argv:
        name = item.split("=", 1)[0]
        if layouts and name in throughput_only:
            raise UsageError(f"{name} is an option of the throughput benchmark, not of {LAYOUTS}: drop it (with "
                             f"{LAYOUTS} a config key is set as --section.key=value, e.g. --train.seq_len=512; run "
                             f"'python -m nanotrain.bench {LAYOUTS} --help')")
        if not layouts and (name in layouts_only or (name.startswith("--") and "." in name)):
            raise UsageError(f"{name} is taken by {LAYOUTS} only (per-rank memory and step time of a parallel "
                             f"layout): add {LAYOUTS} or drop it (run 'python -m nanotrain.bench --help')")


def parse_args(argv: list[str]) -> argparse.Namespace:
    refuse_the_other_modes_options(argv, layouts=False)
    return build_parser().parse_args(argv)


def parse_layouts_args(argv: list[str]) -> tuple[layout_benchmark.BenchmarkSettings, list[str]]:
    """The layouts benchmark's settings and its --section.key=value overrides."""
    refuse_the_other_modes_options(argv, layouts=True)
    args, overrides = build_layouts_parser().parse_known_args(argv)
    for item in overrides:
        if not item.startswith("--") or "=" not in item or "." not in item.split("=", 1)[0]:
            raise NanotrainError(f"unexpected argument '{item}': overrides look like --section.key=value")
    if args.global_batch < 1 or args.warmup < 1 or args.steps < 1:
        raise NanotrainError("--global_batch, --warmup and --steps must be >= 1 (a warm-up step creates "
                             "the optimizer state that is counted)")
    return layout_benchmark.BenchmarkSettings(args.config, args.global_batch, args.warmup, args.steps,
                                              args.profile), overrides


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if LAYOUTS in argv:
        layouts_main([item for item in argv if item != LAYOUTS])
    else:
        throughput_main(argv)


@distributed.torchrun_entry  # under torchrun: the failing rank's traceback in the job summary; a clean exit
@exit_on_error
def layouts_main(argv: list[str]) -> None:
    layout_benchmark.benchmark_layout(*parse_layouts_args(argv))


@exit_on_error
def throughput_main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise NanotrainError("--steps, --rounds and --batch_size must be >= 1 and --seq_len >= 2")
    cfg = load_config(args.config, [
        *BENCH_SHAPES.get(args.shape, []),
        f"--train.seq_len={args.seq_len}", f"--train.batch_size={args.batch_size}",
        f"--train.precision={args.precision}", f"--train.compile={str(args.compile).lower()}",
        f"--train.device={args.device}", "--model.dropout=0.0",
    ], dataset_vocab_size)
    dims = ParallelDims.single_process(distributed.pick_device(cfg.train.device, 0))
    if dims.device.type == "cuda":
        torch.cuda.set_device(dims.device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    precision = Precision(cfg.train.precision, dims.device, dims.strategy)
    m = cfg.model
    batch = torch.randint(0, m.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(dims.device)

    ours = build_model(m, seed=0)
    sides = []
    if args.reference == "auto" and m.features == LLAMA_FEATURES:  # what LlamaForCausalLM implements
        sides.append(reference_side("HF LlamaForCausalLM", hf_llama_with_weights_of(ours, m), cfg, dims, precision,
                                    batch, args.reference_fused_adamw))
    elif args.reference == "auto":  # otherwise a plain GPT
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sides.append(reference_side("ReferenceGPT", ReferenceGPT(m), cfg, dims, precision, batch,
                                        args.reference_fused_adamw))
    sides.insert(0, nanotrain_side(ours, cfg, dims, precision, batch))

    tokens_per_step = args.batch_size * args.seq_len
    flops = flops_per_token(m, args.seq_len)
    peak, peak_source = device_peak_tflops(dims.device, args.precision, cfg.train.tf32)
    meter = SpeedMeter(dims.device, 1, tokens_per_step, flops, peak, peak_source)  # MFU never above 100%
    threads = f", {torch.get_num_threads()} threads" if dims.device.type == "cpu" else ""
    gpu = f" ({torch.cuda.get_device_name(dims.device)})" if dims.device.type == "cuda" else ""
    model_name = args.shape or args.config
    print(f"bench: {model_name} ({m.flavour}, {sum(p.numel() for p in ours.parameters()):,} parameters) | "
          f"batch {args.batch_size} x seq {args.seq_len} | {args.precision}{' + compile' if args.compile else ''} | "
          f"{dims.device}{gpu}{threads} | torch {torch.__version__}")
    print(f"peak {peak:.3g} TFLOP/s ({peak_source}) | {flops / 1e6:.1f} MFLOP per token" if peak
          else f"peak unknown ({peak_source})")

    for round_index in range(args.rounds + 1):  # round 0 warms up (allocations, compile) and is not counted
        order = sides if round_index % 2 == 0 else sides[::-1]
        figures = {side.name: side.run(args.steps, tokens_per_step, dims.device) for side in order}
        label = "warm-up" if round_index == 0 else f"round {round_index}"
        print(f"{label:>9}: " + " | ".join(f"{name} {tps:,.0f} tok/s" for name, tps in figures.items()), flush=True)
        for side in sides:
            if round_index == 0:
                side.cpu_seconds, side.steps_run, side.page_faults = 0.0, 0, 0
            else:
                side.round_tokens_per_sec.append(figures[side.name])

    print("first-step loss: " + " | ".join(f"{s.name} {s.first_loss:.4f}" for s in sides))
    report = {"model": model_name, "flavour": m.flavour, "parameters": sum(p.numel() for p in ours.parameters()),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "precision": args.precision,
              "compile": args.compile, "device": str(dims.device), "gpu": gpu.strip(" ()"),
              "torch": torch.__version__, "flops_per_token": flops, "sides": []}
    for side in sides:
        tps = statistics.median(side.round_tokens_per_sec)
        mfu = meter.mfu_pct(tps * flops / 1e12)
        cpu = ""
        if dims.device.type == "cpu":
            cpu = (f" | {side.cpu_seconds / side.steps_run:.2f} CPU-s/step"
                   f" | {side.page_faults / side.steps_run:,.0f} page faults/step")
        print(f"{side.name:>20}: {tps:>10,.0f} tok/s (median of {args.rounds})"
              f"{f' | MFU {mfu:.1f}%' if mfu is not None else ''}{cpu}")
        report["sides"].append({"name": side.name, "tokens_per_sec": tps, "mfu_pct": mfu, "first_loss": side.first_loss,
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
        print(f"peak memory {memory_gib:.2f} GiB (process peak RSS{', both sides together' if len(sides) == 2 else ''})")
        report["process_peak_rss_gib"] = memory_gib
    if args.profile:
        report["profile"] = {}
        for side in sides:
            summary = profile_summary(side, dims.device.type == "cuda")
            report["profile"][side.name] = summary
            print("\n" + format_profile(side.name, summary, dims.device.type == "cuda"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
