"""Dashboards: the run log's TensorBoard and Weights & Biases sinks, turned on in the `[log]` section.

Each sink gets every number of each train log step and evaluation (the keys of metrics.jsonl:
loss, lr, grad_norm, tokens_per_sec, mfu_pct, peak_mem_gib, tokens_seen, val_loss, ...) against
the optimizer step, and the sampled completions as text. A resumed run continues the same curves:

* TensorBoard writes event files under `<train.out_dir>/tensorboard/`; on resume the new writer
  purges the events after the resumed step (work lost in the crash and redone), so each step is
  shown once, with the values of the run that got past it.
* W&B keeps its files under `<train.out_dir>/wandb/` and the run id in `<train.out_dir>/wandb_run_id`,
  so a resume continues the same run. Without `WANDB_API_KEY` or `WANDB_MODE` in the environment it
  runs offline (`wandb sync` uploads later): a training job never waits on a login prompt.

Each needs an optional extra (`pip install 'nanotrain[tensorboard]'`, `'nanotrain[wandb]'`);
`check_installed` reports a missing one at start-up, on every rank, before any training.
"""

from __future__ import annotations

import importlib
import os
import secrets
from pathlib import Path

from nanotrain.config import Config
from nanotrain.errors import NanotrainError
from nanotrain.files import replace_file
from nanotrain.run_log import Sink

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"


class DashboardNotInstalledError(NanotrainError):
    """A dashboard is turned on in the config but its package is not installed."""


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


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a step or eval record, the step itself and absent values (None) left out."""
    return {key: value for key, value in record.items()
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

    def _add(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def log_step(self, record: dict) -> None:
        self._add(record)

    def log_eval(self, record: dict) -> None:
        self._add(record)

    def log_samples(self, step: int, samples: list[str]) -> None:
        self.writer.add_text("samples", samples_text(samples), step)
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
        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        (run_dir / "wandb").mkdir(exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.log.wandb_project, dir=str(run_dir), id=run_id, resume="allow",
                              mode=None if configured else "offline", config=cfg.to_dict(),
                              settings=wandb.Settings(console="off"))  # stdout stays the console sink's

    def log_step(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def log_eval(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def log_samples(self, step: int, samples: list[str]) -> None:
        self.run.log({"samples": self.wandb.Table(columns=["sample"], data=[[text] for text in samples])}, step=step)

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
