"""The single-process loop: it learns, it is deterministic, and it leaves the promised run files."""

import json
import math

import pytest

from nanotrain.config import load_config
from nanotrain.data import unigram_entropy
from nanotrain.prepare import prepare_stories
from nanotrain.train import train

TINY = [
    "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2",
    "--model.d_ff=128", "--train.seq_len=64", "--train.batch_size=8", "--train.log_every=1",
    "--train.sample_tokens=0", "--optim.warmup_steps=5",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_CACHE", str(tmp_path / "cache"))


def test_short_run_on_stories_falls_far_below_unigram_entropy(tmp_path):
    cfg = load_config(None, TINY + [
        f"--train.out_dir={tmp_path}/run", "--train.max_steps=60", "--train.lr=3e-3",
        "--train.eval_every=0", "--train.eval_steps=4",
    ])
    result = train(cfg)
    corpus = prepare_stories(cfg.data.stories_count, cfg.data.stories_vocab_size, cfg.data.stories_seed, verbose=False)
    entropy = unigram_entropy(corpus, "train")
    assert result.losses[1] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.3)
    # 60 steps of a 0.2M-parameter model: far below ln(1024) = 6.93 and the unigram entropy (5.16)
    assert result.val_losses[60] < 0.7 * entropy, (result.val_losses, entropy)
    assert result.losses[60] < 0.7 * entropy


def test_same_seed_same_losses_and_run_files(tmp_path):
    overrides = TINY + ["--data.source=random", "--model.vocab_size=128", "--train.max_steps=4",
                        "--train.eval_every=2", "--train.eval_steps=2"]
    first = train(load_config(None, overrides + [f"--train.out_dir={tmp_path}/a"]))
    second = train(load_config(None, overrides + [f"--train.out_dir={tmp_path}/b"]))
    assert first.losses == second.losses and len(first.losses) == 4
    assert first.val_losses == second.val_losses and set(first.val_losses) == {2, 4}
    other_seed = train(load_config(None, overrides + [f"--train.out_dir={tmp_path}/c", "--train.seed=7"]))
    assert other_seed.losses != first.losses

    run = tmp_path / "a"
    assert load_config(str(run / "config.toml")) == load_config(None, overrides + [f"--train.out_dir={run}"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
        assert r["loss"] == first.losses[r["step"]]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [first.val_losses[2], first.val_losses[4]]
