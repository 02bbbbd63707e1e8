"""Config: presets load, overrides apply with types, and bad input fails with one clear line."""

import subprocess
import sys

import pytest

from nanotrain.config import Config, all_keys, default_out_dir, describe_keys, load_config, preset_names
from nanotrain.errors import ConfigError
from nanotrain.train import main


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


@pytest.mark.parametrize("key", ["optim.grad_clip", "train.lr", "optim.eps", "optim.weight_decay", "model.rope_theta",
                                 "model.norm_eps", "train.peak_tflops", "train.loss_spike_ratio", "optim.beta1"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    # nan passes every `< 0` check, and inf passes every `> 0` one: each would otherwise be accepted somewhere
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"--{key}={value}"])
    assert str(info.value).startswith(f"{key} must be a finite number, got {value}")


def test_non_finite_numbers_in_a_toml_file_are_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\ngrad_clip = nan\n")
    with pytest.raises(ConfigError,
                       match=r"^optim.grad_clip must be a finite number, got nan \(0 disables clipping\)$"):
        load_config(str(path))
    path.write_text("[model]\nrope_theta = +inf\n")
    with pytest.raises(ConfigError, match=r"^model.rope_theta must be a finite number, got inf$"):
        load_config(str(path))


@pytest.mark.parametrize("overrides, message", [
    (["--train.loss_spike_ratio=1"],
     "train.loss_spike_ratio must be above 1 (or 0 to turn the spike check off), got 1.0"),
    (["--train.loss_spike_ratio=-2"], "train.loss_spike_ratio must be above 1"),
    (["--train.max_consecutive_skips=0"], "train.max_consecutive_skips must be positive, got 0"),
])
def test_divergence_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert load_config(None, ["--train.loss_spike_ratio=0"]).train.loss_spike_ratio == 0  # 0: the check is off


def test_non_finite_number_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanotrain.train", "--optim.grad_clip=nan"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: optim.grad_clip must be a finite number, got nan (0 disables clipping)"]
    assert not any(tmp_path.iterdir())  # refused before the run directory was made


# ---- --help-config: the chosen preset's values, a description for every key ----------------------

def help_config_lines(text: str) -> dict[str, tuple[str, str]]:
    """--help-config's key lines: dotted key -> (value, description)."""
    lines = {}
    for line in text.splitlines():
        if line.startswith("  --"):
            option, _, description = line.strip().partition("  ")
            key, _, value = option.removeprefix("--").partition("=")
            lines[key] = (value, description.strip())
    return lines


def test_help_config_describes_every_key_with_the_chosen_presets_values():
    proc = subprocess.run([sys.executable, "-m", "nanotrain.train", "--config", "gpt-mini", "--train.lr=5e-4",
                           "--help-config"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = help_config_lines(proc.stdout)
    assert sorted(lines) == sorted(all_keys())
    assert all(description for _, description in lines.values())
    # the preset's values, and the command line's, not the dataclass defaults (llama, 32000, runs/default)
    assert lines["model.flavour"][0] == '"gpt"' and lines["model.vocab_size"][0] == "10000"
    assert lines["train.out_dir"][0] == '"runs/gpt-mini"' and lines["train.lr"][0] == "0.0005"
    assert lines["model.n_layers"][1] == "transformer blocks"
    assert "[model]" in proc.stdout.splitlines()[0]  # sections are headed
    bare = help_config_lines(describe_keys())  # what a bare `python -m nanotrain.train` runs
    assert bare["train.max_steps"][0] == str(load_config(None).train.max_steps) != str(Config().train.max_steps)


# ---- the run directory of a run that does not name one --------------------------------------------

@pytest.mark.parametrize("strategy, dp, tp, sequence_parallel, expected", [
    ("auto", 1, 1, False, "runs/default"),
    ("auto", 2, 1, False, "runs/default-ddp2"),
    ("fsdp", 2, 1, False, "runs/default-fsdp2"),
    ("auto", 1, 2, False, "runs/default-tp2"),
    ("fsdp", 2, 2, False, "runs/default-fsdp2-tp2"),
    ("auto", 2, 2, True, "runs/default-ddp2-tp2-sp"),
    ("ddp", 1, 1, False, "runs/default-ddp1"),  # one torchrun process told to use DDP: not the plain run
])
def test_default_run_directory_is_named_after_the_preset_and_the_layout(strategy, dp, tp, sequence_parallel, expected):
    assert default_out_dir("default", strategy, dp, tp, sequence_parallel) == expected


def test_an_unset_out_dir_follows_the_launched_layout_and_a_set_one_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert load_config(None).train.out_dir == "runs/default"
    assert load_config("gpt-mini").train.out_dir == "runs/gpt-mini"
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node=4 sets it
    assert load_config(None).train.out_dir == "runs/default-ddp4"
    assert load_config(None, ["--parallel.tp=2", "--parallel.strategy=fsdp"]).train.out_dir == "runs/default-fsdp2-tp2"
    assert load_config(None, ["--train.out_dir=mine"]).train.out_dir == "mine"
    own = tmp_path / "small.toml"
    own.write_text("[train]\nmax_steps = 5\n")
    assert load_config(str(own)).train.out_dir == "runs/small-ddp4"  # a config file is a preset named after it
    own.write_text('[train]\nout_dir = "there"\n')
    assert load_config(str(own)).train.out_dir == "there"
    saved = tmp_path / "config.toml"  # a run's saved config names its directory: resuming it under any launch finds it
    saved.write_text(load_config(None, ["--parallel.tp=2"]).to_toml())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert load_config(str(saved)).train.out_dir == "runs/default-ddp2-tp2"


def test_print_config_shows_the_run_directory_of_the_launched_layout(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(["--print-config", "--parallel.tp=2"])
    assert 'out_dir = "runs/default-tp2"\n' in capsys.readouterr().out


# ---- a config file that is not UTF-8 text ---------------------------------------------------------

@pytest.mark.parametrize("content, byte, offset", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "0x89", 0),  # a binary file
    ('[train]\nout_dir = "caf\u00e9"\n'.encode("latin-1"), "0xe9", 22),  # latin-1 text
])
def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path, content, byte, offset):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "nanotrain.train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: config file '{path}' is not UTF-8 text (byte {byte} at offset "
                                        f"{offset}); a TOML config must be saved as UTF-8"]
    assert sorted(tmp_path.iterdir()) == [path]  # refused before the run directory was made
