"""The run log: the loop reports each event once, and sinks write it where it belongs.

The loop calls `log_step(record)` at every log step, `log_eval(record)` after every evaluation
and `log_samples(step, samples)` after every sampling; `RunLog` hands each call to its sinks
(an evaluation with its perplexity added, so every sink shows the same `val_ppl`).
Two sinks exist: `ConsoleSink` (the log line on stdout) and `JsonlSink` (`metrics.jsonl` in the
run directory). Only the main process has sinks, so every rank may call the run log.

The dashboards (TensorBoard, W&B) are sinks too, in reporting/dashboards.py. To add a sink: subclass
`Sink`, implement the events it cares about, and append it in `choose_sinks`, under the config key that turns it on.

This module is also the one place that knows metrics.jsonl's name and format: `trim_metrics`
rewinds it on resume, `read_metrics` reads it back (`python -m nanotrain.plot`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from nanotrain.config import Config
from nanotrain.data.loader import window_span
from nanotrain.errors import NanotrainError
from nanotrain.files import replace_file
from nanotrain.parallel.dims import ParallelDims

METRICS_FILE = "metrics.jsonl"


class Sink:
    """One destination of the run log; each event it has no use for is ignored."""

    def log_step(self, record: dict) -> None:
        """A train log step: step, loss, lr, grad_norm, the speed fields, tokens_seen, epoch, elapsed_s, eta_s."""

    def log_eval(self, record: dict) -> None:
        """An evaluation: step, val_loss and val_ppl."""

    def log_samples(self, step: int, samples: list[str]) -> None:
        """Completions sampled from the model at `step`."""

    def close(self) -> None:
        """Release what the sink holds (files, connections); called once when the run ends."""


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def perplexity(loss: float) -> float:
    """exp(loss), capped (at exp(50)) so that a diverged loss gives a number, not an overflow."""
    return math.exp(min(loss, 50.0))


def format_epochs(epochs: float) -> str:
    """Passes over the train split: three significant digits below one (0.0517, 0.620), two decimals above (1.37)."""
    return f"{epochs:#.3g}" if epochs < 1 else f"{epochs:.2f}"


def format_step(record: dict, max_steps: int) -> str:
    """The one line printed every train.log_every steps."""
    parts = [f"step {record['step']:>6}/{max_steps}"]
    if record.get("epoch") is not None:  # the random source is endless: no epochs
        parts.append(f"epoch {format_epochs(record['epoch'])}")
    parts += [
        f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
        f"grad norm {record['grad_norm']:.3f}", f"{record['tokens_per_sec']:,.0f} tok/s",
    ]
    if record.get("tokens_per_sec_per_rank", record["tokens_per_sec"]) != record["tokens_per_sec"]:
        parts[-1] += f" ({record['tokens_per_sec_per_rank']:,.0f}/rank)"
    if record.get("mfu_pct") is not None:
        parts.append(f"MFU {record['mfu_pct']:.1f}%")
    if record.get("peak_mem_gib") is not None:
        parts.append(f"mem {record['peak_mem_gib']:.2f} GiB ({record['peak_mem_pct']:.0f}%)")
    if "data_ms" in record:
        parts.append(f"data {record['data_ms']:.0f} ms + compute {record['compute_ms']:.0f} ms")
    parts += [f"elapsed {format_duration(record['elapsed_s'])}", f"eta {format_duration(record['eta_s'])}"]
    return " | ".join(parts)


def format_eval(record: dict, max_steps: int) -> str:
    """The line printed after each evaluation: val loss and perplexity."""
    val_loss = record["val_loss"]
    line = f"step {record['step']:>6}/{max_steps} | val loss {val_loss:.4f} | val ppl {perplexity(val_loss):.2f}"
    if "val_windows" in record:  # the windows averaged, named as nanotrain.evaluate names them
        line += f" | {record['val_tokens']:,} tokens in {window_span(record['val_windows'], record['val_windows_total'])}"
    return line


class ConsoleSink(Sink):
    """The human-readable log on stdout: one line per log step and evaluation, one per sample."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def log_step(self, record: dict) -> None:
        print(format_step(record, self.max_steps))

    def log_eval(self, record: dict) -> None:
        print(format_eval(record, self.max_steps))

    def log_samples(self, step: int, samples: list[str]) -> None:
        print("\n".join(f"sample: {text!r}" for text in samples))


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def trim_metrics(file: Path, step: int) -> None:
    """Drop metrics records after `step` (work lost in the crash, about to be redone); keep the rest."""
    if not file.is_file():
        return
    kept = []
    for line in file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    replace_file(file, "".join(f"{line}\n" for line in kept))


