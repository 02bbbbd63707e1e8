"""The single-process loop: it learns, it is deterministic, and it leaves the promised run files."""

import json
import math
import subprocess
import sys

import pytest
import torch

from nanotrain.checkpoint.checkpointer import list_checkpoints
from nanotrain.config import TrainConfig, load_config
from nanotrain.data.loader import unigram_entropy
from nanotrain.data.stories import prepare_stories
from nanotrain.errors import DivergenceError
from nanotrain.model.transformer import build_model
from nanotrain.parallel import distributed, precision
from nanotrain.reporting.run_log import read_metrics
from nanotrain.training import trainer as trainer_module
from nanotrain.training.divergence import DivergenceGuard
from nanotrain.training.trainer import train

TINY = [
    "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2",
    "--model.d_ff=128", "--train.seq_len=64", "--train.batch_size=8", "--train.log_every=1",
    "--train.sample_tokens=0", "--optim.warmup_steps=5",
]
RANDOM = TINY + ["--data.source=random", "--model.vocab_size=128", "--train.eval_every=0", "--checkpoint.interval=2"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_CACHE", str(tmp_path / "cache"))


def test_short_run_on_stories_falls_far_below_unigram_entropy(tmp_path):
    cfg = load_config(None, TINY + [
        f"--train.out_dir={tmp_path}/run", "--train.max_steps=60", "--train.lr=3e-3",
        "--train.eval_every=0", "--train.eval_steps=4",
    ])
    result = train(cfg)
    corpus = prepare_stories(cfg.data.stories_count, cfg.data.stories_vocab_size, cfg.data.stories_seed, verbose=False)
    entropy = unigram_entropy(corpus, "train")
    assert result.losses[1] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.3)
    # 60 steps of a 0.2M-parameter model: far below ln(1024) = 6.93 and the unigram entropy (5.16)
    assert result.val_losses[60] < 0.7 * entropy, (result.val_losses, entropy)
    assert result.losses[60] < 0.7 * entropy


