"""Training checkpoints: crash-safe save, exact resume, resharding, and loading that never unpickles code.

A checkpoint is a directory `<checkpoint.dir or train.out_dir/checkpoints>/step_00000100/`:

    model.safetensors    full fp32 weights, clean parameter names (a tied head is stored once,
                         as tok_embeddings.weight); readable with safetensors alone
    config.toml          the resolved config
    tokenizer.model      the data's tokenizer file, unchanged (tokenizer.json for a Hugging Face
                         tokenizer); absent for data.source = "random"
    trainer_state.json   the train state (step, tokens seen, skipped steps), GradScaler, loader
                         position, layout, data identity, config (training checkpoints only)
    train_state/         model + optimizer state through torch.distributed.checkpoint (DCP):
                         each rank writes its own shard; DCP reshards on load, so a checkpoint
                         saved by 2 ranks resumes on 1 and the reverse (also DDP <-> FSDP)
    rank_00000.pt        per-rank random streams (Python, NumPy, torch CPU, CUDA) and loader position
    manifest.json        written LAST: every file's size and sha256, the step, the format version

The `Checkpointer` only saves and restores state that others own (the model, optimizer, scaler,
the loop's `TrainState`, the loader, the random streams) and picks and verifies the checkpoint
to resume from; signals are training/preemption.py's, metrics.jsonl is reporting/run_log.py's. The files and their
verification live in checkpoint/manifest.py, loading pickles safely in checkpoint/safe_loading.py.

Atomicity: everything is written into `step_00000100.tmp-<pid>`, synced, then renamed; a
directory without a manifest is never picked up. Old checkpoints beyond keep_last are deleted
only after the new one is in place. A disk without room for a checkpoint (`checkpoint_bytes`)
is refused at start and before each save; a write that fails anyway (disk full) stops every
rank with one line naming the directory and the space needed, and leaves nothing behind.
docs/09-checkpointing.md.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanotrain.checkpoint.manifest import (
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    TRAIN_STATE_DIR,
    TRAINER_STATE,
    WEIGHTS,
    checkpoint_root,
    list_checkpoints,
    read_trainer_state,
    read_weights,
    require_directory,
    step_dir_name,
    verify,
    write_bytes,
    write_manifest,
    write_text,
    write_weights,
)
from nanotrain.checkpoint.safe_loading import (
    PROTOCOL_WARNING,
    dcp_failure,
    dcp_planner,
    dcp_reader,
    torch_load,
    unsafe_pickle,
)
from nanotrain.checkpoint.state import RandomState, TrainState
from nanotrain.config import Config, load_config
from nanotrain.errors import CheckpointError, NanotrainError, first_line
from nanotrain.files import fsync, publish, remove_stale_temporaries, temp_directory
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims

# Config keys whose change makes a checkpoint meaningless for this run: the weights' shape or
# function, or the order of the data (seed, sequence length; the global batch is checked apart).
RESUME_REFUSES = (
    "model.flavour", "model.vocab_size", "model.max_position_embeddings", "model.n_layers",
    "model.n_heads", "model.n_kv_heads", "model.d_model", "model.d_ff", "model.rope_theta",
    "model.norm_eps", "model.tie_embeddings", "data.source", "data.mode", "train.seq_len", "train.seed",
)
# Changes that are neither refused nor worth a log line.
RESUME_IGNORES = ("checkpoint.resume", "train.out_dir", "data.path")


def load_pretrained(model: torch.nn.Module, model_cfg, checkpoint: str | Path) -> None:
    """Load checkpoint directory `checkpoint`'s weights into a freshly built `model` (train.init_from).

    The saved model must have the shape and function this run configures (the model keys of
    RESUME_REFUSES); dropout, init_std and activation checkpointing may differ.
    """
    path = Path(checkpoint)
    try:
        verify(path)
        saved = load_config(str(path / CONFIG))
    except NanotrainError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    for key in (k.split(".", 1)[1] for k in RESUME_REFUSES if k.startswith("model.")):
        if getattr(saved.model, key) != getattr(model_cfg, key):
            raise CheckpointError(
                f"train.init_from '{path}' has model.{key} = {getattr(saved.model, key)!r} but this run sets "
                f"{getattr(model_cfg, key)!r}; use --config {path / CONFIG} or match it"
            )
    model.load_state_dict(read_weights(path, saved), strict=True)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """A lower bound on the size of one training checkpoint of `model`, the same on every rank.

    Its tensors: DCP's copy of the weights and of AdamW's two moments (each of the parameter's
    shape and dtype), and model.safetensors' fp32 copy of the weights; a DTensor counts whole.
    """
    parameters = list(model.parameters())  # a tied weight once
    return sum(3 * p.numel() * p.element_size() + 4 * p.numel() for p in parameters)


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _storage_failure(error: BaseException) -> str | None:
    """Why a write failed, in one line, when storage refused it (disk full, read-only, gone); else None.

    torch.save into a file object raises a RuntimeError ("unexpected pos") whose context is the
    write's OSError; into a path, the RuntimeError alone; safetensors raises its own error type.
    """
    error = dcp_failure(error)
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return first_line(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)  # `from None` ends it
    text = str(error)
    torch_writer = isinstance(error, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text)
    if torch_writer or (type(error).__name__ == "SafetensorError" and "I/O error" in text):
        return f"a write stopped short: {first_line(error)}"
    return None


def _flatten(config_dict: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config_dict.items() for key, value in values.items()}


@dataclass
class _Layout:
    dp_size: int  # saved as trainer_state.json's "world_size"
    global_batch: int  # sequences per optimizer step over all ranks and micro-steps


class Checkpointer:
    """Saves and restores, atomically, everything a run needs to continue exactly where it stopped.

    It owns none of it: the model, optimizer and scaler are the loop's, `train_state` is the
    loop's counters, the loader comes from `data`, and this process's random streams are read
    and set through `RandomState`. Seams in training/trainer.py: `restore()` once after the optimizer is
    built (returns the step to start from) and `maybe_save(force=...)` after every optimizer
    step (interval, final step; `force` when the loop stops for a preemption).
    """

    def __init__(self, cfg: Config, dims: ParallelDims, data, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, train_state: TrainState):
        self.cfg, self.dims, self.model, self.optimizer, self.scaler = cfg, dims, model, optimizer, scaler
        self.train_state, self.random = train_state, RandomState(dims.device)
        self.loader, self.data_identity, self.tokenizer = data.train, data.identity, data.tokenizer
        self.root = checkpoint_root(cfg)
        t = cfg.train
        self.layout = _Layout(dims.dp_size, t.grad_accum_steps * dims.dp_size * t.batch_size)
        self.log = print if dims.is_main else (lambda *args, **kwargs: None)
        self.multi_process = dist.is_initialized() and dims.world_size > 1  # collectives have others to reach
        self.last_saved_step = -1
        self.checkpoint_bytes = checkpoint_bytes(model)
        self.resumed_config: dict | None = None  # the restored checkpoint's config (Config.to_dict() form)
        if cfg.checkpoint.interval > 0 or cfg.checkpoint.on_preempt:
            self._prepare_root()

    def _decided_on_rank0(self, decide: Callable[[], object], failure: str):
        """`decide()`'s result on rank 0, handed to every rank; a CheckpointError there stops every rank.

        Only rank 0 looks at the disk, so the ranks never disagree, and none waits in a later
        collective for a rank that has stopped. `failure` completes "rank 0 ..." for the others.
        """
        verdict, error = [None], None
        if self.dims.is_main:
            try:
                verdict[0] = ("decided", decide())
            except CheckpointError as e:
                error, verdict[0] = e, ("failed", None)
        if self.multi_process:  # the object is rank 0's own (a path or None), never read from a file
            dist.broadcast_object_list(verdict, src=0, device=self.dims.device)
        if error is not None:
            raise error
        outcome, value = verdict[0]
        if outcome == "failed":
            raise CheckpointError(f"rank 0 {failure}; see its error")
        return value

    def _prepare_root(self) -> None:
        """Check that the checkpoint directory can be written and holds a checkpoint; remove what killed saves left.

        Now rather than at the first save, after the training it should protect.
        """
        def check() -> None:
            if self.root.exists() and not self.root.is_dir():
                raise CheckpointError(
                    f"checkpoint directory '{self.root}' is a file; set checkpoint.dir to a directory")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=self.root):  # unnamed where the OS allows: nothing to clean up
                    pass
            except OSError as e:
                raise CheckpointError(f"checkpoint directory '{self.root}' cannot be written ({e.strerror or e}); "
                                      "set checkpoint.dir to a writable directory") from None
            remove_stale_temporaries(self.root, "step_*")
            if (free := _free_bytes(self.root)) < self.checkpoint_bytes:
                raise CheckpointError(
                    f"checkpoint directory '{self.root}' has {_megabytes(free)} free but a checkpoint "
                    f"of this run needs at least {_megabytes(self.checkpoint_bytes)}; free space "
                    "there, or set checkpoint.dir to a disk with room")

        self._decided_on_rank0(check, "cannot write the checkpoint directory")

    # -- save -------------------------------------------------------------------------------------

    def maybe_save(self, force: bool = False) -> Path | None:
        """Save the train state's step if a checkpoint is due (interval, last step) or `force`d.

        Returns the new checkpoint, or None.
        """
        step, interval = self.train_state.step, self.cfg.checkpoint.interval
        due = interval > 0 and (step // interval > max(self.last_saved_step, 0) // interval
                                or step == self.cfg.train.max_steps)
        if (due or force) and step != self.last_saved_step:
            return self.save()
        return None

    def save(self) -> Path:
        """Write a complete checkpoint of the train state's step (all ranks call this together).

        A failed write stops every rank at once, with the first failure's line: DCP's save fails
        on every rank together, each rank's own file is followed by a shared verdict, and what
        rank 0 alone writes is decided on rank 0. None waits in a collective for a stopped rank.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        dims, step = self.dims, self.train_state.step
        final = self.root / step_dir_name(step)
        tmp = self._decided_on_rank0(lambda: self._start_save(final), "could not start saving the checkpoint")
        try:
            with self._write_failures(final):
                model_state = get_model_state_dict(self.model)  # sharded under FSDP, clean names always
                optim_state = get_optimizer_state_dict(self.model, self.optimizer)["state"]  # tensors only
                _save_train_state(dcp, {"model": model_state, "optim": optim_state}, tmp / TRAIN_STATE_DIR)
            full_weights = distributed.full_state_dict(self.model, dims)  # a collective under FSDP
            rank_state = {"rng": self.random.state_dict(), "loader": self.loader.state_dict()}
            self._on_every_rank(lambda: _save_rank_state(tmp / f"rank_{dims.rank:05d}.pt", rank_state), final)
            if self.multi_process:
                self._decided_on_rank0(lambda: self._require_every_rank_file(tmp), "found rank files missing")
            self._decided_on_rank0(lambda: self._finish_save(tmp, final, step, full_weights),
                                   "could not finish saving the checkpoint")
        except BaseException:  # DCP's CheckpointException and Ctrl-C are BaseExceptions
            if dims.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint left behind
            raise
        self.last_saved_step = step
        return final

    def _start_save(self, final: Path) -> Path:
        """Rank 0: refuse a save the disk cannot hold, then create its temporary directory (named after rank 0)."""
        tmp = temp_directory(final, tag=os.getpid())
        with self._write_failures(final):
            self.root.mkdir(parents=True, exist_ok=True)
            if (free := _free_bytes(self.root)) < self.checkpoint_bytes:
                raise CheckpointError(self._save_failed(final, "not enough free space", free))
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        return tmp

    def _on_every_rank(self, write: Callable[[], None], final: Path) -> None:
        """Run `write` on every rank; where it failed on any, raise that rank's line on all (rank 0 prints it)."""
        failure = None
        try:
            with self._write_failures(final):
                write()
        except CheckpointError as e:
            failure = str(e)
        failures = [failure]
        if self.multi_process:
            failures = [None] * self.dims.world_size
            dist.all_gather_object(failures, failure)  # each rank's own string, never read from a file
        if first := next((f for f in failures if f), None):
            raise CheckpointError(first)

    def _finish_save(self, tmp: Path, final: Path, step: int, full_weights: dict) -> None:
        """Rank 0: the files only it writes, the manifest last, the rename, then the pruning of old checkpoints."""
        with self._write_failures(final):
            write_weights(tmp / WEIGHTS, full_weights, self.cfg)
            write_text(tmp / CONFIG, self.cfg.to_toml())
            if self.tokenizer is not None:
                write_bytes(tmp / self.tokenizer.file_name, self.tokenizer.file_bytes)
            write_text(tmp / TRAINER_STATE, json.dumps(self._trainer_state(), indent=1) + "\n")
            write_manifest(tmp, step, kind="training")
            publish(tmp, final, replace=True)  # replace: a step redone after resuming from an earlier checkpoint
        self._prune()
        self.log(f"saved checkpoint {final}")

    @contextmanager
    def _write_failures(self, final: Path):
        """A write that storage refused (disk full, read-only, gone) as one CheckpointError; other errors unchanged."""
        try:
            yield
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            reason = _storage_failure(e)
            if reason is None:
                raise
            raise CheckpointError(self._save_failed(final, reason)) from None

    def _save_failed(self, final: Path, reason: str, free: int | None = None) -> str:
        try:
            free = _free_bytes(self.root) if free is None else free
            space = f"{_megabytes(free)} free in {self.root}"
        except OSError:
            space = f"free space in {self.root} unknown"
        return (f"saving checkpoint {final} failed ({reason}): a checkpoint of this run needs at least "
                f"{_megabytes(self.checkpoint_bytes)}, {space}; nothing was published and earlier checkpoints "
                f"are intact: free space or fix {self.root} (or set checkpoint.dir), then rerun to resume")

    def _require_every_rank_file(self, tmp: Path) -> None:
        """Every rank wrote into one directory; on nodes with a disk each, rank 0 sees only its own node's files."""
        missing = [r for r in range(self.dims.world_size) if not (tmp / f"rank_{r:05d}.pt").is_file()]
        if missing:
            raise CheckpointError(
                f"saving {tmp.name}: the files of rank(s) {', '.join(map(str, missing))} are not in {tmp.parent}, "
                "so that directory is not shared by every node; put train.out_dir (or checkpoint.dir) on a "
                "file system all nodes mount at the same path"
            )

    def _trainer_state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **self.train_state.state_dict(),  # step, tokens_seen, skipped_steps
            "world_size": self.layout.dp_size,
            "strategy": self.dims.strategy,
            "tp": self.dims.tp_size,
            "global_batch": self.layout.global_batch,
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "data_identity": self.data_identity,
            "config": self.cfg.to_dict(),
        }

    def _prune(self) -> None:
        """Delete checkpoints beyond keep_last, oldest first; called only after a new one is published."""
        for _, old in list_checkpoints(self.root)[self.cfg.checkpoint.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- restore ----------------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the checkpoint `checkpoint.resume` names (auto: newest complete); return its step (0: fresh)."""
        path = self._choose()
        if path is None:
            return 0
        state = read_trainer_state(path)
        self._check_compatible(path, state)
        self._load_train_state(path)
        if state["scaler"] and self.scaler.is_enabled():
            with _malformed(path, f"{TRAINER_STATE}'s scaler"):
                self.scaler.load_state_dict(state["scaler"])
        own_file = path / f"rank_{self.dims.rank:05d}.pt"
        same_layout = state["world_size"] == self.layout.dp_size and state.get("tp", 1) == self.dims.tp_size
        if same_layout and own_file.is_file():
            rank_state = torch_load(own_file)
            with _malformed(path, own_file.name):
                self.random.load_state_dict(rank_state["rng"])
                self.loader.load_state_dict(rank_state["loader"])
        else:
            self.loader.load_state_dict(state["loader"])  # positions are global: any layout can take them
            RandomState.reseed(self.cfg.train.seed, state["step"], self.dims.dp_rank)
            self.log(f"resume: checkpoint saved by {state['world_size']} data-parallel x {state.get('tp', 1)} "
                     f"tensor-parallel process(es), now {self.layout.dp_size} x {self.dims.tp_size}: per-rank RNG "
                     "streams re-seeded from train.seed, step and data-parallel rank (only dropout is affected)")
        self.train_state.load_state_dict(state)
        self.last_saved_step = state["step"]
        self.resumed_config = state["config"]
        self.log(f"resumed from {path} at step {state['step']} ({state['tokens_seen']:,} tokens seen, "
                 f"{state['skipped_steps']} skipped steps)")
        return state["step"]

    def _choose(self) -> Path | None:
        """Rank 0 picks and verifies the checkpoint; every rank learns the verdict (never a hang)."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        given = Path(resume) if resume != "auto" else None
        names_one = given is not None and ((given / MANIFEST).exists() or given.name.startswith("step_"))
        root = None if names_one else (given or self.root)  # a directory of checkpoints: take the newest
        return self._decided_on_rank0(lambda: self._pick(given, root), "could not open the checkpoint to resume from")

    def _pick(self, given: Path | None, root: Path | None) -> Path | None:
        if given is not None:
            require_directory(given)
        if root is None:  # an explicit checkpoint directory: use it or fail
            verify(given, kind="training")
            return given
        candidates = list_checkpoints(root)
        if not candidates:
            if given is not None:
                raise CheckpointError(f"checkpoint.resume: '{given}' holds no complete checkpoint")
            self.log(f"resume=auto: no checkpoint in {root}, starting from step 0")
            return None
        problems = []
        for _, path in candidates:
            try:
                verify(path, kind="training")
            except CheckpointError as e:
                self.log(f"resume: skipping unusable checkpoint ({e}); falling back to the previous one")
                problems.append(str(e))
                continue
            self.log(f"resume: newest complete checkpoint is {path}")
            return path
        raise CheckpointError(f"no usable checkpoint in {root} (newest: {problems[0]}); "
                              "move them away, or start afresh with a new --train.out_dir")

    def _check_compatible(self, path: Path, state: dict) -> None:
        saved, now = _flatten(state["config"]), _flatten(self.cfg.to_dict())
        refused = [f"{k} is {saved.get(k)!r} there but {now[k]!r} now"
                   for k in RESUME_REFUSES if saved.get(k) != now[k]]
        if state["global_batch"] != self.layout.global_batch:
            refused.append(f"the global batch (grad_accum_steps x data-parallel ranks x batch_size) is "
                           f"{state['global_batch']} there but {self.layout.global_batch} now, "
                           "which changes the data order")
        ignore = ("path",)  # a dataset may move; its hashes may not change
        saved_id = {k: v for k, v in state["data_identity"].items() if k not in ignore}
        now_id = {k: v for k, v in self.data_identity.items() if k not in ignore}
        if saved_id != now_id:
            diff = sorted(k for k in saved_id.keys() | now_id.keys() if saved_id.get(k) != now_id.get(k))
            refused.append(f"the dataset differs ({', '.join(diff)})")
        if refused:
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(refused)}; restore those settings, or start "
                                  "a new run (checkpoint.resume=none and a new train.out_dir)")
        for key in sorted(now):
            if key not in RESUME_IGNORES and saved.get(key) != now[key]:
                self.log(f"resume: {key} changed from {saved.get(key)!r} to {now[key]!r}")

    def _load_train_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_state = get_model_state_dict(self.model)
        optim = get_optimizer_state_dict(self.model, self.optimizer)  # templates in this run's layout
        target = {"model": model_state, "optim": optim["state"]}
        reader = dcp_reader(path / TRAIN_STATE_DIR)
        reader.read_metadata()  # the restricted unpickler's verdict, before DCP wraps errors per rank
        try:
            with _single_process_quietly():
                dcp.load(target, storage_reader=reader, planner=dcp_planner())
        except BaseException as e:  # DCP's CheckpointException is a BaseException that wraps each rank's error
            cause = dcp_failure(e)
            if isinstance(cause, NanotrainError):
                raise cause from None
            if not isinstance(cause, Exception):  # Ctrl-C
                raise
            if isinstance(cause, pickle.UnpicklingError):  # what torch.load(weights_only=True) refused in a shard
                raise CheckpointError(unsafe_pickle(f"a shard of {path / TRAIN_STATE_DIR}", cause)) from None
            raise CheckpointError(f"checkpoint '{path}': {TRAIN_STATE_DIR} cannot be loaded into this model and "
                                  f"optimizer ({type(cause).__name__}: {first_line(cause)})") from None
        set_model_state_dict(self.model, target["model"])
        # The hyperparameters come from this run's config (a changed lr is allowed); the state from the file.
        set_optimizer_state_dict(
            self.model, self.optimizer, {"state": target["optim"], "param_groups": optim["param_groups"]})


@contextmanager
def _malformed(path: Path, what: str):
    """One line for a checkpoint file whose content has the wrong shape (altered, with the manifest to match)."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint '{path}': {what} is malformed ({type(e).__name__}: {first_line(e)}); "
                              "resume from another checkpoint") from None


@contextmanager
def _single_process_quietly():
    """DCP warns that it assumes one process when there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=PROTOCOL_WARNING)  # a crafted shard, refused in one line
        yield


# Named steps of a save, so tests can interrupt a save between any two of them.
def _save_train_state(dcp, state: dict, directory: Path) -> None:
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=str(directory))


def _save_rank_state(file: Path, state: dict) -> None:
    torch.save(state, file)
    fsync(file)
