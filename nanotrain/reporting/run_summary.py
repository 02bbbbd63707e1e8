"""The few lines a run prints at start: what trains, on what, how, and where its files go.

The full resolved config is not printed (it is `<train.out_dir>/config.toml`, and
`python -m nanotrain.train --print-config` shows it without training). `epochs` turns a count
of train samples into passes over the train split, for this summary and the step log
(docs/02-loss-and-train-loop.md).
"""

from __future__ import annotations

from pathlib import Path

from nanotrain.checkpoint.manifest import CONFIG, checkpoint_root
from nanotrain.config import Config
from nanotrain.data.loader import Data
from nanotrain.model.transformer import num_parameters
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision
from nanotrain.reporting.run_log import METRICS_FILE, describe_dashboards, format_epochs

SOURCE_NAMES = {"stories": "built-in story corpus", "tokens": "prepared dataset", "random": "random tokens"}


def run_summary(cfg: Config, dims: ParallelDims, model, data: Data, precision: Precision) -> str:
    """Aligned `label  value` lines: model, data, layout, precision, run dir, config and checkpoints."""
    m, run_dir = cfg.model, Path(cfg.train.out_dir)
    dashboards = describe_dashboards(cfg)  # None when both are off
    rows = [
        ("model", f"{num_parameters(model):,} parameters, {m.flavour}, {m.n_layers} layers x d_model {m.d_model}, "
                  f"vocab {m.vocab_size:,}"),
        ("data", _describe_data(cfg, dims, data)),
        ("layout", f"{dims.world_size} process{'es' if dims.world_size > 1 else ''} on {dims.device}, "
                   f"strategy {dims.strategy}, data parallel {dims.dp_size}"
                   + (f", tensor parallel {dims.tp_size}" if dims.tp_size > 1 else "")),
        ("precision", precision.describe()),
        ("run dir", f"{run_dir} (metrics in {METRICS_FILE})"),
        *([("dashboards", dashboards)] if dashboards else []),
        ("config", f"{run_dir / CONFIG} (the full resolved config; --print-config prints it without training)"),
        ("checkpoints", _describe_checkpoints(cfg)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def epochs(samples: int, cfg: Config, data: Data) -> float | None:
    """`samples` train samples as passes over the train split (1.5: one and a half).

    None for the endless random source."""
    return None if cfg.data.source == "random" else samples / data.train.order.num_samples


def _describe_data(cfg: Config, dims: ParallelDims, data: Data) -> str:
    d, t = cfg.data, cfg.train
    where = f" at {data.path}" if data.path else ""
    unit = "documents" if d.mode == "padded" else f"windows of {t.seq_len} tokens"
    # the random source never runs out: its sample count is a sentinel, not a size
    train_size = "endless" if d.source == "random" else f"{data.train.order.num_samples:,}"
    run_epochs = epochs(t.max_steps * t.grad_accum_steps * dims.dp_size * t.batch_size, cfg, data)
    steps = f"{t.max_steps:,} step{'s' if t.max_steps > 1 else ''}"
    length = f", {format_epochs(run_epochs)} epochs in {steps}" if run_epochs is not None else ""
    evaluation = f"{data.num_val_batches} val batches per evaluation" if data.num_val_batches else "no val batches"
    return f"{d.source} ({SOURCE_NAMES[d.source]}){where}: {train_size} train {unit} ({d.mode}){length}, {evaluation}"


def _describe_checkpoints(cfg: Config) -> str:
    c = cfg.checkpoint
    every = f"every {c.interval} steps" if c.interval else "no periodic saves (checkpoint.interval = 0)"
    return f"{checkpoint_root(cfg)} ({every}, keep last {c.keep_last}, resume {c.resume})"
