"""Typed configuration: dataclasses, TOML presets and dotted command-line overrides.

A run's configuration is built in three layers, each overriding the last:
the dataclass defaults below, a TOML preset (`--config NAME` for one shipped in
`nanotrain/configs/`, or `--config path/to/file.toml`), and dotted overrides
(`--model.n_layers=2 --train.lr=1e-3`). Everything is validated before any work
starts; every problem is reported as a `ConfigError` with a one-line message.
Every field is declared with `setting(default, description)`; `--help-config` prints each key
with its description and its value in the chosen preset (docs/02-loss-and-train-loop.md).
A run that sets no `train.out_dir` (the presets do not) trains in a directory named after its
preset and its layout under torchrun, `default_out_dir` (README, "Where a run goes").
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from nanotrain.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "default"


# ---- model flavours: names for combinations of architectural features ---------------------------
# model/transformer.py builds from `ModelConfig.features` and never compares flavour names. A third
# flavour is its name in `Flavour`, one row in `FEATURES`, a preset in configs/, and (only for a
# norm, MLP or position encoding the model lacks) one new block in model/transformer.py (docs/01).
# Tied embeddings are not a flavour feature: any flavour may set `model.tie_embeddings`.

Flavour = Literal["llama", "gpt"]  # the allowed values of model.flavour; FEATURES has a row for each


@dataclass(frozen=True)
class FlavourFeatures:
    """The architectural choices one flavour stands for."""

    norm: Literal["layernorm", "rmsnorm"]  # rmsnorm is computed in fp32, as HF Llama does
    mlp: Literal["gelu", "swiglu"]  # down(gelu(up x)) or down(silu(gate x) * up x)
    positions: Literal["learned", "rope"]  # a learned pos_embeddings table, or RoPE on q and k
    bias: bool  # biases on the attention and MLP projections (never on the head)
    grouped_query_attention: bool  # whether model.n_kv_heads may be fewer than model.n_heads


FEATURES: dict[str, FlavourFeatures] = {
    "llama": FlavourFeatures(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False,
                             grouped_query_attention=True),
    "gpt": FlavourFeatures(norm="layernorm", mlp="gelu", positions="learned", bias=True,
                           grouped_query_attention=False),
}


def setting(default, help: str):
    """A config field with its one-line description, which --help-config prints beside the key."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The Transformer's shape. `flavour` picks the mini-GPT or the LLaMA variant."""

    flavour: Flavour = setting("llama", "llama: RoPE, RMSNorm, SwiGLU, grouped-query attention; "
                                        "gpt: learned positions, LayerNorm, GELU, biases")
    vocab_size: int = setting(32000, "rows of the token embedding; unless set, the data's vocabulary")
    max_position_embeddings: int = setting(2048, "longest sequence the model accepts")
    n_layers: int = setting(4, "transformer blocks")
    n_heads: int = setting(8, "attention (query) heads")
    n_kv_heads: int = setting(0, "key/value heads (grouped-query attention); 0 = n_heads")
    d_model: int = setting(256, "width of the residual stream")
    d_ff: int = setting(768, "MLP hidden size (SwiGLU intermediate size for llama)")
    dropout: float = setting(0.0, "dropout of the embeddings, attention weights and block outputs; 0 = off")
    rope_theta: float = setting(10000.0, "RoPE base (llama only)")
    norm_eps: float = setting(1e-6, "RMSNorm eps (llama) / LayerNorm eps (gpt)")
    tie_embeddings: bool = setting(False, "the output head shares the token embedding's weights")
    init_std: float = setting(0.02, "standard deviation of the normal weight initialisation")
    activation_checkpointing: bool = setting(False, "recompute each block in backward: less memory, more compute")

    @property
    def features(self) -> FlavourFeatures:
        """Norm, MLP, position encoding and biases of this flavour: what model/transformer.py builds from."""
        return FEATURES[self.flavour]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    """Where training tokens come from and how they are batched."""

    source: Literal["stories", "tokens", "random"] = setting(
        "stories", "the built-in story corpus | a prepared dataset (data.path) | random tokens")
    path: str = setting("", "prepared dataset directory (nanotrain.prepare); setting it alone implies source = tokens")
    mode: Literal["packed", "padded"] = setting("packed", "documents concatenated into windows | one document per row")
    num_workers: int = setting(0, "DataLoader worker processes")
    stories_count: int = setting(6000, "documents the built-in corpus generates")
    stories_vocab_size: int = setting(
        1024, "tokenizer size trained on the built-in corpus (at most ~1700 fit its words)")
    stories_seed: int = setting(0, "seed of the built-in corpus (apart from train.seed: new runs, same text)")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule. The peak learning rate is `train.lr`."""

    weight_decay: float = setting(0.1, "AdamW weight decay of the weight matrices (not norms, biases, embeddings)")
    beta1: float = setting(0.9, "AdamW decay of the gradient's running mean")
    beta2: float = setting(0.95, "AdamW decay of the squared gradient's running mean")
    eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")
    warmup_steps: int = setting(100, "steps of linear warm-up to train.lr")
    decay_steps: int = setting(0, "step where the cosine reaches its floor and stays; 0 = train.max_steps")
    min_lr_ratio: float = setting(0.1, "the cosine decays to train.lr x this at its end (optim.decay_steps)")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = setting(
        "auto", "AdamW kernel; auto = fused")


@dataclass
class TrainConfig:
    """The loop: how long, how big, how often to log and evaluate."""

    out_dir: str = setting("runs/default", "run directory; unset: runs/<preset>, with the layout under torchrun "
                                            "(runs/default-ddp2)")
    max_steps: int = setting(1000, "optimizer steps; the cosine schedule ends here unless optim.decay_steps is set")
    batch_size: int = setting(16, "sequences per data-parallel rank per micro-step")
    seq_len: int = setting(256, "tokens per sequence")
    grad_accum_steps: int = setting(1, "micro-steps per optimizer step")
    lr: float = setting(1e-3, "peak learning rate, reached after optim.warmup_steps")
    seed: int = setting(1337, "seed of the weights, the data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto = cuda when a GPU is visible, else cpu")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "fp32, or bf16 / fp16 autocast (fp16 with a loss scaler)")
    compile: bool = setting(False, "torch.compile the model")
    fused_loss: bool = setting(True, "head + cross-entropy in row chunks: no (B, T, V) logits (model/loss.py)")
    tf32: bool = setting(True, "TF32 matmuls on Ampere and newer GPUs")
    log_every: int = setting(10, "steps between log lines")
    eval_every: int = setting(100, "steps between evaluations; 0 disables periodic evaluation")
    eval_steps: int = setting(
        20, "global batches per evaluation of a val split over 65,536 tokens (a smaller one is evaluated whole)")
    on_nonfinite: Literal["stop", "skip"] = setting(
        "stop", "a non-finite or spiking loss or grad norm stops the run, or skips the update")
    loss_spike_ratio: float = setting(2.0, "a loss above ~this multiple of the recent mean is a spike "
                                           "(training/divergence.py); 0 = off")
    max_consecutive_skips: int = setting(10, "stop after this many skipped updates in a row (fp16 overflows included)")
    peak_tflops: float = setting(0.0, "device peak for MFU; 0 = look up or measure")
    sample_prompts: list[str] = setting(["Once upon a time"], "prompts completed at each evaluation")
    sample_tokens: int = setting(48, "tokens generated per prompt at each evaluation; 0 disables")
    # Checked when used, not in validate(): a saved config must stay loadable after the dir is gone.
    init_from: str = setting("", "checkpoint dir whose weights start a fresh run (e.g. one made by "
                                 "nanotrain.export); a resumed checkpoint wins")


@dataclass
class ParallelConfig:
    """How the model is spread across processes."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = setting(
        "auto", "how the data-parallel ranks hold the model; auto = ddp when dp > 1")
    tp: int = setting(1, "tensor-parallel degree: processes that split each layer (dp = world // tp)")
    sequence_parallel: bool = setting(False, "with tp > 1: norms and residual stream split by position too")
    reshard_after_forward: bool = setting(True, "FSDP: free gathered params after forward")
    timeout_s: int = setting(300, "collective timeout: a stuck rank fails the job, never hangs it")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and what to resume from."""

    interval: int = setting(0, "steps between checkpoints; 0 disables periodic saving")
    keep_last: int = setting(3, "checkpoints kept; older ones are deleted")
    dir: str = setting("", "where checkpoints go; empty = <train.out_dir>/checkpoints")
    resume: str = setting("auto", "auto = the newest complete checkpoint, if any | none | a checkpoint directory")
    on_preempt: bool = setting(True, "save before exiting on SIGTERM / SIGINT")


@dataclass
class LogConfig:
    """Dashboards the run log writes to besides the console and metrics.jsonl (reporting/run_log.py)."""

    tensorboard: bool = setting(False, "event files in <train.out_dir>/tensorboard; needs nanotrain[tensorboard]")
    wandb_project: str = setting("", "Weights & Biases project; empty = off; needs nanotrain[wandb]")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML that `--config` reads back unchanged."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


def toml_value(value) -> str:
    """A config value written as TOML (config.toml, --help-config, the train command's --help)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings and lists of strings: JSON quoting is valid TOML


# --help-config aligns descriptions after the options up to this wide (a longer one pushes its own line's out)
HELP_COLUMN = 44


def _sections() -> dict[str, type]:
    return _field_types(Config)


def _field_types(cls) -> dict[str, type]:
    """Field name -> resolved type annotation (annotations are strings under `from __future__`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Dotted key -> allowed values of each key typed as a Literal (the one list of them), for validate() and
# the commands' argparse `choices=`.
CHOICES = {f"{section}.{name}": typing.get_args(annotation) for section, cls in _sections().items()
           for name, annotation in _field_types(cls).items() if typing.get_origin(annotation) is Literal}


def all_keys() -> list[str]:
    """Every dotted key a configuration accepts, e.g. `model.n_layers`."""
    return [f"{s}.{name}" for s, cls in _sections().items() for name in _field_types(cls)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a right field name under the wrong section is a common slip
        name = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == name]
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help-config to list every key"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value, annotation):
    """Convert a TOML value or a command-line string to the field's declared type."""
    from_cli = isinstance(value, str) and annotation is not str
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and value.lower() in ("false", "0", "no", "off"):
            return False
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str or typing.get_origin(annotation) is Literal:
        if isinstance(value, str):
            return value  # a Literal's allowed values are checked in validate(), which names them
    elif typing.get_origin(annotation) is list:
        if from_cli:
            try:
                value = json.loads(value) if value.startswith("[") else [v for v in value.split("|") if v]
            except json.JSONDecodeError:
                pass  # reported below as the wrong type
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    type_name = getattr(annotation, "__name__", str(annotation))
    if typing.get_origin(annotation) is list:
        type_name = "list of strings ('a|b' or JSON)"
    elif typing.get_origin(annotation) is Literal:
        type_name = f"one of {', '.join(typing.get_args(annotation))}"
    raise ConfigError(f"config key '{key}' expects {type_name}, got {value!r}")


def _apply(cfg: Config, key: str, value) -> None:
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections or not name:
        raise _unknown(key)
    types = _field_types(sections[section])
    if name not in types:
        raise _unknown(key)
    setattr(getattr(cfg, section), name, _coerce(key, value, types[name]))


def _apply_table(cfg: Config, table: dict, source: str) -> set[str]:
    """Apply a TOML file's tables; returns the dotted keys it set."""
    given = set()
    for section, values in table.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a [section] table, got {values!r}")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value)
            given.add(f"{section}.{name}")
    return given


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"config file '{name_or_path}' does not exist")
        return path
    shipped = PRESET_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown preset '{name_or_path}': {hint}choose one of {', '.join(preset_names())} or pass a .toml path"
        )
    return shipped


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None,
                dataset_vocab: Callable[[str], int] | None = None) -> Config:
    """Build and validate a Config from a preset (name or .toml path) and dotted overrides.

    `overrides` take the form "section.key=value" (a leading "--" is allowed). `dataset_vocab`
    reads a prepared dataset's vocabulary (data/dataset_format.py's `dataset_vocab_size`): the
    commands pass it so that an unset model.vocab_size follows `data.path`; this foundation reads
    no dataset itself (docs/11).
    """
    cfg = Config()
    path = _preset_path(name_or_path or DEFAULT_PRESET)
    in_file, on_command_line = _apply_table(cfg, _read_toml(path), str(path)), set()
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like --section.key=value")
        _apply(cfg, key, value)
        on_command_line.add(key)
    if "train.out_dir" not in in_file | on_command_line:
        p = cfg.parallel
        # torchrun sets WORLD_SIZE before the process starts, so the layout, and with it the run
        # directory, is known here, before any process group: --print-config and config.toml show it.
        dp = max(int(os.environ.get("WORLD_SIZE", "1")) // p.tp, 1)
        cfg.train.out_dir = default_out_dir(path.stem, p.strategy, dp, p.tp, p.sequence_parallel)
    follow_the_data(cfg, in_file, on_command_line, dataset_vocab)
    validate(cfg)
    return cfg


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); a TOML config must be saved as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror})") from None


