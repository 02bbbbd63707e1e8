"""The built-in corpus: deterministic, varied, and prepared once into the cache."""

import threading

import numpy as np

from nanotrain.data.dataset_format import read_meta
from nanotrain.data.stories import GENERATOR_VERSION, generate_stories, prepare_stories


def test_generator_is_deterministic_and_varied():
    stories = generate_stories(3000, seed=0)
    assert stories == generate_stories(3000, seed=0)
    assert generate_stories(50, seed=1) != stories[:50]
    assert len(set(stories)) > 2900  # thousands of distinct stories from one seed
    assert all(s.count("\n\n") >= 2 and s.endswith((".", "!", '"')) for s in stories)
    assert sum('"' in s for s in stories) == len(stories)  # every story has some dialogue


def test_corpus_is_prepared_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_CACHE", str(tmp_path))
    results = []
    # two "ranks" asking at the same time: one builds, the other waits on the lock and reuses it
    threads = [threading.Thread(target=lambda: results.append(prepare_stories(300, 400, seed=5, verbose=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == tmp_path / f"stories-v{GENERATOR_VERSION}-n300-v400-s5"
    meta = read_meta(results[0])
    splits = meta["splits"]
    assert meta["vocab_size"] == 400 and splits["train"]["documents"] + splits["val"]["documents"] == 300
    stamp = (results[0] / "train.bin").stat().st_mtime_ns
    assert prepare_stories(300, 400, seed=5, verbose=False) == results[0]
    assert (results[0] / "train.bin").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [results[0].name]
    tokens = np.fromfile(results[0] / "train.bin", dtype=np.uint16)
    assert tokens.max() < 400 and (tokens == 2).sum() == meta["splits"]["train"]["documents"]
