"""The CUDA test set: every CUDA-only path of nanotrain, run on a GPU machine (`pytest -m cuda`).

A machine without CUDA (CI, this project's CPU box) skips every test here with the reason
below; `launch/gpu_check.sh` runs them on a GPU in one call, then the benchmarks
(docs/15-running-on-gpus.md). Each test is sized to take seconds on an H100, so the set fits
the check script's budget; the tolerances are stated beside each test.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nanotrain.checkpoint.safe_loading import read_dcp_metadata
from nanotrain.config import load_config
from nanotrain.data.loader import build_data, to_device
from nanotrain.model.loss import fused_next_token_loss, next_token_loss
from nanotrain.model.transformer import build_model
from nanotrain.reporting.metrics import device_peak_tflops
from nanotrain.training.trainer import train
from test_checkpoint import assert_same_run, losses, run_cli, weights
from test_precision import check_the_poisoned_step_was_skipped, poison_one_gradient

NO_CUDA = "needs a CUDA GPU (a GPU machine runs these: launch/gpu_check.sh, or pytest -m cuda)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

DEVICE = torch.device("cuda")
TINY = [
    "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=128",
    "--model.vocab_size=128", "--model.max_position_embeddings=64", "--train.seq_len=64", "--train.batch_size=8",
    "--data.source=random", "--train.eval_every=0", "--train.eval_steps=1", "--train.sample_tokens=0",
    "--train.log_every=1", "--optim.warmup_steps=2", "--checkpoint.resume=none", "--checkpoint.on_preempt=false",
]
# The kernels SDPA may run for training: a fused one, never the math fallback that builds (B, H, T, T) scores.
FUSED_ATTENTION = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_cudnn_attention")
MATH_ATTENTION = "aten::_scaled_dot_product_attention_math"


@pytest.fixture(autouse=True)
def tf32_flags_restored():
    """train() sets the global TF32 flags from train.tf32; no test may leave them to the next."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def run(out: Path, *extra: str):
    return train(load_config(None, [*TINY, f"--train.device={DEVICE.type}", f"--train.out_dir={out}", *extra]))


# ---- precision ------------------------------------------------------------------------------------

def test_bf16_tracks_fp32_over_30_steps(tmp_path):
    # init_std 0.5 starts far above ln(128), so the loss has far to fall; fp32 without TF32 is the reference.
    common = ["--train.max_steps=30", "--train.lr=3e-3", "--model.init_std=0.5"]
    fp32 = run(tmp_path / "fp32", *common, "--train.tf32=false").losses
    bf16 = run(tmp_path / "bf16", *common, "--train.precision=bf16").losses
    assert fp32[30] < fp32[1] - 1.0 and bf16[30] < bf16[1] - 1.0
    worst = max(abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32)
    # 5% relative at every step: bf16 keeps 8 mantissa bits; the same run on CPU (bf16 autocast there)
    # drifts at most 1.5%.
    assert worst < 0.05, f"bf16 drifted {worst:.2%} from fp32"
    assert any(bf16[s] != fp32[s] for s in fp32), "bf16 run identical to fp32: autocast not in force"


def test_fp16_grad_scaler_skips_an_infinite_gradient_and_lowers_the_scale(tmp_path, monkeypatch, capsys):
    weights_seen = poison_one_gradient(monkeypatch, poisoned_step=4)
    result = run(tmp_path / "fp16", "--train.max_steps=6", "--train.precision=fp16")
    check_the_poisoned_step_was_skipped(capsys.readouterr().out, weights_seen, result.model, poisoned_step=4)


# ---- compile ----------------------------------------------------------------------------------------

def test_compile_gives_eagers_losses_and_clean_checkpoint_names(tmp_path):
    common = ["--train.max_steps=5", "--checkpoint.interval=5", "--train.lr=3e-3", "--train.tf32=false"]
    eager_run, compiled_run = tmp_path / "eager", tmp_path / "compiled"
    run(eager_run, *common)
    run(compiled_run, *common, "--train.compile=true")
    eager, compiled = losses(eager_run), losses(compiled_run)
    assert eager.keys() == compiled.keys() == set(range(1, 6))
    for step in eager:  # fp32: inductor's fused kernels sum in another order; 1e-3 relative is ~100x that
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), step
    names = set(weights(compiled_run, step=5))
    assert names == set(weights(eager_run, step=5)) and not any("_orig_mod" in name for name in names)
    train_state = compiled_run / "checkpoints" / "step_00000005" / "train_state"
    keys = read_dcp_metadata(train_state).state_dict_metadata.keys()
    assert keys and not any("_orig_mod" in key for key in keys), sorted(keys)[:5]


# ---- attention and the fused head + loss --------------------------------------------------------------

