"""Checkpoints: crash-safe save, exact resume, resharding, and loading that never unpickles code.

A checkpoint is a directory `<checkpoint.dir or train.out_dir/checkpoints>/step_00000100/`:

    model.safetensors    full fp32 weights, clean parameter names (a tied head is stored once,
                         as tok_embeddings.weight); readable with safetensors alone
    config.toml          the resolved config
    tokenizer.model      the data's tokenizer (absent for data.source = "random")
    trainer_state.json   step, tokens seen, skipped steps, GradScaler, loader position, layout,
                         data identity, config (training checkpoints only)
    train_state/         model + optimizer state through torch.distributed.checkpoint (DCP):
                         each rank writes its own shard; DCP reshards on load, so a checkpoint
                         saved by 2 ranks resumes on 1 and the reverse (also DDP <-> FSDP)
    rank_00000.pt        per-rank RNG states (Python, NumPy, torch CPU, CUDA) and loader position
    manifest.json        written LAST: every file's size and sha256, the step, the format version

Atomicity: everything is written into `step_00000100.tmp-<pid>`, synced, then renamed; a
directory without a manifest is never picked up. Old checkpoints beyond keep_last are deleted
only after the new one is in place. Before anything is deserialised the manifest's sizes and
hashes are checked, so a truncated or altered file is refused with its name.

Safe loading: tensors come from safetensors or `torch.load(weights_only=True)`; DCP's pickled
`.metadata` is read with an unpickler that admits exact (module, name) pairs of the globals DCP
puts there and sets state only on DCP's dataclasses (`_MetadataUnpickler`), and DCP items that
would need `torch.load(weights_only=False)` are refused (we never save any).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import random
import shutil
import signal
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, is_dataclass
from pathlib import Path, PosixPath

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanotrain.config import Config, ConfigError, load_config
from nanotrain.errors import NanotrainError
from nanotrain.files import atomic_directory, fsync, publish, remove_stale_temporaries, sha256_file, temp_directory

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.toml"
TOKENIZER = "tokenizer.model"
TRAINER_STATE = "trainer_state.json"
TRAIN_STATE_DIR = "train_state"
TIED_HEAD = "lm_head.weight"  # stored once, as the embedding table, when model.tie_embeddings

# Config keys whose change makes a checkpoint meaningless for this run: the weights' shape or
# function, or the order of the data (seed, sequence length; the global batch is checked apart).
RESUME_REFUSES = (
    "model.flavour", "model.vocab_size", "model.max_position_embeddings", "model.n_layers",
    "model.n_heads", "model.n_kv_heads", "model.d_model", "model.d_ff", "model.rope_theta",
    "model.norm_eps", "model.tie_embeddings", "data.source", "data.mode", "train.seq_len", "train.seed",
)
# Changes that are neither refused nor worth a log line.
RESUME_IGNORES = ("checkpoint.resume", "train.out_dir", "data.path")


class CheckpointError(NanotrainError):
    """A checkpoint that cannot be used, described in one line naming the file or the difference."""


# ---- inference checkpoints (generate, evaluate, export, import) ---------------------------------

def save_inference(path: str | Path, model_state_dict: dict, cfg: Config, tokenizer_path: str | Path | None = None) -> Path:
    """Write an inference checkpoint (weights, config, tokenizer, manifest) atomically at `path`.

    `model_state_dict` has clean nanotrain names; `path` must not exist yet.
    """
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"'{path}' already exists; choose a new checkpoint directory or delete it")
    with atomic_directory(path) as tmp:
        _write_weights(tmp / WEIGHTS, model_state_dict, cfg)
        _write_text(tmp / CONFIG, cfg.to_toml())
        if tokenizer_path is not None:
            _write_bytes(tmp / TOKENIZER, Path(tokenizer_path).read_bytes())
        _write_manifest(tmp, step=None, kind="inference")
    return path


def load_inference(path: str | Path, device: str | torch.device = "cpu"):
    """Open any checkpoint for inference: `(model in eval mode, cfg, tokenizer or None)`.

    The manifest's hashes are verified first; the model is built with `build_model` and the
    weights loaded strictly (a tied head is re-tied to the embedding table).
    """
    from nanotrain.model import build_model
    from nanotrain.tokenizer import Tokenizer

    path = Path(path)
    verify(path)
    try:
        cfg = load_config(str(path / CONFIG))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{path}': {CONFIG} is not a valid config ({e})") from None
    model = build_model(cfg.model)
    model.load_state_dict(read_weights(path, cfg), strict=True)
    tokenizer = Tokenizer.load(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    return model.to(device).eval(), cfg, tokenizer


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


def read_weights(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The state dict in `path/model.safetensors`, with the tied head restored when the config ties it."""
    try:
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}': {WEIGHTS} is unreadable ({e})") from None
    if cfg.model.tie_embeddings and "tok_embeddings.weight" in state:
        state[TIED_HEAD] = state["tok_embeddings.weight"]
    return state