def test_same_seed_same_losses_and_run_files(tmp_path):
    overrides = TINY + ["--data.source=random", "--model.vocab_size=128", "--train.max_steps=4",
                        "--train.eval_every=2", "--train.eval_steps=2"]
    first = train(load_config(None, overrides + [f"--train.out_dir={tmp_path}/a"]))
    second = train(load_config(None, overrides + [f"--train.out_dir={tmp_path}/b"]))
    assert first.losses == second.losses and len(first.losses) == 4
    assert first.val_losses == second.val_losses and set(first.val_losses) == {2, 4}
    other_seed = train(load_config(None, overrides + [f"--train.out_dir={tmp_path}/c", "--train.seed=7"]))
    assert other_seed.losses != first.losses

    run = tmp_path / "a"
    assert load_config(str(run / "config.toml")) == load_config(None, overrides + [f"--train.out_dir={run}"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
        assert r["loss"] == first.losses[r["step"]]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [first.val_losses[2], first.val_losses[4]]


def test_extending_a_finished_run_names_its_lr_jump_and_decay_steps_keeps_the_floor(tmp_path, capsys):
    run = tmp_path / "run"
    args = RANDOM + [f"--train.out_dir={run}", "--train.eval_every=0"]  # lr 2e-3, floor 2e-4, warmup 5 steps
    train(load_config(None, args + ["--train.max_steps=4"]))
    assert ("note: optim.warmup_steps = 5 is not shorter than the run (train.max_steps = 4): the learning rate only "
            "ramps up, to 1.60e-03 at the last step") in capsys.readouterr().out
    # 4 -> 8 stretches the cosine: step 5 still warms up as before, step 6 jumps from the old schedule's floor
    train(load_config(None, args + ["--train.max_steps=8"]))
    out = capsys.readouterr().out
    assert ("resume: the learning-rate schedule differs from the checkpoint's (train.max_steps 4 -> 8): step 6 trains "
            "at lr 2.00e-03 where the checkpoint's schedule gives 2.00e-04; the cosine now ends at step 8, not 4 "
            "(--optim.decay_steps=4 keeps the checkpoint's)") in out.splitlines()
    assert "note: optim.warmup_steps" not in out
    # continued with the cosine's end kept at step 8: the floor, and no schedule line
    train(load_config(None, args + ["--train.max_steps=10", "--optim.decay_steps=8"]))
    assert "learning-rate schedule" not in capsys.readouterr().out
    lrs = {record["step"]: record["lr"] for record in read_metrics(run).steps}
    assert lrs[6] == pytest.approx(2e-3) and lrs[9] == lrs[10] == pytest.approx(2e-4)  # step k logs update k's lr


# ---- divergence: non-finite and spiking losses, skipped updates (nanotrain/training/divergence.py) ----------------

def steps_of(run_dir):
    return [step for step, _ in list_checkpoints(run_dir / "checkpoints")]


def test_huge_lr_stops_at_once_in_one_line_and_saves_no_diverged_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, RANDOM + [f"--train.out_dir={run}", "--train.max_steps=4"]))
    # The same run continued at a learning rate 1e5 times too high: step 5's update wrecks the weights,
    # and step 6's loss (the first to see them) stops the run before anything saves them.
    proc = subprocess.run([sys.executable, "-m", "nanotrain.train", *RANDOM, f"--train.out_dir={run}",
                           "--train.max_steps=12", "--train.lr=1e2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: step 6: "), proc.stderr
    assert f"--checkpoint.resume={run / 'checkpoints' / 'step_00000004'}" in lines[0]
    assert steps_of(run) == [4, 2]


def nan_grad_norm_at(monkeypatch, bad_steps: set[int]):
    real, calls = distributed.clip_grad_norm, []

    def clip(model, max_norm):
        calls.append(1)
        norm = real(model, max_norm)
        return torch.full_like(norm, float("nan")) if len(calls) in bad_steps else norm

    monkeypatch.setattr(distributed, "clip_grad_norm", clip)


def test_skip_mode_stops_after_max_consecutive_skips(tmp_path, monkeypatch, capsys):
    nan_grad_norm_at(monkeypatch, {2, 5, 6, 7, 8})
    run = tmp_path / "run"
    with pytest.raises(DivergenceError) as info:
        train(load_config(None, RANDOM + [f"--train.out_dir={run}", "--train.max_steps=20", "--checkpoint.interval=1",
                                          "--train.on_nonfinite=skip", "--train.max_consecutive_skips=3"]))
    # step 2's lone skip does not count: the update at step 3 went through
    assert str(info.value).startswith("step 7: the run has diverged: 3 updates in a row were skipped (steps 5-7")
    # step 5's check found step 4's weights bad; step 3's are the newest the guard saw healthy
    assert f"--checkpoint.resume={run / 'checkpoints' / 'step_00000003'}" in str(info.value)
    # weights whose check failed are never saved (steps 2, 5, 6), so no healthy checkpoint was pruned for them
    assert steps_of(run) == [4, 3, 1]
    assert "step 2: non-finite gradient norm (nan)" in capsys.readouterr().out


def test_fp16_overflow_skips_count_but_a_few_at_the_start_do_not_stop(tmp_path, monkeypatch):
    # fp16 runs on CPU in torch; nanotrain allows it on CUDA only, so the test widens that (as test_precision does)
    monkeypatch.setattr(precision, "FP16_DEVICE_TYPES", ("cuda", "cpu"))
    overflowing = {1, 2, 5, 6, 7}  # the scaler's search for its scale, then gradients that overflow at any scale
    backward_calls = []

    def build_overflowing_model(model_cfg, seed=0):
        model = build_model(model_cfg, seed)

        def poison(grad):
            backward_calls.append(1)
            return torch.full_like(grad, float("inf")) if len(backward_calls) in overflowing else grad

        model.lm_head.weight.register_hook(poison)
        return model

    monkeypatch.setattr(trainer_module, "build_model", build_overflowing_model)
    with pytest.raises(DivergenceError) as info:
        train(load_config(None, RANDOM + [f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=20",
                                          "--train.precision=fp16", "--train.max_consecutive_skips=3"]))
    assert str(info.value).startswith("step 7: the run has diverged: 3 updates in a row were skipped (steps 5-7, "
                                      "train.max_consecutive_skips=3; the last: fp16 gradient overflow)")


def test_a_spike_is_double_the_recent_mean_or_one_nat_above_it_below_a_mean_of_one(tmp_path):
    def verdict(history, loss, grad_norm=1.0):
        guard = DivergenceGuard(TrainConfig(on_nonfinite="skip"), 0, tmp_path)
        assert all(guard.check(step, past, 1.0) is None for step, past in enumerate(history, 1))
        return guard.check(len(history) + 1, loss, grad_norm) or "healthy"

    assert verdict([4.0] * 5, 7.9) == "healthy"
    assert verdict([4.0] * 5, 8.1).startswith("loss spike to 8.1 from a recent mean of 4")
    assert verdict([0.05] * 5, 1.0) == "healthy"  # low losses: a rise of up to 1 nat is noise, not a spike
    assert verdict([0.05] * 5, 1.1).startswith("loss spike")
    assert verdict([0.05] * 5, 0.5, float("inf")).startswith("non-finite gradient norm (inf)")
    assert verdict([0.05] * 5, float("nan")).startswith("non-finite loss (nan)")


def test_the_default_runs_fast_early_drop_is_far_from_a_spike(tmp_path):
    # The default preset's real curve (6.97 -> 3.5 in its first 30 steps) passes even a check ten times
    # stricter than the default (a rise of 0.1 x the mean where the default allows 1 x the mean).
    result = train(load_config(None, [
        f"--train.out_dir={tmp_path}/run", "--train.max_steps=30", "--train.log_every=1", "--train.eval_every=0",
        "--train.eval_steps=1", "--train.sample_tokens=0", "--checkpoint.interval=0", "--train.loss_spike_ratio=1.1",
    ]))
    assert sorted(result.losses) == list(range(1, 31))  # every step ran: nothing stopped it
    assert result.losses[1] > 6.5 and result.losses[30] < 4.0
