"""Side-by-side training throughput: nanotrain against what a user would write instead; or, with
`--layouts`, the per-rank memory and step time of a parallel layout (training/layout_benchmark.py).

    python -m nanotrain.bench [--config tinystories-20m] [--shape llama-125m] [--seq_len 256]
                              [--batch_size 8] [--steps 3] [--rounds 5] [--precision fp32]
                              [--compile] [--reference auto|none] [--profile] [--json FILE]
    python -m nanotrain.bench --layouts [--config tinystories-20m] [--global_batch 8] [--warmup 2]
                                        [--steps 5] [--profile] [--section.key=value ...]
    torchrun --nproc_per_node=N -m nanotrain.bench --layouts [the same options]

The two modes take their own options; an option of the other mode is refused in one line.

The throughput benchmark's library is training/throughput_benchmark.py (docs/08-performance.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanotrain.config import CHOICES
from nanotrain.errors import ArgumentParser, NanotrainError, UsageError, exit_on_error
from nanotrain.hf.convert import hf_llama_with_weights_of
from nanotrain.parallel import distributed
from nanotrain.training import layout_benchmark
from nanotrain.training.throughput_benchmark import BENCH_SHAPES, ThroughputSettings, benchmark_throughput

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
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES),
                        help="a model shape of BENCH_SHAPES instead of the preset's")
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


def parse_args(argv: list[str]) -> ThroughputSettings:
    """The throughput benchmark's settings."""
    refuse_the_other_modes_options(argv, layouts=False)
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise NanotrainError("--steps, --rounds and --batch_size must be >= 1 and --seq_len >= 2")
    return ThroughputSettings(args.config, args.shape, args.seq_len, args.batch_size, args.steps, args.rounds,
                              args.precision, args.compile, args.device, args.reference,
                              args.reference_fused_adamw, args.profile, args.json)


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
    benchmark_throughput(parse_args(argv), llama_reference=hf_llama_with_weights_of)


if __name__ == "__main__":
    main()
