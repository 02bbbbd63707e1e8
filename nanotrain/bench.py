"""Side-by-side training throughput: nanotrain against what a user would write instead.

    python -m nanotrain.bench [--config tinystories-20m] [--seq_len 256] [--batch_size 8]
                              [--steps 3] [--rounds 5] [--precision fp32] [--compile] [--profile]

In one process, on one batch, it times full training steps (forward, loss, backward, clip,
AdamW step) of nanotrain's model and of a reference trained by a plain PyTorch loop:
- llama flavour: Hugging Face transformers' `LlamaForCausalLM` holding the same weights (the
  first losses of both sides are printed: equal losses show both do the same work);
- gpt flavour: `ReferenceGPT` below, a plain mini-GPT of the same shape.
The two sides alternate, `--steps` steps each per round, the first round is a warm-up, and
the medians over rounds are reported, so a machine's changing load hits both sides alike.
Both sides share the process and its settings (threads, allocator); nanotrain runs the training
loop's own `train_step` (fused loss, AdamW kernel per optim.implementation, and the one host sync
per step that reads the loss and gradient norm), the reference torch's defaults
(`torch.optim.AdamW(params, lr)`, mean loss from the model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotrain import distributed
from nanotrain.config import CHOICES, ModelConfig, load_config
from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error
from nanotrain.metrics import device_peak_tflops, peak_memory
from nanotrain.hf import LLAMA_FEATURES, hf_llama_config, hf_llama_name
from nanotrain.model import build_model, flops_per_token
from nanotrain.optim import build_optimizer
from nanotrain.parallel_dims import ParallelDims
from nanotrain.precision import Precision
from nanotrain.train_step import train_step


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m nanotrain.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tinystories-20m", help="preset name or .toml path (model shape)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds after the warm-up round")
    parser.add_argument("--precision", default="fp32", choices=CHOICES["train.precision"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each block, both sides")
    parser.add_argument("--device", default="auto", choices=CHOICES["train.device"])
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per side")
    parser.add_argument("--reference_fused_adamw", action="store_true",
                        help="give the reference torch's fused AdamW too (compares model + loss alone)")
    return parser.parse_args(argv)


def profile_table(side: Side, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        side.step_fn()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


@exit_on_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise NanotrainError("--steps, --rounds and --batch_size must be >= 1 and --seq_len >= 2")
    cfg = load_config(args.config, [
        f"--train.seq_len={args.seq_len}", f"--train.batch_size={args.batch_size}",
        f"--train.precision={args.precision}", f"--train.compile={str(args.compile).lower()}",
        f"--train.device={args.device}", "--model.dropout=0.0",
    ])
    dims = ParallelDims.single_process(distributed.pick_device(cfg.train.device, 0))
    if dims.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    precision = Precision(cfg.train.precision, dims.device, dims.strategy)
    m = cfg.model
    batch = torch.randint(0, m.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0)).to(dims.device)

    ours = build_model(m, seed=0)
    if m.features == LLAMA_FEATURES:  # what LlamaForCausalLM implements; otherwise a plain GPT
        reference = reference_side("HF LlamaForCausalLM", hf_llama_with_weights_of(ours, m), cfg, dims, precision, batch,
                                   args.reference_fused_adamw)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reference = reference_side("ReferenceGPT", ReferenceGPT(m), cfg, dims, precision, batch,
                                       args.reference_fused_adamw)
    sides = [nanotrain_side(ours, cfg, dims, precision, batch), reference]

    tokens_per_step = args.batch_size * args.seq_len
    flops = flops_per_token(m, args.seq_len)
    peak, peak_source = device_peak_tflops(dims.device, args.precision, cfg.train.tf32)
    threads = f", {torch.get_num_threads()} threads" if dims.device.type == "cpu" else ""
    print(f"bench: {args.config} ({m.flavour}) | batch {args.batch_size} x seq {args.seq_len} | {args.precision}"
          f"{' + compile' if args.compile else ''} | {dims.device}{threads} | torch {torch.__version__}")
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
    for side in sides:
        tps = statistics.median(side.round_tokens_per_sec)
        mfu = f" | MFU {100 * tps * flops / (peak * 1e12):.1f}%" if peak else ""
        cpu = ""
        if dims.device.type == "cpu":
            cpu = (f" | {side.cpu_seconds / side.steps_run:.2f} CPU-s/step"
                   f" | {side.page_faults / side.steps_run:,.0f} page faults/step")
        print(f"{side.name:>20}: {tps:>10,.0f} tok/s (median of {args.rounds}){mfu}{cpu}")
    per_round = [a / b for a, b in zip(sides[0].round_tokens_per_sec, sides[1].round_tokens_per_sec)]
    ratio = statistics.median(per_round)
    print(f"nanotrain / {sides[1].name}: {ratio:.2f}x (median of per-round ratios; "
          f"range {min(per_round):.2f}-{max(per_round):.2f})")
    if dims.device.type == "cuda":
        print("peak memory (CUDA max allocated): " + " | ".join(f"{s.name} {s.peak_mem_gib:.2f} GiB" for s in sides))
    else:
        memory_gib, _ = peak_memory(dims.device)
        print(f"peak memory {memory_gib:.2f} GiB (process peak RSS, both sides together)")
    if args.profile:
        for side in sides:
            print(f"\nprofile of one {side.name} step:\n{profile_table(side)}")


if __name__ == "__main__":
    main()
