"""Speed metrics: every train log record carries tokens/s, MFU, peak memory and the data/compute split."""

import json

import pytest
import torch

from nanotrain.config import load_config
from nanotrain.model.transformer import flops_per_token
from nanotrain.reporting.metrics import SpeedMeter, device_peak_tflops, gpu_peak_tflops, measure_matmul_tflops
from nanotrain.reporting.run_log import format_step
from nanotrain.training.trainer import train

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
        assert 0 < record["mfu_pct"] <= 100
        assert 0 < record["peak_mem_gib"] and 0 < record["peak_mem_pct"] < 100
        assert record["data_ms"] >= 0 and record["compute_ms"] > 0
    assert "MFU peak" in out and "best float32 1024x1024 matmul over 0.5 s" in out
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


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989.4),  # H100 SXM
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),
    ("NVIDIA H100 PCIe", "bf16", True, 756.0),
    ("NVIDIA H100 NVL", "fp16", True, 835.5),
    ("NVIDIA H200", "bf16", True, 989.4),  # H200 SXM
    ("NVIDIA H200 NVL", "bf16", True, 835.5),
    ("NVIDIA GH200 480GB", "fp32", False, 66.9),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", False, 19.5),
    ("NVIDIA A100-PCIE-40GB", "bf16", True, 312.0),
    ("NVIDIA A100 80GB PCIe", "fp16", False, 312.0),
    ("NVIDIA L4", "bf16", True, 121.0),
    ("NVIDIA L4", "fp32", True, 60.0),
    ("NVIDIA L40S", "bf16", True, 362.05),  # "L4" is a word of the name, not a prefix
    ("NVIDIA GeForce RTX 4090", "bf16", True, 165.2),
    ("NVIDIA GeForce RTX 4090", "fp32", False, 82.6),
    ("NVIDIA A10G", "bf16", True, 70.0),  # not taken for an A10
    ("NVIDIA L40", "bf16", True, None),  # not in the table: not an L4
    ("NVIDIA H800", "bf16", True, None),
    ("Some Future GPU", "bf16", True, None),
])
def test_the_peak_table_by_device_name_and_precision(name, precision, tf32, peak):
    assert gpu_peak_tflops(name, precision, tf32) == peak


def test_an_unknown_gpu_gets_no_mfu_and_a_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Quantum 9000")
    peak, source = device_peak_tflops(torch.device("cuda"), "bf16", tf32=True)
    assert peak is None
    assert source.startswith("NVIDIA Quantum 9000 is not in metrics.GPU_PEAK_TFLOPS") and "train.peak_tflops" in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak_tflops(torch.device("cuda"), "fp32", tf32=False) == (
        51.2, "NVIDIA H100 PCIe data sheet, dense, fp32 on the fp32 units")
    assert device_peak_tflops(torch.device("cpu"), "fp32", True, override=123.0) == (123.0, "train.peak_tflops")
    assert 0.001 < measure_matmul_tflops() < 100  # a plausible CPU


def test_mfu_never_exceeds_100_percent_and_says_when_the_peak_is_raised():
    # As if the CPU peak had been measured while another job held the cores: 1 GFLOP/s.
    notes = []
    meter = SpeedMeter(torch.device("cpu"), world_size=1, tokens_per_step=1000, flops_per_token=6e6,
                       peak_tflops=0.001, peak_source="measured", log=notes.append)
    assert meter.report(steps=1, seconds=1.0)["mfu_pct"] == 100.0  # 6 GFLOP/s achieved: the peak rises to it
    assert meter.peak_tflops == pytest.approx(0.006) and len(notes) == 1
    assert "6e-03 TFLOP/s" in notes[0] or "0.006 TFLOP/s" in notes[0], notes
    assert meter.report(steps=1, seconds=2.0)["mfu_pct"] == pytest.approx(50.0)  # slower now: against the raised peak
    assert meter.report(steps=1, seconds=0.5)["mfu_pct"] == 100.0 and len(notes) == 2
    assert "MFU peak 0.012 TFLOP/s per device (raised to this run's own rate)" in meter.describe()


def test_a_training_run_never_logs_mfu_above_100(tmp_path, capsys):
    cfg = load_config(None, [
        "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64",
        "--model.vocab_size=64", "--model.max_position_embeddings=16", "--train.seq_len=16",
        "--train.batch_size=4", "--data.source=random", "--train.eval_every=0", "--train.eval_steps=1",
        "--train.sample_tokens=0", "--train.log_every=1", "--train.max_steps=3", "--checkpoint.resume=none",
        "--checkpoint.on_preempt=false", f"--train.out_dir={tmp_path}",
        "--train.peak_tflops=1e-9",  # a peak far below any CPU's: the run outpaces it at once
    ])
    train(cfg)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu_pct"] for r in records if "loss" in r]
    assert len(mfus) == 3 and all(0 < mfu <= 100 for mfu in mfus) and mfus[0] == 100.0
    assert out.count("note: this run computes") >= 1 and "above the MFU peak of 1e-09 (train.peak_tflops)" in out


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
