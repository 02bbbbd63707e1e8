"""Loss curves from runs: `python -m nanotrain.plot RUN_DIR [RUN_DIR ...] [--out PNG]`.

Reads each run's metrics.jsonl (with nanotrain.reporting.run_log's reader) and draws train and val loss,
learning rate and tokens/s against the step, one colour per run, so passing two run directories
compares them.
Needs matplotlib (`pip install 'nanotrain[plot]'`).
"""

from __future__ import annotations

import os
from pathlib import Path

from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error
from nanotrain.reporting.run_log import metrics_path, read_metrics


def loss_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run; a run with neither is an error."""
    records = read_metrics(run_dir)
    if not records.steps and not records.evals:
        raise NanotrainError(f"{metrics_path(run_dir)} holds no loss records yet")
    return records.steps, records.evals


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the runs' curves into the PNG `out` (written whole or not at all); return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise NanotrainError("plotting needs matplotlib: pip install 'nanotrain[plot]'") from None

    runs = [(run_dir, *loss_records(run_dir)) for run_dir in run_dirs]
    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(9, 10), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 1, 1]})
    for index, (run_dir, train_records, eval_records) in enumerate(runs):
        color, name = f"C{index}", run_dir.resolve().name
        steps = [r["step"] for r in train_records]
        loss_ax.plot(steps, [r["loss"] for r in train_records], color=color, label=f"{name} train")
        if eval_records:
            loss_ax.plot([r["step"] for r in eval_records], [r["val_loss"] for r in eval_records],
                         color=color, linestyle="--", marker="o", markersize=3, label=f"{name} val")
        lr_ax.plot(steps, [r["lr"] for r in train_records], color=color)
        speed_ax.plot(steps, [r["tokens_per_sec"] for r in train_records], color=color, label=name)
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.legend()
    lr_ax.set_ylabel("learning rate")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    loss_ax.set_title(" vs ".join(run_dir.resolve().name for run_dir in run_dirs))
    fig.tight_layout()

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    fig.savefig(partial, format="png", dpi=100)
    plt.close(fig)
    os.replace(partial, out)
    return out


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m nanotrain.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png of the first run)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dirs[0] / "curves.png"
    print(f"wrote {plot_runs(args.run_dirs, out)}")


if __name__ == "__main__":
    main()
