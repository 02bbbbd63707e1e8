"""The dashboards (TensorBoard and W&B sinks, reporting/run_log.py) get what metrics.jsonl gets, across resumes."""

import json
import math
import os
import re
import struct
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import pytest

from nanotrain import train as train_cli
from nanotrain.config import describe_keys, load_config
from nanotrain.reporting.run_log import (
    TENSORBOARD_DIR,
    WANDB_DIR,
    WANDB_RUN_ID_FILE,
    TensorBoardSink,
    read_metrics,
    samples_text,
    scalars,
)
from nanotrain.training.trainer import train

TINY = [
    "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64",
    "--model.max_position_embeddings=32", "--train.seq_len=16", "--train.batch_size=4",
    "--train.log_every=1", "--train.eval_every=2", "--train.eval_steps=1", "--checkpoint.on_preempt=false",
]


def expected_curves(run) -> dict[str, dict[int, float]]:
    """metrics.jsonl as dashboard curves: train/key or eval/key -> {step: value}.

    A step twice would be a test failure."""
    records = read_metrics(run)
    curves: dict[str, dict[int, float]] = {}
    for group, kind in (("train", records.steps), ("eval", records.evals)):
        for record in kind:
            for key, value in scalars(record, group).items():
                assert record["step"] not in curves.setdefault(key, {})
                curves[key][record["step"]] = value
    return curves


def tensorboard_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    events.Reload()
    return events


def test_tensorboard_shows_each_metrics_jsonl_number_once_per_step_across_a_resume(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    common = TINY + ["--data.source=random", f"--train.out_dir={run}", "--log.tensorboard=true",
                     "--checkpoint.interval=2"]
    train(load_config(None, common + ["--train.max_steps=4"]))
    events_dir = run / TENSORBOARD_DIR
    assert f"dashboards   TensorBoard events in {events_dir} (tensorboard --logdir {events_dir})" in \
        capsys.readouterr().out.splitlines()
    before_the_crash = expected_curves(run)
    # Back to step 2, as after a crash that lost steps 3-4; a new learning rate makes the redone steps differ.
    train(load_config(None, common + ["--train.max_steps=5", "--train.lr=3e-3",
                                      f"--checkpoint.resume={run / 'checkpoints' / 'step_00000002'}"]))

    events = tensorboard_events(run / TENSORBOARD_DIR)
    expected = expected_curves(run)
    assert set(expected) >= {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen",
                             "eval/val_loss", "eval/val_ppl"}
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, curve in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in logged] == sorted(curve), key  # every step once, in order
        assert [value for _, value in logged] == pytest.approx([curve[step] for step in sorted(curve)], rel=1e-6)
    assert [event.step for event in events.Scalars("train/lr")] == [1, 2, 3, 4, 5]
    assert expected["train/lr"][3] != pytest.approx(before_the_crash["train/lr"][3])  # the redone step's values shown
    assert [event.value for event in events.Scalars("eval/val_ppl")] == pytest.approx(
        [math.exp(event.value) for event in events.Scalars("eval/val_loss")], rel=1e-5)


def test_tensorboard_sink_writes_samples_as_text_at_their_step(tmp_path):
    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path)
    samples = {2: ["Once upon a time there was", "a cat"], 4: ["Once upon a time the dog"]}
    for step, texts in samples.items():
        sink.log_samples(step, texts)
    sink.close()
    events = tensorboard_events(tmp_path / TENSORBOARD_DIR)
    texts = {event.step: event.tensor_proto.string_val[0].decode()
             for event in events.Tensors("eval/samples/text_summary")}
    assert texts == {step: samples_text(texts) for step, texts in samples.items()}
    assert "a cat" in texts[2] and "the dog" in texts[4]


