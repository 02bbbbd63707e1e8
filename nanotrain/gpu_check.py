"""The GPU check: one call on a GPU machine that proves the CUDA path and measures it, in 8 minutes.

    launch/gpu_check.sh OUT_DIR [--wheels DIR] [--budget_s 480] [--dry_run]
    python -m nanotrain.gpu_check OUT_DIR ...                      (the same, from the repository root)

Parts, in order, each a child process with its own time budget and log file in OUT_DIR:

    install       what is missing, never torch: the project with --no-deps, then only the modules that
                  do not import, from --wheels DIR (--no-index) when given; torch's version is pinned
                  by a constraints file and checked unchanged afterwards
    cuda-tests    pytest -m cuda tests/test_cuda.py (tests/test_cuda.py: the CUDA test set)
    bench-20m     nanotrain.bench: tinystories-20m, seq 256, bf16 + compile, against HF LlamaForCausalLM
                  given the same precision and compile (ratio, tokens/s, MFU, peak memory)
    bench-125m    nanotrain.bench --shape llama-125m, seq 1024, bf16 + compile, nanotrain alone (MFU
                  against the data-sheet dense bf16 peak, tokens/s, peak memory) with a profile summary
    bench-20m-big nanotrain alone at 4x the batch, for the reproduction's best throughput

then the reproduction's budget projected (the time ~110M tokens take at the best tokens/s measured),
and OUT_DIR/summary.md (one table, also printed) and summary.json. A part that overruns its budget
is killed and marked so; unused seconds pass to the parts after it. Exit status: 0 when every part
passed, 1 when a CUDA test failed (or the test part did not finish), 3 when only a benchmark failed.

`--dry_run` runs the same plan on CPU so the script cannot rot (tests/test_gpu_check.py): nothing is
installed (the commands are logged), the CUDA tests skip with their reason, and the benchmarks run a
tiny model for a step. docs/15-running-on-gpus.md describes the run and how to read the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error

REPO = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480  # 8 minutes on an H100, the bound
# The TinyStories reproduction this project follows: 2 epochs of ~10% of TinyStoriesV2, ~110M
# tokens, which took ~1.5 h on a free Colab GPU.
REPRODUCTION_TOKENS = 110e6
REPRODUCTION_COLAB_HOURS = 1.5
# Module -> pip requirement, for what the runtime and the CUDA tests import besides torch.
NEEDED_MODULES = {"numpy": "numpy", "safetensors": "safetensors", "sentencepiece": "sentencepiece",
                  "pytest": "pytest", "transformers": "transformers",
                  **({"tomli": "tomli"} if sys.version_info < (3, 11) else {})}
TINY_MODEL = """[model]
flavour = "llama"
vocab_size = 256
max_position_embeddings = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_model = 32
d_ff = 64
[data]
source = "random"
"""


@dataclass
class Part:
    """One step of the check: a command, its time budget, and what became of it."""

    name: str
    budget_s: float
    argv: list[str]
    kind: str  # "install" | "tests" | "bench"
    status: str = "not run"  # passed | failed | timed out | skipped | not run
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)

    @property
    def log_name(self) -> str:
        return f"{self.name}.log"


def bench_argv(out_dir: Path, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nanotrain.bench", *args, "--json", str(out_dir / f"{name}.json")]


def plan(out_dir: Path, dry_run: bool) -> list[Part]:
    """The parts of the check and their budgets (seconds on an H100; they sum to TOTAL_BUDGET_S).

    install 40: two torch imports and at most a dozen local wheels. cuda-tests 190: ~20 tests of seconds each
    plus five child processes (three launches of launch/single_gpu.sh, one torchrun) and one
    torch.compile of a 2-layer model. bench-20m 110: two compiled models (nanotrain's blocks, HF's
    decoder layers) plus 6 rounds x 10 steps per side. bench-125m 90: one compile and 4 rounds of 10
    steps of ~30 ms plus a profiled step. bench-20m-big 50: one compile and 4 rounds of 10 steps.
    """
    tests = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    if dry_run:  # CPU: a tiny fp32 model for a step; no compile (inductor's C++ build takes minutes on a small CPU)
        tiny = str(out_dir / "tiny.toml")
        common = ["--device", "cpu", "--seq_len", "32", "--steps", "1", "--rounds", "1"]
        bench_20m = [*common, "--config", tiny, "--batch_size", "2"]
        bench_125m = [*common, "--config", tiny, "--batch_size", "2", "--reference", "none", "--profile"]
        bench_big = [*common, "--config", tiny, "--batch_size", "8", "--reference", "none"]
    else:
        common = ["--device", "cuda", "--precision", "bf16", "--compile", "--steps", "10"]
        bench_20m = [*common, "--config", "tinystories-20m", "--seq_len", "256", "--batch_size", "32", "--rounds", "5"]
        bench_125m = [*common, "--shape", "llama-125m", "--seq_len", "1024", "--batch_size", "16", "--rounds", "3",
                      "--reference", "none", "--profile"]
        bench_big = [*common, "--config", "tinystories-20m", "--seq_len", "256", "--batch_size", "128", "--rounds", "3",
                     "--reference", "none"]
    return [
        Part("install", 40, [], "install"),
        Part("cuda-tests", 190, tests, "tests"),
        Part("bench-20m", 110, bench_argv(out_dir, "bench-20m", *bench_20m), "bench"),
        Part("bench-125m", 90, bench_argv(out_dir, "bench-125m", *bench_125m), "bench"),
        Part("bench-20m-big", 50, bench_argv(out_dir, "bench-20m-big", *bench_big), "bench"),
    ]


# ---- install: only what is missing, never torch -------------------------------------------------------

def missing_requirements() -> list[str]:
    """The pip requirements of NEEDED_MODULES whose module does not import in this interpreter."""
    return [requirement for module, requirement in NEEDED_MODULES.items() if importlib.util.find_spec(module) is None]


def install_commands(missing: list[str], wheels: Path | None, constraints: Path) -> list[list[str]]:
    """pip commands that add `missing` (from `wheels` alone when given) and the project without its dependencies.

    The constraints file pins torch to the installed version, so no requirement can replace it.
    """
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--constraint", str(constraints)]
    commands = []
    if missing:
        source = ["--no-index", "--find-links", str(wheels)] if wheels else ["--retries", "0", "--timeout", "10"]
        commands.append([*pip, *source, *missing])
    commands.append([*pip, "--no-deps", "--no-build-isolation", "-e", str(REPO)])
    return commands


def installed_torch() -> str:
    """torch's version as a fresh interpreter sees it (what the child processes will import)."""
    result = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                            capture_output=True, text=True, timeout=120)
    return result.stdout.strip() or f"none ({result.stderr.strip().splitlines()[-1:]})"


