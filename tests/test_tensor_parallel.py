"""Tensor parallelism and 2-D (dp x tp) layouts give the losses of one process; checkpoints cross layouts.

Two torchrun launches (tests/distributed_worker.py, gloo, OMP_NUM_THREADS=1) run the layouts one
after another inside one process group each, while the single-process references train here.
Global batch 8 sequences everywhere, fp32, dropout 0, 6 optimizer steps:

    2 processes   tp 2 (padded, tied embeddings, an uneven vocabulary split), tp 2 x accumulation 2
                  (packed, the gpt flavour: biases, LayerNorm, learned positions), both again with
                  sequence parallelism ("-sp"); the loss/gradient/generation checks; a tp 2 + sp
                  run on a story dataset; then resumes: tp from its own checkpoint (bit-exact),
                  tp from an FSDP 2 one
    4 processes   FSDP 2 x tp 2 (with and without sp), DDP 2 x tp 2 x accumulation 2, DDP 2 x tp 2
                  + sp (padded), and DDP 2 x tp 2 x accumulation 2 resuming a one-process checkpoint
    here          one process; and resumes of a tp 2 and of an FSDP 2 x tp 2 checkpoint

Every compared step's loss and gradient norm must be within 1e-5 (relative) of one process's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanotrain.config import load_config
from nanotrain.errors import ConfigError
from nanotrain.inference.evaluation import evaluate_checkpoint
from nanotrain.model.transformer import build_model
from nanotrain.parallel.dims import ParallelDims
from nanotrain.parallel.tensor_parallel import vocabulary_starts
from nanotrain.training.trainer import train
from test_distributed import (
    REPO,
    STEPS,
    TOLERANCE,
    WORKER,
    layout_overrides,
    max_loss_difference,
    relative_difference,
    worker_env,
)

TP = ["--parallel.tp=2", "--checkpoint.interval=3"]
MODE_EXTRA = {"packed": [], "padded": ["--model.vocab_size=67"], "gpt": ["--model.flavour=gpt", "--model.n_kv_heads=0"]}
# name -> (data mode, strategy, per-rank batch, accumulation steps, processes)
LAYOUTS = {
    "tp-padded": ("padded", "none", 8, 1, 2),
    "tp-accum-gpt": ("packed", "none", 4, 2, 2),
    "fsdp-tp-padded": ("padded", "fsdp", 4, 1, 4),
    "ddp-tp-accum-padded": ("padded", "ddp", 2, 2, 4),  # gradients averaged over dp after the last micro-batch only
    # sequence parallelism ("-sp"): norms and residual stream split by position as well
    "tp-sp-accum-gpt": ("packed", "none", 4, 2, 2),
    "tp-sp-padded": ("padded", "none", 8, 1, 2),
    "ddp-tp-sp-padded": ("padded", "ddp", 4, 1, 4),
    "fsdp-tp-sp-padded": ("padded", "fsdp", 4, 1, 4),
}
SEQUENCE_PARALLEL = ["--parallel.sequence_parallel=true"]
# Weights: tensor parallelism splits each matmul's sum in two, and AdamW turns that rounding
# difference in a near-zero gradient into a step of up to ~lr on that element; 3.2e-6 seen at
# lr 1e-3 after 6 steps. A wrong gradient or optimizer state moves weights by ~lr per step.
WEIGHT_ATOL = 1e-4


def reference_name(layout: str) -> str:
    return "gpt" if layout.endswith("gpt") else layout.rsplit("-", 1)[1]


def overrides(name: str, out: Path, *extra: str) -> list[str]:
    mode, strategy, batch, accum, _ = LAYOUTS[name]
    sequence = SEQUENCE_PARALLEL if "-sp" in name else []
    return layout_overrides(mode, strategy, batch, accum,
                            [*TP, *sequence, *MODE_EXTRA[reference_name(name)], *extra], out)


def reference_overrides(reference: str, out: Path, *extra: str) -> list[str]:
    mode = "padded" if reference == "padded" else "packed"
    return layout_overrides(mode, "none", 8, 1, ["--checkpoint.interval=3", *MODE_EXTRA[reference], *extra], out)


def start_worker(processes: int, spec: list[dict], tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    log = tmp / f"{name}.log"
    with open(log, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
             str(WORKER), "layouts", str(tmp / f"{name}.json"), str(tmp)],
            cwd=tmp, env={**worker_env(), "OMP_NUM_THREADS": "1"}, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    return worker, log


def finish(worker: subprocess.Popen, log: Path) -> str:
    try:
        worker.wait(timeout=600)
    finally:
        if worker.poll() is None:  # a failure here must not leave the job running
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    output = log.read_text()
    assert worker.returncode == 0, output[-4000:]
    return output


def checkpoint(tmp: Path, run: str, step: int = 3) -> Path:
    return tmp / run / "checkpoints" / f"step_{step:08d}"


def grad_norms(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}


def record(result) -> dict:
    return {"losses": result.losses, "val_losses": result.val_losses,
            "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()}}


def story_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """A run on a prepared dataset (so its checkpoint holds a tokenizer), sampling at each evaluation."""
    return layout_overrides("packed", "none", 8, 1, [f"--data.path={data}", "--data.source=tokens",
                                                     "--model.vocab_size=320", "--train.sample_tokens=8", *extra], out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_story_dataset):
    tmp = tmp_path_factory.mktemp("tp")
    stories = make_story_dataset(tmp / "stories", count=300, seed=0)
    two = [{"name": name, "overrides": overrides(name, tmp / name)} for name in LAYOUTS if LAYOUTS[name][4] == 2]
    two += [
        {"name": "tensor-parallel-checks"},
        {"name": "tp-stories", "overrides": story_overrides(stories, tmp / "tp-stories", "--parallel.tp=2",
                                                            *SEQUENCE_PARALLEL)},
        {"name": "fsdp-padded", "overrides": layout_overrides(
            "padded", "fsdp", 4, 1, ["--checkpoint.interval=3", *MODE_EXTRA["padded"]], tmp / "fsdp-padded")},
        {"name": "resume-tp-from-tp", "overrides": overrides(
            "tp-padded", tmp / "resume-tp-from-tp", f"--checkpoint.resume={checkpoint(tmp, 'tp-padded')}")},
        {"name": "resume-tp-from-fsdp", "overrides": overrides(
            "tp-padded", tmp / "resume-tp-from-fsdp", f"--checkpoint.resume={checkpoint(tmp, 'fsdp-padded')}")},
    ]
    four = [{"name": name, "overrides": overrides(name, tmp / name)} for name in LAYOUTS if LAYOUTS[name][4] == 4]
    four.append({"name": "resume-ddp-tp-from-one", "overrides": overrides(
        "ddp-tp-accum-padded", tmp / "resume-ddp-tp-from-one", f"--checkpoint.resume={checkpoint(tmp, 'padded')}")})

    results = {}
    worker = start_worker(2, two, tmp, "two")
    for reference in ("packed", "padded", "gpt"):  # meanwhile, here
        results[reference] = record(train(load_config(None, reference_overrides(reference, tmp / reference))))
    results["stories"] = record(train(load_config(None, story_overrides(stories, tmp / "stories-one"))))
    output = finish(*worker)
    worker = start_worker(4, four, tmp, "four")
    results["resume-one-from-tp"] = record(train(load_config(None, reference_overrides(
        "padded", tmp / "resume-one-from-tp", f"--checkpoint.resume={checkpoint(tmp, 'tp-padded')}"))))
    output += finish(*worker)
    results["resume-one-from-fsdp-tp"] = record(train(load_config(None, reference_overrides(
        "padded", tmp / "resume-one-from-fsdp-tp", f"--checkpoint.resume={checkpoint(tmp, 'fsdp-tp-padded')}"))))
    for entry in two + four:
        if entry["name"] == "tensor-parallel-checks":
            results[entry["name"]] = json.loads((tmp / f"{entry['name']}.json").read_text())
        else:
            results[entry["name"]] = torch.load(tmp / f"{entry['name']}.pt", weights_only=True)
    results["dir"], results["output"], results["dataset"] = tmp, output, stories
    return results


def max_weight_difference(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys()
    return max((state[k] - v).abs().max().item() for k, v in reference.items())


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_one_process(runs, layout):
    run, reference = runs[layout], runs[reference_name(layout)]
    assert reference["losses"].keys() == set(range(1, STEPS + 1))
    loss = max_loss_difference(run["losses"], reference["losses"])
    # the val set is eval_steps x dp x batch_size sequences: the reference's only without accumulation
    val = max_loss_difference(run["val_losses"], reference["val_losses"]) if LAYOUTS[layout][3] == 1 else 0.0
    norm = max_loss_difference(grad_norms(runs["dir"] / layout), grad_norms(runs["dir"] / reference_name(layout)))
    weights = max_weight_difference(run["state"], reference["state"])
    print(f"\n{layout}: max relative difference loss {loss:.1e}, val loss {val:.1e}, grad norm {norm:.1e}; "
          f"max weight difference {weights:.1e}")
    assert max(loss, val, norm) <= TOLERANCE and weights <= WEIGHT_ATOL, (loss, val, norm, weights)


@pytest.mark.slow
def test_the_layouts_differ_from_each_other_beyond_the_tolerance(runs):
    """Guards the comparison: the three references train on other data or models."""
    losses = [runs[name]["losses"][STEPS] for name in ("packed", "padded", "gpt")]
    assert min(abs(a - b) for a, b in zip(losses, losses[1:] + losses[:1])) > 100 * TOLERANCE


@pytest.mark.slow
def test_resume_in_the_same_tensor_parallel_layout_is_bit_exact(runs):
    resumed, uninterrupted = runs["resume-tp-from-tp"], runs["tp-padded"]
    assert resumed["losses"] == {s: v for s, v in uninterrupted["losses"].items() if s > 3}
    for name, tensor in uninterrupted["state"].items():
        assert torch.equal(resumed["state"][name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("resumed, saved_by", [
    ("resume-tp-from-fsdp", "FSDP 2"), ("resume-one-from-tp", "tp 2"),
    ("resume-ddp-tp-from-one", "one process"), ("resume-one-from-fsdp-tp", "FSDP 2 x tp 2"),
])
def test_checkpoints_resume_across_layouts(runs, resumed, saved_by):
    """Steps 4-6 continue one process's run; only reduction order differs (see WEIGHT_ATOL)."""
    run, reference = runs[resumed], runs["padded"]
    assert run["losses"].keys() == {4, 5, 6}, saved_by
    loss = max_loss_difference(run["losses"], {s: v for s, v in reference["losses"].items() if s > 3})
    weights = max_weight_difference(run["state"], reference["state"])
    print(f"\n{resumed}: max relative loss difference {loss:.1e}, max weight difference {weights:.1e}")
    assert loss <= TOLERANCE and weights <= WEIGHT_ATOL


