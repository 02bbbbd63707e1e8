"""nanotrain.prepare on parquet and Arrow (HF `datasets`) inputs: the same dataset as from text, clean errors."""

import json
import sys

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from nanotrain.files import sha256_file
from nanotrain.prepare import main, prepare
from nanotrain.stories import generate_stories

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


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def same_files(a, b) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in DATASET_FILES)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_parquet_and_arrow_give_the_dataset_the_same_texts_give(tmp_path):
    reference = tmp_path / "from-jsonl"
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", DOCS, "story"))], reference, vocab_size=400,
            text_field="story", val_fraction=0.1, verbose=False)
    # blank and null rows are skipped like empty documents in text files
    with_blanks = DOCS[:10] + ["   ", None] + DOCS[10:]
    parquet = write_parquet(tmp_path / "docs.parquet", with_blanks, "story")
    meta = prepare([str(parquet)], tmp_path / "from-parquet", vocab_size=400, text_field="story", val_fraction=0.1,
                   verbose=False)  # trains the tokenizer from parquet too
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
    args, phrase = _bad_inputs(tmp_path)[case]
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