def run_install(part: Part, out_dir: Path, wheels: Path | None, dry_run: bool, log, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    torch_before = installed_torch()
    constraints = out_dir / "constraints.txt"
    constraints.write_text(f"torch=={torch_before}\n")
    missing = missing_requirements()
    commands = install_commands(missing, wheels, constraints)
    part.detail.update({"torch": torch_before, "missing": missing, "commands": [" ".join(c) for c in commands]})
    log(f"torch {torch_before}; missing: {', '.join(missing) or 'nothing'}")
    if dry_run:
        log("dry run: not installing; would run:\n" + "\n".join(part.detail["commands"]))
        part.status = "passed"
        return
    failures = []
    for command in commands:
        log("$ " + " ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                    timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            log("[gpu_check] pip killed: over the install budget")
            failures.append(command[-1])
            continue
        log(result.stdout + result.stderr)
        if result.returncode:
            failures.append(command[-1])
    torch_after = installed_torch()
    if torch_after != torch_before:
        part.status, part.detail["error"] = "failed", f"torch changed from {torch_before} to {torch_after}"
        return
    still_missing = missing_requirements()
    part.detail["still_missing"] = still_missing
    # The project itself runs from the repository root (PYTHONPATH) even when its editable install fails.
    part.status = "failed" if still_missing else "passed"
    if failures:
        part.detail["pip_failures"] = failures


# ---- running a part, reading its results ---------------------------------------------------------------

def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1"}


def run_child(part: Part, timeout_s: float, log_file: Path) -> None:
    """Run the part's command with its output in `log_file`; kill its whole process group at the timeout."""
    with open(log_file, "a") as out:
        out.write("$ " + " ".join(part.argv) + "\n")
        out.flush()
        proc = subprocess.Popen(part.argv, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\n[gpu_check] killed after {timeout_s:.0f} s: over its budget\n")
            part.status = "timed out"
            return
    part.status = "passed" if returncode == 0 else "failed"
    part.detail["exit_status"] = returncode


TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)
SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+): (.*)$", re.M)


def read_test_results(log_text: str) -> dict:
    """Per-test outcomes from pytest -v output (complete up to a kill), and the skip reasons from -rs."""
    outcomes = {name: outcome.lower() for name, outcome in TEST_LINE.findall(log_text)}
    counts = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    reasons = sorted({reason for _, _, reason in SKIP_LINE.findall(log_text)})
    return {"tests": outcomes, "counts": counts, "skip_reasons": reasons}


def projection(parts: dict[str, Part]) -> dict | None:
    """The reproduction's time at the best nanotrain tokens/s the 19.5M-model benchmarks measured."""
    candidates = []
    for name in ("bench-20m", "bench-20m-big"):
        figures = parts[name].detail
        for side in figures.get("sides", []):
            if side["name"] == "nanotrain":
                setting = (f"{figures['model']}, batch {figures['batch_size']} x {figures['seq_len']}, "
                           f"{figures['precision']}{' + compile' if figures['compile'] else ''}")
                candidates.append((side["tokens_per_sec"], setting))
    if not candidates:
        return None
    tokens_per_sec, setting = max(candidates)
    hours = REPRODUCTION_TOKENS / tokens_per_sec / 3600
    return {"tokens_per_sec": tokens_per_sec, "setting": setting, "hours": hours,
            "speed_vs_colab": REPRODUCTION_COLAB_HOURS / hours}


# ---- the summary ----------------------------------------------------------------------------------------

def format_number(value, spec: str = ",.0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def summary_table(parts: list[Part], forecast: dict | None, total_s: float, dry_run: bool) -> str:
    by_name = {part.name: part for part in parts}
    lines = [f"# GPU check{' (dry run on CPU)' if dry_run else ''}", "",
             f"{by_name['install'].detail.get('gpu', '')}", "",
             "| part | status | seconds (budget) | result |", "|---|---|---:|---|"]
    for part in parts:
        lines.append(f"| {part.name} | {part.status} | {part.seconds:.0f} ({part.budget_s:.0f}) | {describe(part)} |")
    lines.append(f"| total | | {total_s:.0f} ({TOTAL_BUDGET_S}) | |")
    tests = by_name["cuda-tests"].detail.get("tests", {})
    if tests:
        lines += ["", "| CUDA test | outcome |", "|---|---|"]
        lines += [f"| {name.split('::', 1)[1]} | {outcome} |" for name, outcome in tests.items()]
    for reason in by_name["cuda-tests"].detail.get("skip_reasons", []):
        lines.append(f"\nskipped: {reason}")
    profile = by_name["bench-125m"].detail.get("profile", {}).get("nanotrain")
    if profile:
        lines += ["", "| bench-125m: top kernels of one step | share | ms |", "|---|---:|---:|"]
        lines += [f"| `{row['name'][:80]}` | {row['share_pct']:.1f}% | {row['ms']:.2f} |" for row in profile]
    if forecast:
        lines += ["", f"The reproduction's ~{REPRODUCTION_TOKENS / 1e6:.0f}M tokens at the best measured "
                  f"{forecast['tokens_per_sec']:,.0f} tokens/s ({forecast['setting']}): {forecast['hours'] * 60:,.1f} "
                  f"minutes; it took ~{REPRODUCTION_COLAB_HOURS} h on a free Colab GPU "
                  f"({forecast['speed_vs_colab']:.2g}x that speed)."]
    return "\n".join(lines) + "\n"


def describe(part: Part) -> str:
    d = part.detail
    if part.kind == "install":
        missing = ", ".join(d.get("missing", [])) or "nothing"
        extra = f"; {d['error']}" if "error" in d else ""
        return f"torch {d.get('torch', '?')} kept; missing before: {missing}{extra}"
    if part.kind == "tests":
        counts = d.get("counts", {})
        failed = [name.split("::", 1)[1] for name, outcome in d.get("tests", {}).items()
                  if outcome in ("failed", "error")]
        text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"
        return text + (f"; failed: {', '.join(failed)}" if failed else "")
    sides = d.get("sides", [])
    if not sides:
        return d.get("error", "no figures")
    pieces = [f"{s['name']} {format_number(s['tokens_per_sec'])} tok/s, MFU {format_number(s['mfu_pct'], '.1f', '%')}, "
              f"{format_number(s['peak_mem_gib'], '.2f', ' GiB')}" for s in sides]
    if "ratio" in d:
        pieces.append(f"ratio {d['ratio']:.2f}x ({d['ratio_range'][0]:.2f}-{d['ratio_range'][1]:.2f})")
    return f"{d['model']} batch {d['batch_size']} x {d['seq_len']}: " + "; ".join(pieces)


def exit_status(parts: list[Part]) -> int:
    """0 all passed; 1 a CUDA test failed or the tests did not finish; 3 only a benchmark (or install) failed."""
    tests = next(part for part in parts if part.kind == "tests")
    if tests.status != "passed":
        return 1
    return 0 if all(part.status == "passed" for part in parts) else 3


# ---- the command --------------------------------------------------------------------------------------

def environment() -> str:
    import torch

    line = f"python {platform.python_version()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line += (f", CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {props.name} "
                 f"({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
    else:
        line += ", no CUDA device"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        line += f", driver {smi.stdout.strip().split(', ')[-1]}" if smi.returncode == 0 and smi.stdout.strip() else ""
    # launch/forward_signals.sh (every launch script) refuses to start without pkill, and triton
    # (torch.compile on CUDA) builds a small launcher with the system's C compiler
    line += "" if shutil.which("pkill") else ", no pkill (the launch scripts need procps)"
    return line + ("" if any(shutil.which(cc) for cc in ("cc", "gcc", "clang")) else
                   ", no C compiler (torch.compile's triton needs one)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory for the logs, summary.md and summary.json")
    parser.add_argument("--wheels", type=Path,
                        help="directory of wheels for what is missing (installed with --no-index)")
    parser.add_argument("--budget_s", type=float, default=TOTAL_BUDGET_S, help="the whole check's time budget")
    parser.add_argument("--dry_run", action="store_true",
                        help="run the plan on CPU: nothing installed, tiny benchmarks")
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        raise NanotrainError(f"--wheels {args.wheels} is not a directory of wheels")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanotrainError(f"cannot create {args.out_dir} ({e.strerror}); give a writable directory") from None
    out_dir = args.out_dir.resolve()
    if args.dry_run:
        (out_dir / "tiny.toml").write_text(TINY_MODEL)
    parts = plan(out_dir, args.dry_run)
    scale = args.budget_s / TOTAL_BUDGET_S
    for part in parts:
        part.budget_s *= scale
    start = time.perf_counter()

    def log_to(part: Part):
        def log(text: str) -> None:
            with open(out_dir / part.log_name, "a") as f:
                f.write(text.rstrip() + "\n")
        return log

    for index, part in enumerate(parts):
        elapsed = time.perf_counter() - start
        # This part's own budget plus whatever the earlier parts left unused; the later parts keep theirs.
        timeout = args.budget_s - elapsed - sum(p.budget_s for p in parts[index + 1:])
        (out_dir / part.log_name).write_text("")
        print(f"[gpu_check] {part.name}: up to {timeout:.0f} s ...", flush=True)
        part_start = time.perf_counter()
        if timeout < 5:
            part.status = "skipped"
            part.detail["error"] = "no time left in the budget"
        elif part.kind == "install":
            part.detail["gpu"] = environment()
            run_install(part, out_dir, args.wheels, args.dry_run, log_to(part), timeout)
        else:
            run_child(part, timeout, out_dir / part.log_name)
        part.seconds = time.perf_counter() - part_start
        if part.kind == "tests":
            part.detail.update(read_test_results((out_dir / part.log_name).read_text()))
        if part.kind == "bench":
            figures = out_dir / f"{part.name}.json"
            if figures.is_file() and part.status == "passed":
                part.detail.update(json.loads(figures.read_text()))
        print(f"[gpu_check] {part.name}: {part.status} in {part.seconds:.0f} s — {describe(part)}", flush=True)

    total = time.perf_counter() - start
    forecast = projection({part.name: part for part in parts})
    table = summary_table(parts, forecast, total, args.dry_run)
    (out_dir / "summary.md").write_text(table)
    (out_dir / "summary.json").write_text(json.dumps(
        {"dry_run": args.dry_run, "total_s": total, "budget_s": args.budget_s, "projection": forecast,
         "parts": [{"name": p.name, "status": p.status, "seconds": p.seconds, "budget_s": p.budget_s,
                    "detail": p.detail} for p in parts]}, indent=1) + "\n")
    print("\n" + table)
    status = exit_status(parts)
    print(f"[gpu_check] logs and summary in {out_dir}; exit status {status}")
    raise SystemExit(status)


if __name__ == "__main__":
    main()
