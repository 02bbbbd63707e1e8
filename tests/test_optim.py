"""Optimizer groups and the learning-rate schedule."""

import math

import torch
from torch import nn

from nanotrain.config import OptimConfig
from nanotrain.optim import build_optimizer, lr_at, parameter_groups


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


def test_schedule_warmup_cosine_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert math.isclose(lr_at(0, 1.0, 110, cfg), 0.1)
    assert math.isclose(lr_at(9, 1.0, 110, cfg), 1.0)
    assert math.isclose(lr_at(10, 1.0, 110, cfg), 1.0)
    assert math.isclose(lr_at(60, 1.0, 110, cfg), 0.55)
    assert math.isclose(lr_at(110, 1.0, 110, cfg), 0.1)
    lrs = [lr_at(s, 1.0, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
