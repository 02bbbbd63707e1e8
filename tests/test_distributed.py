"""DDP, FSDP and gradient accumulation give the update of one big batch; a failing rank ends the job.

Every 2-rank layout runs inside ONE torchrun launch (tests/distributed_worker.py holds the
process group and calls train() once per layout), while the single-process references run in
this pytest process meanwhile. Global batch B = 8 sequences everywhere:

    reference   1 process x B                    (c) 1 process x accumulation 2 x B/2
    (a) DDP     2 ranks x B/2                    (d) DDP  2 ranks x accumulation 2 x B/4
    (b) FSDP    2 ranks x B/2                    (e) FSDP 2 ranks x accumulation 2 x B/4

each in packed mode (every token counts) and in padded mode (random document lengths, so
micro-batches and ranks hold different numbers of valid tokens; tied embeddings there, so
FSDP's handling of the shared weight is covered too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanotrain.config import load_config
from nanotrain.data.loader import build_data
from nanotrain.errors import ConfigError
from nanotrain.model.loss import count_valid_tokens, next_token_loss
from nanotrain.model.transformer import build_model
from nanotrain.parallel.distributed import init, resolve_strategy
from nanotrain.training.trainer import train

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "distributed_worker.py"
# Relative, fp32. Summation order differs between layouts (~1e-7); Adam divides each gradient by
# its own running magnitude, which magnifies that noise where gradients nearly cancel, in
# proportion to the learning rate: 1.6e-6 at lr 1e-3, 1.1e-5 at lr 1e-2 (measured).
TOLERANCE = 1e-5
STEPS = 6

TINY = [
    "--data.source=random", "--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=2",
    "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=64", "--model.dropout=0.0",
    "--train.seq_len=16", f"--train.max_steps={STEPS}", "--train.log_every=1", "--train.eval_every=3",
    "--train.eval_steps=2", "--train.lr=1e-3", "--optim.warmup_steps=2", "--train.precision=fp32",
    "--train.device=cpu", "--train.peak_tflops=1", "--train.sample_tokens=0", "--checkpoint.resume=none",
    "--checkpoint.on_preempt=false",  # no SIGTERM/SIGINT handlers left in the pytest process
]
MODES = {"packed": ["--data.mode=packed"], "padded": ["--data.mode=padded", "--model.tie_embeddings=true"]}
# name -> (strategy, per-rank batch, accumulation steps, extra flags); global batch 8 in every layout
SINGLE = {"reference": ("none", 8, 1, []), "accum": ("none", 4, 2, [])}
TWO_RANKS = {
    "ddp": ("ddp", 4, 1, []),
    "fsdp": ("fsdp", 4, 1, []),  # reshard_after_forward = true (the default)
    "ddp-accum": ("ddp", 2, 2, []),
    "fsdp-accum": ("fsdp", 2, 2, ["--parallel.reshard_after_forward=false"]),
}


def layout_overrides(mode: str, strategy: str, batch: int, accum: int, extra: list[str], out_dir: Path) -> list[str]:
    return TINY + MODES[mode] + extra + [
        f"--parallel.strategy={strategy}", f"--train.batch_size={batch}",
        f"--train.grad_accum_steps={accum}", f"--train.out_dir={out_dir}",
    ]


def torchrun(*args: str) -> list[str]:
    # --standalone picks a free port, so concurrent test runs never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]


def worker_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: per tensor, so near-zero entries don't blow it up."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def max_loss_difference(losses: dict[int, float], reference: dict[int, float]) -> float:
    assert losses.keys() == reference.keys() and reference
    return max(abs(losses[s] - v) / abs(v) for s, v in reference.items())


def max_param_difference(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys()
    return max(relative_difference(state[k], v) for k, v in reference.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(mode, layout): {losses, val_losses, state}} for every layout, plus the worker's output."""
    tmp = tmp_path_factory.mktemp("layouts")
    spec = [{"name": f"init-{mode}", "overrides": layout_overrides(mode, "fsdp", 4, 1, [], tmp / f"init-{mode}")}
            for mode in MODES]
    spec += [{"name": f"{mode}-{name}", "overrides": layout_overrides(mode, *layout, tmp / f"{mode}-{name}")}
             for mode in MODES for name, layout in TWO_RANKS.items()]
    (tmp / "spec.json").write_text(json.dumps(spec))
    log = tmp / "worker.log"  # a file, not a pipe: nobody reads a pipe while the references train
    with open(log, "w") as log_file:
        worker = subprocess.Popen(torchrun("layouts", str(tmp / "spec.json"), str(tmp)), cwd=tmp, env=worker_env(),
                                  stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    results = {}
    try:
        for mode in MODES:  # the single-process runs, while the 2-rank job runs
            for name, layout in SINGLE.items():
                result = train(load_config(None, layout_overrides(mode, *layout, tmp / f"{mode}-{name}")))
                state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
                results[mode, name] = {"losses": result.losses, "val_losses": result.val_losses, "state": state}
        worker.wait(timeout=600)
    finally:
        if worker.poll() is None:  # a failure here must not leave the 2-rank job running
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    output = log.read_text()
    assert worker.returncode == 0, output[-4000:]
    for entry in spec:
        mode, _, name = entry["name"].partition("-")
        key = (name, "init") if mode == "init" else (mode, name)
        results[key] = torch.load(tmp / f"{entry['name']}.pt", weights_only=True)
    results["output"] = output
    return results


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["accum", *TWO_RANKS])
def test_layout_equals_one_process_big_batch(runs, mode, layout):
    run, reference = runs[mode, layout], runs[mode, "reference"]
    assert reference["losses"].keys() == set(range(1, STEPS + 1))
    loss = max_loss_difference(run["losses"], reference["losses"])
    params = max_param_difference(run["state"], reference["state"])
    print(f"\n{mode} {layout}: max relative difference per-step loss {loss:.1e}, final parameters {params:.1e}")
    assert loss <= TOLERANCE and params <= TOLERANCE, (loss, params)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_val_loss_is_the_same_for_any_world_size(runs, mode, layout):
    """The eval set is eval_steps x data-parallel ranks x batch_size samples: 2 x 4 here as 1 x 8 in the reference."""
    run, reference = runs[mode, layout], runs[mode, "reference"]
    assert reference["val_losses"].keys() == {3, STEPS}
    difference = max_loss_difference(run["val_losses"], reference["val_losses"])
    print(f"\n{mode} {layout}: max relative difference val loss {difference:.1e}")
    assert difference <= TOLERANCE


