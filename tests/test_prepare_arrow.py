"""nanotrain.prepare on parquet and Arrow (HF `datasets`) inputs: the same dataset as from text, clean errors."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from nanotrain.data.dataset_format import open_meta
from nanotrain.data.stories import generate_stories
from nanotrain.data.tokenizer import Tokenizer
from nanotrain.files import sha256_file
from nanotrain.prepare import main, prepare

DOCS = generate_stories(300, seed=5)
DATASET_FILES = ("train.bin", "val.bin", "train.idx", "val.idx", "tokenizer.model")


def table(docs, field="text", categorical=False) -> pa.Table:
    column = pa.array(docs, pa.string())
    return pa.table({"id": list(range(len(docs))), field: column.dictionary_encode() if categorical else column})


def write_parquet(path, docs, field="text", categorical=False):
    pq.write_table(table(docs, field, categorical), path, row_group_size=64)  # several row groups and batches
    return path


def write_arrow(path, docs, field="text", stream=True):
    """Arrow IPC, as `datasets.Dataset.save_to_disk` writes it (stream) or in the random-access file format."""
    data = table(docs, field)
    with pa.OSFile(str(path), "wb") as f, (pa.ipc.new_stream if stream else pa.ipc.new_file)(f, data.schema) as w:
        for batch in data.to_batches(max_chunksize=50):
            w.write_batch(batch)
    return path


def save_dataset_dict(root, splits: dict, field="text"):
    """What `datasets.DatasetDict.save_to_disk(root)` writes: dataset_dict.json, and per split a saved Dataset
    directory (data-*.arrow in the IPC stream format, state.json listing them, dataset_info.json)."""
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, docs in splits.items():
        (root / name).mkdir()
        write_arrow(root / name / "data-00000-of-00001.arrow", docs, field)
        (root / name / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": f"{hash(name) & 0xFFFF:016x}",
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
            "_split": name}))
        (root / name / "dataset_info.json").write_text(json.dumps({
            "citation": "", "description": "", "homepage": "", "license": "",
            "features": {"id": {"dtype": "int64", "_type": "Value"}, field: {"dtype": "string", "_type": "Value"}}}))
    return root


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def same_files(a, b) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in DATASET_FILES)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_parquet_and_arrow_give_the_dataset_the_same_texts_give(tmp_path, capsys):
    reference = tmp_path / "from-jsonl"
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", DOCS, "story"))], reference, vocab_size=400,
            text_field="story", val_fraction=0.1, verbose=False)
    # blank and null rows are skipped like empty documents in text files; the nulls are counted in a note
    with_blanks = DOCS[:10] + ["   ", None] + DOCS[10:150] + [None] + DOCS[150:]  # in different row groups
    parquet = write_parquet(tmp_path / "docs.parquet", with_blanks, "story")
    capsys.readouterr()
    meta = prepare([str(parquet)], tmp_path / "from-parquet", vocab_size=400, text_field="story", val_fraction=0.1,
                   verbose=False)  # trains the tokenizer from parquet too
    assert capsys.readouterr().err == f"note: skipped 2 rows whose 'story' is null ({parquet}: 2)\n"
    assert same_files(reference, tmp_path / "from-parquet")
    assert meta["sources"] == [{"name": "docs.parquet", "bytes": parquet.stat().st_size,
                                "sha256": sha256_file(parquet), "format": "parquet"}]
    tokenizer = str(reference / "tokenizer.model")
    for stream in (True, False):
        arrow = write_arrow(tmp_path / f"docs-{stream}.arrow", DOCS, "story", stream=stream)
        prepare([str(arrow)], tmp_path / f"from-arrow-{stream}", tokenizer=tokenizer,
                text_field="story", val_fraction=0.1, verbose=False)
        prepare([str(write_jsonl(tmp_path / f"docs-{stream}.jsonl", DOCS, "story"))], tmp_path / f"ref-{stream}",
                tokenizer=tokenizer, text_field="story", val_fraction=0.1, verbose=False)
        assert same_files(tmp_path / f"ref-{stream}", tmp_path / f"from-arrow-{stream}")


def test_directory_mixing_text_parquet_and_a_saved_datasets_directory(tmp_path):
    data = tmp_path / "data"
    (data / "hf").mkdir(parents=True)
    (data / "a.txt").write_text("".join(f"{d}\n<|endoftext|>\n" for d in DOCS[:100]))
    write_parquet(data / "b.parquet", DOCS[100:200], categorical=True)  # as pandas writes a categorical column
    # what Dataset.save_to_disk writes, plus a Dataset.map cache file that is not part of the dataset
    write_arrow(data / "hf" / "data-00000-of-00001.arrow", DOCS[200:])
    write_arrow(data / "hf" / "cache-1234abcd.arrow", ["derived data, not a document"] * 5)
    (data / "hf" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (data / "hf" / "dataset_info.json").write_text("{}")
    meta = prepare([str(data)], tmp_path / "mixed", vocab_size=400, val_fraction=0.1, verbose=False)
    prepare([str(write_jsonl(tmp_path / "all.jsonl", DOCS))], tmp_path / "reference", vocab_size=400,
            val_fraction=0.1, verbose=False)
    assert same_files(tmp_path / "reference", tmp_path / "mixed")
    assert [(s["name"], s["format"]) for s in meta["sources"]] == [
        ("a.txt", "delimited"), ("b.parquet", "parquet"), ("data-00000-of-00001.arrow", "arrow")]


def _bad_inputs(tmp):
    write_parquet(tmp / "ok.parquet", DOCS[:50])
    (tmp / "cut.parquet").write_bytes((tmp / "ok.parquet").read_bytes()[:-200])
    (tmp / "cut.arrow").write_bytes(write_arrow(tmp / "whole.arrow", DOCS[:50]).read_bytes()[:3000])
    (tmp / "junk.arrow").write_bytes(b"not arrow at all\n" * 10)
    return {
        "missing column": ([str(tmp / "ok.parquet"), "--text_field", "body"],
                           "ok.parquet' has no column 'body' (it has: id, text); pass --text_field NAME"),
        "non-string column": ([str(tmp / "ok.parquet"), "--text_field", "id"],
                              "ok.parquet' column 'id' holds int64, not strings"),
        "corrupt parquet": ([str(tmp / "cut.parquet")], "cut.parquet' is not a readable parquet file"),
        "truncated arrow": ([str(tmp / "cut.arrow")], "cut.arrow' is not a readable arrow file"),
        "not arrow": ([str(tmp / "junk.arrow")], "junk.arrow' is not a readable arrow file"),
    }


@pytest.mark.parametrize("case", ["missing column", "non-string column", "corrupt parquet", "truncated arrow",
                                  "not arrow"])
def test_each_bad_columnar_input_gives_one_line_and_leaves_nothing(case, tmp_path, capsys):
    assert_one_line_and_nothing_left(*_bad_inputs(tmp_path)[case], tmp_path, capsys)


def assert_one_line_and_nothing_left(args, phrase, tmp_path, capsys):
    before = leftovers(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "out"), "--vocab_size", "300", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    assert leftovers(tmp_path) == before


def test_missing_pyarrow_names_the_pip_command(tmp_path, capsys, monkeypatch):
    write_parquet(tmp_path / "ok.parquet", DOCS[:50])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "ok.parquet"), "--out", str(tmp_path / "out"), "--vocab_size", "300", "--quiet"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: reading .parquet and .arrow inputs needs pyarrow; "
                                       "pip install 'nanotrain[parquet]' (or pip install pyarrow)\n")


@pytest.mark.parametrize("fmt, write", [("parquet", write_parquet), ("arrow", write_arrow)])
def test_format_parquet_or_arrow_reads_a_file_whatever_its_name(fmt, write, tmp_path):
    shard = write(tmp_path / "shard-00000", DOCS)  # e.g. a blob of the Hub cache: no suffix to go by
    main([str(shard), "--format", fmt, "--out", str(tmp_path / "ds"), "--vocab_size", "400", "--val_fraction", "0.1",
          "--quiet"])
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", DOCS))], tmp_path / "reference", vocab_size=400,
            val_fraction=0.1, verbose=False)
    assert same_files(tmp_path / "reference", tmp_path / "ds")


def test_a_dataset_dict_trains_on_its_train_split_and_validates_on_its_validation_split(tmp_path, capsys):
    saved = save_dataset_dict(tmp_path / "saved", {"train": DOCS[:250], "validation": DOCS[250:],
                                                   "test": ["A test story that no split may take."] * 3})
    meta = prepare([str(saved)], tmp_path / "from-dict", vocab_size=400, verbose=False)
    assert "note: DatasetDict '" in capsys.readouterr().err  # the test split is named as unused
    assert meta["splits"]["val"]["documents"] == 50 and meta["splits"]["train"]["documents"] == 250
    assert [(s["name"], s["split"]) for s in meta["sources"]] == [("data-00000-of-00001.arrow", "train"),
                                                                  ("data-00000-of-00001.arrow", "val")]
    # the same as the two splits' texts given as INPUT and --val: nothing drawn, nothing merged
    prepare([str(write_jsonl(tmp_path / "train.jsonl", DOCS[:250]))], tmp_path / "reference",
            val_inputs=[str(write_jsonl(tmp_path / "validation.jsonl", DOCS[250:]))], vocab_size=400, verbose=False)
    assert same_files(tmp_path / "reference", tmp_path / "from-dict")
    # the tokenizer learned from the train split alone: the held-out split stays held out
    prepare([str(write_jsonl(tmp_path / "train-only.jsonl", DOCS[:250]))], tmp_path / "train-only", vocab_size=400,
            val_fraction=0.1, verbose=False)
    trained = [(tmp_path / name / "tokenizer.model").read_bytes() for name in ("train-only", "from-dict")]
    assert trained[0] == trained[1]


def test_a_dataset_dict_without_a_validation_split_draws_the_val_set_from_train_with_a_note(tmp_path, capsys):
    saved = save_dataset_dict(tmp_path / "saved", {"train": DOCS, "test": DOCS[:20]})
    meta = prepare([str(saved)], tmp_path / "ds", vocab_size=400, val_fraction=0.1, verbose=False)
    prepare([str(saved / "train")], tmp_path / "reference", vocab_size=400, val_fraction=0.1, verbose=False)
    assert same_files(tmp_path / "reference", tmp_path / "ds") and meta["splits"]["val"]["documents"] > 0
    assert capsys.readouterr().err.splitlines() == [
        f"note: DatasetDict '{saved}' has no validation split: the val set is drawn from its 'train' split "
        "(--val_fraction); pass --val DIR to take it from elsewhere",
        f"note: DatasetDict '{saved}' also holds the split 'test', not used; pass its directory '{saved / 'test'}' "
        "as an INPUT or with --val to use it"]


def test_a_split_prepared_as_a_val_only_dataset(tmp_path):
    save_dataset_dict(tmp_path / "saved", {"train": DOCS[:250], "validation": DOCS[250:]})
    prepare([str(tmp_path / "saved" / "train")], tmp_path / "train", vocab_size=400, verbose=False)
    tokenizer = tmp_path / "train" / "tokenizer.model"
    main(["--val", str(tmp_path / "saved" / "validation"), "--tokenizer", str(tokenizer),
          "--out", str(tmp_path / "val-only"), "--quiet"])
    meta = open_meta(tmp_path / "val-only")
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (0, 50)
    ids = np.fromfile(tmp_path / "val-only" / "val.bin", dtype=meta["dtype"]).tolist()
    assert ids == [i for doc in DOCS[250:] for i in Tokenizer.load(tokenizer).encode(doc, bos=True, eos=True)]


def _bad_splits(tmp):
    save_dataset_dict(tmp / "saved", {"train": DOCS[:40], "validation": DOCS[40:50]})
    save_dataset_dict(tmp / "no-train", {"train_sft": DOCS[:40], "test": DOCS[40:50]})
    (tmp / "data").mkdir()
    save_dataset_dict(tmp / "data" / "nested", {"train": DOCS[:40], "validation": DOCS[40:50]})
    return {
        "val_fraction with a validation split": (
            [str(tmp / "saved"), "--val_fraction", "0.1"],
            "--val_fraction 0.1 draws the val set from the inputs, but it is given (--val, or a DatasetDict's "
            "validation split); drop --val_fraction"),
        "no train split": ([str(tmp / "no-train")],
                           f"DatasetDict '{tmp / 'no-train'}' has no 'train' split (it has: train_sft, test); pass the "
                           f"directory of the split to train on as INPUT (e.g. '{tmp / 'no-train' / 'train_sft'}')"),
        "a dataset dict as --val": ([str(tmp / "saved" / "train"), "--val", str(tmp / "saved")],
                                    f"--val '{tmp / 'saved'}' is a DatasetDict (splits: train, validation); name the "
                                    f"directory of one split, e.g. --val {tmp / 'saved' / 'validation'}"),
        "a dataset dict inside a directory": ([str(tmp / "data")],
                                              f"input directory '{tmp / 'data'}' holds a DatasetDict, "
                                              f"'{tmp / 'data' / 'nested'}', whose splits would be merged"),
        "val only without a tokenizer": (["--val", str(tmp / "saved" / "validation")],
                                         "a val-only dataset (no INPUT, only --val) is evaluated with the tokenizer"),
    }


@pytest.mark.parametrize("case", ["val_fraction with a validation split", "no train split", "a dataset dict as --val",
                                  "a dataset dict inside a directory", "val only without a tokenizer"])
def test_each_bad_use_of_splits_gives_one_line_and_leaves_nothing(case, tmp_path, capsys):
    assert_one_line_and_nothing_left(*_bad_splits(tmp_path)[case], tmp_path, capsys)
