"""Evaluation of a checkpoint reproduces the val loss its training run logged, in any precision."""

import json
import math

import pytest

from nanotrain.config import load_config
from nanotrain.evaluate import main
from nanotrain.evaluation import evaluate_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_story_dataset):
    """A prepared story dataset and a 10-step run that saved a checkpoint and logged its val loss."""
    from nanotrain.trainer import train

    root = tmp_path_factory.mktemp("eval")
    make_story_dataset(root, 200, seed=1)
    cfg = load_config(None, [
        "--model.vocab_size=320", "--model.max_position_embeddings=64", "--model.n_layers=1",
        "--model.n_heads=2", "--model.n_kv_heads=1", "--model.d_model=32", "--model.d_ff=64",
        "--data.source=tokens", f"--data.path={root / 'data'}", "--train.seq_len=32", "--train.batch_size=4",
        "--train.max_steps=10", "--train.eval_every=10", "--train.eval_steps=3", "--train.log_every=10",
        "--train.sample_tokens=0", f"--train.out_dir={root / 'run'}", "--checkpoint.interval=10",
        "--checkpoint.resume=none", "--train.peak_tflops=1",  # skip measuring a matmul peak
    ])
    train(cfg)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    val_loss = next(r["val_loss"] for r in records if "val_loss" in r)
    (checkpoint,) = (root / "run" / "checkpoints").glob("step_*")
    return checkpoint, root / "data", val_loss


def test_evaluate_equals_the_val_loss_the_run_logged(trained):
    checkpoint, data, logged = trained
    result = evaluate_checkpoint(str(checkpoint), str(data), batch_size=4, max_batches=3)
    assert result.loss == pytest.approx(logged, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(logged), rel=1e-5)
    assert result.batches == 3 and result.tokens == 3 * 4 * 31  # 31 predictions per 32-token row


def test_whole_split_bf16_and_train_split(trained):
    checkpoint, data, _ = trained
    fp32 = evaluate_checkpoint(str(checkpoint), str(data), batch_size=4)
    bf16 = evaluate_checkpoint(str(checkpoint), str(data), batch_size=4, precision="bf16")
    assert fp32.batches > 3  # the default covers every full batch of the split
    assert bf16.tokens == fp32.tokens and abs(bf16.loss - fp32.loss) < 0.05  # bf16 rounding only
    on_train = evaluate_checkpoint(str(checkpoint), str(data), split="train", batch_size=4, max_batches=2)
    assert on_train.batches == 2 and math.isfinite(on_train.loss)


def test_cli_prints_loss_and_perplexity(trained, capsys):
    checkpoint, data, logged = trained
    main(["--checkpoint", str(checkpoint), "--data", str(data), "--batch_size", "4", "--max_batches", "3"])
    out = capsys.readouterr().out
    assert out.startswith(f"val loss {logged:.4f} | perplexity {math.exp(logged):.2f}")


def test_cli_errors_are_one_line(trained, tmp_path, capsys):
    checkpoint, data, _ = trained
    for argv, message in [
        (["--checkpoint", str(tmp_path / "none"), "--data", str(data)], "does not exist"),
        (["--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")], "does not exist"),
        (["--checkpoint", str(checkpoint), "--data", str(data), "--seq_len", "65"], "exceeds model.max_position_embeddings"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