def default_out_dir(preset: str, strategy: str, dp: int, tp: int, sequence_parallel: bool) -> str:
    """The run directory of a run whose train.out_dir is not set: named after its preset and layout.

    `runs/<preset>` for one process; for several, the data-parallel strategy and degree, then the
    tensor-parallel degree and `sp` for sequence parallelism: runs/default-ddp2,
    runs/default-fsdp2-tp2, runs/default-tp2-sp. Rerunning a command resumes its run, and a
    command of another layout starts its own instead of resuming, or being refused by, another's.
    `strategy` is parallel.strategy as configured: auto is ddp over several data-parallel ranks.
    """
    if strategy == "auto":
        strategy = "ddp" if dp > 1 else "none"
    layout = [f"{strategy}{dp}"] if strategy != "none" else []
    if tp > 1:
        layout.append(f"tp{tp}")
    if sequence_parallel:
        layout.append("sp")
    return f"runs/{'-'.join([preset, *layout])}"


def follow_the_data(cfg: Config, in_file: set[str], on_command_line: set[str],
                    dataset_vocab: Callable[[str], int] | None = None) -> None:
    """Resolve the keys the data decides unless the config file or an override set them.

    A non-empty data.path means the prepared dataset there: data.source becomes "tokens". A
    conflicting data.source is an error when it was given at the same level as data.path or
    above it (both in the file, or both on the command line); a `--data.path` override wins
    over a file's data.source, so `--config RUN/config.toml --data.path=DIR` works.
    model.vocab_size, unless given, becomes the data's vocabulary: the dataset's, read by
    `dataset_vocab` (without it a dataset's vocabulary must be given), else data.stories_vocab_size,
    the built-in corpus's, which the random source shares so that switching to it keeps the model's
    shape. The result is concrete, so the saved config.toml reads back to the same run.
    """
    d, m = cfg.data, cfg.model

    def level(key: str) -> int:  # 0: default, 1: config file, 2: command line
        return 2 if key in on_command_line else 1 if key in in_file else 0

    if d.path and d.source in ("stories", "random"):
        if level("data.source") >= level("data.path"):
            raise ConfigError(
                f"data.path = '{d.path}' names a prepared dataset but data.source = '{d.source}'; pass "
                f"--data.source=tokens to train on the dataset, or leave data.path empty for the {d.source} source"
            )
        d.source = "tokens"
    if level("model.vocab_size") or (d.source == "tokens" and not d.path):  # validate names the missing path
        return
    if d.source == "tokens":
        if dataset_vocab is None:
            raise ConfigError(f"model.vocab_size follows the dataset at data.path = '{d.path}', which this caller "
                              f"does not read; set --model.vocab_size to the dataset's vocabulary")
        m.vocab_size = dataset_vocab(d.path)
    else:
        m.vocab_size = d.stories_vocab_size


