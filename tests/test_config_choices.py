"""Enum-like config keys are typed once, as Literal[...]: validation, TOML, --help-config and the
commands' argparse choices all read their allowed values from that type."""

import importlib
import typing

import pytest

from nanotrain.config import CHOICES, Config, describe_keys, load_config
from nanotrain.errors import ConfigError, UsageError


def literal_keys() -> dict[str, tuple[str, ...]]:
    hints = {section: typing.get_type_hints(type(value)) for section, value in vars(Config()).items()}
    return {f"{section}.{name}": typing.get_args(annotation) for section, fields in hints.items()
            for name, annotation in fields.items() if typing.get_origin(annotation) is typing.Literal}


def test_choices_are_exactly_the_literal_typed_keys():
    assert CHOICES == literal_keys()
    assert CHOICES["model.flavour"] == ("llama", "gpt") and CHOICES["train.precision"] == ("fp32", "bf16", "fp16")
    assert set(CHOICES) >= {"data.source", "data.mode", "optim.implementation", "train.device",
                            "train.on_nonfinite", "parallel.strategy"}


def test_every_default_is_one_of_its_choices():
    defaults = Config()
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        assert getattr(getattr(defaults, section), name) in choices, key


def test_a_literal_key_in_a_toml_file_must_be_a_string_naming_the_choices(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nflavour = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == "config key 'model.flavour' expects one of llama, gpt, got 3"
    path.write_text('[parallel]\nstrategy = "fsdp"\n')
    assert load_config(str(path)).parallel.strategy == "fsdp"


def test_an_unknown_choice_and_gqa_for_gpt_keep_their_messages():
    with pytest.raises(ConfigError, match=r"^parallel.strategy must be one of auto, none, ddp, fsdp, got 'tp'$"):
        load_config(None, ["--parallel.strategy=tp"])
    with pytest.raises(ConfigError, match=r"^model.n_kv_heads \(grouped-query attention\) is a llama feature; "
                                          r"leave it 0 for gpt$"):
        load_config("gpt-mini", ["--model.n_kv_heads=2"])


def test_help_config_lists_the_allowed_values():
    lines = {line.split()[0]: line for line in describe_keys().splitlines()}
    assert lines['--train.precision="fp32"'].endswith("(one of fp32, bf16, fp16)")
    assert lines['--model.flavour="llama"'].endswith("(one of llama, gpt)")
    assert "one of" not in lines["--model.n_layers=4"]  # keys that are not Literal show their value and description


@pytest.mark.parametrize("module, option, key", [
    ("nanotrain.evaluate", "--precision", "train.precision"),
    ("nanotrain.bench", "--precision", "train.precision"),
    ("nanotrain.bench", "--device", "train.device"),
])
def test_command_line_choices_come_from_the_config_type(module, option, key):
    cli = importlib.import_module(module)
    parse = cli.build_parser().parse_args if hasattr(cli, "build_parser") else cli.parse_args
    required = ["--checkpoint", "c", "--data", "d"] if module == "nanotrain.evaluate" else []
    with pytest.raises(UsageError) as info:
        parse(required + [option, "nope"])
    assert f"(choose from {', '.join(repr(value) for value in CHOICES[key])})" in str(info.value)
