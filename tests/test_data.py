"""The loader: global order across layouts, disjoint rank shards, exact resume, padded rows, validation."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from nanotrain.config import DataConfig, load_config
from nanotrain.data.dataset_format import TokenSplit, dataset_vocab_size, open_meta, open_tokenizer, write_dataset
from nanotrain.data.loader import MicroBatchSampler, build_data, evaluation_batches, unigram_entropy
from nanotrain.data.sources import SOURCES, StoriesSource, TokensSource
from nanotrain.data.stories import generate_stories
from nanotrain.errors import ConfigError, DataError, PrepareError

T = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    stories = generate_stories(300, seed=2)
    out = tmp_path_factory.mktemp("data") / "ds"
    write_dataset(lambda: ((s, 0) for s in stories), out, sources=[{"name": "test"}], total_bytes=1,
                  vocab_size=400, val_fraction=0.1, seed=0, verbose=False)
    return out


def config(dataset, *overrides):
    return load_config(None, [f"--data.path={dataset}", f"--train.seq_len={T}", "--train.eval_steps=3", *overrides],
                       dataset_vocab_size)


def rows(batches):
    """Each micro-batch's sequences as tuples, in order."""
    return [tuple(r.tolist()) for b in batches for r in b["input_ids"]]


def step_rows(dataset, world, batch, accum, steps, *extra):
    """Per optimizer step, the sequences all ranks saw together (layout: world x batch x accum)."""
    cfg = config(dataset, f"--train.batch_size={batch}", f"--train.grad_accum_steps={accum}", *extra)
    loaders = [build_data(cfg, r, world).train for r in range(world)]
    return [sorted(rows(next(loaders[r]) for r in range(world) for _ in range(accum))) for _ in range(steps)]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_same_sequences_per_step_whatever_the_layout(dataset, mode):
    single = step_rows(dataset, 1, 8, 1, 4, f"--data.mode={mode}")
    assert step_rows(dataset, 2, 4, 1, 4, f"--data.mode={mode}") == single  # 2 ranks x B/2
    assert step_rows(dataset, 1, 4, 2, 4, f"--data.mode={mode}") == single  # 1 x B/2 x accum 2
    assert step_rows(dataset, 2, 2, 2, 4, f"--data.mode={mode}") == single  # 2 ranks x B/4 x accum 2
    if mode == "packed":  # (padded rows of T=32 are story openings, which repeat)
        assert len({r for step in single for r in step}) == 32  # the steps hold different sequences


