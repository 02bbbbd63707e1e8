"""The run log (nanotrain/reporting/run_log.py).

One call per event, fanned out to the console and metrics.jsonl sinks.
"""

import json
import math

import pytest

from nanotrain.config import load_config
from nanotrain.data.loader import build_data
from nanotrain.errors import NanotrainError
from nanotrain.parallel.dims import ParallelDims
from nanotrain.reporting import run_log
from nanotrain.reporting.run_log import (
    ConsoleSink,
    JsonlSink,
    RunLog,
    Sink,
    format_epochs,
    format_eval,
    format_step,
    read_metrics,
)
from nanotrain.training.trainer import train

TINY = [
    "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64",
    "--model.max_position_embeddings=32", "--train.seq_len=16", "--train.batch_size=4",
    "--train.log_every=2", "--train.eval_every=2", "--train.eval_steps=1", "--checkpoint.on_preempt=false",
]
STEP_RECORD = {"step": 5, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 2000.0,
               "tokens_per_sec_per_rank": 1000.0, "mfu_pct": 41.5, "peak_mem_gib": 1.25, "peak_mem_pct": 5.0,
               "data_ms": 3.0, "compute_ms": 97.0, "tokens_seen": 640, "epoch": 1.374, "elapsed_s": 10, "eta_s": 20}


class Recorder(Sink):
    """A sink as a user would add one: it keeps every event it is handed."""

    def __init__(self):
        self.events, self.closed = [], False

    def log_step(self, record):
        self.events.append(("step", record))

    def log_eval(self, record):
        self.events.append(("eval", record))

    def log_samples(self, step, samples):
        self.events.append(("samples", {"step": step, "samples": samples}))

    def close(self):
        self.closed = True


def test_an_added_sink_receives_exactly_what_the_console_and_metrics_jsonl_get(
        tmp_path, capsys, monkeypatch, make_story_dataset):
    data = make_story_dataset(tmp_path / "stories", count=100, seed=0)  # a tokenizer, so samples are logged
    recorder = Recorder()
    chosen = run_log.choose_sinks
    monkeypatch.setattr(run_log, "choose_sinks", lambda cfg, resumed_step: [*chosen(cfg, resumed_step), recorder])
    run = tmp_path / "run"
    cfg = load_config(None, TINY + [f"--data.path={data}", "--model.vocab_size=320", "--train.max_steps=4",
                                    "--train.sample_tokens=3", "--checkpoint.interval=0", f"--train.out_dir={run}"])
    train(cfg)

    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["step", "eval", "samples"] * 2 and recorder.closed
    assert [record["step"] for _, record in recorder.events] == [2, 2, 2, 4, 4, 4]
    # epochs: the step's global batches (4 windows each) over the train split's windows; perplexity: exp(val loss)
    windows = build_data(cfg).train.order.num_samples
    assert [record["epoch"] for kind, record in recorder.events if kind == "step"] == [8 / windows, 16 / windows]
    assert all(record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))
               for kind, record in recorder.events if kind == "eval")
    # metrics.jsonl holds the same records, one JSON line each, in the same order
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines == [json.dumps(record) for _, record in recorder.events]
    # and the console shows today's lines for them, in the same order
    expected = []
    for kind, record in recorder.events:
        if kind == "step":
            expected.append(format_step(record, 4))
        elif kind == "eval":
            expected.append(format_eval(record, 4))
        else:
            expected += [f"sample: {text!r}" for text in record["samples"]]
    out = capsys.readouterr().out.splitlines()
    first = out.index(expected[0])
    assert out[first:first + len(expected)] == expected
    data_line = next(line for line in out if line.startswith("data "))
    epochs = format_epochs(16 / windows)
    assert f"{windows:,} train windows of 16 tokens (packed), {epochs} epochs in 4 steps" in data_line
    assert read_metrics(run).samples == [record for kind, record in recorder.events if kind == "samples"]


