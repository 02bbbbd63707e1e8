"""Train a language model: `python -m nanotrain.train [--config NAME] [--print-config] [--section.key=value ...]`.

The command line is a preset (or a .toml file) and dotted overrides; the loop itself is
training/trainer.py's `train(cfg)`, which tests and notebooks call directly.
"""

from __future__ import annotations

import argparse
import sys

from nanotrain.config import DEFAULT_PRESET, PRESET_DIR, describe_keys, load_config, preset_names, toml_value
from nanotrain.data.dataset_format import dataset_vocab_size
from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error
from nanotrain.parallel import distributed
from nanotrain.training.trainer import train

# The keys a first run changes most; --help shows them with the default preset's values.
COMMON_KEYS = [
    "train.max_steps", "train.lr", "train.batch_size", "train.seq_len", "train.grad_accum_steps",
    "train.precision", "train.out_dir", "data.path", "model.flavour", "model.n_layers", "model.d_model",
    "model.n_heads", "model.vocab_size", "parallel.strategy", "parallel.tp", "checkpoint.interval", "checkpoint.resume",
]


def preset_description(name: str) -> str:
    """The first sentence of a shipped preset's leading `#` comment ("" when it has none)."""
    comment = []
    for line in (PRESET_DIR / f"{name}.toml").read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    end = text.find(". ")
    return text if end == -1 else text[:end + 1]


def help_epilog() -> str:
    """--help's tail: each preset with its description, and the most used keys with their default values."""
    width = max(map(len, preset_names()))
    presets = [f"  {name:<{width}}  {preset_description(name)}".rstrip() for name in preset_names()]
    defaults = load_config(DEFAULT_PRESET).to_dict()
    keys = [f"  --{key}={toml_value(defaults[key.split('.')[0]][key.split('.')[1]])}" for key in COMMON_KEYS]
    return "\n".join([
        "presets (--config NAME):", *presets, "",
        f"most used keys (values of the '{DEFAULT_PRESET}' preset):", *keys, "",
        "--help-config lists every key with its description; the run's resolved config is <train.out_dir>/config.toml",
    ])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split the command line into its options (--config, --print-config, --help-config) and dotted
    overrides (`--a.b=v` or `--a.b v`)."""
    parser = ArgumentParser(
        prog="python -m nanotrain.train",
        description="Train a language model. Any config field can be overridden as --section.key=value.",
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the epilog's one-entry-per-line layout
    )
    parser.add_argument("--config", help="preset name or path to a .toml file (default: 'default')")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its description and its value in the chosen preset "
                             "(with any overrides), then exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (what config.toml would hold) as TOML, then exit "
                             "without training")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise NanotrainError(f"unexpected argument '{item}': overrides look like --section.key=value")
        if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


@distributed.torchrun_entry  # under torchrun: the failing rank's traceback in the job summary; a clean exit
@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, overrides, dataset_vocab_size)
    if args.help_config:
        print(describe_keys(cfg))
    elif args.print_config:
        sys.stdout.write(cfg.to_toml())
    else:
        train(cfg)


if __name__ == "__main__":
    main()