def test_rank_shards_are_disjoint_and_cover_the_epoch(dataset):
    cfg = config(dataset, "--train.batch_size=4")
    order = build_data(cfg, 0, 2).train.order
    samplers = [MicroBatchSampler(order, 4, r, 2) for r in range(2)]
    n = order.num_samples
    full = n // 8  # micro-batches whose 8 global positions all lie in epoch 0
    shards = [[i for k in range(full) for i in samplers[r].indices(k)] for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    in_order = [i for k in range(full + 1) for r in range(2) for i in samplers[r].indices(k)]
    assert sorted(in_order[:n]) == list(range(n))  # every sample exactly once per epoch
    epoch1 = [order.sample(n + j) for j in range(n)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != in_order[:n]  # the next epoch: a new shuffle


@pytest.mark.parametrize("mode,workers", [("packed", 0), ("padded", 0), ("packed", 1)])
def test_resume_gives_the_identical_next_batches(dataset, mode, workers):
    cfg = config(dataset, "--train.batch_size=4", f"--data.mode={mode}", f"--data.num_workers={workers}")
    first = build_data(cfg, 1, 2).train
    per_epoch_micro = first.order.num_samples // 8
    for _ in range(per_epoch_micro - 1):  # stop just before an epoch boundary, so resume crosses it
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 0 and all(isinstance(v, int) for v in state.values())
    expected = [next(first) for _ in range(4)]
    resumed = build_data(cfg, 1, 2).train
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_on_another_world_size(dataset):
    """Saved by 2 ranks x B/2 at a step boundary, resumed by 1 process x B: same next global batch."""
    two = [build_data(config(dataset, "--train.batch_size=4"), r, 2).train for r in range(2)]
    for _ in range(3):
        for loader in two:
            next(loader)
    state = two[0].state_dict()
    one = build_data(config(dataset, "--train.batch_size=8"), 0, 1).train
    one.load_state_dict(state)
    assert rows([next(one)]) == rows([next(two[0]), next(two[1])])


def test_packed_samples_are_windows_of_the_token_stream(dataset):
    data = build_data(config(dataset, "--train.batch_size=4"), 0, 1)
    tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16).astype(np.int64)
    batch = next(data.train)
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    for row, i in zip(batch["input_ids"], MicroBatchSampler(data.train.order, 4, 0, 1).indices(0)):
        assert row.tolist() == tokens[i * T : (i + 1) * T].tolist()


def test_padded_rows_are_left_padded_documents(dataset):
    T = 270  # the stories hold 209 to 385 tokens: some rows are padded, some truncated
    data = build_data(config(dataset, "--train.batch_size=8", "--data.mode=padded", f"--train.seq_len={T}",
                             "--model.max_position_embeddings=512"), 0, 1)
    tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16).astype(np.int64)
    offsets = np.fromfile(dataset / "train.idx", dtype=np.uint64).astype(np.int64)
    batch = next(data.train)
    pad = data.tokenizer.pad_id
    for k, i in enumerate(MicroBatchSampler(data.train.order, 8, 0, 1).indices(0)):
        doc = tokens[offsets[i] : offsets[i + 1]][:T].tolist()
        n = len(doc)
        assert batch["input_ids"][k].tolist() == [pad] * (T - n) + doc
        assert batch["attention_mask"][k].tolist() == [0] * (T - n) + [1] * n
        assert batch["labels"][k].tolist() == [-100] * (T - n) + doc
    assert (batch["attention_mask"] == 0).any()  # some stories are shorter than T ... and
    assert (batch["attention_mask"].sum(1) == T).any()  # ... some were truncated to T


def test_random_source_follows_the_contract_with_uneven_padding():
    cfg = load_config(None, ["--data.source=random", "--data.mode=padded", "--model.vocab_size=50",
                             f"--train.seq_len={T}", "--train.batch_size=4"])
    one = build_data(cfg, 0, 1)
    assert one.tokenizer is None and one.identity["source"] == "random" and one.vocab_size == 50
    batches = [next(one.train) for _ in range(3)]
    assert all(b["input_ids"].max() < 50 for b in batches)
    valid = [int((b["labels"] != -100).sum()) for b in batches]
    assert len(set(valid)) > 1  # micro-batches hold different numbers of valid tokens
    cfg2 = load_config(None, ["--data.source=random", "--data.mode=padded", "--model.vocab_size=50",
                              f"--train.seq_len={T}", "--train.batch_size=2"])
    two = [build_data(cfg2, r, 2).train for r in range(2)]
    again = [torch.cat([next(two[0])["input_ids"], next(two[1])["input_ids"]]) for _ in range(3)]
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(again, batches))


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_val_set_union_is_the_same_across_world_sizes(dataset, mode):
    one = list(build_data(config(dataset, "--train.batch_size=4", f"--data.mode={mode}"), 0, 1).val_batches())
    two = [list(build_data(config(dataset, "--train.batch_size=2", f"--data.mode={mode}"), r, 2).val_batches())
           for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) > 3  # a small split: all of it, not eval_steps batches
    for k in range(len(one)):
        assert rows([one[k]]) == rows([two[0][k], two[1][k]])
    assert one[0]["input_ids"].shape == (4, T)


