"""Test aid (not part of nanotrain): run nanotrain.train and SIGKILL this process at a chosen point.

    CRASH_AT_STEP=N  CRASH_POINT=<point>  [CRASH_RANK=r]  python tests/checkpoint_crash_run.py ARGS...

Points: "after_step" (right after the checkpoint seam of step N, outside any save), "sigterm"
(SIGTERM instead of SIGKILL, right after the checkpoint seam of step N - 1, so the ranks agree on it
at step N's preemption check: a preemption notice), or one of the
named steps of a save at step N, killed just before ("before_<name>") or just after ("after_<name>"):
save_train_state, save_rank_state, write_manifest, publish, prune; or "full_disk_at_<name>": that
step raises ENOSPC instead of writing, as on a full disk (the process lives on). Under torchrun the crash happens
on CRASH_RANK only (default 0) and only in the first attempt (TORCHELASTIC_RESTART_COUNT = 0), so a
restarted job runs through.
"""

import errno
import os
import signal
import sys

from nanotrain.checkpoint import checkpointer as checkpoint
from nanotrain.train import main

CRASH_STEP = int(os.environ["CRASH_AT_STEP"])
CRASH_POINT = os.environ.get("CRASH_POINT", "after_step")
CRASH_HERE = (int(os.environ.get("RANK", "0")) == int(os.environ.get("CRASH_RANK", "0"))
              and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")
current_step = None


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def crashing(name, original):
    def wrapper(*args, **kwargs):
        if CRASH_HERE and current_step == CRASH_STEP and CRASH_POINT == f"before_{name}":
            die()
        if CRASH_HERE and current_step == CRASH_STEP and CRASH_POINT == f"full_disk_at_{name}":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        result = original(*args, **kwargs)
        if CRASH_HERE and current_step == CRASH_STEP and CRASH_POINT == f"after_{name}":
            die()
        return result
    return wrapper


for attribute in ("_save_train_state", "_save_rank_state", "write_manifest", "publish"):
    setattr(checkpoint, attribute, crashing(attribute.lstrip("_"), getattr(checkpoint, attribute)))
checkpoint.Checkpointer._prune = crashing("prune", checkpoint.Checkpointer._prune)
original_maybe_save = checkpoint.Checkpointer.maybe_save


def maybe_save(self, *args, **kwargs):
    global current_step
    current_step = step = self.train_state.step
    saved = original_maybe_save(self, *args, **kwargs)
    if CRASH_HERE and step == CRASH_STEP - 1 and CRASH_POINT == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice that reaches this rank only
    if CRASH_HERE and step == CRASH_STEP and CRASH_POINT == "after_step":
        die()
    return saved


checkpoint.Checkpointer.maybe_save = maybe_save

if __name__ == "__main__":
    main(sys.argv[1:])
