"""Evaluation of a checkpoint reproduces the val loss its training run logged, in any precision."""

import json
import math

import pytest

from nanotrain.config import load_config
from nanotrain.evaluate import main
from nanotrain.inference.evaluation import evaluate_checkpoint
from nanotrain.inference.sampling import check_device


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_story_dataset):
    """A prepared story dataset and a 10-step run that saved a checkpoint and logged its val loss."""
    from nanotrain.training.trainer import train

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


def logged_evaluation(checkpoint):
    """The run's metrics.jsonl record of its evaluation."""
    records = [json.loads(line) for line in (checkpoint.parents[1] / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if "val_loss" in r)


def test_evaluate_equals_the_val_loss_the_run_logged(trained):
    checkpoint, data, logged = trained
    record = logged_evaluation(checkpoint)
    # The split is small, so the run evaluated all of it, as evaluate does by default; and says so.
    assert record["val_windows"] == record["val_windows_total"] > 3 * 4  # more than train.eval_steps batches
    for batch_size in (4, 8):  # any grouping of the same windows gives the same mean
        result = evaluate_checkpoint(str(checkpoint), str(data), batch_size=batch_size)
        assert result.loss == pytest.approx(logged, abs=1e-5)
        assert result.perplexity == pytest.approx(math.exp(logged), rel=1e-5)
        assert (result.windows, result.windows_total, result.tokens) == (
            record["val_windows"], record["val_windows_total"], record["val_tokens"])
    first = evaluate_checkpoint(str(checkpoint), str(data), batch_size=4, max_batches=3)
    assert first.batches == 3 and first.windows == 12 and first.tokens == 3 * 4 * 31  # 31 predictions per 32-token row


def test_whole_split_bf16_and_train_split(trained):
    checkpoint, data, _ = trained
    fp32 = evaluate_checkpoint(str(checkpoint), str(data), batch_size=4)
    bf16 = evaluate_checkpoint(str(checkpoint), str(data), batch_size=4, precision="bf16")
    assert fp32.batches > 3 and fp32.windows == fp32.windows_total  # the default covers the whole split
    assert bf16.tokens == fp32.tokens and abs(bf16.loss - fp32.loss) < 0.05  # bf16 rounding only
    on_train = evaluate_checkpoint(str(checkpoint), str(data), split="train", batch_size=4, max_batches=2)
    assert on_train.batches == 2 and on_train.windows == 8 and math.isfinite(on_train.loss)


def test_cli_and_run_log_name_the_windows_they_average(trained, capsys):
    from nanotrain.reporting.run_log import format_eval

    checkpoint, data, logged = trained
    record = logged_evaluation(checkpoint)
    windows = f"{record['val_tokens']:,} tokens in all {record['val_windows_total']} val windows"
    assert format_eval(record, 10).endswith(f"val loss {logged:.4f} | val ppl {math.exp(logged):.2f} | {windows}")
    main(["--checkpoint", str(checkpoint), "--data", str(data), "--batch_size", "4"])
    out = capsys.readouterr().out
    assert out.startswith(f"val loss {logged:.4f} | perplexity {math.exp(logged):.2f} | {windows} (")
    main(["--checkpoint", str(checkpoint), "--data", str(data), "--batch_size", "4", "--max_batches", "3"])
    out = capsys.readouterr().out
    assert f"| 372 tokens in the first 12 of {record['val_windows_total']} val windows (3 batches) |" in out


def test_cli_takes_the_newest_complete_checkpoint_of_a_run(trained, capsys):
    checkpoint, data, logged = trained
    run = checkpoint.parents[1]
    main(["--checkpoint", str(run), "--data", str(data), "--device", "auto"])
    out, err = capsys.readouterr()
    assert err == f"note: using {checkpoint}, the newest complete checkpoint in {run}\n"
    assert out.startswith(f"val loss {logged:.4f}") and f"on {check_device('auto')} |" in out  # cuda:0 where visible


@pytest.fixture(scope="module")
def other_tokenizer_data(tmp_path_factory):
    """The fixture's kind of stories, prepared with a 400-token tokenizer of their own."""
    from nanotrain.data.stories import generate_stories
    from nanotrain.prepare import prepare

    root = tmp_path_factory.mktemp("other")
    (root / "stories.txt").write_text("\n<|endoftext|>\n".join(generate_stories(100, seed=3)))
    prepare([str(root / "stories.txt")], root / "data", vocab_size=400, seed=0, workers=1, verbose=False)
    return root / "data"


def test_cli_errors_are_one_line(trained, other_tokenizer_data, tmp_path, capsys):
    checkpoint, data, _ = trained
    for argv, message in [
        (["--checkpoint", str(tmp_path / "none"), "--data", str(data)], "does not exist"),
        (["--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")], "does not exist"),
        (["--checkpoint", str(checkpoint), "--data", str(data), "--seq_len", "65"],
         "exceeds model.max_position_embeddings"),
        (["--checkpoint", str(checkpoint), "--data", str(data), "--seq_len", "1"],
         "--seq_len 1 leaves nothing to predict (a window of T tokens gives T-1 next-token predictions); "
         "use --seq_len 2 or more"),
        (["--checkpoint", str(checkpoint), "--data", str(other_tokenizer_data)],
         f"dataset '{other_tokenizer_data}' was tokenized with another tokenizer than checkpoint '{checkpoint}' "
         "(400 tokens there, 320 here); prepare the text again with the checkpoint's tokenizer: python -m "
         f"nanotrain.prepare INPUT ... --out NEW_DIR --tokenizer {checkpoint / 'tokenizer.model'}, "
         "then pass --data NEW_DIR"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
        assert "--model." not in err and "--train." not in err  # never a training flag


def test_evaluation_batches_of_the_whole_split_count_each_window_once(trained):
    """A last partial batch is filled with rows whose labels are all ignored, in training's layout too."""
    from nanotrain.data.loader import _val_layout, evaluation_batches
    from nanotrain.data.sources import TokensSource

    _, data, _ = trained
    source = TokensSource(data)
    total = len(source.samples("val", 32, padded=False))
    assert total % 8  # the last batch of 8 is partial
    chosen = evaluation_batches(source, "val", 32, 8, padded=False, seed=0)
    batches = list(chosen.batches)
    assert chosen.count == len(batches) == -(-total // 8) and chosen.windows == total
    counted = [tuple(row.tolist()) for b in batches for row, labels in zip(b["input_ids"], b["labels"])
               if (labels != -100).any()]
    assert counted == [tuple(source.samples("val", 32, False)[i]["input_ids"].tolist()) for i in range(total)]
    # two data-parallel ranks of 3: together the same windows, each once; None pads the last global batch
    ranks = [_val_layout(total, 3, r, 2) for r in range(2)]
    positions = [p for k in range(len(ranks[0])) for r in range(2) for p in ranks[r][k]]
    assert [p for p in positions if p is not None] == list(range(total)) and len(ranks[0]) == len(ranks[1])


def test_a_large_val_split_is_evaluated_in_its_first_eval_steps_batches():
    from nanotrain.data.loader import WHOLE_VAL_SPLIT_TOKENS, val_window_count, window_span

    small = WHOLE_VAL_SPLIT_TOKENS // 128  # windows of 128 tokens
    assert val_window_count(small, 128, wanted=160) == small  # whole: at most WHOLE_VAL_SPLIT_TOKENS tokens
    assert val_window_count(small + 1, 128, wanted=160) == 160  # larger: train.eval_steps global batches
    assert val_window_count(small + 1, 128, wanted=10**6) == small + 1  # never more than the split holds
    assert val_window_count(2**62, 32, wanted=40) == 40  # the endless random source
    assert window_span(40, None) == "40 val windows" and window_span(160, 335) == "the first 160 of 335 val windows"
