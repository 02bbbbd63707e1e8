"""The run directory: one job at a time, and never a run silently started over another.

`train.out_dir` holds a run's `config.toml`, `metrics.jsonl` and, unless `checkpoint.dir` puts
them elsewhere, its `checkpoints/`. Rank 0 claims the run's directories at set-up, before it
writes anything into them:

* **A lock per directory**, an exclusive `flock` on `<dir>/.lock`, on `train.out_dir` and on
  `checkpoint.dir` when that is set and lies elsewhere, held until the run returns or raises. A
  second job on either directory (another command, or ranks left running after their launcher
  was killed) is refused in one line naming the directory and the PID holding it. The kernel
  drops the lock when its process dies, however it dies, so a SIGKILL or a torchrun restart
  never leaves a stale lock behind (a PID file would).
* **No fresh start over a run.** `checkpoint.resume = none` trains from step 0, which would replace
  the directory's checkpoints and truncate its `metrics.jsonl`, and a later `resume = auto` would
  mix the two runs; where a checkpoint or a non-empty `metrics.jsonl` is already there, it is
  refused. A torchrun restart (`--max-restarts`) of a `resume = none` job is the same run starting
  over, and goes ahead.

`write_config` saves `config.toml` atomically, and train.py calls it only once the run is known to
go ahead (after resuming), so a refused resume leaves the directory's config as it was.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from nanotrain.checkpoint.manifest import CONFIG, checkpoint_root, list_checkpoints
from nanotrain.config import Config
from nanotrain.errors import RunDirectoryError
from nanotrain.files import replace_file
from nanotrain.parallel.distributed import restart_attempt
from nanotrain.reporting.run_log import METRICS_FILE

LOCK = ".lock"


def claim(cfg: Config, cleanup: ExitStack, log: Callable[[str], None] = print) -> None:
    """Create and lock the run's directories for this job, and refuse a fresh start over a run.

    Rank 0 calls it at set-up, before anything is written; the locks are released when `cleanup`
    closes. Raises RunDirectoryError (one line) if a directory cannot be written, another job
    holds it, or `checkpoint.resume = none` would start over a run it holds.
    """
    run_dir, checkpoints = Path(cfg.train.out_dir), checkpoint_root(cfg)
    directories = {run_dir: "train.out_dir"}
    if cfg.checkpoint.dir and not _same_directory(checkpoints, run_dir):
        directories[checkpoints] = "checkpoint.dir"
    for directory, key in directories.items():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirectoryError(f"{key} '{directory}' cannot be written ({e.strerror}); choose another") from None
        cleanup.enter_context(locked(directory, key, log))
    if cfg.checkpoint.resume == "none" and restart_attempt() == 0:
        refuse_to_start_over(run_dir, checkpoints)


@contextmanager
def locked(directory: Path, key: str = "train.out_dir", log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (its `.lock` file) for the block.

    Raises RunDirectoryError naming the holder (`PID 1234 on host`, which the holder writes into
    the file) if another process has it. `key` names the directory in messages. Where the
    filesystem cannot lock (some network mounts) or `fcntl` is missing, `log` says so and the
    block runs unprotected.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        log(f"note: cannot lock {key} '{directory}' on this system; nothing stops a second job from writing into it")
        yield
        return
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirectoryError(f"{key} '{directory}' cannot be written ({e.strerror}); choose another") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "which has not yet written its PID"
            raise RunDirectoryError(
                f"{key} '{directory}' is in use by another training job ({holder}); wait for that job to end "
                f"or stop it, or choose another {key}"
            ) from None
        except OSError as e:
            log(f"note: cannot lock {key} '{directory}' ({e.strerror}); "
                "nothing stops a second job from writing into it")
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def refuse_to_start_over(run_dir: Path, checkpoints: Path) -> None:
    """Raise RunDirectoryError if `run_dir` or `checkpoints` holds a run.

    A run is a checkpoint, or a non-empty metrics.jsonl."""
    inside = _same_directory(checkpoints.parent, run_dir)
    found = []
    saved = list_checkpoints(checkpoints)
    if saved:
        found.append(f"checkpoints up to step {saved[0][0]}")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"a non-empty {METRICS_FILE}")
    if not found:
        return
    if inside:
        where, afresh = f"train.out_dir '{run_dir}'", f"a new --train.out_dir (or delete '{run_dir}')"
    else:
        where = f"train.out_dir '{run_dir}' with checkpoint.dir '{checkpoints}'"
        afresh = "a new --train.out_dir and --checkpoint.dir (or delete both)"
    raise RunDirectoryError(
        f"{where} already holds a run ({' and '.join(found)}), which checkpoint.resume = 'none' "
        f"would overwrite; resume it with --checkpoint.resume=auto, or start afresh with {afresh}"
    )


def write_config(run_dir: Path, cfg: Config) -> None:
    """Save the resolved config as `<run_dir>/config.toml`, atomically: a reader sees the old file or the new one."""
    path = run_dir / CONFIG
    try:
        replace_file(path, cfg.to_toml())  # one temporary name: the run's lock makes this job the only writer
    except OSError as e:
        raise RunDirectoryError(f"cannot write '{path}' ({e.strerror}); free space or fix permissions") from None


def _same_directory(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()
