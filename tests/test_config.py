"""Config: presets load, overrides apply with types, and bad input fails with one clear line."""

import subprocess
import sys

import pytest

from nanotrain.config import ConfigError, load_config, preset_names


def test_presets_load_and_validate():
    assert {"default", "tinystories-20m", "gpt-mini"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


def test_overrides_are_typed():
    cfg = load_config(None, ["--model.n_layers=2", "--train.lr=3e-4", "model.tie_embeddings=true",
                             "--train.sample_prompts=Once|The dog"])
    assert cfg.model.n_layers == 2 and cfg.train.lr == 3e-4 and cfg.model.tie_embeddings is True
    assert cfg.train.sample_prompts == ["Once", "The dog"]


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config("gpt-mini", ["--train.lr=5e-4", "--train.sample_prompts=a|b"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.n_layer=2"], "unknown config key 'model.n_layer'; did you mean 'model.n_layers'?"),
        (["--lr=1e-3"], "unknown config key 'lr'; did you mean 'train.lr'?"),
        (["--train.lr=fast"], "config key 'train.lr' expects float, got 'fast'"),
        (["--train.max_steps=1.5"], "config key 'train.max_steps' expects int, got '1.5'"),
        (["--model.d_model=130", "--model.n_heads=4"], "model.d_model (130) must be divisible by model.n_heads (4)"),
        (["--model.n_kv_heads=3"], "model.n_heads (4) must be divisible by model.n_kv_heads (3)"),
        (["--model.n_layers=0"], "model.n_layers must be positive, got 0"),
        (["--train.seq_len=512"], "train.seq_len (512) exceeds model.max_position_embeddings (256)"),
        (["--train.precision=fp8"], "train.precision must be one of fp32, bf16, fp16, got 'fp8'"),
        (["--model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
        (["--data.source=tokens"], "data.source = 'tokens' needs --data.path=DIR"),
        (["--train.lr"], "override '--train.lr' must look like --section.key=value"),
        (["--train.sample_prompts=[bad"], "config key 'train.sample_prompts' expects list of strings"),
    ],
)
def test_bad_overrides_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_preset_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'gpt-mni': did you mean 'gpt-mini'"):
        load_config("gpt-mni")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layers = 'two'\n")
    with pytest.raises(ConfigError, match="config key 'model.n_layers' expects int, got 'two'"):
        load_config(str(bad))


def test_command_line_error_is_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "nanotrain.train", "--model.n_heads=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.d_model (128) must be divisible by model.n_heads (3)"
    ]
