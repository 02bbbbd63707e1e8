"""Checkpointing: layout, exact resume, crash safety, corruption, safe loading, compatibility."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanotrain import build_model, load_config
from nanotrain.checkpoint import checkpointer as checkpoint
from nanotrain.checkpoint.checkpointer import Checkpointer, verify
from nanotrain.checkpoint.inference import load_inference, save_inference
from nanotrain.checkpoint.safe_loading import read_dcp_metadata
from nanotrain.checkpoint.state import RandomState, TrainState, seed_everything
from nanotrain.errors import CheckpointError, NanotrainError
from nanotrain.files import temp_directory
from nanotrain.parallel import distributed
from nanotrain.parallel.dims import ParallelDims
from nanotrain.training.preemption import Preemption
from nanotrain.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64",
    "--model.vocab_size=64", "--model.max_position_embeddings=32", "--train.seq_len=16",
    "--data.source=random", "--train.eval_every=0", "--train.log_every=1", "--train.sample_tokens=0",
    "--optim.warmup_steps=2", "--train.lr=3e-3", "--train.max_steps=6", "--checkpoint.interval=2",
]
# Weights after a resume under another layout: FSDP's reduce-scatter sums gradients in another
# order, and AdamW turns a rounding difference in a near-zero gradient into a step of up to ~lr on
# that element; 1.6e-6 was seen under ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE. A wrong
# optimizer state or data position moves weights by ~train.lr (3e-3), 300x this.
CROSS_LAYOUT_ATOL = 1e-5
SUBPROCESS_TIMEOUT = 300  # generous: other suites share the 2 cores; a hang still ends


def args_for(out: Path, *extra: str) -> list[str]:
    return [*TINY, f"--train.out_dir={out}", *extra]


def run_here(out: Path, *extra: str):
    # on_preempt off in-process: pytest's own SIGINT handler stays in charge
    return train(load_config(None, args_for(out, "--train.batch_size=4", "--checkpoint.on_preempt=false", *extra)))


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run_cli(cmd: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group, so a timeout also ends torchrun's workers."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**subprocess_env(), **(env_extra or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... timed out; last output:\n{stdout[-1500:]}\n{stderr[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(args: list[str], script: list[str] | None = None, restarts: int = 0, env_extra: dict | None = None):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           f"--max-restarts={restarts}", *(script or ["-m", "nanotrain.train"]), *args]
    result = run_cli(cmd, {"OMP_NUM_THREADS": "1", **(env_extra or {})})
    return result


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(out: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_run(a: Path, b: Path, exact: bool = True):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, 7))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    if exact:
        assert la == lb
        for name in wa:
            assert torch.equal(wa[name], wb[name]), name
    else:
        for step in la:
            assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """6 uninterrupted steps in one process, with dropout so RNG state matters; checkpoints 2, 4, 6."""
    out = tmp_path_factory.mktemp("single")
    run_here(out, "--model.dropout=0.1")
    return out


# ---- layout and inference checkpoints ------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_inference_roundtrip_and_layout(tmp_path, tied):
    cfg = load_config(None, TINY + [f"--model.tie_embeddings={tied}"])
    model = build_model(cfg.model, seed=3)
    path = save_inference(tmp_path / "ckpt", model.state_dict(), cfg)
    stored = load_file(path / "model.safetensors")  # readable with safetensors alone
    assert ("lm_head.weight" in stored) is not tied  # a tied head is stored once
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in stored)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.toml"}
    assert not list(tmp_path.glob("*.tmp-*"))

    loaded, loaded_cfg, tokenizer = load_inference(path)
    assert tokenizer is None and loaded_cfg.model == cfg.model
    assert (loaded.lm_head.weight is loaded.tok_embeddings.weight) is tied
    ids = torch.randint(0, 64, (2, 8))
    assert torch.equal(loaded(ids)[0], model.eval()(ids)[0])
    with pytest.raises(CheckpointError, match="already exists"):
        save_inference(path, model.state_dict(), cfg)


def test_training_checkpoint_contents(single):
    ckpt = single / "checkpoints" / "step_00000006"
    manifest = verify(ckpt, kind="training")
    assert manifest["step"] == 6 and manifest["kind"] == "training"
    assert {"model.safetensors", "config.toml", "trainer_state.json", "rank_00000.pt",
            "train_state/.metadata"} <= set(manifest["files"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 16 and state["loader"]["samples_consumed"] == 24
    rank_state = torch.load(ckpt / "rank_00000.pt", weights_only=True)
    assert {"python", "numpy_keys", "torch"} <= set(rank_state["rng"])
    assert sorted(p.name for p in (single / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (2, 4, 6)]


# ---- exact resume after SIGKILL, including kills in the middle of a save ---------------------------

KILL_POINTS = {  # point -> (step, checkpoint that resume=auto must pick)
    "after_step": (5, 4),             # killed between checkpoints
    "before_publish": (4, 2),         # inside the save: all files and manifest written, not yet renamed
    "before_prune": (4, 4),           # new checkpoint in place, old ones not yet deleted
}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Start every SIGKILLed run at once (they are independent), so the suite waits for them only once."""
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for point, (step, _) in KILL_POINTS.items():
        cmd = [sys.executable, "tests/checkpoint_crash_run.py",
               *args_for(root / point, "--train.batch_size=4", "--model.dropout=0.1")]
        env = {**subprocess_env(), "CRASH_AT_STEP": str(step), "CRASH_POINT": point, "OMP_NUM_THREADS": "1"}
        procs[point] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
    for point, proc in procs.items():
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, f"{point}: {stderr[-2000:]}"
    return root


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_is_bit_exact(killed_runs, single, point):
    out = killed_runs / point
    assert [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")][0] == KILL_POINTS[point][1]
    run_here(out, "--model.dropout=0.1")
    assert not list((out / "checkpoints").glob("*.tmp-*"))  # the killed save's leftovers are gone
    assert_same_run(single, out)


def test_preemption_signal_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanotrain.train", *args_for(out, "--train.batch_size=4", "--train.max_steps=100000",
                                                               "--checkpoint.interval=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + SUBPROCESS_TIMEOUT
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "preemption signal received" in stdout
    (saved, path), = checkpoint.list_checkpoints(out / "checkpoints")
    assert saved == max(losses(out)) and verify(path, kind="training")["step"] == saved


# ---- corruption, fallback, unsafe files ----------------------------------------------------------

def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupted_checkpoint_is_named_and_auto_falls_back(tmp_path, single, capsys):
    out = copy_run(single, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000006"
    shard = next((newest / "train_state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"file train_state/{shard.name} is corrupted"):
        verify(newest)
    middle = out / "checkpoints" / "step_00000004" / "model.safetensors"
    middle.write_bytes(middle.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="file model.safetensors is truncated"):
        verify(middle.parent)

    with pytest.raises(CheckpointError, match="is corrupted"):  # an explicit path never falls back
        run_here(out, "--model.dropout=0.1", f"--checkpoint.resume={newest}")
    capsys.readouterr()
    run_here(out, "--model.dropout=0.1", "--train.max_steps=6")
    log = capsys.readouterr().out
    assert "skipping unusable checkpoint" in log and "falling back" in log
    assert "resumed from" in log and "step_00000002 at step 2" in log
    assert_same_run(single, out)


class Payload:
    """Unpickled without restriction, it would run `exec(source)`."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def plant_in_every_shard_item(train_state: Path, payload: bytes) -> None:
    """Make every item of DCP's shards read `payload`, .metadata and the shard rewritten to match."""
    metadata = read_dcp_metadata(train_state)
    shard = next(train_state.glob("*.distcp"))
    shard.write_bytes(payload)
    for info in metadata.storage_data.values():
        info.relative_path, info.offset, info.length = shard.name, 0, len(payload)
    (train_state / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("victim, refusal", [
    ("rank_00000.pt", r"refusing to load \S*rank_00000\.pt as unsafe: .*Unsupported global: GLOBAL (builtins\.)?exec"),
    ("train_state/.metadata", r"refusing to load \S*\.metadata: global 'exec' of module 'builtins' is not allowed"),
    ("train_state/*.distcp", r"refusing to load a shard of \S*train_state as unsafe: .*Unsupported global: "
                             r"GLOBAL (builtins\.)?exec"),
], ids=["rank file", ".metadata", ".distcp"])
def test_malicious_pickle_is_refused_without_running(tmp_path, single, victim, refusal):
    """Refused as unsafe in one line that never tells the user to load the file unrestricted (weights_only=False)."""
    marker = tmp_path / "pwned"
    payload = Payload(f"open({str(marker)!r}, 'w').write('ran')")
    out = copy_run(single, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000006"
    if victim == "train_state/.metadata":
        (ckpt / victim).write_bytes(pickle.dumps(payload))
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)  # a torch file, as torch.load expects one
        if victim == "rank_00000.pt":
            (ckpt / victim).write_bytes(buffer.getvalue())
        else:
            plant_in_every_shard_item(ckpt / "train_state", buffer.getvalue())
    checkpoint.write_manifest(ckpt, 6, "training")  # the attacker rewrote the manifest too
    with pytest.raises(CheckpointError, match=refusal) as refused:
        run_here(out, f"--checkpoint.resume={ckpt}", "--model.dropout=0.1")
    assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()


# Crafted `.metadata` files. Python's unpickler resolves a dotted name ("os.system") through the
# named module's attributes, so each payload names an allowed module and walks out of it.
DCP_METADATA = "torch.distributed.checkpoint.metadata"
GADGET = "nanotrain_test_gadget"  # an attribute a BUILD gadget would set on a class or function


def pickled_str(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def crafted_pickle(*ops: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + b"".join(ops) + pickle.STOP


def stack_global(module: str, name: str) -> bytes:
    return pickled_str(module) + pickled_str(name) + pickle.STACK_GLOBAL


def call(argument: str) -> bytes:  # call what is on the stack with one string argument
    return pickled_str(argument) + pickle.TUPLE1 + pickle.REDUCE


def set_gadget_on(module: str, name: str) -> bytes:  # BUILD (None, {GADGET: 1}): setattr on the global itself
    return (stack_global(module, name) + pickle.NONE + pickle.EMPTY_DICT + pickled_str(GADGET)
            + pickle.BININT1 + b"\x01" + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD)


def metadata_payloads(marker: Path) -> dict[str, bytes]:
    touch, write = f"touch {marker}", f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "metadata+os.system": crafted_pickle(stack_global(DCP_METADATA, "os.system"), call(touch)),
        "torch+os.system": crafted_pickle(stack_global("torch", "os.system"), call(touch)),
        "collections+os.system": crafted_pickle(stack_global("collections", "os.system"), call(touch)),
        "pathlib+os.system": crafted_pickle(stack_global("pathlib", "os.system"), call(touch)),
        "filesystem+os.system": crafted_pickle(stack_global("torch.distributed.checkpoint.filesystem", "os.system"),
                                               call(touch)),
        "GLOBAL opcode": crafted_pickle(pickle.GLOBAL + f"{DCP_METADATA}\nos.system\n".encode(), call(touch)),
        "Metadata.__init__.__builtins__": crafted_pickle(
            stack_global(DCP_METADATA, "Metadata.__init__.__builtins__.get"), call("exec"), call(write)),
        "BUILD on a class": crafted_pickle(set_gadget_on(DCP_METADATA, "StorageMeta")),
        "BUILD on a function": crafted_pickle(set_gadget_on("torch.serialization", "_get_layout")),
    }


@pytest.mark.parametrize("payload", list(metadata_payloads(Path("marker"))))
def test_crafted_dcp_metadata_never_runs_on_resume(tmp_path, single, payload):
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.serialization import _get_layout

    marker = tmp_path / "pwned"
    out = copy_run(single, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000006"
    (ckpt / "train_state" / ".metadata").write_bytes(metadata_payloads(marker)[payload])
    checkpoint.write_manifest(ckpt, 6, "training")  # whoever can write the directory can rewrite the manifest
    try:
        for resume in ("auto", str(ckpt)):
            with pytest.raises(CheckpointError, match=r"refusing to load .*\.metadata: (global|setting the state)"):
                run_here(out, f"--checkpoint.resume={resume}", "--model.dropout=0.1")
            assert not marker.exists()
            assert not hasattr(StorageMeta, GADGET) and not hasattr(_get_layout, GADGET)
    finally:
        for target in (StorageMeta, _get_layout):
            if hasattr(target, GADGET):
                delattr(target, GADGET)


def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, single):
    out = copy_run(single, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000006"
    metadata = read_dcp_metadata(ckpt / "train_state")
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../rank_00000.pt"
    (ckpt / "train_state" / ".metadata").write_bytes(pickle.dumps(metadata))
    checkpoint.write_manifest(ckpt, 6, "training")
    with pytest.raises(CheckpointError, match=r"names data file '\.\./rank_00000\.pt', which is not a file in"):
        run_here(out, f"--checkpoint.resume={ckpt}")


@pytest.fixture(scope="module")
def story_run(tmp_path_factory, make_story_dataset):
    """A 2-step run on a prepared story dataset (so it has a tokenizer) that saved one checkpoint; (run, data)."""
    root = tmp_path_factory.mktemp("story")
    data = make_story_dataset(root, 100, seed=2)
    run_here(root / "run", "--data.source=tokens", f"--data.path={data}", "--model.vocab_size=320",
             "--train.max_steps=2")
    return root / "run", data


def test_crafted_dcp_metadata_never_runs_from_any_command(tmp_path, story_run):
    """The exact payload through the CLIs: train refuses in one line; generate, evaluate, export never unpickle it."""
    run, data = story_run
    marker = tmp_path / "pwned"
    out = copy_run(run, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000002"
    (ckpt / "train_state" / ".metadata").write_bytes(metadata_payloads(marker)["metadata+os.system"])
    checkpoint.write_manifest(ckpt, 2, "training")
    python = [sys.executable, "-m"]
    commands = {
        "train": [*python, "nanotrain.train", "--config", str(out / "config.toml"), f"--train.out_dir={out}",
                  "--checkpoint.resume=auto"],
        "generate": [*python, "nanotrain.generate", "--checkpoint", str(ckpt), "--prompt", "Once upon a time",
                     "--max_new_tokens", "4"],
        "evaluate": [*python, "nanotrain.evaluate", "--checkpoint", str(ckpt), "--data", str(data),
                     "--max_batches", "1"],
        "export": [*python, "nanotrain.export", "--checkpoint", str(ckpt), "--format", "hf",
                   "--out", str(tmp_path / "hf")],
    }
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}  # independent: run them side by side
    results = {name: (proc.communicate(timeout=SUBPROCESS_TIMEOUT), proc.returncode) for name, proc in procs.items()}
    (_, train_err), train_code = results.pop("train")
    assert train_code == 2, train_err[-2000:]
    assert train_err.splitlines() == [
        f"error: refusing to load {ckpt / 'train_state' / '.metadata'}: global 'os.system' of module "
        f"'{DCP_METADATA}' is not allowed in DCP metadata (it could run code)"]
    for name, ((_, stderr), code) in results.items():
        assert code == 0, f"{name}: {stderr[-2000:]}"
    assert not marker.exists()


# ---- malformed checkpoints and failing saves: one line, nothing half-written --------------------

@pytest.mark.parametrize("damage, refusal", [
    (lambda data: data[:len(data) // 2], "'{ckpt}': train_state cannot be loaded into this model and optimizer"),
    # bytes the restricted unpickler stops at: damage and a crafted file look alike, so it is refused as unsafe
    (lambda data: b"not a tensor file" * 100, "a shard of {ckpt}/train_state as unsafe: .*Unsupported operand"),
], ids=["truncated", "not a torch file"])
def test_malformed_shard_is_one_error(tmp_path, single, damage, refusal):
    out = copy_run(single, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000006"
    shard = next((ckpt / "train_state").glob("*.distcp"))
    shard.write_bytes(damage(shard.read_bytes()))
    checkpoint.write_manifest(ckpt, 6, "training")
    with pytest.raises(CheckpointError, match=refusal.format(ckpt=ckpt)) as refused:
        run_here(out, f"--checkpoint.resume={ckpt}")
    assert "weights_only" not in str(refused.value)


def write_trainer_state(ckpt: Path, content: str) -> None:
    """Replace the checkpoint's trainer_state.json and rewrite the manifest to match (as an editor would)."""
    (ckpt / "trainer_state.json").write_text(content)
    checkpoint.write_manifest(ckpt, 6, "training")


@pytest.mark.parametrize("change, named", [
    (lambda state: "{", "is not valid JSON"),
    (lambda state: '["step", 6]', "lacks or mistypes everything"),
    (lambda state: {k: v for k, v in state.items() if k != "step"}, "lacks or mistypes step;"),
    (lambda state: {**state, "step": "6"}, "lacks or mistypes step;"),
    (lambda state: {**state, "world_size": True}, "lacks or mistypes world_size;"),
    (lambda state: {**state, "loader": {}}, "lacks or mistypes loader.samples_consumed, loader.samples_per_epoch;"),
    (lambda state: {**state, "config": {"model": 1}}, "lacks or mistypes config;"),
], ids=["not JSON", "a list", "no step", "step a string", "world_size a bool", "empty loader", "config section"])
def test_corrupt_trainer_state_is_one_error(tmp_path, single, change, named):
    out = copy_run(single, tmp_path / "run")
    ckpt = out / "checkpoints" / "step_00000006"
    changed = change(json.loads((ckpt / "trainer_state.json").read_text()))
    write_trainer_state(ckpt, changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(CheckpointError, match=f"checkpoint '{ckpt}': trainer_state.json {named}"):
        run_here(out, f"--checkpoint.resume={ckpt}", "--model.dropout=0.1")


def test_auto_resume_falls_back_past_a_corrupt_trainer_state(tmp_path, single, capsys):
    out = copy_run(single, tmp_path / "run")
    write_trainer_state(out / "checkpoints" / "step_00000006", "{")
    run_here(out, "--model.dropout=0.1")
    log = capsys.readouterr().out
    assert "skipping unusable checkpoint" in log and "trainer_state.json is not valid JSON" in log
    assert "step_00000004 at step 4" in log
    assert_same_run(single, out)


FULL_DEVICE = Path("/dev/full")  # every write to it fails with ENOSPC, as on a full disk


def fill_the_disk_at_step_4(monkeypatch, where: str) -> None:
    """Make one write of step 4's save meet a full disk, through the library that writes it."""
    def at_step_4(path) -> bool:
        return "step_00000004" in str(path)

    if where == "a DCP shard":  # torch.save into DCP's stream: RuntimeError "unexpected pos", from ENOSPC
        from torch.distributed.checkpoint.filesystem import FileSystem

        create_stream = FileSystem.create_stream

        @contextlib.contextmanager
        def full_disk_stream(self, path, mode):
            if at_step_4(path) and "w" in mode:
                with open(FULL_DEVICE, "wb") as full:
                    yield full
            else:
                with create_stream(self, path, mode) as stream:
                    yield stream

        monkeypatch.setattr(FileSystem, "create_stream", full_disk_stream)
        return
    name = {"a rank file": "_save_rank_state", "model.safetensors": "write_weights",
            "the manifest": "write_manifest"}[where]
    original = getattr(checkpoint, name)

    def onto_a_full_disk(path, *args, **kwargs):
        if not at_step_4(path):
            return original(path, *args, **kwargs)
        if name == "_save_rank_state":  # torch.save to a path: its RuntimeError has no OSError behind it
            return original(FULL_DEVICE, *args, **kwargs)
        if name == "write_weights":  # safetensors renames its file into place: never over /dev/full
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what open().write raises

    monkeypatch.setattr(checkpoint, name, onto_a_full_disk)


@pytest.mark.skipif(not FULL_DEVICE.exists(), reason="needs /dev/full")
@pytest.mark.parametrize("where", ["a DCP shard", "a rank file", "model.safetensors", "the manifest"])
def test_a_full_disk_during_a_save_is_one_error_and_publishes_nothing(tmp_path, monkeypatch, capsys, where):
    fill_the_disk_at_step_4(monkeypatch, where)
    out = tmp_path / "run"
    root = out / "checkpoints"
    needed = re.escape(f"{checkpoint.checkpoint_bytes(build_model(load_config(None, TINY).model)) / 1e6:,.1f} MB")
    with pytest.raises(CheckpointError, match=(
            rf"^saving checkpoint {re.escape(str(root))}/step_00000004 failed \((\[Errno 28\] )?.*(No space left on "
            rf"device|unexpected pos).*\): a checkpoint of this run needs at least {needed}, [0-9.,]+ MB free in "
            rf"{re.escape(str(root))}; nothing was published and earlier checkpoints are intact")):
        run_here(out)
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # the temporary directory is gone
    verify(root / "step_00000002", kind="training")
    monkeypatch.undo()
    capsys.readouterr()
    run_here(out)  # space freed: rerunning resumes from the checkpoint before the failed save
    assert "step_00000002 at step 2" in capsys.readouterr().out
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [6, 4, 2]


@pytest.mark.parametrize("full_after", ["the start", "step 2's save"])
def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch, full_after):
    """Less free space than a checkpoint needs: refused at start, or before a save writes anything."""
    root = tmp_path / "run" / "checkpoints"
    full = (lambda directory: True) if full_after == "the start" else (lambda d: (d / "step_00000002").is_dir())
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda directory: 1000 if full(directory) else 10**12)
    if full_after == "the start":
        with pytest.raises(CheckpointError,
                           match=rf"checkpoint directory '{re.escape(str(root))}' has 0.0 MB free "
                                 r"but a checkpoint of this run needs at least [0-9.]+ MB; free space"):
            run_here(tmp_path / "run")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
        assert list(root.iterdir()) == []
    else:
        with pytest.raises(CheckpointError,
                           match=r"saving checkpoint \S*step_00000004 failed \(not enough free space\): "
                                 r"a checkpoint of this run needs at least [0-9.]+ MB, 0.0 MB free in"):
            run_here(tmp_path / "run")
        assert [p.name for p in root.iterdir()] == ["step_00000002"]


def test_checkpoint_bytes_is_a_lower_bound(single):
    """The estimate the space checks use never exceeds what a checkpoint takes.

    So it never refuses a save that fits."""
    model = build_model(load_config(None, TINY).model)
    written = sum(f.stat().st_size for f in (single / "checkpoints" / "step_00000006").rglob("*") if f.is_file())
    assert 0 < checkpoint.checkpoint_bytes(model) <= written


def test_unwritable_checkpoint_dir_is_found_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = tmp_path / "run"
    (out / "checkpoints").parent.mkdir()
    (out / "checkpoints").write_text("not a directory")  # the default checkpoint.dir
    for extra, named in [([f"--checkpoint.dir={blocker / 'checkpoints'}"], r"cannot be written \(Not a directory\)"),
                         ([], "is a file; set checkpoint.dir to a directory")]:
        with pytest.raises(NanotrainError, match=named):
            run_here(out, *extra)
        assert not (out / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into any directory")
def test_read_only_checkpoint_dir_is_found_before_training(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o555)
    with pytest.raises(NanotrainError, match=r"cannot be written \(Permission denied\)"):
        run_here(tmp_path / "run", f"--checkpoint.dir={directory}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_file_given_as_checkpoint_is_called_a_file(tmp_path, single):
    weights_file = single / "checkpoints" / "step_00000006" / "model.safetensors"
    for load in (verify, load_inference):
        with pytest.raises(CheckpointError, match=f"checkpoint '{weights_file}' is a file, not a directory"):
            load(weights_file)
    for given in (weights_file, single / "metrics.jsonl"):  # one checkpoint, or a directory of them
        with pytest.raises(CheckpointError, match="is a file, not a directory"):
            run_here(tmp_path / "run", f"--checkpoint.resume={given}")
    with pytest.raises(CheckpointError, match=f"checkpoint '{tmp_path / 'nope'}' does not exist"):
        run_here(tmp_path / "run", f"--checkpoint.resume={tmp_path / 'nope'}")


def test_startup_removes_temporaries_of_dead_saves_only(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()  # reaped: its pid names no process now
    root = tmp_path / "run" / "checkpoints"
    dead = temp_directory(root / "step_00000004", tag=finished.pid)
    live = temp_directory(root / "step_00000099", tag=os.getpid())  # a live writer's (this process)
    for leftover in (dead, live):
        (leftover / "train_state").mkdir(parents=True)
    run_here(tmp_path / "run", "--train.max_steps=2")
    assert not dead.exists() and live.is_dir()


def test_incompatible_resume_is_refused_and_allowed_changes_are_logged(tmp_path, single, capsys):
    ckpt = single / "checkpoints" / "step_00000004"
    for change, named in [("--model.d_model=64", "model.d_model is 32 there but 64 now"),
                          ("--train.seq_len=8", "train.seq_len"),
                          ("--train.batch_size=2", "global batch"),
                          ("--train.seed=7", "train.seed")]:
        with pytest.raises(CheckpointError, match=named):
            run_here(tmp_path / "new", f"--checkpoint.resume={ckpt}", "--model.dropout=0.1", change)
    capsys.readouterr()
    result = run_here(tmp_path / "new", f"--checkpoint.resume={ckpt}", "--model.dropout=0.1",
                      "--train.max_steps=7", "--train.lr=1e-3")
    log = capsys.readouterr().out
    assert "train.max_steps changed from 6 to 7" in log and "train.lr changed from 0.003 to 0.001" in log
    assert set(result.losses) == {5, 6, 7}


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    cfg = load_config(None, TINY)
    path = save_inference(tmp_path / "w", build_model(cfg.model).state_dict(), cfg)
    with pytest.raises(CheckpointError, match="cannot resume training"):
        run_here(tmp_path / "run", f"--checkpoint.resume={path}")


# ---- the pieces the checkpointer saves: train state, random streams, preemption ----------------

def test_train_state_counts_and_round_trips():
    state = TrainState()
    assert state.advance(64) == 1 and state.advance(64) == 2
    state.skipped_steps += 1
    saved = state.state_dict()
    assert list(saved) == ["step", "tokens_seen", "skipped_steps"]  # trainer_state.json's order
    assert saved == {"step": 2, "tokens_seen": 128, "skipped_steps": 1}
    resumed = TrainState()
    resumed.load_state_dict({**saved, "world_size": 1})  # a whole trainer_state.json is fine
    assert resumed == state


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def test_random_state_restores_every_stream_through_a_weights_only_file(tmp_path):
    streams = RandomState(torch.device("cpu"))
    seed_everything(5)
    torch.save(streams.state_dict(), tmp_path / "rng.pt")
    expected = draws()
    seed_everything(6)
    streams.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_reseeding_for_a_new_layout_differs_per_rank_and_takes_any_step():
    RandomState.reseed(1337, step=10**6, rank=0)  # 1_000_003 * step is past NumPy's 32-bit seeds
    rank0 = draws()
    RandomState.reseed(1337, step=10**6, rank=1)
    assert draws() != rank0
    RandomState.reseed(1337, step=10**6, rank=0)
    assert draws() == rank0


def test_preemption_notices_a_signal_and_gives_the_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    disabled = Preemption(False, ParallelDims.single_process("cpu"))
    assert signal.getsignal(signal.SIGTERM) is before and not disabled.requested()
    preemption = Preemption(True, ParallelDims.single_process("cpu"))
    try:
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM ends the process
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGTERM) is before


# ---- non-finite steps ----------------------------------------------------------------------------

def nan_at(monkeypatch, bad_step: int):
    real, calls = distributed.clip_grad_norm, []

    def clip(model, max_norm):
        calls.append(1)
        norm = real(model, max_norm)
        return torch.full_like(norm, float("nan")) if len(calls) == bad_step else norm

    monkeypatch.setattr(distributed, "clip_grad_norm", clip)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, 5)
    with pytest.raises(Exception, match="non-finite"):
        run_here(tmp_path / "run")
    steps = [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [4, 2]
    verify(tmp_path / "run" / "checkpoints" / "step_00000004", kind="training")


def test_nonfinite_skip_is_counted_in_the_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, 3)
    run_here(tmp_path / "run", "--train.on_nonfinite=skip")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["step"] == 6


# ---- two processes: DDP and FSDP over gloo, torchrun restarts, resharding -----------------------------

def uninterrupted_torchrun(out: Path, *extra: str) -> Path:
    """6 straight steps on 2 ranks with batch 2 each: the run a resumed one must reproduce."""
    result = torchrun(args_for(out, "--train.batch_size=2", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    return uninterrupted_torchrun(tmp_path_factory.mktemp("ddp"), "--model.dropout=0.1")


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    return uninterrupted_torchrun(tmp_path_factory.mktemp("fsdp"), "--parallel.strategy=fsdp")


def test_torchrun_restart_resumes_ddp_bit_exact(tmp_path, ddp_reference):
    """Rank 1 is SIGKILLed after step 5; torchrun restarts the job, which resumes from step 4 by itself."""
    out = tmp_path / "run"
    result = torchrun(args_for(out, "--train.batch_size=2", "--model.dropout=0.1"),
                      script=["tests/checkpoint_crash_run.py"], restarts=1,
                      env_extra={"CRASH_AT_STEP": "5", "CRASH_RANK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step_00000004 at step 4" in result.stdout
    assert_same_run(ddp_reference, out)


def test_preemption_of_one_rank_saves_on_all_ranks_and_resumes_bit_exact(tmp_path, ddp_reference):
    """Only rank 1 gets SIGTERM at step 3: the ranks agree, save step 3 together and exit 0; rerunning finishes."""
    out = tmp_path / "run"
    args = args_for(out, "--train.batch_size=2", "--model.dropout=0.1")
    first = torchrun(args, script=["tests/checkpoint_crash_run.py"],
                     env_extra={"CRASH_AT_STEP": "3", "CRASH_POINT": "sigterm", "CRASH_RANK": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "preemption signal received: saved checkpoint at step 3" in first.stdout
    assert [s for s, _ in checkpoint.list_checkpoints(out / "checkpoints")][0] == 3
    second = torchrun(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step_00000003 at step 3" in second.stdout
    assert_same_run(ddp_reference, out)


def test_fsdp_resume_bit_exact(tmp_path, fsdp_reference):
    out = tmp_path / "run"
    ckpt = fsdp_reference / "checkpoints" / "step_00000004"
    result = torchrun(args_for(out, "--train.batch_size=2", "--parallel.strategy=fsdp", f"--checkpoint.resume={ckpt}"))
    assert result.returncode == 0, result.stderr[-3000:]
    ref = {s: v for s, v in losses(fsdp_reference).items() if s > 4}
    assert losses(out) == ref
    for name, tensor in weights(fsdp_reference).items():
        assert torch.equal(weights(out)[name], tensor), name


def test_fsdp_two_ranks_resume_in_one_process(tmp_path, fsdp_reference):
    out = tmp_path / "run"
    ckpt = fsdp_reference / "checkpoints" / "step_00000004"
    result = run_here(out, f"--checkpoint.resume={ckpt}")
    ref = losses(fsdp_reference)
    assert set(result.losses) == {5, 6}
    for step, loss in result.losses.items():
        assert loss == pytest.approx(ref[step], rel=1e-5)
    for name, tensor in weights(fsdp_reference).items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-4, atol=CROSS_LAYOUT_ATOL)


def test_one_process_resume_on_two_fsdp_ranks(tmp_path, fsdp_reference):
    source = tmp_path / "single"
    run_here(source, "--train.max_steps=6")  # same config as the FSDP reference, one process
    out = tmp_path / "run"
    ckpt = source / "checkpoints" / "step_00000004"
    result = torchrun(args_for(out, "--train.batch_size=2", "--parallel.strategy=fsdp", f"--checkpoint.resume={ckpt}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved by 1 data-parallel x 1 tensor-parallel process(es), now 2 x 1" in result.stdout
    ref = losses(fsdp_reference)
    for step, loss in losses(out).items():
        assert loss == pytest.approx(ref[step], rel=1e-5)
    for name, tensor in weights(fsdp_reference).items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-4, atol=CROSS_LAYOUT_ATOL)


def test_a_refused_resume_stops_every_rank_in_one_line(tmp_path):
    """Only rank 0 looks at the disk; rank 1 learns its verdict and stops too, instead of waiting for it.

    Rank 0's line is the job's one line: torchrun stops rank 1 during its grace period, silently.
    """
    missing = tmp_path / "nope"
    result = torchrun(args_for(tmp_path / "run", "--train.batch_size=2", f"--checkpoint.resume={missing}"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint '{missing}' does not exist"]
    assert "exitcode  : 2" in result.stderr and "SIGTERM" not in result.stderr.split("Failures:")[-1]


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes, but the lock, which records whichever job took it last."""
    return {str(f.relative_to(run)): f.read_bytes()
            for f in sorted(run.rglob("*")) if f.is_file() and f.name != ".lock"}


def test_a_resume_refused_on_every_rank_prints_once_and_changes_no_file(tmp_path, ddp_reference):
    """Each rank finds the other global batch itself: rank 0's line is the job's one, and the run stays as it was."""
    out = copy_run(ddp_reference, tmp_path / "run")
    before = run_files(out)
    result = torchrun(args_for(out, "--train.batch_size=4", "--train.max_steps=8", "--model.dropout=0.1"))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: cannot resume from {out / 'checkpoints' / 'step_00000006'}: the global batch "
                      "(grad_accum_steps x data-parallel ranks x batch_size) is 4 there but 8 now, which changes the "
                      "data order; restore those settings, or start a new run (checkpoint.resume=none and a new "
                      "train.out_dir)"], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr and "/nanotrain/" not in result.stderr, result.stderr[-3000:]
    assert run_files(out) == before  # config.toml, metrics.jsonl and every checkpoint untouched, no temporaries


def test_a_full_disk_on_one_rank_stops_every_rank_in_one_line(tmp_path):
    """Rank 1 alone fails to write its rank file.

    Every rank stops, rank 0 prints rank 1's line, nothing is published."""
    out = tmp_path / "run"
    result = torchrun(args_for(out, "--train.batch_size=2", "--train.max_steps=4"),
                      script=["tests/checkpoint_crash_run.py"],
                      env_extra={"CRASH_AT_STEP": "4", "CRASH_POINT": "full_disk_at_save_rank_state",
                                 "CRASH_RANK": "1"})
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: saving checkpoint {out / 'checkpoints' / 'step_00000004'} "
        "failed ([Errno 28] No space left on device)"), result.stderr[-3000:]
    # no rank traceback
    assert "exitcode  : 2" in result.stderr and "/nanotrain/" not in result.stderr, result.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    verify(out / "checkpoints" / "step_00000002", kind="training")


def test_a_checkpoint_directory_not_shared_by_every_node_is_refused(tmp_path):
    """On nodes with a disk each, rank 0 sees only its own node's rank files: the save must not publish."""
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.dims = ParallelDims(rank=0, local_rank=0, world_size=3, device="cpu", strategy="ddp")
    tmp = tmp_path / "step_00000004.tmp-1"
    tmp.mkdir()
    for rank in (0, 2):
        (tmp / f"rank_{rank:05d}.pt").touch()
    with pytest.raises(CheckpointError, match=r"the files of rank\(s\) 1 are not in .* not shared by every node"):
        checkpointer._require_every_rank_file(tmp)
    (tmp / "rank_00001.pt").touch()
    checkpointer._require_every_rank_file(tmp)
