"""Optimizer groups and the learning-rate schedule."""

import math

import pytest
import torch
from torch import nn

from nanotrain.config import Config, OptimConfig, load_config
from nanotrain.errors import ConfigError
from nanotrain.training.optim import Schedule, build_optimizer, parameter_groups, schedule_change


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once, undecayed


def test_no_weight_decay_on_norms_biases_embeddings():
    model = Tiny()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.embed.weight), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)
    }


def test_kernels_give_the_same_update():
    results = []
    for implementation in ("foreach", "for-loop", "fused"):
        torch.manual_seed(0)
        model = Tiny()
        opt = build_optimizer(model, OptimConfig(implementation=implementation), lr=1e-2)
        model.proj(model.embed(torch.tensor([1, 2]))).sum().backward()
        opt.step()
        results.append(model.proj.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-7) and torch.allclose(results[0], results[2], atol=1e-6)


def schedule(warmup_steps=10, max_steps=110, decay_steps=0, lr=1.0, min_lr_ratio=0.1) -> dict:
    cfg = Config()
    cfg.train.lr, cfg.train.max_steps = lr, max_steps
    cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.optim.min_lr_ratio = warmup_steps, decay_steps, min_lr_ratio
    return cfg.to_dict()


def test_schedule_warmup_cosine_floor():
    lr_at = Schedule.of(schedule()).lr_at
    assert math.isclose(lr_at(0), 0.1)
    assert math.isclose(lr_at(9), 1.0)
    assert math.isclose(lr_at(10), 1.0)
    assert math.isclose(lr_at(60), 0.55)
    assert math.isclose(lr_at(110), 0.1)
    lrs = [lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_decay_steps_ends_the_cosine_there_and_keeps_the_floor_after_it():
    fixed = Schedule.of(schedule(max_steps=300, decay_steps=110))
    assert fixed == Schedule.of(schedule(max_steps=110))  # the same rates as a 110-step run...
    assert [fixed.lr_at(s) for s in (110, 200, 299)] == [0.1, 0.1, 0.1]  # ...and its floor after step 110
    assert "\ndecay_steps = 7\n" in load_config(None, ["--optim.decay_steps=7"]).to_toml()  # saved in config.toml
    with pytest.raises(ConfigError, match="optim.decay_steps must be >= 0"):
        load_config(None, ["--optim.decay_steps=-1"])


def test_extending_a_finished_run_names_the_lr_jump_and_how_to_keep_the_schedule():
    # the case: the default preset (lr 2e-3, warmup 30) trained to 200, extended to 300
    finished, extended = schedule(30, 200, lr=2e-3), schedule(30, 300, lr=2e-3)
    line = schedule_change(finished, extended, step=200)
    assert line.startswith("resume: the learning-rate schedule differs from the checkpoint's (train.max_steps 200 -> "
                           "300): step 201 trains at lr 7.44e-04 where the checkpoint's schedule gives 2.00e-04")
    assert line.endswith("(--optim.decay_steps=200 keeps the checkpoint's)")
    assert schedule_change(finished, schedule(30, 300, decay_steps=200, lr=2e-3), step=200) is None  # the advice works
    assert schedule_change(finished, finished, step=150) is None  # a crashed run resumed as it was
    # a checkpoint saved before optim.decay_steps existed reads as decay_steps = 0
    del finished["optim"]["decay_steps"]
    assert schedule_change(finished, extended, step=200) == line
    # a changed peak lr is named too, at the first step whose rate differs (here after the warmup both share)
    line = schedule_change(schedule(30, 200), schedule(30, 200, lr=2.0), step=0)
    assert line.startswith("resume: the learning-rate schedule differs from the checkpoint's (train.lr 1.0 -> 2.0): "
                           "step 1 trains at lr 6.67e-02 where the checkpoint's schedule gives 3.33e-02")
    assert "decay_steps" not in line


def test_a_warmup_not_shorter_than_the_run_or_the_cosine_gets_a_note():
    assert Schedule.of(schedule(warmup_steps=10, max_steps=11)).warmup_note(11) is None
    note = Schedule.of(schedule(warmup_steps=100, max_steps=50, lr=1e-3)).warmup_note(50)
    assert note == ("optim.warmup_steps = 100 is not shorter than the run (train.max_steps = 50): the learning rate "
                    "only ramps up, to 5.00e-04 at the last step (train.lr = 1.00e-03), and never decays; lower "
                    "optim.warmup_steps")
    note = Schedule.of(schedule(warmup_steps=100, max_steps=500, decay_steps=80)).warmup_note(500)
    assert note.startswith("optim.warmup_steps = 100 is not shorter than optim.decay_steps = 80: after warmup the "
                           "learning rate drops from 1.00e+00 straight to its floor 1.00e-01")