def wandb_history(wandb_file) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB log (32 KiB blocks of chunks) of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = wandb_file.read_bytes(), 32768, 7  # the file opens with ":W&B", a magic and a version
    assert data[:4] == b":W&B"
    position, record, rows = header, b"", []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # a block's tail too short for a chunk header is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding to the end of the block
            position += left_in_block
            continue
        record += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            if parsed.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in parsed.history.item} | {"_step": parsed.history.step.num})
            record = b""
    return rows


def test_wandb_offline_run_holds_the_metrics_jsonl_numbers_and_a_resume_continues_the_same_run(
        tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written to ~
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    run = tmp_path / "run"
    common = TINY + ["--data.source=random", f"--train.out_dir={run}", "--log.wandb_project=nanotrain-test",
                     "--checkpoint.interval=2"]
    train(load_config(None, common + ["--train.max_steps=2"]))
    run_id = (run / WANDB_RUN_ID_FILE).read_text().strip()
    train(load_config(None, common + ["--train.max_steps=3"]))  # resumes at step 2
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # W&B's service process writes the run file's tail when it stops (at exit in a real run)

    assert (run / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    # W&B names each attempt's directory offline-run-<time>-<id>, adding "-1" when both start in the same second
    same_run = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    assert len(offline_runs) == 2 and all(same_run.fullmatch(path.name) for path in offline_runs), offline_runs
    logged: dict[str, dict[int, float]] = {}
    for offline_run in offline_runs:
        for row in wandb_history(offline_run / f"run-{run_id}.wandb"):
            for key, value in row.items():
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    assert row["_step"] not in logged.setdefault(key, {})
                    logged[key][row["_step"]] = value
    expected = expected_curves(run)
    assert set(logged) == set(expected) and {"train/loss", "eval/val_loss", "eval/val_ppl"} <= set(logged)
    for key, curve in expected.items():
        assert logged[key] == pytest.approx(curve, rel=1e-6), key


@pytest.mark.parametrize("flag, module, extra", [
    ("--log.tensorboard=true", "tensorboard", "tensorboard"),
    ("--log.wandb_project=demo", "wandb", "wandb"),
])
def test_a_dashboard_without_its_package_is_one_error_line_before_training(
        tmp_path, monkeypatch, capsys, flag, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(TINY + ["--data.source=random", "--train.max_steps=2", f"--train.out_dir={run}", flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"pip install 'nanotrain[{extra}]'" in err[0]
    assert not run.exists()  # stopped before anything was written


def test_log_section_is_listed_in_help_config():
    assert "--log.tensorboard=false" in describe_keys() and '--log.wandb_project=""' in describe_keys()


@contextmanager
def unwritable(directory):
    """`directory` made read-only for this process: by its mode bits, or (mode bits do not bind root) immutable."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield
        directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not available (not ext4, or no CAP_LINUX_IMMUTABLE)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.parametrize("flag, directory", [
    ("--log.tensorboard=true", TENSORBOARD_DIR),
    ("--log.wandb_project=demo", WANDB_DIR),
])
@pytest.mark.parametrize("problem", ["a file", "read-only"])
def test_a_dashboard_directory_that_is_a_file_or_read_only_is_one_error_line_before_anything_is_written(
        tmp_path, capsys, flag, directory, problem):
    pytest.importorskip("tensorboard" if "tensorboard" in flag else "wandb")
    run = tmp_path / "run"
    run.mkdir()
    path = run / directory
    if problem == "a file":
        path.write_text("not a directory\n")
        blocked = nullcontext()
    else:
        path.mkdir()
        blocked = unwritable(path)
    with blocked, pytest.raises(SystemExit) as exit_info:
        train_cli.main(TINY + ["--data.source=random", "--train.max_steps=2", f"--train.out_dir={run}", flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = flag[2:].split("=")[0]
    expected = "which is a file" if problem == "a file" else "which cannot be written"
    assert len(err) == 1 and err[0].startswith(f"error: {key} writes into '{path}', {expected}"), err
    assert f"or turn {key} off" in err[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock", directory]  # no config.toml, no metrics.jsonl
