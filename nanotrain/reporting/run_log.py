"""The run log: the loop reports each event once, and sinks write it where it belongs.

The loop calls `log_step(record)` at every log step, `log_eval(record)` after every evaluation
and `log_samples(step, samples)` after every sampling; `RunLog` hands each call to its sinks
(an evaluation with its perplexity added, so every sink shows the same `val_ppl`). Only the main
process has sinks, so every rank may call the run log. The sinks, in `choose_sinks`' order:
`JsonlSink` (`metrics.jsonl` in the run directory), `ConsoleSink` (the log line on stdout), and the
dashboards the `[log]` section turns on, `TensorBoardSink` and `WandbSink`. To add a sink: subclass
`Sink`, implement the events it cares about, and append it in `choose_sinks` under the config key
that turns it on (docs/11, docs/12-logging-and-dashboards.md).

A dashboard gets every number of each step and evaluation against the optimizer step, named
`train/loss`, `eval/val_ppl`, ... (its metrics.jsonl key in a group), and a resumed run continues
the same curves: TensorBoard's new writer purges the events after the resumed step, W&B keeps its
run id in `<train.out_dir>/wandb_run_id` and runs offline unless `WANDB_API_KEY` or `WANDB_MODE` is
set. Each needs an optional extra; `check_dashboards_installed` reports a missing one on every rank
before any training, `check_dashboards_writable` a directory of theirs that is a file or read-only
before anything is written into the run.

This module is also the one place that knows metrics.jsonl's name and format: `trim_metrics`
rewinds it on resume, `read_metrics` reads it back (`python -m nanotrain.plot`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nanotrain.config import Config
from nanotrain.data.loader import window_span
from nanotrain.errors import DashboardDirectoryError, DashboardNotInstalledError, NanotrainError
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
        span = window_span(record["val_windows"], record["val_windows_total"])
        line += f" | {record['val_tokens']:,} tokens in {span}"
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


# ----------------------------------------------------------------------------- dashboards

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_RUN_ID_FILE = "wandb_run_id"


def _import(module: str, extra: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DashboardNotInstalledError(
            f"{key} needs the {extra} package: pip install 'nanotrain[{extra}]', or turn {key} off"
        ) from None


def check_dashboards_installed(cfg: Config) -> None:
    """Raise DashboardNotInstalledError (one line with the pip command) if a dashboard turned on is missing."""
    if cfg.log.tensorboard:
        _import("torch.utils.tensorboard", "tensorboard", "log.tensorboard")
    if cfg.log.wandb_project:
        _import("wandb", "wandb", "log.wandb_project")


def dashboard_directories(cfg: Config) -> dict[str, Path]:
    """The directory each dashboard turned on writes into, by the config key that turns it on."""
    run_dir, directories = Path(cfg.train.out_dir), {}
    if cfg.log.tensorboard:
        directories["log.tensorboard"] = run_dir / TENSORBOARD_DIR
    if cfg.log.wandb_project:
        directories["log.wandb_project"] = run_dir / WANDB_DIR
    return directories


def check_dashboards_writable(cfg: Config) -> None:
    """Create each dashboard's directory; raise DashboardDirectoryError (one line) if one is a file or read-only.

    Rank 0 calls it at set-up, beside the run directory's own checks, so a bad directory stops the
    run before config.toml or metrics.jsonl is written, not at the first log line.
    """
    for key, directory in dashboard_directories(cfg).items():
        if directory.exists() and not directory.is_dir():
            raise DashboardDirectoryError(f"{key} writes into '{directory}', which is a file; move the file away, "
                                          f"or turn {key} off")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):  # unnamed where the OS allows: nothing to clean up
                pass
        except OSError as e:
            raise DashboardDirectoryError(f"{key} writes into '{directory}', which cannot be written "
                                          f"({e.strerror or e}); make it writable, or turn {key} off") from None


def wandb_offline() -> bool:
    """Whether W&B runs offline: unless WANDB_API_KEY or WANDB_MODE is set, so a job never waits on a login prompt."""
    return not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))


def describe_dashboards(cfg: Config) -> str | None:
    """Where the dashboards turned on write, for the run's start-up summary; None when both are off."""
    directories, parts = dashboard_directories(cfg), []
    if "log.tensorboard" in directories:
        events = directories["log.tensorboard"]
        parts.append(f"TensorBoard events in {events} (tensorboard --logdir {events})")
    if "log.wandb_project" in directories:
        files = directories["log.wandb_project"]
        if wandb_offline():
            mode = f"offline ('wandb sync {files}/offline-run-*' uploads)"
        else:
            mode = os.environ.get("WANDB_MODE") or "online"
        parts.append(f"W&B project {cfg.log.wandb_project} in {files}, {mode}")
    return "; ".join(parts) or None


def scalars(record: dict, group: str) -> dict[str, float]:
    """The numbers of a step or eval record as `group/key`, the step itself and absent values (None) left out."""
    return {f"{group}/{key}": value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def samples_text(samples: list[str]) -> str:
    """The completions as one Markdown block per sample (TensorBoard renders text as Markdown)."""
    return "\n\n".join(f"    {text}" for text in samples)


class TensorBoardSink(Sink):
    """Event files in `<run_dir>/tensorboard/`, flushed at each event so a crash loses none of them."""

    def __init__(self, run_dir: Path, resumed_step: int = 0):
        tensorboard = _import("torch.utils.tensorboard", "tensorboard", "log.tensorboard")
        # purge_step hides the events the previous writer logged after the checkpoint (redone now)
        self.writer = tensorboard.SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                                purge_step=resumed_step + 1 if resumed_step > 0 else None)

    def _add(self, record: dict, group: str) -> None:
        for tag, value in scalars(record, group).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def log_step(self, record: dict) -> None:
        self._add(record, "train")

    def log_eval(self, record: dict) -> None:
        self._add(record, "eval")

    def log_samples(self, step: int, samples: list[str]) -> None:
        self.writer.add_text("eval/samples", samples_text(samples), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """A Weights & Biases run in project `log.wandb_project`, the same run across resumes."""

    def __init__(self, cfg: Config, run_dir: Path, resumed_step: int = 0):
        wandb = _import("wandb", "wandb", "log.wandb_project")
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_RUN_ID_FILE
        if resumed_step > 0 and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B ids: up to 64 of [a-z0-9_-]
            replace_file(id_file, run_id + "\n")
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.log.wandb_project, dir=str(run_dir), id=run_id, resume="allow",
                              mode="offline" if wandb_offline() else None, config=cfg.to_dict(),
                              settings=wandb.Settings(console="off"))  # stdout stays the console sink's

    def log_step(self, record: dict) -> None:
        self.run.log(scalars(record, "train"), step=record["step"])

    def log_eval(self, record: dict) -> None:
        self.run.log(scalars(record, "eval"), step=record["step"])

    def log_samples(self, step: int, samples: list[str]) -> None:
        table = self.wandb.Table(columns=["sample"], data=[[text] for text in samples])
        self.run.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def choose_sinks(cfg: Config, resumed_step: int) -> list[Sink]:
    """The sinks a run writes to, in order; a new sink is one more line here."""
    run_dir = Path(cfg.train.out_dir)
    sinks = [JsonlSink(run_dir, resumed_step), ConsoleSink(cfg.train.max_steps)]  # a printed line is already on disk
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir, resumed_step))
    if cfg.log.wandb_project:
        sinks.append(WandbSink(cfg, run_dir, resumed_step))
    return sinks


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
