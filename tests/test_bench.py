"""nanotrain.bench times nanotrain against HF Llama / a reference GPT in one process and reports the ratio."""

import json
import re

import pytest
import torch

from nanotrain.bench import main
from nanotrain.config import load_config
from nanotrain.model.transformer import Transformer
from nanotrain.training import throughput_benchmark
from nanotrain.training.throughput_benchmark import BENCH_SHAPES

TINY_MODEL = """
[model]
flavour = "{flavour}"
vocab_size = 256
max_position_embeddings = 64
n_layers = 2
n_heads = 4
n_kv_heads = {kv_heads}
d_model = 32
d_ff = 64
[data]
source = "random"
"""


def run_bench(tmp_path, capsys, flavour, kv_heads, *extra):
    preset = tmp_path / f"{flavour}.toml"
    preset.write_text(TINY_MODEL.format(flavour=flavour, kv_heads=kv_heads))
    main(["--config", str(preset), "--seq_len", "32", "--batch_size", "2", "--steps", "1", "--rounds", "2", *extra])
    return capsys.readouterr().out


def test_llama_against_hugging_face(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = run_bench(tmp_path, capsys, "llama", 2)
    losses = re.search(r"first-step loss: nanotrain ([\d.]+) \| HF LlamaForCausalLM ([\d.]+)", out)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-3, out  # same weights, same work
    assert re.search(r"nanotrain: +[\d,]+ tok/s \(median of 2\) \| MFU [\d.]+%", out), out
    assert re.search(r"nanotrain / HF LlamaForCausalLM: [\d.]+x", out), out


def test_nanotrain_side_times_the_training_loops_train_step(tmp_path, capsys, monkeypatch):
    real, outcomes = throughput_benchmark.train_step, []

    def recording_train_step(*args, **kwargs):
        outcomes.append(real(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(throughput_benchmark, "train_step", recording_train_step)
    out = run_bench(tmp_path, capsys, "gpt", 0)
    assert len(outcomes) == 3 and all(o.applied and o.valid_tokens == 2 * 31 for o in outcomes)  # 1 step x 3 rounds
    assert f"first-step loss: nanotrain {outcomes[0].loss:.4f} |" in out, out


def test_gpt_against_reference_gpt_in_bf16(tmp_path, capsys):
    out = run_bench(tmp_path, capsys, "gpt", 0, "--precision", "bf16")
    assert "bf16" in out.splitlines()[0]
    assert re.search(r"nanotrain / ReferenceGPT: [\d.]+x", out), out


def test_bad_arguments_give_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "0"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        main(["--config", "no-such-preset"])
    assert "error: " in capsys.readouterr().err


def test_nanotrain_alone_with_a_profile_summary_and_a_json_report(tmp_path, capsys):
    report_file = tmp_path / "bench.json"
    out = run_bench(tmp_path, capsys, "llama", 2, "--reference", "none", "--profile", "--json", str(report_file))
    report = json.loads(report_file.read_text())
    assert [side["name"] for side in report["sides"]] == ["nanotrain"] and "ratio" not in report
    assert report["sides"][0]["tokens_per_sec"] > 0 and 0 < report["sides"][0]["mfu_pct"] <= 100
    rows = report["profile"]["nanotrain"]
    assert 0 < len(rows) <= 10 and 0 < sum(row["share_pct"] for row in rows) <= 100.0 + 1e-9
    assert [row["share_pct"] for row in rows] == sorted((row["share_pct"] for row in rows), reverse=True)
    assert "profile of one nanotrain step, top" in out and "HF LlamaForCausalLM" not in out


def test_the_125m_llama_shape():
    cfg = load_config("tinystories-20m", BENCH_SHAPES["llama-125m"])
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = Transformer(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 123_587_328
    assert cfg.model.head_dim == 64 and cfg.model.kv_heads == cfg.model.n_heads  # flash attention's favourite shape
