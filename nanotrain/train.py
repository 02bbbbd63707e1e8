"""Train a language model: `python -m nanotrain.train [--config NAME] [--section.key=value ...]`.

The command line is a preset (or a .toml file) and dotted overrides; the loop itself is
trainer.py's `train(cfg)`, which tests and notebooks call directly.
"""

from __future__ import annotations

import sys

from nanotrain import distributed
from nanotrain.config import describe_keys, load_config, preset_names
from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error
from nanotrain.trainer import train


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split the command line into a preset and dotted overrides (`--a.b=v` or `--a.b v`)."""
    parser = ArgumentParser(
        prog="python -m nanotrain.train",
        description="Train a language model. Any config field can be overridden as --section.key=value.",
        epilog=f"presets: {', '.join(preset_names())}; --help-config lists every key",
    )
    parser.add_argument("--config", help="preset name or path to a .toml file (default: 'default')")
    parser.add_argument("--help-config", action="store_true", help="list every config key and its default")
    args, rest = parser.parse_known_args(argv)
    if args.help_config:
        print(describe_keys())
        raise SystemExit(0)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise NanotrainError(f"unexpected argument '{item}': overrides look like --section.key=value")
        if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args.config, overrides


@distributed.record_errors  # under torchrun: the failing rank's traceback in the job summary
@exit_on_error
def main(argv: list[str] | None = None) -> None:
    preset, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    train(load_config(preset, overrides))


if __name__ == "__main__":
    main()
