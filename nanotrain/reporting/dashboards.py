"""Dashboards: the run log's TensorBoard and Weights & Biases sinks, turned on in the `[log]` section.

Each sink gets every number of each train log step and evaluation against the optimizer step,
named after its metrics.jsonl key in a group: `train/loss`, `train/lr`, `train/epoch`, ...,
`eval/val_loss`, `eval/val_ppl`, and the sampled completions as text (`eval/samples`). A resumed
run continues the same curves:

* TensorBoard writes event files under `<train.out_dir>/tensorboard/`; on resume the new writer
  purges the events after the resumed step (work lost in the crash and redone), so each step is
  shown once, with the values of the run that got past it.
* W&B keeps its files under `<train.out_dir>/wandb/` and the run id in `<train.out_dir>/wandb_run_id`,
  so a resume continues the same run. Without `WANDB_API_KEY` or `WANDB_MODE` in the environment it
  runs offline (`wandb sync` uploads later): a training job never waits on a login prompt.

Each needs an optional extra (`pip install 'nanotrain[tensorboard]'`, `'nanotrain[wandb]'`);
`check_installed` reports a missing one at start-up, on every rank, before any training, and
`check_writable` a directory of theirs that is a file or read-only, before anything is written
into the run (docs/12-logging-and-dashboards.md).
"""

from __future__ import annotations

import importlib
import os
import secrets
import tempfile
from pathlib import Path

from nanotrain.config import Config
from nanotrain.errors import NanotrainError
from nanotrain.files import replace_file
from nanotrain.reporting.run_log import Sink

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_RUN_ID_FILE = "wandb_run_id"


class DashboardNotInstalledError(NanotrainError):
    """A dashboard is turned on in the config but its package is not installed."""


class DashboardDirectoryError(NanotrainError):
    """A dashboard's directory in the run directory is a file or cannot be written."""


def _import(module: str, extra: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DashboardNotInstalledError(
            f"{key} needs the {extra} package: pip install 'nanotrain[{extra}]', or turn {key} off"
        ) from None


def check_installed(cfg: Config) -> None:
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


def check_writable(cfg: Config) -> None:
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
        self.run.log({"eval/samples": self.wandb.Table(columns=["sample"], data=[[text] for text in samples])}, step=step)

    def close(self) -> None:
        self.run.finish()


def dashboard_sinks(cfg: Config, resumed_step: int) -> list[Sink]:
    """The dashboard sinks the `[log]` section turns on (none by default)."""
    run_dir = Path(cfg.train.out_dir)
    sinks: list[Sink] = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir, resumed_step))
    if cfg.log.wandb_project:
        sinks.append(WandbSink(cfg, run_dir, resumed_step))
    return sinks