def attention_ops(model, ids: torch.Tensor, precision: str, attention_mask=None) -> set[str]:
    """The aten ops one forward and backward of `model` on `ids` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(ids, attention_mask, labels=ids, fused_loss=True)
        loss.backward()
    return {event.key for event in prof.key_averages() if "scaled_dot_product" in event.key}


@pytest.mark.parametrize("preset", ["tinystories-20m", "default"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_sdpa_runs_a_fused_attention_kernel_for_the_training_shapes(preset, precision):
    cfg = load_config(preset, ["--model.vocab_size=1024"])  # the vocabulary plays no part in attention
    model = build_model(cfg.model).to(DEVICE)
    ids = torch.randint(0, 1024, (cfg.train.batch_size, cfg.train.seq_len), device=DEVICE)
    ops = attention_ops(model, ids, precision)
    fused = [op for op in ops if op.startswith(FUSED_ATTENTION)]
    assert fused and MATH_ATTENTION not in ops, (
        f"{preset} ({cfg.model.n_heads} heads, {cfg.model.kv_heads} kv heads, head_dim {cfg.model.head_dim}) in "
        f"{precision} on {torch.cuda.get_device_name()} ran {sorted(ops)} (torch {torch.__version__})")
    print(f"{preset} {precision}: {sorted(fused)}")  # which backend, for the check script's log


def test_sdpa_with_a_padding_mask_runs_the_memory_efficient_kernel():
    cfg = load_config("default", ["--model.vocab_size=1024"])
    model = build_model(cfg.model).to(DEVICE)
    ids = torch.randint(0, 1024, (8, 128), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[::2, :37] = 0  # left padding in every other row: data.mode = "padded"
    for precision in ("bf16", "fp32"):
        ops = attention_ops(model, ids, precision, attention_mask=mask)
        assert any(op.startswith(FUSED_ATTENTION) for op in ops) and MATH_ATTENTION not in ops, (precision, ops)


def test_fused_head_and_loss_equals_the_plain_loss_in_bf16_and_never_makes_the_logits():
    B, T, C, V = 16, 1024, 256, 32000  # tinystories-20m's head at seq 1024: bf16 logits would be 1.0 GiB
    generator = torch.Generator(DEVICE).manual_seed(0)
    hidden = torch.randn(B, T, C, device=DEVICE, generator=generator).requires_grad_()
    weight = (0.02 * torch.randn(V, C, device=DEVICE, generator=generator)).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=DEVICE, generator=generator)
    logits_bytes = B * (T - 1) * V * 2

    def loss_and_peak(fused: bool):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                loss_sum, count = fused_next_token_loss(hidden, weight, labels)
            else:
                loss_sum, count = next_token_loss(torch.nn.functional.linear(hidden, weight), labels)
        (loss_sum / count).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return (loss_sum / count).item(), hidden.grad.clone(), weight.grad.clone(), peak

    fused_loss, fused_grad_h, fused_grad_w, fused_peak = loss_and_peak(fused=True)
    plain_loss, plain_grad_h, plain_grad_w, plain_peak = loss_and_peak(fused=False)
    assert plain_peak > logits_bytes, "the measurement cannot see a logits tensor: the memory check would be void"
    assert fused_peak < logits_bytes / 2, f"fused path peaked at {fused_peak / 2**20:.0f} MiB over its inputs"
    assert fused_loss == pytest.approx(plain_loss, rel=1e-3)  # both round the logits to bf16; the loss is fp32

    def relative(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert relative(fused_grad_h, plain_grad_h) < 2e-2 and relative(fused_grad_w, plain_grad_w) < 2e-2


# ---- generation ---------------------------------------------------------------------------------------

@torch.no_grad()
def test_greedy_generation_with_the_kv_cache_equals_hugging_face_generate():
    pytest.importorskip("transformers")
    from nanotrain.inference.sampling import generate
    from test_hf_parity import llama_pair

    ours, hf = llama_pair(tie_embeddings=False)
    ours, hf = ours.to(DEVICE), hf.to(DEVICE)
    # fp32 matmuls in full precision: TF32's 1e-3 rounding, summed in another order by each side's
    # attention kernel, could turn a near-tie between two tokens into different greedy choices.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eos = 2
    for prompt in ([5, 17, 99, 3], [1, 64, 7, 7, 21, 100, 42, 9, 11]):
        expected = hf.generate(torch.tensor([prompt], device=DEVICE), attention_mask=torch.ones(1, len(prompt),
                               dtype=torch.long, device=DEVICE), max_new_tokens=24, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        ours_tokens = generate(ours, [prompt], 24, temperature=0, eos_id=eos)[0]
        assert ours_tokens == expected, prompt
        assert len(set(expected)) > 3, "a degenerate continuation would make the comparison weak"


# ---- processes: NCCL, DDP, FSDP, tensor parallelism, the launch script --------------------------------

SHORT_RUN = ["--train.max_steps=4", "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4",
             "--model.d_ff=128", "--model.vocab_size=128", "--train.seq_len=64", "--train.batch_size=8",
             "--data.source=random", "--train.eval_every=2", "--train.eval_steps=1", "--train.sample_tokens=8",
             "--checkpoint.interval=2", "--train.log_every=1"]
TEARDOWN_TROUBLE = ("Traceback", "terminate called", "Segmentation fault", "destroy_process_group() was not called")


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_launch_single_gpu_sh_runs_as_written(tmp_path, strategy):
    """launch/single_gpu.sh (torchrun, one process, NCCL): a few steps with checkpoints, evaluation, samples.

    auto is the script as written (strategy none in a one-process NCCL group); ddp and fsdp wrap
    the model in a one-rank DDP / FSDP2 over NCCL. Every run must end with exit 0 and no trace of
    a crash at teardown.
    """
    out = tmp_path / strategy
    result = run_cli(["bash", "launch/single_gpu.sh", *SHORT_RUN, f"--train.out_dir={out}",
                      f"--parallel.strategy={strategy}"])
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert not [t for t in TEARDOWN_TROUBLE if t in text], text[-3000:]
    expected = "none" if strategy == "auto" else strategy
    assert re.search(rf"1 process on cuda:0, strategy {expected}", result.stdout), result.stdout[:2000]
    assert sorted(losses(out)) == [1, 2, 3, 4] and (out / "checkpoints" / "step_00000004").is_dir()


def test_tensor_parallelism_builds_on_a_one_gpu_cuda_mesh(tmp_path):
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                      "tests/cuda_worker.py", "tensor-parallel-1", "cuda", str(tmp_path / "tp.json")])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "tp.json").read_text())
    assert report["backend"] == "nccl" and report["mesh"] == "cuda"
    assert report["dtensor_parameters"] == report["parameters"] > 0
    assert report["loss_difference"] <= 1e-5 and report["largest_gradient_difference"] <= 1e-5, report


# ---- data: pinned memory, non-blocking copies, exact resume ---------------------------------------------

def test_the_loader_pins_copies_without_blocking_and_resumes_bit_exactly(monkeypatch):
    cfg = load_config(None, [*TINY, "--train.device=cuda"])
    data = build_data(cfg)
    batches = [next(data.train) for _ in range(6)]
    assert all(tensor.is_pinned() for batch in batches for tensor in batch.values())

    blocking = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        blocking.append(not kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    expected = [to_device(batch, DEVICE) for batch in batches[3:]]
    monkeypatch.undo()
    assert blocking and not any(blocking), "a batch was copied to the GPU with a blocking copy"

    first_half = build_data(cfg)
    for _ in range(3):
        next(first_half.train)
    resumed = build_data(cfg)
    resumed.train.load_state_dict(first_half.train.state_dict())
    for want in expected:
        got = to_device(next(resumed.train), DEVICE)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_training_resumes_bit_exactly_with_dropout_on_the_gpu(tmp_path):
    """6 steps at once equal 3 steps, a checkpoint, and 3 more: the CUDA RNG state travels in the checkpoint.

    Dropout draws from the CUDA generator, so a resume that lost its state would draw other masks.
    Attention runs on SDPA's math kernel here: the fused kernels' backward may sum in a different
    order from run to run, which this comparison of exact bits would take for a resume error.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    common = ["--train.max_steps=6", "--checkpoint.interval=3", "--model.dropout=0.1", "--train.lr=3e-3",
              "--checkpoint.resume=auto"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    with sdpa_kernel(SDPBackend.MATH):
        run(whole, *common)
        shutil.copytree(whole, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000006")
        run(resumed, *common)
    assert_same_run(whole, resumed, exact=True)


# ---- MFU ----------------------------------------------------------------------------------------------

def test_the_peak_table_knows_this_gpu_for_each_precision():
    name = torch.cuda.get_device_name(DEVICE)
    peaks = {(p, tf32): device_peak_tflops(DEVICE, p, tf32) for p in ("bf16", "fp16", "fp32") for tf32 in (True, False)}
    print(f"{name}: " + ", ".join(f"{p}{' tf32' if tf32 else ''} {peak} ({source})"
                                  for (p, tf32), (peak, source) in peaks.items()))
    bf16, tf32, fp32 = peaks[("bf16", True)][0], peaks[("fp32", True)][0], peaks[("fp32", False)][0]
    assert bf16 is not None, f"{name} is not in metrics.GPU_PEAK_TFLOPS: {peaks[('bf16', True)][1]}"
    assert peaks[("fp16", False)][0] == bf16 >= tf32 >= fp32 > 0
    assert "data sheet, dense" in peaks[("bf16", True)][1]