def test_the_layouts_are_not_trivially_equal(runs):
    """Guards the comparison itself: the weights moved far beyond the tolerance, and the padded runs
    train on other batches than the packed ones."""
    trained, initial = runs["packed", "reference"]["state"], runs["packed", "init"]["state"]
    assert max(relative_difference(trained[k], initial[k]) for k in initial) > 1e-2
    assert runs["padded", "reference"]["losses"] != runs["packed", "reference"]["losses"]


def test_averaging_micro_batch_means_would_fail_this_tolerance():
    """The pitfall the loop avoids, on the padded batches above: a mean per micro-batch, averaged,
    weights the tokens of a micro-batch with few valid tokens more than those of a full one."""
    cfg = load_config(None, layout_overrides("padded", "none", 4, 2, [], Path("unused")))
    train_batches = build_data(cfg).train
    micro_batches = [next(train_batches) for _ in range(2)]
    big_batch = {k: torch.cat([b[k] for b in micro_batches]) for k in micro_batches[0]}
    model = build_model(cfg.model, seed=cfg.train.seed)

    def gradient(losses_of) -> torch.Tensor:
        model.zero_grad()
        sum(losses_of()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def sum_and_count(batch):
        return next_token_loss(model(batch["input_ids"], batch["attention_mask"])[0], batch["labels"])

    big = gradient(lambda: [sum_and_count(big_batch)[0] / count_valid_tokens(big_batch["labels"])])
    global_normalised = gradient(lambda: [sum_and_count(b)[0] / count_valid_tokens(big_batch["labels"])
                                          for b in micro_batches])
    mean_of_means = gradient(lambda: [loss / count / 2 for loss, count in map(sum_and_count, micro_batches)])
    valid = [count_valid_tokens(b["labels"]).item() for b in micro_batches]
    naive, right = relative_difference(mean_of_means, big), relative_difference(global_normalised, big)
    print(f"\nvalid tokens per micro-batch {valid}: gradient error, mean of means {naive:.1e}, "
          f"global count {right:.1e}")
    assert valid[0] != valid[1]
    assert right <= 1e-6 and naive > 100 * TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_initial_weights_are_independent_of_world_size(runs, mode):
    cfg = load_config(None, layout_overrides(mode, "none", 8, 1, [], Path("unused")))
    expected = build_model(cfg.model, seed=cfg.train.seed).state_dict()
    gathered = runs[mode, "init"]["state"]  # FSDP, 2 ranks, gathered from the shards
    assert gathered.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor), name


def test_only_rank_0_prints_and_tokens_per_step_is_logged(runs):
    output = runs["output"]
    assert output.count("tokens per optimizer step") == len(MODES) * len(TWO_RANKS)
    assert "tokens per optimizer step = 2 accum x 2 data-parallel x 2 batch x 16 seq = 128" in output
    assert output.count(f"step {STEPS:>6}/{STEPS} | val loss") == len(MODES) * len(TWO_RANKS)


def test_failing_rank_ends_the_job_promptly_with_its_error(tmp_path):
    # on_preempt as by default: its SIGTERM handler must not keep a rank alive once torchrun stops it
    overrides = layout_overrides("packed", "ddp", 4, 1, [], tmp_path / "run") + [
        "--train.max_steps=50", "--checkpoint.on_preempt=true"]
    start = time.perf_counter()
    # parallel.timeout_s stays at its 300 s default: the job must end long before it
    job = subprocess.Popen(torchrun("raise", *overrides), cwd=tmp_path, env=worker_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:  # hung: stop torchrun and its ranks, then fail below
            os.killpg(job.pid, signal.SIGKILL)
            output, _ = job.communicate()
    elapsed = time.perf_counter() - start
    assert job.returncode != 0
    # in the rank's own stderr and again in torchrun's end-of-job summary of failed ranks
    # (which rank the summary calls "Root Cause" is decided by 1-second timestamps: not checked)
    assert "RuntimeError: injected failure on rank 1 at micro-batch 3" in output
    summary = output.rsplit("FAILED", 1)[-1]
    assert "Root Cause" in summary and "injected failure on rank 1" in summary
    assert elapsed < 120, f"the job took {elapsed:.0f} s to stop"
    assert "step     50/50" not in output  # rank 0 did not carry on alone


def test_strategy_none_with_two_processes_is_refused():
    assert resolve_strategy("auto", 1) == "none" and resolve_strategy("auto", 2) == "ddp"
    with pytest.raises(ConfigError, match="separate copies"):
        resolve_strategy("none", 2)


def test_ddp_without_torchrun_is_refused(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        init(load_config(None, ["--parallel.strategy=fsdp", "--data.source=random"]))