def test_jsonl_sink_on_resume_keeps_records_up_to_the_step_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = [json.dumps({"step": step, "loss": 5.0 - step}) for step in range(1, 7)]
    path.write_text("\n".join(old) + '\n{"step": 7, "lo')  # steps 5-7 were lost in a crash, 7 torn
    sink = JsonlSink(tmp_path, resumed_step=4)
    sink.log_step(STEP_RECORD)
    sink.log_eval({"step": 5, "val_loss": 1.5})
    sink.log_samples(5, ["Once upon"])
    sink.close()
    assert path.read_text().splitlines() == old[:4] + [
        json.dumps(STEP_RECORD), '{"step": 5, "val_loss": 1.5}', '{"step": 5, "samples": ["Once upon"]}']

    JsonlSink(tmp_path, resumed_step=0).close()  # a fresh run starts the file empty
    assert path.read_text() == ""
    assert not list(tmp_path.glob("*.tmp"))


def test_a_resumed_run_logs_every_step_once(tmp_path):
    run = tmp_path / "run"
    args = TINY + ["--data.source=random", "--model.vocab_size=64", "--train.eval_every=0", "--train.log_every=1",
                   "--train.sample_tokens=0", "--checkpoint.interval=2", f"--train.out_dir={run}"]
    train(load_config(None, args + ["--train.max_steps=4"]))
    with open(run / "metrics.jsonl", "a") as f:  # as if the run had logged step 5 and died mid-line at 6
        f.write('{"step": 5, "loss": 99.0}\n{"step": 6, "lo')
    result = train(load_config(None, args + ["--train.max_steps=6"]))
    records = read_metrics(run).steps
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["loss"] == result.losses[5] != 99.0
    assert all(r["epoch"] is None for r in records)  # the random source is endless: no epochs


def test_console_sink_prints_the_log_lines(capsys):
    sink = ConsoleSink(max_steps=10)
    sink.log_step(STEP_RECORD)
    sink.log_eval({"step": 5, "val_loss": 2.0})
    sink.log_samples(5, ["a 'b'", "c"])
    assert capsys.readouterr().out.splitlines() == [
        "step      5/10 | epoch 1.37 | loss 2.0000 | lr 1.00e-03 | grad norm 0.500 | 2,000 tok/s (1,000/rank) | "
        "MFU 41.5% | mem 1.25 GiB (5%) | data 3 ms + compute 97 ms | elapsed 00:10 | eta 00:20",
        "step      5/10 | val loss 2.0000 | val ppl 7.39",
        "sample: \"a 'b'\"",
        "sample: 'c'",
    ]
    assert format_step({**STEP_RECORD, "epoch": None}, 10).startswith("step      5/10 | loss 2.0000 |")
    assert [format_epochs(epochs) for epochs in (0.000123, 0.0517, 0.62, 0.999, 1.374, 12.5)] == [
        "0.000123", "0.0517", "0.620", "0.999", "1.37", "12.50"]


def test_only_the_main_process_has_sinks(tmp_path):
    cfg = load_config(None, [f"--train.out_dir={tmp_path}"])
    main = ParallelDims.single_process("cpu")
    other = ParallelDims(rank=1, local_rank=1, world_size=2, device="cpu", strategy="ddp")
    assert RunLog.for_run(cfg, other, resumed_step=0).sinks == []
    assert not (tmp_path / "metrics.jsonl").exists()
    log = RunLog.for_run(cfg, main, resumed_step=0)
    assert [type(sink) for sink in log.sinks] == [JsonlSink, ConsoleSink]
    log.close()


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "loss": 1}\n{"step": 2, "lo', None),  # a torn last line is a crash mid-write: ignored
    ('[1, 2]\n{"step": 1, "loss": 1}\n', "line 1 is not a JSON object"),
    ('oops\n{"step": 1, "loss": 1}\n', "line 1 is not JSON"),
])
def test_reader_ignores_a_torn_last_line_and_refuses_damage(tmp_path, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    if message is None:
        assert read_metrics(tmp_path).steps == [{"step": 1, "loss": 1}]
    else:
        with pytest.raises(NanotrainError, match=message):
            read_metrics(tmp_path)
