"""Speed metrics: every train log record carries tokens/s, MFU, peak memory and the data/compute split."""

import json

import pytest
import torch

from nanotrain.config import load_config
from nanotrain.metrics import SpeedMeter, device_peak_tflops, gpu_peak_tflops, measure_matmul_tflops
from nanotrain.model import flops_per_token
from nanotrain.run_log import format_step
from nanotrain.trainer import train

SPEED_FIELDS = ("tokens_per_sec", "tokens_per_sec_per_rank", "mfu_pct", "peak_mem_gib", "peak_mem_pct",
                "data_ms", "compute_ms")


def test_train_records_carry_the_speed_fields(tmp_path, capsys):
    cfg = load_config(None, [
        "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64",
        "--model.vocab_size=64", "--model.max_position_embeddings=16", "--train.seq_len=16",
        "--train.batch_size=4", "--data.source=random", "--train.eval_every=0", "--train.eval_steps=1",
        "--train.sample_tokens=0", "--train.log_every=2", "--train.max_steps=4", "--checkpoint.resume=none",
        "--checkpoint.on_preempt=false", f"--train.out_dir={tmp_path}",
    ])
    train(cfg)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for record in train_records:
        assert all(record[key] is not None for key in SPEED_FIELDS), record
        assert record["tokens_per_sec"] == record["tokens_per_sec_per_rank"] > 0  # one process
        assert 0 < record["mfu_pct"] < 100
        assert 0 < record["peak_mem_gib"] and 0 < record["peak_mem_pct"] < 100
        assert record["data_ms"] >= 0 and record["compute_ms"] > 0
    assert "MFU peak" in out and "measured float32 matmul" in out
    assert "MFU " in out and "GiB" in out and "data " in out  # and in the log line


def test_speed_meter_arithmetic():
    meter = SpeedMeter(torch.device("cpu"), world_size=2, tokens_per_step=1000, flops_per_token=6e6,
                       peak_tflops=0.01)
    with meter.waiting_for_data():
        pass
    meter.data_seconds = 0.5  # as if the loader had kept us waiting half a second over the interval
    record = meter.report(steps=10, seconds=5.0)
    assert record["tokens_per_sec"] == pytest.approx(2000)
    assert record["tokens_per_sec_per_rank"] == pytest.approx(1000)
    assert record["mfu_pct"] == pytest.approx(100 * 1000 * 6e6 / 1e10)  # 60 %
    assert record["data_ms"] == pytest.approx(50) and record["compute_ms"] == pytest.approx(450)
    assert meter.report(steps=1, seconds=1.0)["data_ms"] == 0  # the split restarts at each log step


def test_peak_table_and_override():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=True) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16", tf32=True) == 756.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == 19.5
    assert gpu_peak_tflops("NVIDIA L40S", "bf16", tf32=True) == 362.05  # not taken for an L4
    assert gpu_peak_tflops("NVIDIA A10G", "bf16", tf32=True) == 70.0  # not taken for an A10
    assert gpu_peak_tflops("Some Future GPU", "bf16", tf32=True) is None
    assert device_peak_tflops(torch.device("cpu"), "fp32", True, override=123.0) == (123.0, "train.peak_tflops")
    assert 0.001 < measure_matmul_tflops() < 100  # a plausible CPU


def test_log_line_shows_speed_and_per_rank_throughput():
    record = {"step": 5, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 2000.0,
              "tokens_per_sec_per_rank": 1000.0, "mfu_pct": 41.5, "peak_mem_gib": 1.25, "peak_mem_pct": 5.0,
              "data_ms": 3.0, "compute_ms": 97.0, "elapsed_s": 10, "eta_s": 20}
    line = format_step(record, 10)
    for piece in ("2,000 tok/s (1,000/rank)", "MFU 41.5%", "mem 1.25 GiB (5%)", "data 3 ms + compute 97 ms"):
        assert piece in line, line
    assert flops_per_token(load_config("tinystories-20m").model, 256) == pytest.approx(71.2e6, rel=1e-3)


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    measure_matmul_tflops.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    measure_matmul_tflops(seconds=0.01, size=64)
    assert torch.equal(torch.rand(3), expected)
