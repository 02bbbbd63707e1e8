"""First contact: a run starts with a short summary, --print-config shows the full config, --help the presets."""

import subprocess
import sys

import pytest

from nanotrain.config import load_config, preset_names
from nanotrain.model.transformer import build_model, num_parameters
from nanotrain.train import COMMON_KEYS, main, preset_description
from nanotrain.training.trainer import train

TINY = [
    "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=128",
    "--train.seq_len=32", "--train.batch_size=4", "--train.grad_accum_steps=2", "--train.max_steps=1",
    "--train.sample_tokens=0", "--train.eval_steps=2", "--data.source=random", "--model.vocab_size=96",
    "--checkpoint.interval=5", "--train.peak_tflops=1",  # a given peak: no matmul benchmark at start
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_CACHE", str(tmp_path / "cache"))


def test_run_starts_with_a_summary_and_print_config_shows_its_config_toml(tmp_path, capsys):
    run = tmp_path / "run"
    main(["--print-config", *TINY, f"--train.out_dir={run}"])
    printed = capsys.readouterr().out
    assert not run.exists()  # printed, not trained

    cfg = load_config(None, TINY + [f"--train.out_dir={run}"])
    train(cfg)
    lines = capsys.readouterr().out.splitlines()
    parameters = num_parameters(build_model(cfg.model))
    assert lines[:8] == [
        f"model        {parameters:,} parameters, llama, 2 layers x d_model 64, vocab 96",
        "data         random (random tokens): endless train windows of 32 tokens (packed), "
        "2 val batches per evaluation",
        "layout       1 process on cpu, strategy none, data parallel 1",
        "precision    fp32 (no autocast)",
        f"run dir      {run} (metrics in metrics.jsonl)",
        f"config       {run / 'config.toml'} (the full resolved config; --print-config prints it without training)",
        f"checkpoints  {run / 'checkpoints'} (every 5 steps, keep last 3, resume auto)",
        "tokens per optimizer step = 2 accum x 1 data-parallel x 4 batch x 32 seq = 256",
    ]
    assert not any(line.startswith("[") for line in lines)  # no TOML section of the resolved config
    assert printed == (run / "config.toml").read_text()


def test_help_lists_every_preset_and_the_most_used_keys():
    proc = subprocess.run([sys.executable, "-m", "nanotrain.train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    for name in preset_names():
        description = preset_description(name)
        assert description and f"  {name} " in out and description in out
    assert preset_description("gpt-mini") == "The mini-GPT: learned positions, LayerNorm, GELU MLP, dropout."
    default = load_config(None)
    assert f"  --train.max_steps={default.train.max_steps}\n" in out and '  --train.out_dir="runs/default"\n' in out
    for key in COMMON_KEYS:
        assert f"  --{key}=" in out
    assert "--help-config" in out