def test_small_val_split_is_evaluated_whole(dataset):
    data = build_data(config(dataset, "--train.batch_size=16", "--train.eval_steps=1", "--data.mode=padded"), 0, 1)
    n_val = build_data(config(dataset, "--data.mode=padded"), 0, 1)._val_samples.split.num_documents
    assert data.num_val_batches == len(list(data.val_batches())) == -(-n_val // 16) > 1 and not data.notes
    assert data.val_windows == data.val_windows_total == n_val


def test_build_errors_are_one_line(dataset, tmp_path):
    with pytest.raises(DataError, match="does not exist; make it with"):
        build_data(config(tmp_path / "nowhere"), 0, 1)
    (tmp_path / "afile").write_text("not a dataset")
    for vocab in ([], ["--model.vocab_size=400"]):  # found resolving the vocabulary, or opening the data
        with pytest.raises(DataError, match=re.escape(f"data.path '{tmp_path / 'afile'}' is a file, not a directory")):
            build_data(config(tmp_path / "afile", *vocab), 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        build_data(config(tmp_path / "empty"), 0, 1)
    with pytest.raises(DataError, match="set --model.vocab_size=400"):
        build_data(config(dataset, "--model.vocab_size=300"), 0, 1)
    words = r"fewer than one optimizer step needs \(grad_accum_steps x data-parallel ranks x batch_size"
    with pytest.raises(DataError, match=words):
        build_data(config(dataset, "--train.batch_size=3000"), 0, 1)


def test_unigram_entropy_matches_a_hand_computation(dataset):
    tokens = np.fromfile(dataset / "val.bin", dtype=np.uint16)
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    assert unigram_entropy(dataset, "val") == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    assert 0 < unigram_entropy(dataset) < np.log(400)


# ----------------------------------------------------------------------------- data.path decides the data


def test_data_path_alone_means_the_dataset_and_its_vocabulary(dataset, tmp_path):
    cfg = load_config(None, [f"--data.path={dataset}"], dataset_vocab_size)
    assert cfg.data.source == "tokens" and cfg.model.vocab_size == 400
    saved = tmp_path / "config.toml"
    saved.write_text(cfg.to_toml())
    assert load_config(str(saved)) == cfg  # the resolved values are what is saved
    assert load_config(None, [f"--data.path={dataset}", "--data.source=tokens"], dataset_vocab_size) == cfg
    with pytest.raises(ConfigError, match="set --model.vocab_size to the dataset's vocabulary"):
        load_config(None, [f"--data.path={dataset}"])  # a caller that reads no dataset (config is a foundation)
    assert load_config(None, ["--data.stories_vocab_size=512"]).model.vocab_size == 512  # the built-in corpus's
    for source in ("stories", "random"):
        with pytest.raises(ConfigError, match=re.escape(
                f"data.path = '{dataset}' names a prepared dataset but data.source = '{source}'; "
                "pass --data.source=tokens")):
            load_config(None, [f"--data.source={source}", f"--data.path={dataset}"])
    stories_run = load_config(None)
    saved.write_text(stories_run.to_toml())  # a stories run's saved config sets its source explicitly
    moved = load_config(str(saved), [f"--data.path={dataset}"])  # the command line wins over the file
    assert moved.data.source == "tokens" and moved.model.vocab_size == stories_run.model.vocab_size
    saved.write_text(f'[data]\nsource = "stories"\npath = "{dataset}"\n')  # one file saying both
    with pytest.raises(ConfigError, match="but data.source = 'stories'"):
        load_config(str(saved))


def test_vocab_size_below_the_data_is_refused_and_above_it_noted(dataset):
    with pytest.raises(DataError, match="has a 400-token vocabulary but model.vocab_size is 300; "
                                        "set --model.vocab_size=400"):
        build_data(config(dataset, "--model.vocab_size=300"), 0, 1)
    notes = build_data(config(dataset, "--model.vocab_size=512"), 0, 1).notes
    assert notes[0] == ("model.vocab_size (512) exceeds the data's 400-token vocabulary: 112 embedding rows never "
                        "see a token (--model.vocab_size=400 fits exactly)")
    assert not any("vocab" in note for note in build_data(config(dataset), 0, 1).notes)


def test_a_run_on_data_path_alone_saves_and_resumes_its_resolved_config(dataset, tmp_path):
    from nanotrain.training.trainer import train

    run = tmp_path / "run"
    tiny = [f"--data.path={dataset}", f"--train.out_dir={run}", "--model.n_layers=1", "--model.d_model=32",
            "--model.n_heads=2", "--model.d_ff=64", f"--train.seq_len={T}", "--train.batch_size=4",
            "--train.eval_every=0", "--train.eval_steps=1", "--train.sample_tokens=0", "--train.log_every=1",
            "--optim.warmup_steps=1", "--checkpoint.interval=2", "--checkpoint.on_preempt=false",
            "--train.peak_tflops=1"]
    first = train(load_config(None, tiny + ["--train.max_steps=2"], dataset_vocab_size))
    assert first.model.tok_embeddings.num_embeddings == 400
    again = load_config(str(run / "config.toml"), ["--train.max_steps=3"])
    assert again == load_config(None, tiny + ["--train.max_steps=3"], dataset_vocab_size)
    assert set(train(again).losses) == {3}  # resumed from the step-2 checkpoint


# ----------------------------------------------------------------------------- damaged datasets


def copy_of(dataset, tmp_path, change_meta=None):
    """A copy of the dataset to damage; `change_meta(meta)` returns the meta.json to write instead."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    if change_meta is not None:
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps(change_meta(meta)))
    return copy


def with_split(meta, split, **change):
    return {**meta, "splits": {**meta["splits"], split: {**meta["splits"][split], **change}}}


META_DAMAGE = {
    "no splits": (lambda m: {k: v for k, v in m.items() if k != "splits"}, "has no 'splits' entries 'train' and 'val'"),
    "no val split": (lambda m: {**m, "splits": {"train": m["splits"]["train"]}}, "has no 'splits' entries"),
    "bogus dtype": (lambda m: {**m, "dtype": "float99"}, "has dtype 'float99', not uint16 or uint32"),
    "narrow dtype": (lambda m: {**m, "vocab_size": 70000},
                     "has dtype 'uint16', not uint16 or uint32 wide enough for 70000"),
    "vocab as text": (lambda m: {**m, "vocab_size": "400"}, "has vocab_size '400', not a positive integer"),
    "tokenizer elsewhere": (lambda m: {**m, "tokenizer": {**m["tokenizer"], "file": "../tokenizer.model"}},
                            "not a file name in the dataset and its sha256"),
    "negative token count": (lambda m: with_split(m, "train", tokens=-1), "has splits.train = "),
    "file outside": (lambda m: with_split(m, "val", file="/etc/passwd"), "has splits.val = "),
    "pad id beyond vocab": (lambda m: {**m, "pad_id": 400}, "has pad_id 400, not a token id below vocab_size 400"),
    "max id beyond vocab": (lambda m: {**m, "max_token_id": 400}, "has max_token_id 400, not a token id below"),
    "no identity": (lambda m: {**m, "identity": None}, "has identity None, not a hash string"),
    "not an object": (lambda m: [m], "is not a prepared dataset (no readable meta.json)"),
}


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchelastic's record() under pytest
@pytest.mark.parametrize("case", sorted(META_DAMAGE))
def test_a_damaged_meta_json_is_one_line_from_the_command_line(case, dataset, tmp_path, capsys):
    from nanotrain.train import main

    change, phrase = META_DAMAGE[case]
    copy = copy_of(dataset, tmp_path, change)
    with pytest.raises(SystemExit) as exit_info:  # refused while the config is resolved, before any work
        main([f"--data.path={copy}", f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=1",
              "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.d_ff=64"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    with pytest.raises(DataError, match=re.escape(phrase)):  # and likewise where the vocabulary is given
        build_data(config(copy, "--model.vocab_size=512"), 0, 1)


def test_damaged_document_offsets_are_refused(dataset, tmp_path):
    copy = copy_of(dataset, tmp_path)
    offsets = np.fromfile(copy / "train.idx", dtype=np.uint64)
    offsets[[5, 6]] = offsets[[6, 5]]
    offsets.tofile(copy / "train.idx")
    with pytest.raises(DataError, match=re.escape(
            f"train.idx does not hold increasing document offsets from 0 to {offsets[-1]}; prepare it again")):
        build_data(config(copy), 0, 1)


def test_a_dataset_prepared_before_max_token_id_was_recorded_is_read(dataset, tmp_path):
    copy = copy_of(dataset, tmp_path, lambda m: {k: v for k, v in m.items() if k != "max_token_id"})
    assert "max_token_id" in json.loads((dataset / "meta.json").read_text())
    assert torch.equal(next(build_data(config(copy), 0, 1).train)["input_ids"],
                       next(build_data(config(dataset), 0, 1).train)["input_ids"])


@pytest.mark.parametrize("split,workers", [("train", 0), ("train", 1), ("val", 0)])
def test_token_ids_outside_the_vocabulary_stop_before_the_model(dataset, tmp_path, split, workers):
    copy = copy_of(dataset, tmp_path)
    tokens = np.fromfile(copy / f"{split}.bin", dtype=np.uint16)
    tokens[::T] = 60000  # the first token of every packed sample
    tokens.tofile(copy / f"{split}.bin")
    data = build_data(config(copy, "--train.batch_size=4", f"--data.num_workers={workers}"), 0, 1)
    with pytest.raises(DataError, match=re.escape(
            f"'{copy / split}.bin' holds token id 60000, outside the dataset's 400-token vocabulary")):
        next(data.train if split == "train" else data.val_batches())


def test_an_unwritable_corpus_cache_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = load_config(None, ["--data.stories_count=20"])
    for cache in (blocker, blocker / "sub"):
        monkeypatch.setenv("NANOTRAIN_CACHE", str(cache))
        with pytest.raises(PrepareError, match=re.escape(
                f"cannot write the built-in corpus cache '{cache}' ('{blocker}' is a file, not a directory); "
                "set NANOTRAIN_CACHE to a writable directory")):
            build_data(cfg, 0, 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="file permissions do not bind root")
def test_a_read_only_corpus_cache_is_named(tmp_path, monkeypatch):
    cfg = load_config(None, ["--data.stories_count=20"])
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    monkeypatch.setenv("NANOTRAIN_CACHE", str(read_only))
    with pytest.raises(PrepareError, match=re.escape(
            f"cannot write the built-in corpus cache '{read_only}' (Permission denied)")):
        build_data(cfg, 0, 1)


# ---- the walls: one format module, sources behind one interface, the data-parallel axis, evaluation batches ----


def test_the_format_module_reads_back_what_it_wrote(tmp_path):
    """Documents in, BOS + tokens + EOS per document out, split by the seeded draw, offsets at the boundaries."""
    stories = generate_stories(200, seed=3)
    out = tmp_path / "ds"
    write_dataset(lambda: ((s, 0) for s in stories), out, sources=[{"name": "t"}], total_bytes=1, vocab_size=320,
                  val_fraction=0.2, seed=4, verbose=False)
    meta = open_meta(out)
    tokenizer = open_tokenizer(out, meta)
    is_val = np.random.default_rng(4).random(len(stories)) < 0.2
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        token_split = TokenSplit(out, split, meta)
        documents = [tokenizer.encode(s, bos=True, eos=True) for s, keep in zip(stories, chosen) if keep]
        assert token_split.tokens.dtype == np.uint16 and token_split.num_documents == len(documents) > 0
        assert token_split.tokens.tolist() == [t for doc in documents for t in doc]
        assert token_split.offsets.tolist() == np.cumsum([0] + [len(d) for d in documents]).tolist()


class CountingSamples(torch.utils.data.Dataset):
    """Sample i = (i, i+1, ..., i+T-1) mod 64: its position in the order can be read off its first token."""

    def __init__(self, seq_len: int, offset: int):
        self.seq_len, self.offset = seq_len, offset

    def __len__(self):
        return 64

    def __getitem__(self, i):
        window = (torch.arange(self.seq_len) + i + self.offset) % 64
        return {"input_ids": window, "labels": window.clone()}

    def check(self, batch):
        return batch


class CountingSource:
    """A data source written in a test: one class and one SOURCES entry make it trainable."""

    name, shuffle, tokenizer, path, vocab_size = "counting", False, None, None, 64
    identity = {"source": "counting"}

    @classmethod
    def from_config(cls, data, model_vocab_size, seed, verbose):
        return cls()

    def samples(self, split, seq_len, padded):
        return CountingSamples(seq_len, offset=32 if split == "val" else 0)


def test_a_new_source_is_one_class_and_one_entry(monkeypatch):
    monkeypatch.setitem(SOURCES, "counting", CountingSource)
    cfg = load_config(None, ["--data.source=random", "--model.vocab_size=64", "--train.seq_len=8",
                             "--train.batch_size=2", "--train.eval_steps=2"])
    cfg.data.source = "counting"  # (config validation knows only the built-in sources)
    data = build_data(cfg, dp_rank=1, dp_size=2)  # keyword names: the data-parallel axis
    assert data.identity == {"source": "counting"} and data.tokenizer is None and data.notes == []
    # rank 1 of 2 with B = 2 takes global positions [2, 4), then [6, 8): the unshuffled order
    assert [b["input_ids"][:, 0].tolist() for b in (next(data.train), next(data.train))] == [[2, 3], [6, 7]]
    assert [b["input_ids"][:, 0].tolist() for b in data.val_batches()][:2] == [[34, 35], [38, 39]]


def test_the_stories_source_reads_its_cache_like_a_prepared_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_CACHE", str(tmp_path))
    stories = StoriesSource.from_config(DataConfig(stories_count=200, stories_vocab_size=320), 320, 0, verbose=False)
    tokens = TokensSource(stories.path)
    assert stories.path.parent == tmp_path and stories.vocab_size == tokens.vocab_size == 320
    assert stories.identity == {**tokens.identity, "source": "stories"}
    assert stories.tokenizer.sha256 == tokens.tokenizer.sha256
    for split in ("train", "val"):
        mine, theirs = stories.samples(split, T, padded=True), tokens.samples(split, T, padded=True)
        assert len(mine) == len(theirs) > 0 and all(torch.equal(mine[0][k], theirs[0][k]) for k in mine[0])


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_evaluation_batches_are_the_loaders_batches(dataset, mode):
    data = build_data(config(dataset, "--train.batch_size=4", f"--data.mode={mode}"), 0, 1)
    source, padded = TokensSource(dataset), mode == "padded"
    val = evaluation_batches(source, "val", T, 4, padded, seed=0, max_batches=3)
    assert val.count == 3 and rows(val.batches) == rows(data.val_batches())[:12]
    every = evaluation_batches(source, "val", T, 4, padded, seed=0)
    n_val = len(data._val_samples)  # by default the whole split, in order
    assert every.count == -(-n_val // 4) > 3 and every.windows == n_val
    assert rows(every.batches) == rows(data.val_batches())  # what training logs as val loss
    assert rows(evaluation_batches(source, "val", T, 4, padded, seed=0).batches)[:n_val] == [
        tuple(data._val_samples[i]["input_ids"].tolist()) for i in range(n_val)]
    seed = data.train.order.seed  # train.seed, whose permutation of epoch 0 training follows
    train = evaluation_batches(source, "train", T, 4, padded, seed, max_batches=2)
    # epoch 0, training's order
    assert train.count == 2 and rows(train.batches) == rows(next(data.train) for _ in range(2))
    assert evaluation_batches(source, "train", T, 4, padded, seed).count == data.train.order.num_samples // 4


def test_evaluation_of_a_val_split_smaller_than_a_batch_fills_it_with_ignored_rows(dataset):
    source = TokensSource(dataset)
    n_val = len(source.samples("val", T, padded=True))
    chosen = evaluation_batches(source, "val", T, n_val + 3, padded=True, seed=0)
    (batch,) = list(chosen.batches)
    assert chosen.count == 1 and (batch["labels"][:n_val] != -100).any(dim=1).all()
    assert (batch["labels"][n_val:] == -100).all()  # the 3 rows past the split count for nothing
