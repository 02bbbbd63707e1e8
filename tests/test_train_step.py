"""train_step: accumulated micro-batches give one big batch's update; a judge or fp16 overflow can withhold it;
a schedule passed in (as pipelining will) replaces the micro-batch loop."""

import copy

import pytest
import torch

from nanotrain.config import ModelConfig, OptimConfig, load_config
from nanotrain.inference.evaluation import mean_loss
from nanotrain.model.loss import IGNORE_INDEX
from nanotrain.model.transformer import build_model
from nanotrain.parallel import precision as precision_module
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.precision import Precision
from nanotrain.training import trainer as trainer_module
from nanotrain.training.optim import build_optimizer
from nanotrain.training.step import train_step

CPU = ParallelDims.single_process("cpu")
MODEL = ModelConfig(vocab_size=61, max_position_embeddings=16, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64)
OPTIM = OptimConfig(grad_clip=0.05)  # small enough that this step's gradient is clipped


def micro_batches_with_uneven_valid_tokens():
    """Three micro-batches of 2 x 12 tokens holding 22, 15 and 7 valid (scored) labels."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for ignored in (0, 8, 17):
        ids = torch.randint(0, MODEL.vocab_size, (2, 12), generator=g)
        labels = ids.clone()
        labels.view(-1)[:ignored] = IGNORE_INDEX
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def model_and_optimizer(lr=1e-2):
    model = build_model(MODEL, seed=3)
    return model, build_optimizer(model, OPTIM, lr)


def fp32():
    return Precision("fp32", CPU.device, CPU.strategy)


def test_accumulated_micro_batches_step_like_one_big_batch():
    micro_batches = micro_batches_with_uneven_valid_tokens()
    model, optimizer = model_and_optimizer()
    outcome = train_step(model, optimizer, micro_batches, CPU, fp32(), grad_clip=OPTIM.grad_clip, fused_loss=True)

    # the reference: one batch of all six rows, its mean loss over valid tokens, clip, AdamW
    reference, reference_optimizer = model_and_optimizer()
    ids = torch.cat([b["input_ids"] for b in micro_batches])
    labels = torch.cat([b["labels"] for b in micro_batches])
    _, loss = reference(ids, labels=labels)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), OPTIM.grad_clip)
    reference_optimizer.step()

    assert outcome.applied and outcome.rejected is None and outcome.loss_scale_drop is None
    assert outcome.valid_tokens == 22 + 15 + 7
    assert outcome.loss == pytest.approx(loss.item(), rel=1e-5)
    assert outcome.grad_norm == pytest.approx(norm.item(), rel=1e-4) and outcome.grad_norm > OPTIM.grad_clip
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        # Adam's first update is about lr * gradient / |gradient|: where a gradient is within rounding
        # of 0, summing in another order moves it by a small fraction of lr (1e-2)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4, msg=name)
        assert ours.grad is None, f"{name}: gradients are zeroed after the step"


def test_train_step_runs_the_schedule_it_is_given():
    """A replacement for forward_backward: its loss and tokens are the step's, its gradient is clipped and applied."""
    model, optimizer = model_and_optimizer()
    micro_batches = micro_batches_with_uneven_valid_tokens()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def schedule(model, micro_batches, dims, precision, *, fused_loss):
        calls.append((len(micro_batches), dims, fused_loss))
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
        return torch.tensor(6.0), torch.tensor(3.0)

    outcome = train_step(model, optimizer, micro_batches, CPU, fp32(), grad_clip=OPTIM.grad_clip, fused_loss=False,
                         schedule=schedule)
    assert calls == [(3, CPU, False)]
    assert (outcome.loss, outcome.valid_tokens, outcome.applied) == (2.0, 3, True)
    assert outcome.grad_norm == pytest.approx(sum(p.numel() for p in model.parameters()) ** 0.5, rel=1e-6)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_a_rejecting_judge_sees_the_numbers_and_leaves_weights_and_optimizer_alone():
    model, optimizer = model_and_optimizer()
    before = copy.deepcopy(model.state_dict())
    seen = []

    def judge(loss, grad_norm):
        seen.append((loss, grad_norm))
        return "looks wrong"

    outcome = train_step(model, optimizer, micro_batches_with_uneven_valid_tokens(), CPU, fp32(),
                         grad_clip=OPTIM.grad_clip, fused_loss=True, judge=judge)
    assert seen == [(outcome.loss, outcome.grad_norm)] and outcome.grad_norm > 0
    assert outcome.rejected == "looks wrong" and not outcome.applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_fp16_overflow_is_reported_as_a_loss_scale_drop_and_hidden_from_the_judge(monkeypatch):
    monkeypatch.setattr(precision_module, "FP16_DEVICE_TYPES", ("cuda", "cpu"))  # GradScaler on a CPU-only machine
    model, optimizer = model_and_optimizer()
    model.lm_head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = copy.deepcopy(model.state_dict())
    fp16 = Precision("fp16", CPU.device, CPU.strategy)
    judged = []
    outcome = train_step(model, optimizer, micro_batches_with_uneven_valid_tokens(), CPU, fp16,
                         grad_clip=OPTIM.grad_clip, fused_loss=True, judge=lambda *numbers: judged.append(numbers))
    scale = fp16.scaler.get_scale()
    assert outcome.loss_scale_drop == (2 * scale, scale) and not outcome.applied and outcome.rejected is None
    assert judged == [(outcome.loss, 0.0)]  # the scaler, not the judge, answers for fp16 gradients
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_and_its_evaluation_use_train_fused_loss(tmp_path, monkeypatch):
    """With train.fused_loss=false no forward of the run, evaluation's included, takes the fused path."""
    flags = []

    def build_recording_model(model_cfg, seed=0):
        model = build_model(model_cfg, seed)
        model.register_forward_pre_hook(
            lambda module, args, kwargs: flags.append((module.training, kwargs.get("fused_loss"))), with_kwargs=True)
        return model

    monkeypatch.setattr(trainer_module, "build_model", build_recording_model)
    trainer_module.train(load_config(None, [
        "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=4", "--model.d_ff=64", "--model.vocab_size=64",
        "--data.source=random", "--train.seq_len=16", "--train.batch_size=2", "--train.max_steps=2",
        "--train.eval_every=2", "--train.eval_steps=2", "--train.sample_tokens=0", "--checkpoint.interval=0",
        "--train.fused_loss=false", f"--train.out_dir={tmp_path / 'run'}",
    ]))
    assert (True, False) in flags and (False, False) in flags and (False, True) not in flags, flags


@pytest.mark.parametrize("fused", [False, True])
def test_mean_loss_computes_the_loss_the_way_it_is_told(fused):
    model = build_model(MODEL, seed=3)
    batches = micro_batches_with_uneven_valid_tokens()
    loss, tokens = mean_loss(model, batches, fp32(), CPU, fused_loss=fused)
    with torch.no_grad():
        sums = [model(b["input_ids"], labels=b["labels"], loss_reduction="sum", fused_loss=fused)[1] for b in batches]
    assert tokens == 22 + 15 + 7
    assert loss == pytest.approx(sum(s.double() for s in sums).item() / tokens, rel=1e-12)