def _write_weights(file: Path, state_dict: dict, cfg: Config) -> None:
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in state_dict.items()
        if not (cfg.model.tie_embeddings and name == TIED_HEAD)  # safetensors refuses shared storage
    }
    metadata = {"format": "pt", "nanotrain_format_version": str(FORMAT_VERSION)}
    if cfg.model.tie_embeddings:
        metadata["tied"] = f"{TIED_HEAD}=tok_embeddings.weight"
    save_file(tensors, str(file), metadata=metadata)


# ---- files, manifest, verification ---------------------------------------------------------------

def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_text(file: Path, text: str) -> None:
    _write_bytes(file, text.encode())


def _write_manifest(directory: Path, step: int | None, kind: str) -> None:
    """List every file with its size and sha256; written last, it marks the checkpoint complete."""
    files = {
        str(file.relative_to(directory)): {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        for file in sorted(directory.rglob("*")) if file.is_file() and file.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "kind": kind, "step": step,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    _write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def verify(path: str | Path, kind: str | None = None) -> dict:
    """Check a checkpoint's manifest against its files (existence, size, sha256); return the manifest.

    Runs before anything in the directory is deserialised, so truncation, corruption or a file
    swapped after saving is reported by name instead of surfacing as a decoding error.
    """
    path = Path(path)
    _require_directory(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint '{path}' has no {MANIFEST}: it is incomplete (a save was interrupted) or not a nanotrain checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{path}': {MANIFEST} is corrupted") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {manifest.get('format_version')}; this nanotrain reads {FORMAT_VERSION}")
    needed = [WEIGHTS, CONFIG]
    if kind == "training":
        needed += [TRAINER_STATE, f"{TRAIN_STATE_DIR}/.metadata", "rank_00000.pt"]
    for name in needed:
        if name not in files:
            what = "an inference checkpoint (weights only) and cannot resume training" if kind == "training" else "incomplete"
            raise CheckpointError(f"checkpoint '{path}' lists no {name}: it is {what}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint '{path}': file {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint '{path}': file {name} is truncated or altered ({size} bytes, manifest says {expected['bytes']})")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint '{path}': file {name} is corrupted (sha256 differs from the manifest)")
    if kind == "training":
        read_trainer_state(path)
    return manifest


def _require_directory(path: Path) -> None:
    if path.is_dir():
        return
    if path.exists():
        raise CheckpointError(f"checkpoint '{path}' is a file, not a directory; pass the checkpoint directory "
                              f"(the one that holds {MANIFEST})")
    raise CheckpointError(f"checkpoint '{path}' does not exist")


# Every field of trainer_state.json that resuming reads, with its JSON type; a dict: its own fields.
TRAINER_STATE_FIELDS = {
    "step": int, "tokens_seen": int, "skipped_steps": int, "world_size": int, "strategy": str, "global_batch": int,
    "scaler": dict, "loader": {"samples_consumed": int, "samples_per_epoch": int}, "data_identity": dict,
    "config": dict,
}


def read_trainer_state(path: Path) -> dict:
    """The trainer state of training checkpoint `path`, checked to hold every field resuming reads."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is not valid JSON ({_first_line(e)})") from None
    wrong = _wrong_fields(state, TRAINER_STATE_FIELDS)
    if not wrong and not all(isinstance(section, dict) for section in state["config"].values()):
        wrong = ["config"]
    if wrong:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} lacks or mistypes {', '.join(wrong)}; "
                              "it was altered after saving: resume from another checkpoint")
    return state


def _wrong_fields(value, fields: dict, prefix: str = "") -> list[str]:
    if not isinstance(value, dict):
        return [prefix.rstrip(".") or "everything"]
    wrong = []
    for key, kind in fields.items():
        if isinstance(kind, dict):
            wrong += _wrong_fields(value.get(key), kind, f"{prefix}{key}.")
        elif not isinstance(value.get(key), kind) or (kind is int and isinstance(value.get(key), bool)):
            wrong.append(f"{prefix}{key}")  # JSON's true/false are Python ints too
    return wrong


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(cfg: Config) -> Path:
    """Where a run's `step_*` checkpoints go: `checkpoint.dir`, or `<train.out_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every published checkpoint under `root`, newest first (not yet verified)."""
    found = []
    for child in root.glob("step_*") if root.is_dir() else []:
        suffix = child.name.removeprefix("step_")
        if child.is_dir() and suffix.isdigit() and (child / MANIFEST).is_file():
            found.append((int(suffix), child))
    return sorted(found, reverse=True)


# ---- safe deserialisation ------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    """An exception as one short line: the first line of its message, or its type if it has none."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _dcp_failure(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a BaseException), else `error` itself."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        return error.failures[min(error.failures)][0]
    return error


def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {file}: it needs arbitrary unpickling, which could run code ({_first_line(e)})"
        ) from None


@functools.cache
def _metadata_globals() -> dict[tuple[str, str], object]:
    """Every global the `.metadata` of a checkpoint nanotrain writes refers to, by exact (module, name).

    Found by disassembling the `.metadata` of 1-process, DDP and FSDP saves (torch 2.13): DCP's
    dataclasses, the enum that encodes memory formats, `_StorageInfo`, `torch.Size`, dtypes,
    `_get_layout` (how torch pickles a layout: a lookup in torch's layouts) and the `PosixPath` of
    the directory saved to. Python's own `find_class` would resolve a dotted name through module
    attributes (`torch.distributed.checkpoint.metadata` + `os.system` is `os.system`); a lookup
    in this table never leaves it.
    """
    from torch.distributed.checkpoint import filesystem, metadata

    classes = (metadata.Metadata, metadata.StorageMeta, metadata.MetadataIndex, metadata.TensorStorageMetadata,
               metadata.TensorProperties, metadata.ChunkStorageMetadata, metadata._MEM_FORMAT_ENCODING)
    allowed = {("torch.distributed.checkpoint.metadata", cls.__name__): cls for cls in classes}
    allowed |= {("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    allowed |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
                ("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
                ("pathlib", "PosixPath"): PosixPath,
                ("pathlib._local", "PosixPath"): PosixPath}  # where Python 3.13 pickles it from
    return allowed


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's `.metadata` so that it can build DCP's metadata and nothing else.

    Globals come only from `_metadata_globals`, so a call (REDUCE, NEWOBJ) can only construct
    one of those classes, make a `torch.Size` or look up a layout: none touches a file or runs
    code. State (BUILD) may be set only on instances of DCP's dataclasses, which this load has
    just created: set on a class, a function or an enum member it would change them for the
    whole process. The pure-Python unpickler is the one whose BUILD can be checked; `.metadata`
    is small (one entry per tensor chunk), so its speed does not matter.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _metadata_globals()[module, name]
        except (KeyError, TypeError):  # TypeError: a name that is not a string
            raise pickle.UnpicklingError(
                f"global {name!r} of module {module!r} is not allowed in DCP metadata") from None

    def load_build(self):
        target = self.stack[-2]
        if isinstance(target, type) or not is_dataclass(target):
            what = target.__name__ if isinstance(target, type) else type(target).__name__
            raise pickle.UnpicklingError(f"setting the state of '{what}' is not allowed in DCP metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _read_dcp_metadata(directory: Path):
    """DCP's `.metadata` in `directory`, unpickled by `_MetadataUnpickler` and checked to describe only `directory`."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = directory / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {file}: {e} (it could run code)") from None
    except Exception as e:  # malformed: a truncated stream, a wrong state for one of DCP's classes
        raise CheckpointError(f"{file} is not valid DCP metadata ({_first_line(e)})") from None
    if type(metadata) is not Metadata or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file} is not valid DCP metadata (it holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        # DCP opens `directory / relative_path`: a path that leaves the directory would read any file
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or not (directory / name).is_file():
            raise CheckpointError(f"{file} names data file {name!r}, which is not a file in {directory}")
    if not isinstance(metadata.storage_meta, StorageMeta):
        metadata.storage_meta = StorageMeta()
    return metadata


def _dcp_reader(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _read_dcp_metadata(directory)
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeReader(str(directory))


def _dcp_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DefaultLoadPlanner would torch.load these with weights_only=False; we never save any.
            raise CheckpointError(
                f"refusing to load '{read_item.dest_index.fqn}' from the DCP checkpoint: it is a pickled object, not a tensor"
            )

    return TensorOnlyPlanner()


# ---- RNG ----------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """Every random stream this process draws from, in a form torch.load(weights_only=True) reads."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- training checkpoints ------------------------------------------------------------------------

def _flatten(config_dict: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config_dict.items() for key, value in values.items()}


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
    tmp = file.with_name(file.name + ".tmp")
    _write_text(tmp, "".join(f"{line}\n" for line in kept))
    os.replace(tmp, file)


@dataclass
class _Layout:
    world_size: int
    global_batch: int  # sequences per optimizer step over all ranks and micro-steps


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped.

    Seams in train.py: `restore()` once after the optimizer is built (returns the step to start
    from), `maybe_save(step)` after every optimizer step (interval, final step, preemption),
    `preempted` to leave the loop, `skipped_steps` counted by the non-finite-skip policy, and
    `close()` when the loop ends.
    """

    def __init__(self, cfg: Config, env, data, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler):
        self.cfg, self.env, self.model, self.optimizer, self.scaler = cfg, env, model, optimizer, scaler
        self.loader, self.data_identity, self.tokenizer = data.train, data.identity, data.tokenizer
        self.root = checkpoint_root(cfg)
        t = cfg.train
        self.layout = _Layout(env.world_size, t.grad_accum_steps * env.world_size * t.batch_size)
        self.log = print if env.is_main else (lambda *args, **kwargs: None)
        self.skipped_steps = 0  # updates skipped as unhealthy (divergence.py; train.on_nonfinite = skip)
        self.last_saved_step = -1
        self.preempted = False
        self._signal_received = False
        self._signal_group = None
        self._previous_handlers = {}
        if cfg.checkpoint.interval > 0 or cfg.checkpoint.on_preempt:
            self._prepare_root()
        if cfg.checkpoint.on_preempt:
            self._install_signal_handlers()

    def _prepare_root(self) -> None:
        """Check that the checkpoint directory can be written, and remove what killed saves left there.

        Now rather than at the first save, after the training it should protect. Rank 0 checks;
        every rank learns the verdict, so none waits in a collective for one that has stopped.
        """
        error = None
        if self.env.is_main and self.root.exists() and not self.root.is_dir():
            error = CheckpointError(f"checkpoint directory '{self.root}' is a file; set checkpoint.dir to a directory")
        elif self.env.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=self.root):  # unnamed where the OS allows: nothing to clean up
                    pass
            except OSError as e:
                error = CheckpointError(f"checkpoint directory '{self.root}' cannot be written ({e.strerror or e}); "
                                        "set checkpoint.dir to a writable directory")
            else:
                remove_stale_temporaries(self.root, "step_*")
        failed = torch.tensor([int(error is not None)], device=self.env.device)
        if dist.is_initialized() and self.env.world_size > 1:
            dist.broadcast(failed, src=0)
        if error is not None:
            raise error
        if failed.item():
            raise CheckpointError("rank 0 cannot write the checkpoint directory; see its error")

    # -- preemption -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        def on_signal(signum, frame):
            self._signal_received = True
            # A second signal means "now": fall back to the default behaviour.
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, on_signal)
        if dist.is_initialized() and self.env.world_size > 1:
            # Agreeing on the flag over gloo with a CPU tensor keeps the step free of device syncs.
            self._signal_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def close(self) -> None:
        """Give SIGTERM/SIGINT back to whoever handled them before the run (a notebook, pytest)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _any_rank_signalled(self) -> bool:
        if self._signal_group is None:
            return self._signal_received
        flag = torch.tensor([int(self._signal_received)])
        dist.all_reduce(flag, group=self._signal_group)
        return bool(flag.item())

    # -- save -------------------------------------------------------------------------------------

    def maybe_save(self, step: int) -> None:
        """Save if a checkpoint is due (interval, last step) or a preemption signal arrived on any rank."""
        preempt = self.cfg.checkpoint.on_preempt and self._any_rank_signalled()
        interval = self.cfg.checkpoint.interval
        due = interval > 0 and (step // interval > max(self.last_saved_step, 0) // interval
                                or step == self.cfg.train.max_steps)
        if (due or preempt) and step != self.last_saved_step:
            self.save(step)
        if preempt:
            self.preempted = True
            self.log(f"preemption signal received: saved checkpoint at step {step} in {self.root}; exiting cleanly "
                     "(rerun the same command to resume)")

    def save(self, step: int) -> Path:
        """Write a complete checkpoint for `step` (all ranks call this together)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        import torch.distributed.checkpoint as dcp

        env, multi = self.env, dist.is_initialized() and self.env.world_size > 1
        final = self.root / step_dir_name(step)
        owner = torch.tensor([os.getpid() if env.is_main else 0], device=env.device)
        if multi:
            dist.all_reduce(owner)  # every rank writes into rank 0's temporary directory
        tmp = temp_directory(final, tag=int(owner))
        try:
            if env.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            if multi:
                dist.barrier()

            model_state = get_model_state_dict(self.model)  # sharded under FSDP, clean names always
            optim_state = get_optimizer_state_dict(self.model, self.optimizer)["state"]  # tensors only
            _save_train_state(dcp, {"model": model_state, "optim": optim_state}, tmp / TRAIN_STATE_DIR)
            full_weights = self._full_weights(get_model_state_dict)
            _save_rank_state(tmp / f"rank_{env.rank:05d}.pt",
                             {"rng": rng_state(env.device), "loader": self.loader.state_dict()})
            if multi:
                dist.barrier()
            if env.is_main:
                _write_weights(tmp / WEIGHTS, full_weights, self.cfg)
                _write_text(tmp / CONFIG, self.cfg.to_toml())
                if self.tokenizer is not None:
                    _write_bytes(tmp / TOKENIZER, self.tokenizer.model_bytes)
                _write_text(tmp / TRAINER_STATE, json.dumps(self._trainer_state(step), indent=1) + "\n")
                _write_manifest(tmp, step, kind="training")
                publish(tmp, final, replace=True)  # replace: a step redone after resuming from an earlier checkpoint
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint left behind
            cause = _dcp_failure(e)
            if isinstance(cause, OSError):  # disk full, permissions changed, storage gone
                raise CheckpointError(
                    f"saving checkpoint {final} failed ({_first_line(cause)}); nothing was published and earlier "
                    f"checkpoints are intact: free space or fix {self.root} (or set checkpoint.dir), "
                    "then rerun to resume"
                ) from None
            raise
        if env.is_main:
            self._prune()
            self.log(f"saved checkpoint {final}")
        if multi:
            dist.barrier()
        self.last_saved_step = step
        return final

    def _full_weights(self, get_model_state_dict) -> dict:
        if self.env.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
            return get_model_state_dict(self.model, options=options)
        if not self.env.is_main:
            return {}
        return {k: v.detach().cpu() for k, v in get_model_state_dict(self.model).items()}

    def _trainer_state(self, step: int) -> dict:
        t = self.cfg.train
        return {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tokens_seen": step * self.layout.global_batch * t.seq_len,
            "skipped_steps": self.skipped_steps,
            "world_size": self.layout.world_size,
            "strategy": self.env.strategy,
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
        own_file = path / f"rank_{self.env.rank:05d}.pt"
        if state["world_size"] == self.env.world_size and own_file.is_file():
            rank_state = _torch_load(own_file)
            with _malformed(path, own_file.name):
                set_rng_state(rank_state["rng"], self.env.device)
                self.loader.load_state_dict(rank_state["loader"])
        else:
            self.loader.load_state_dict(state["loader"])  # positions are global: any layout can take them
            reseed = self.cfg.train.seed + 1_000_003 * state["step"] + self.env.rank
            random.seed(reseed)
            np.random.seed(reseed % 2**32)
            torch.manual_seed(reseed)
            self.log(f"resume: checkpoint saved by {state['world_size']} process(es), now {self.env.world_size}: "
                     "per-rank RNG streams re-seeded from train.seed, step and rank (only dropout is affected)")
        self.skipped_steps = state["skipped_steps"]
        self.last_saved_step = state["step"]
        if self.env.is_main:
            trim_metrics(Path(self.cfg.train.out_dir) / "metrics.jsonl", state["step"])
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
        chosen, error = None, None
        if self.env.is_main:
            try:
                chosen = self._pick(given, root)
            except CheckpointError as e:
                error = e
        code = torch.tensor([-2 if error else -1 if chosen is None else _step_of(chosen) if root else 0],
                            device=self.env.device)
        if dist.is_initialized() and self.env.world_size > 1:
            dist.broadcast(code, src=0)
        if error is not None:
            raise error
        if code.item() == -2:
            raise CheckpointError("rank 0 could not open the checkpoint to resume from; see its error")
        if code.item() == -1:
            return None
        return chosen if chosen is not None else (root / step_dir_name(int(code)) if root else given)

    def _pick(self, given: Path | None, root: Path | None) -> Path | None:
        if given is not None:
            _require_directory(given)
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
        refused = [f"{k} is {saved.get(k)!r} there but {now[k]!r} now" for k in RESUME_REFUSES if saved.get(k) != now[k]]
        if state["global_batch"] != self.layout.global_batch:
            refused.append(f"the global batch (grad_accum_steps x processes x batch_size) is {state['global_batch']} "
                           f"there but {self.layout.global_batch} now, which changes the data order")
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
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
        import torch.distributed.checkpoint as dcp

        model_state = get_model_state_dict(self.model)
        optim = get_optimizer_state_dict(self.model, self.optimizer)  # templates in this run's layout
        target = {"model": model_state, "optim": optim["state"]}
        reader = _dcp_reader(path / TRAIN_STATE_DIR)
        reader.read_metadata()  # the restricted unpickler's verdict, before DCP wraps errors per rank
        try:
            with _single_process_quietly():
                dcp.load(target, storage_reader=reader, planner=_dcp_planner())
        except BaseException as e:  # DCP's CheckpointException is a BaseException that wraps each rank's error
            cause = _dcp_failure(e)
            if isinstance(cause, NanotrainError):
                raise cause from None
            if not isinstance(cause, Exception):  # Ctrl-C
                raise
            raise CheckpointError(f"checkpoint '{path}': {TRAIN_STATE_DIR} cannot be loaded into this model and "
                                  f"optimizer ({type(cause).__name__}: {_first_line(cause)})") from None
        set_model_state_dict(self.model, target["model"])
        # The hyperparameters come from this run's config (a changed lr is allowed); the state from the file.
        set_optimizer_state_dict(self.model, self.optimizer, {"state": target["optim"], "param_groups": optim["param_groups"]})


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


@contextmanager
def _malformed(path: Path, what: str):
    """One line for a checkpoint file whose content has the wrong shape (altered, with the manifest to match)."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint '{path}': {what} is malformed ({type(e).__name__}: {_first_line(e)}); "
                              "resume from another checkpoint") from None


@contextmanager
def _single_process_quietly():
    """DCP warns that it assumes one process when there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# Named steps of a save, so tests can interrupt a save between any two of them.
def _save_train_state(dcp, state: dict, directory: Path) -> None:
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=str(directory))


def _save_rank_state(file: Path, state: dict) -> None:
    torch.save(state, file)
    fsync(file)
