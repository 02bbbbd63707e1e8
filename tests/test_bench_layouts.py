"""`nanotrain.bench --layouts` counts each rank's parameter, gradient and optimizer bytes right: one process and TP 2.

The expected bytes are worked out by hand from the tiny model's shapes below, not read from the model.
"""

import re
import subprocess
import sys

import pytest

from nanotrain.bench import main
from test_distributed import worker_env

V, C, LAYERS, HEADS, KV_HEADS, FF = 64, 32, 2, 4, 2, 64
TINY = [f"--model.vocab_size={V}", f"--model.d_model={C}", f"--model.n_layers={LAYERS}", f"--model.n_heads={HEADS}",
        f"--model.n_kv_heads={KV_HEADS}", f"--model.d_ff={FF}", "--model.tie_embeddings=false", "--train.seq_len=16",
        "--global_batch", "4", "--warmup", "1", "--steps", "1"]
FP32 = 4

# Elements of the llama flavour's tensors (no biases): split ones and ones every tp rank holds whole.
HEAD_DIM = C // HEADS
BLOCK_MATRICES = C * HEADS * HEAD_DIM * 2 + C * KV_HEADS * HEAD_DIM * 2 + C * FF * 3  # q, o; k, v; gate, up, down
SPLIT = V * C + LAYERS * BLOCK_MATRICES + V * C  # embedding, blocks, head
WHOLE = LAYERS * 2 * C + C  # two RMSNorms per block, the final one
TENSORS = 1 + LAYERS * 9 + 1 + 1  # one fused-AdamW step counter (a float32 scalar) per parameter tensor


def adamw_state(parameter_bytes: int) -> int:
    return 2 * parameter_bytes + TENSORS * FP32  # exp_avg and exp_avg_sq shaped like the parameters


def table_rows(out: str) -> list[list[str]]:
    """The per-rank rows: rank, dp, tp, parameters, gradients, optimizer, total, %, step s, ..."""
    return [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s+[\d,]+", line)]


def as_int(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_one_process_counts_every_tensor_whole(capsys):
    main(["--layouts", *TINY])
    out = capsys.readouterr().out
    parameters = (SPLIT + WHOLE) * FP32
    assert f"1 process: parameters {parameters:,} B | gradients {parameters:,} B" in out, out
    [row] = table_rows(out)
    assert [as_int(c) for c in row[3:7]] == [parameters, parameters, adamw_state(parameters),
                                            2 * parameters + adamw_state(parameters)], out
    assert row[7] == "100.0%", out


@pytest.mark.slow
def test_tensor_parallel_ranks_hold_half_the_matrices_and_the_norms_whole():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanotrain.bench",
         "--layouts", "--parallel.tp=2", *TINY],
        env={**worker_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "TP 2: 2 process(es), dp 1 x tp 2" in out, out
    parameters = (SPLIT // 2 + WHOLE) * FP32  # gradients and AdamW's moments are split like their parameters
    one_process = 2 * (SPLIT + WHOLE) * FP32 + adamw_state((SPLIT + WHOLE) * FP32)
    rows = table_rows(out)
    assert [row[:3] for row in rows] == [["0", "0", "0"], ["1", "0", "1"]], out
    for row in rows:
        total = 2 * parameters + adamw_state(parameters)
        assert [as_int(c) for c in row[3:7]] == [parameters, parameters, adamw_state(parameters), total], out
        assert row[7] == f"{100 * total / one_process:.1f}%", out


def test_bad_arguments_give_one_line_errors(capsys):
    for argv in (["--steps", "0"], ["--parallel.tp"], ["--config", "no-such-preset"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--layouts", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "--seq_len", "32"], "--seq_len is an option of the throughput benchmark, not of --layouts"),
    (["--layouts", "--rounds=2"], "--rounds is an option of the throughput benchmark, not of --layouts"),
    (["--global_batch", "4"], "--global_batch is taken by --layouts only"),
    (["--parallel.tp=2"], "--parallel.tp is taken by --layouts only"),
])
def test_an_option_of_the_other_mode_is_refused_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_help_runs_without_torchrun():
    result = subprocess.run([sys.executable, "-m", "nanotrain.bench", "--layouts", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--global_batch" in result.stdout and "torchrun" in result.stdout, result
    assert "--rounds" not in result.stdout, result.stdout  # the throughput benchmark's options are not listed