class JsonlSink(Sink):
    """metrics.jsonl: one JSON object per line and event, flushed at once (a crash loses at most one line).

    A fresh run starts the file empty; a run resumed at `resumed_step` keeps the records up to
    that step, drops the later ones (work about to be redone) and appends after them.
    """

    def __init__(self, run_dir: Path, resumed_step: int = 0):
        path = metrics_path(run_dir)
        if resumed_step > 0:
            trim_metrics(path, resumed_step)
        self.file = open(path, "a" if resumed_step > 0 else "w")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def log_step(self, record: dict) -> None:
        self.write(record)

    def log_eval(self, record: dict) -> None:
        self.write(record)

    def log_samples(self, step: int, samples: list[str]) -> None:
        self.write({"step": step, "samples": samples})

    def close(self) -> None:
        self.file.close()


def choose_sinks(cfg: Config, resumed_step: int) -> list[Sink]:
    """The sinks a run writes to, in order; a new sink is one more line here."""
    from nanotrain.reporting.dashboards import dashboard_sinks  # reporting/dashboards.py subclasses Sink from this module

    return [
        JsonlSink(Path(cfg.train.out_dir), resumed_step),  # first: a printed line is already on disk
        ConsoleSink(cfg.train.max_steps),
        *dashboard_sinks(cfg, resumed_step),  # TensorBoard, W&B: as the [log] section says
    ]


class RunLog:
    """Fans each event of the loop out to the sinks, in order."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @classmethod
    def for_run(cls, cfg: Config, dims: ParallelDims, resumed_step: int) -> "RunLog":
        """The run log of one process: the configured sinks on the main process, none elsewhere."""
        return cls(choose_sinks(cfg, resumed_step) if dims.is_main else [])

    def log_step(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log_step(record)

    def log_eval(self, record: dict) -> None:
        record = {**record, "val_ppl": perplexity(record["val_loss"])}
        for sink in self.sinks:
            sink.log_eval(record)

    def log_samples(self, step: int, samples: list[str]) -> None:
        for sink in self.sinks:
            sink.log_samples(step, samples)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


@dataclass
class MetricsRecords:
    """A run's metrics.jsonl, by kind of event."""

    steps: list[dict] = field(default_factory=list)  # train log steps (have "loss")
    evals: list[dict] = field(default_factory=list)  # evaluations (have "val_loss")
    samples: list[dict] = field(default_factory=list)  # samplings (have "samples")


def read_metrics(run_dir: Path) -> MetricsRecords:
    """The records of a run's metrics.jsonl; a torn last line (a crash mid-write) is ignored.

    Raises NanotrainError (one line) if the file is missing or a line before the last is damaged.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        raise NanotrainError(f"{path} not found: pass a run directory (train.out_dir) of a run that logged")
    lines = path.read_text().splitlines()
    records = MetricsRecords()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise NanotrainError(f"{path} line {number} is not JSON; the file is damaged") from None
        if not isinstance(record, dict):
            raise NanotrainError(f"{path} line {number} is not a JSON object; the file is damaged")
        for key, kind in (("loss", records.steps), ("val_loss", records.evals), ("samples", records.samples)):
            if key in record:
                kind.append(record)
    return records
