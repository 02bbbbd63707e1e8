"""A checkpoint directory on disk: its file names, the manifest that marks it complete, verification.

Every reader starts here: `verify` checks the manifest's sizes and hashes before anything in the
directory is deserialised, so a truncated or altered file is refused with its name. Writing the
files is shared by training checkpoints (checkpoint/checkpointer.py) and inference checkpoints
(checkpoint/inference.py); `list_checkpoints` finds a run's published ones, `newest_checkpoint`
the one a run directory stands for. A Hugging Face model directory is told apart and refused with
the import command (docs/09-checkpointing.md, docs/10-generation-and-export.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanotrain.config import Config
from nanotrain.errors import CheckpointError, first_line
from nanotrain.files import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.toml"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # each Tokenizer implementation's file_name
TRAINER_STATE = "trainer_state.json"
TRAIN_STATE_DIR = "train_state"
TIED_HEAD = "lm_head.weight"  # stored once, as the embedding table, when model.tie_embeddings


# ---- writing ------------------------------------------------------------------------------------

def write_bytes(file: Path, data: bytes) -> None:
    """Write `data` to `file` and fsync it (it is about to be listed in a manifest)."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(file: Path, text: str) -> None:
    """`write_bytes` for text."""
    write_bytes(file, text.encode())


def write_weights(file: Path, state_dict: dict, cfg: Config) -> None:
    """Write fp32 weights with clean names as safetensors; a tied head is stored once, as the embedding table."""
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in state_dict.items()
        if not (cfg.model.tie_embeddings and name == TIED_HEAD)  # safetensors refuses shared storage
    }
    metadata = {"format": "pt", "nanotrain_format_version": str(FORMAT_VERSION)}
    if cfg.model.tie_embeddings:
        metadata["tied"] = f"{TIED_HEAD}=tok_embeddings.weight"
    write_safetensors(file, tensors, metadata)


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors' save_file, leaving the file readable as every other file written (open()'s 0666 minus the umask).

    save_file writes a private temporary file (0600) and renames it over `file`.
    """
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask; reading it means setting it, so the moment between errs on the private side."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_manifest(directory: Path, step: int | None, kind: str) -> None:
    """List every file with its size and sha256; written last, it marks the checkpoint complete."""
    files = {
        str(file.relative_to(directory)): {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        for file in sorted(directory.rglob("*")) if file.is_file() and file.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "kind": kind, "step": step,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


# ---- reading ------------------------------------------------------------------------------------

def verify(path: str | Path, kind: str | None = None) -> dict:
    """Check a checkpoint's manifest against its files (existence, size, sha256); return the manifest.

    Runs before anything in the directory is deserialised, so truncation, corruption or a file
    swapped after saving is reported by name instead of surfacing as a decoding error.
    """
    path = Path(path)
    require_directory(path)
    if not (path / MANIFEST).is_file():
        if is_hugging_face_directory(path):
            raise CheckpointError(
                f"'{path}' is a Hugging Face model directory (config.json, *.safetensors), not a nanotrain checkpoint; "
                f"import it with `python -m nanotrain.export --hf {path} --out CKPT` and pass CKPT")
        if (path / "checkpoints").is_dir() or any(path.glob("step_*")):
            raise CheckpointError(
                f"'{path}' holds no complete checkpoint (a step_*/ directory with {MANIFEST}), "
                "neither in it nor in its checkpoints/ folder; a run saves one every checkpoint.interval steps")
        raise CheckpointError(f"checkpoint '{path}' has no {MANIFEST}: it is incomplete (a save was interrupted) "
                              "or not a nanotrain checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{path}': {MANIFEST} is corrupted") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {manifest.get('format_version')}; "
                              f"this nanotrain reads {FORMAT_VERSION}")
    needed = [WEIGHTS, CONFIG]
    if kind == "training":
        needed += [TRAINER_STATE, f"{TRAIN_STATE_DIR}/.metadata", "rank_00000.pt"]
    for name in needed:
        if name not in files:
            what = ("an inference checkpoint (weights only) and cannot resume training" if kind == "training"
                    else "incomplete")
            raise CheckpointError(f"checkpoint '{path}' lists no {name}: it is {what}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint '{path}': file {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint '{path}': file {name} is truncated or altered "
                                  f"({size} bytes, manifest says {expected['bytes']})")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint '{path}': file {name} is corrupted (sha256 differs from the manifest)")
    if kind == "training":
        read_trainer_state(path)
    return manifest


def require_directory(path: Path) -> None:
    """Refuse, in one line, a checkpoint path that does not exist or is a file."""
    if path.is_dir():
        return
    if path.exists():
        raise CheckpointError(f"checkpoint '{path}' is a file, not a directory; pass the checkpoint directory "
                              f"(the one that holds {MANIFEST})")
    raise CheckpointError(f"checkpoint '{path}' does not exist")


def is_hugging_face_directory(path: Path) -> bool:
    """A model directory as transformers saves it: config.json beside *.safetensors weights, no manifest."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and not (path / MANIFEST).exists()


def tokenizer_file(path: Path) -> Path | None:
    """The tokenizer file in a checkpoint (or an HF model directory), tokenizer.model first; None when there is none.

    A checkpoint has none when it was trained on data.source = "random".
    """
    return next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)


def read_weights(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The state dict in `path/model.safetensors`, with the tied head restored when the config ties it."""
    try:
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}': {WEIGHTS} is unreadable ({e})") from None
    if cfg.model.tie_embeddings and "tok_embeddings.weight" in state:
        state[TIED_HEAD] = state["tok_embeddings.weight"]
    return state


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
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is not valid JSON ({first_line(e)})") from None
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


# ---- a run's checkpoints ------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint of `step`: `step_00000100`."""
    return f"step_{step:08d}"


def checkpoint_root(cfg: Config) -> Path:
    """Where a run's `step_*` checkpoints go: `checkpoint.dir`, or `<train.out_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")


def newest_checkpoint(path: Path) -> Path | None:
    """The newest published checkpoint of a run directory (`<run>/checkpoints/`) or a checkpoints folder; None: none."""
    for root in (path, path / "checkpoints"):
        found = list_checkpoints(root)
        if found:
            return found[0][1]
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every published checkpoint under `root`, newest first (not yet verified)."""
    found = []
    for child in root.glob("step_*") if root.is_dir() else []:
        suffix = child.name.removeprefix("step_")
        if child.is_dir() and suffix.isdigit() and (child / MANIFEST).is_file():
            found.append((int(suffix), child))
    return sorted(found, reverse=True)