# Float keys for which infinity would mean "no limit": 0 already says that, so the error points to it.
ZERO_MEANS_OFF = {
    "optim.grad_clip": "0 disables clipping",
    "train.peak_tflops": "0 looks the device peak up or measures it",
    "train.loss_spike_ratio": "0 turns the spike check off",
}


def _require_finite(cfg: Config) -> None:
    """Refuse nan and ±inf in every float key: nan slips through every comparison (nan < 0 is False)."""
    for section, cls in _sections().items():
        for name, annotation in _field_types(cls).items():
            value, key = getattr(getattr(cfg, section), name), f"{section}.{name}"
            if annotation is float and not math.isfinite(value):
                hint = f" ({ZERO_MEANS_OFF[key]})" if key in ZERO_MEANS_OFF else ""
                raise ConfigError(f"{key} must be a finite number, got {value}{hint}")


def _require_tensor_parallel_split(m: ModelConfig, tp: int) -> None:
    """Tensor parallelism gives each of `tp` processes whole heads, an equal slice of the MLP and vocabulary rows."""
    if tp == 1:
        return
    for key, value in (("n_heads", m.n_heads), ("n_kv_heads", m.kv_heads), ("d_ff", m.d_ff)):
        if value % tp:
            raise ConfigError(f"model.{key} = {value} cannot be split over parallel.tp = {tp} processes; "
                              f"use a parallel.tp that divides it (or a model.{key} divisible by {tp})")
    # The vocabulary is split like torch.chunk (tensor_parallel.vocabulary_starts): shares of
    # ceil(V / tp) rows, the last ones short or empty; a process without a row cannot look ids up.
    share = math.ceil(m.vocab_size / tp)
    if share * (tp - 1) >= m.vocab_size:
        without = tp - math.ceil(m.vocab_size / share)
        raise ConfigError(f"model.vocab_size = {m.vocab_size} cannot be split over parallel.tp = {tp} processes: each "
                          f"needs at least one vocabulary row, and shares of ceil({m.vocab_size}/{tp}) = {share} leave "
                          f"{without} of the {tp} without any; use a smaller parallel.tp or a larger vocabulary")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first inconsistency found, before any work starts."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")

    _require_finite(cfg)
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
    positive = {
        "model.vocab_size": m.vocab_size, "model.max_position_embeddings": m.max_position_embeddings,
        "model.n_layers": m.n_layers, "model.n_heads": m.n_heads, "model.d_model": m.d_model,
        "model.d_ff": m.d_ff, "train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
        "train.seq_len": t.seq_len, "train.grad_accum_steps": t.grad_accum_steps, "train.lr": t.lr,
        "train.log_every": t.log_every, "train.eval_steps": t.eval_steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last, "parallel.timeout_s": cfg.parallel.timeout_s,
        "parallel.tp": cfg.parallel.tp, "model.norm_eps": m.norm_eps, "model.init_std": m.init_std,
        "train.max_consecutive_skips": t.max_consecutive_skips,
    }
    if m.features.positions == "rope":
        positive["model.rope_theta"] = m.rope_theta
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "model.n_kv_heads": m.n_kv_heads, "train.eval_every": t.eval_every, "train.sample_tokens": t.sample_tokens,
        "optim.warmup_steps": o.warmup_steps, "optim.decay_steps": o.decay_steps,
        "optim.grad_clip": o.grad_clip, "optim.weight_decay": o.weight_decay, "optim.eps": o.eps,
        "checkpoint.interval": cfg.checkpoint.interval, "data.num_workers": d.num_workers,
        "train.peak_tflops": t.peak_tflops,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    _require_tensor_parallel_split(m, cfg.parallel.tp)
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        raise ConfigError("parallel.sequence_parallel splits the positions over the tensor-parallel processes; "
                          "set parallel.tp > 1 with it, or leave it false")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.loss_spike_ratio and not t.loss_spike_ratio > 1:
        raise ConfigError(f"train.loss_spike_ratio must be above 1 (or 0 to turn the spike check off), "
                          f"got {t.loss_spike_ratio}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= beta < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {beta}")
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"
        )
    if m.n_heads % m.kv_heads:
        raise ConfigError(
            f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})"
        )
    if m.features.positions == "rope" and m.head_dim % 2:
        raise ConfigError(f"{m.flavour} needs an even head dimension for RoPE, got d_model/n_heads = {m.head_dim}")
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
            f"({m.max_position_embeddings}); lower the first or raise the second"
        )
    if d.source == "tokens" and not d.path:
        raise ConfigError("data.source = 'tokens' needs --data.path=DIR (a directory made by nanotrain.prepare)")
    if d.source == "stories" and d.stories_count < 10:
        raise ConfigError(f"data.stories_count must be at least 10, got {d.stories_count}")
    if d.source == "stories" and d.stories_vocab_size > m.vocab_size:
        raise ConfigError(
            f"data.stories_vocab_size ({d.stories_vocab_size}) exceeds model.vocab_size ({m.vocab_size})"
        )
    if not m.features.grouped_query_attention and m.n_kv_heads not in (0, m.n_heads):
        with_gqa = " and ".join(name for name, features in FEATURES.items() if features.grouped_query_attention)
        raise ConfigError(
            f"model.n_kv_heads (grouped-query attention) is a {with_gqa} feature; leave it 0 for {m.flavour}")


def describe_keys(cfg: Config | None = None) -> str:
    """--help-config: every key with its value in `cfg`, its description and a Literal key's allowed values.

    Grouped by section, each headed by its dataclass's docstring. `cfg` is the run's config (the
    chosen preset with any overrides), so the values are the ones a run would use; by default the
    default preset's, what a bare `python -m nanotrain.train` runs.
    """
    values, rows = (cfg or load_config(DEFAULT_PRESET)).to_dict(), []
    for section, cls in _sections().items():
        rows.append((f"[{section}]", (cls.__doc__ or "").split("\n")[0]))
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            allowed = f" (one of {', '.join(CHOICES[key])})" if key in CHOICES else ""
            rows.append((f"  --{key}={toml_value(values[section][f.name])}", f.metadata["help"] + allowed))
    width = max(len(option) for option, _ in rows if len(option) <= HELP_COLUMN)
    return "\n".join(f"{option:<{width}}  {text}" for option, text in rows)