@pytest.mark.slow
def test_resuming_another_layout_says_so(runs):
    assert ("checkpoint saved by 2 data-parallel x 1 tensor-parallel process(es), now 1 x 2" in runs["output"])


def run_command(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_tensor_parallel_run_samples_and_its_checkpoint_serves_generate_evaluate_and_export(runs, tmp_path):
    """model.safetensors holds whole weights, so the one-process tools read a tp checkpoint unchanged.

    The run is sequence-parallel too: its samples decode one token at a time through the KV cache,
    a sequence of 1 split over 2 processes (one holds it, the other none).
    """
    tp_run = runs["dir"] / "tp-stories"
    loss = max_loss_difference(runs["tp-stories"]["losses"], runs["stories"]["losses"])
    assert loss <= TOLERANCE, loss
    samples = [json.loads(line)["samples"] for line in (tp_run / "metrics.jsonl").read_text().splitlines()
               if '"samples"' in line]
    assert len(samples) == 2 and all(text.strip() for texts in samples for text in texts)  # at steps 3 and 6

    tp_checkpoint = checkpoint(runs["dir"], "tp-stories", STEPS)
    one_checkpoint = checkpoint(runs["dir"], "stories-one", STEPS)
    generated = run_command("nanotrain.generate", "--checkpoint", str(tp_checkpoint), "--prompt", "Once upon a time",
                            "--max_new_tokens", "8")
    assert generated.stdout.strip().startswith("Once upon a time")
    val = [evaluate_checkpoint(str(ckpt), str(runs["dataset"]), max_batches=2).loss
           for ckpt in (tp_checkpoint, one_checkpoint)]
    assert abs(val[0] - val[1]) <= TOLERANCE * val[1], val

    run_command("nanotrain.export", "--checkpoint", str(tp_checkpoint), "--format", "hf", "--out", str(tmp_path / "hf"))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours = build_model(load_config(str(tp_checkpoint / "config.toml")).model)
    ours.load_state_dict(runs["tp-stories"]["state"])
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert relative_difference(hf(ids).logits, ours(ids)[0]) < 1e-5


@pytest.mark.slow
def test_an_fsdp_by_tp_checkpoint_holds_the_whole_weights(runs):
    from safetensors.torch import load_file

    saved = load_file(checkpoint(runs["dir"], "fsdp-tp-padded", STEPS) / "model.safetensors")
    expected = runs["fsdp-tp-padded"]["state"]
    assert saved.keys() == {k for k in expected if k != "lm_head.weight"}  # tied: stored once
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_vocabulary_parallel_loss_gradients_and_generation_equal_one_process(runs):
    """Vocabulary 67 over 2 ranks (34 + 33 rows), some labels ignored: loss, every gradient, cached logits."""
    checks = runs["tensor-parallel-checks"]
    print(f"\n{checks}")
    for layout in ("tp", "sequence-parallel"):
        assert checks[layout]["loss"] <= 1e-6 and checks[layout]["grads"] <= 1e-5, layout
        assert checks[layout]["generation_logits"] <= 1e-5, layout
    # the probe sees the one-process model's (B, T, V) logits; the split model makes none
    probe = checks["vocabulary_wide_tensors"]
    assert probe["plain"] > 0 and probe["tp"] == probe["sequence-parallel"] == 0


@pytest.mark.parametrize("world, tp, message", [
    (3, 2, "parallel.tp = 2 must divide the 3 launched processes"),
    (4, 0, "parallel.tp = 0 must divide the 4 launched processes"),
])
def test_a_mesh_that_does_not_fit_the_world_is_refused_in_one_line(world, tp, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims(rank=0, local_rank=0, world_size=world, device="cpu", strategy="none", tp=tp)


def test_the_mesh_puts_tensor_parallel_ranks_side_by_side():
    dims = ParallelDims(rank=3, local_rank=3, world_size=4, device="cpu", strategy="fsdp", tp=2)
    assert dims.degrees == {"dp": 2, "tp": 2}
    assert (dims.dp_size, dims.dp_rank, dims.tp_size, dims.tp_rank) == (2, 1, 2, 1)
    assert ParallelDims(rank=1, local_rank=1, world_size=2, device="cpu", strategy="none", tp=2).dp_rank == 0


@pytest.mark.parametrize("key, value", [("n_heads", 6), ("n_kv_heads", 3), ("d_ff", 66)])
def test_head_counts_tp_does_not_divide_are_refused_in_one_line(key, value):
    with pytest.raises(ConfigError, match=f"model.{key} = {value} cannot be split over parallel.tp = 4"):
        load_config(None, ["--parallel.tp=4", "--model.n_heads=8", "--model.n_kv_heads=4", "--model.d_model=64",
                               f"--model.{key}={value}"])


# n_heads and d_ff that every tp from 2 to 6 divides, so only the vocabulary can be refused
EVERY_TP_DIVIDES = ["--model.n_heads=60", "--model.n_kv_heads=0", "--model.d_model=120", "--model.d_ff=120",
                    "--data.source=random"]


@pytest.mark.parametrize("vocab, tp, without", [(1, 2, 1), (5, 4, 1), (9, 4, 1), (2, 6, 4)])
def test_a_vocabulary_too_small_for_every_tp_process_to_hold_a_row_is_refused_in_one_line(vocab, tp, without):
    with pytest.raises(ConfigError, match=rf"^model.vocab_size = {vocab} cannot be split over parallel.tp = {tp} "
                                          rf"processes: each needs at least one vocabulary row, and shares of "
                                          rf"ceil\({vocab}/{tp}\) = \d+ leave {without} of the {tp} without any"):
        load_config(None, [*EVERY_TP_DIVIDES, f"--parallel.tp={tp}", f"--model.vocab_size={vocab}"])


def test_the_vocabulary_check_accepts_exactly_the_splits_that_give_every_process_rows():
    for tp in range(2, 7):
        for vocab in range(1, 50):
            starts = vocabulary_starts(vocab, tp)  # the split the tp model uses
            every_process_has_rows = all(end > start for start, end in zip(starts, starts[1:]))
            try:
                load_config(None, [*EVERY_TP_DIVIDES, f"--parallel.tp={tp}", f"--model.vocab_size={vocab}"])
                accepted = True
            except ConfigError:
                accepted = False
            assert accepted == every_process_has_rows, (vocab, tp)


def test_tensor_parallelism_without_torchrun_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanotrain.train", "--parallel.tp=2", "--data.source=random",
                             f"--train.out_dir={tmp_path / 'run'}"], cwd=REPO, env=worker_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parallel.tp = 2 needs 2 processes: launch with torchrun --nproc_per_node=2 -m nanotrain.train"]
    assert not (tmp_path / "run").exists()


def test_sequence_parallelism_without_tensor_parallelism_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="parallel.sequence_parallel splits the positions over the tensor-parallel"):
        load_config(None, ["--parallel.sequence_parallel=true"])
