"""Inference checkpoints: weights, config and tokenizer, for generate, evaluate, export and the HF importer.

Any checkpoint opens this way, a training checkpoint too (its extra files are ignored); a
weights-only one written by `save_inference` cannot resume training (checkpoint/checkpointer.py says so).
The commands' --checkpoint goes through `find_checkpoint` first, so a run directory or its
checkpoints/ folder stands for its newest complete checkpoint (docs/10-generation-and-export.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nanotrain.checkpoint.manifest import (
    CONFIG,
    MANIFEST,
    WEIGHTS,
    newest_checkpoint,
    read_weights,
    tokenizer_file,
    verify,
    write_bytes,
    write_manifest,
    write_text,
    write_weights,
)
from nanotrain.config import Config, load_config
from nanotrain.errors import CheckpointError, ConfigError, TokenizerError
from nanotrain.files import atomic_directory


def save_inference(
    path: str | Path, model_state_dict: dict, cfg: Config, tokenizer_path: str | Path | None = None
) -> Path:
    """Write an inference checkpoint (weights, config, tokenizer, manifest) atomically at `path`.

    `model_state_dict` has clean nanotrain names; `path` must not exist yet. The tokenizer file
    (sentencepiece .model or tokenizer.json) is stored unchanged under its kind's name.
    """
    from nanotrain.data.tokenizer import Tokenizer

    path = Path(path)
    if path.exists():
        raise CheckpointError(f"'{path}' already exists; choose a new checkpoint directory or delete it")
    try:
        tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    with atomic_directory(path) as tmp:
        write_weights(tmp / WEIGHTS, model_state_dict, cfg)
        write_text(tmp / CONFIG, cfg.to_toml())
        if tokenizer is not None:
            write_bytes(tmp / tokenizer.file_name, tokenizer.file_bytes)
        write_manifest(tmp, step=None, kind="inference")
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A command's --checkpoint: a checkpoint directory as given, or the newest complete one (a directory
    with a manifest) in a run directory or its checkpoints/ folder, named in a note on stderr.

    Anything else is returned as given, for `verify` to say what it is (a Hugging Face directory, an
    interrupted save, nothing).
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or not path.is_dir():
        return path
    newest = newest_checkpoint(path)
    if newest is None:
        return path
    print(f"note: using {newest}, the newest complete checkpoint in {path}", file=sys.stderr)
    return newest


def load_inference(path: str | Path, device: str | torch.device = "cpu"):
    """Open any checkpoint for inference: `(model in eval mode, cfg, tokenizer or None)`.

    The manifest's hashes are verified first; the model is built with `build_model` and the
    weights loaded strictly (a tied head is re-tied to the embedding table).
    """
    from nanotrain.data.tokenizer import Tokenizer
    from nanotrain.model.transformer import build_model

    path = Path(path)
    verify(path)
    try:
        cfg = load_config(str(path / CONFIG))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{path}': {CONFIG} is not a valid config ({e})") from None
    model = build_model(cfg.model)
    model.load_state_dict(read_weights(path, cfg), strict=True)
    file = tokenizer_file(path)
    try:
        tokenizer = Tokenizer.load(file) if file is not None else None
    except TokenizerError as e:
        raise CheckpointError(f"checkpoint '{path}': {e}") from None
    return model.to(device).eval(), cfg, tokenizer
