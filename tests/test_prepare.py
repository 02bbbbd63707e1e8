"""nanotrain.prepare: shards equal the tokenization, splits are disjoint, bad inputs fail cleanly."""

import builtins
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanotrain.data import dataset_format
from nanotrain.data.dataset_format import token_dtype
from nanotrain.data.stories import generate_stories
from nanotrain.data.tokenizer import SentencePieceTokenizer, Tokenizer
from nanotrain.errors import PrepareError
from nanotrain.prepare import main, prepare

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DOCS = generate_stories(120, seed=11)


def write_delimited(path: Path, docs, delimiter="<|endoftext|>") -> Path:
    path.write_text("".join(f"{d}\n{delimiter}\n" for d in docs))
    return path


def read_split(out: Path, split: str, meta: dict) -> list[list[int]]:
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    offsets = np.fromfile(out / f"{split}.idx", dtype=np.uint64)
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = write_delimited(root / "corpus.txt", DOCS)
    meta = prepare([str(src)], root / "out", vocab_size=400, val_fraction=0.2, seed=7, verbose=False)
    return root / "out", meta


def test_shards_equal_the_tokenization_of_the_input(prepared):
    out, meta = prepared
    tok = Tokenizer.load(out / "tokenizer.model")
    assert tok.sha256 == meta["tokenizer"]["sha256"] and meta["dtype"] == "uint16"
    train, val = read_split(out, "train", meta), read_split(out, "val", meta)
    expected = [tok.encode(d, bos=True, eos=True) for d in DOCS]
    # the seeded draw decides each document's split; within a split input order is kept
    is_val = np.random.default_rng(7).random(len(DOCS)) < 0.2
    assert train == [e for e, v in zip(expected, is_val) if not v]
    assert val == [e for e, v in zip(expected, is_val) if v]
    assert len(val) > 0 and len(train) + len(val) == len(DOCS)  # disjoint and complete, by document
    assert meta["splits"]["val"] == {"file": "val.bin", "index": "val.idx", "documents": len(val),
                                     "tokens": sum(map(len, val))}
    assert all(doc[0] == tok.bos_id and doc[-1] == tok.eos_id for doc in train + val)
    assert meta["max_token_id"] == max(max(doc) for doc in train + val)  # what the reader checks at start-up


def test_same_command_is_a_no_op_and_a_different_dataset_is_refused(prepared, tmp_path):
    out, meta = prepared
    src = out.parent / "corpus.txt"
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare([str(src)], out, vocab_size=400, val_fraction=0.2, seed=7, verbose=False) == meta
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(PrepareError, match="already holds a different dataset; choose another --out"):
        prepare([str(src)], out, vocab_size=400, val_fraction=0.2, seed=8, verbose=False)


def test_lines_format(prepared, tmp_path):
    out, _ = prepared
    tok = Tokenizer.load(out / "tokenizer.model")
    (tmp_path / "a.txt").write_text("First story here.\n\n  Second story.  \n")
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "ds", fmt="lines", tokenizer=str(out / "tokenizer.model"),
                   val_fraction=0.0, verbose=False)
    expected = [tok.encode(t, bos=True, eos=True) for t in ["First story here.", "Second story."]]
    assert read_split(tmp_path / "ds", "train", meta) == expected
    assert meta["splits"]["val"]["documents"] == 0 and meta["tokenizer"]["trained_here"] is False


def test_directory_of_jsonl_and_delimited_files(prepared, tmp_path):
    out, _ = prepared
    tok = Tokenizer.load(out / "tokenizer.model")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    lines = [json.dumps({"story": t, "id": 1}) for t in ["Third!", "Fourth."]]
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines) + "\n")
    write_delimited(tmp_path / "in" / "sub" / "c.txt", ["Fifth.", "Sixth."])
    (tmp_path / "in" / "notes.md").write_text("ignored: not .txt or .jsonl")
    meta = prepare([str(tmp_path / "in")], tmp_path / "ds", tokenizer=str(out / "tokenizer.model"),
                   text_field="story", val_fraction=0.0, verbose=False)
    assert [(s["name"], s["format"]) for s in meta["sources"]] == [("b.jsonl", "jsonl"), ("c.txt", "delimited")]
    assert read_split(tmp_path / "ds", "train", meta) == [tok.encode(t, bos=True, eos=True)
                                                          for t in ["Third!", "Fourth.", "Fifth.", "Sixth."]]


def test_replace_invalid_utf8(prepared, tmp_path):
    out, _ = prepared
    (tmp_path / "bad.txt").write_bytes(b"good story\n<|endoftext|>\nbad \xff byte\n<|endoftext|>\n")
    meta = prepare([str(tmp_path / "bad.txt")], tmp_path / "ds", tokenizer=str(out / "tokenizer.model"),
                   replace_invalid_utf8=True, val_fraction=0.0, verbose=False)
    second = read_split(tmp_path / "ds", "train", meta)[1]
    assert Tokenizer.load(out / "tokenizer.model").decode(second) == "bad \ufffd byte"


def _bad_inputs(tmp: Path) -> dict:
    """Each bad input: (command-line arguments, a phrase the one-line error must contain)."""
    (tmp / "empty.txt").write_text("")
    (tmp / "nodelim.txt").write_text("one story\n\nanother story\n")
    (tmp / "bad.txt").write_bytes(b"fine text\n<|endoftext|>\nab\xffcd\n<|endoftext|>\n")
    write_delimited(tmp / "small.txt", DOCS[:3])
    write_delimited(tmp / "ok.txt", DOCS[:20])
    (tmp / "taken").mkdir()
    (tmp / "a_file").write_text("not a directory")
    (tmp / "taken" / "something.txt").write_text("not a dataset")
    return {
        "missing": ([str(tmp / "nope.txt"), "--vocab_size", "300"], "does not exist"),
        "empty": ([str(tmp / "empty.txt"), "--vocab_size", "300"], "is empty"),
        "no delimiter": ([str(tmp / "nodelim.txt"), "--vocab_size", "300"], "pass --format lines"),
        "invalid utf-8": ([str(tmp / "bad.txt"), "--vocab_size", "300"],
                          "bad.txt' is not valid UTF-8 at byte offset 26"),
        "vocab too large": ([str(tmp / "small.txt"), "--vocab_size", "5000"], "too large for this data"),
        "out holds other files": ([str(tmp / "ok.txt"), "--vocab_size", "300", "--out", str(tmp / "taken")],
                                  "already holds other files"),
        "no tokenizer choice": ([str(tmp / "ok.txt")], "exactly one of --vocab_size"),
        "out is a file": ([str(tmp / "ok.txt"), "--vocab_size", "300", "--out", str(tmp / "a_file")],
                          f"--out '{tmp / 'a_file'}' is a file, not a directory"),
        "out is inside a file": ([str(tmp / "ok.txt"), "--vocab_size", "300", "--out", str(tmp / "a_file" / "ds")],
                                 f"--out '{tmp / 'a_file' / 'ds'}': '{tmp / 'a_file'}' is a file, not a directory"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "no delimiter", "invalid utf-8", "vocab too large",
                                  "out holds other files", "no tokenizer choice", "out is a file",
                                  "out is inside a file"])
def test_each_bad_input_gives_one_line_and_leaves_nothing(case, tmp_path, capsys):
    args, phrase = _bad_inputs(tmp_path)[case]
    before = leftovers(tmp_path)
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    assert leftovers(tmp_path) == before  # no output dir, no temporary dir


def test_interrupt_leaves_nothing_behind(prepared, tmp_path, monkeypatch):
    out, _ = prepared
    write_delimited(tmp_path / "ok.txt", DOCS[:20])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SentencePieceTokenizer, "encode_batch", interrupted)
    before = leftovers(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "ok.txt")], tmp_path / "ds", tokenizer=str(out / "tokenizer.model"), verbose=False)
    assert leftovers(tmp_path) == before


def _refusal(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--quiet"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_is_named_as_full_at_the_output_directory(prepared, tmp_path, monkeypatch, capsys):
    out, _ = prepared
    write_delimited(tmp_path / "ok.txt", DOCS[:20])

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):  # the token files' writes fail with ENOSPC, no file named
        return builtins.open("/dev/full" if str(path).endswith(".bin") else path, mode, *args, **kwargs)

    monkeypatch.setattr(dataset_format, "open", open_on_a_full_disk, raising=False)
    before = leftovers(tmp_path)
    err = _refusal([str(tmp_path / "ok.txt"), "--out", str(tmp_path / "ds"),
                    "--tokenizer", str(out / "tokenizer.model")], capsys)
    assert err == (f"error: cannot write --out '{tmp_path / 'ds'}': its file system is out of space (No space left on "
                   "device); free some space there or choose another --out; nothing was written\n")
    assert leftovers(tmp_path) == before


def test_a_read_only_file_system_is_named_at_the_output_directory(prepared, tmp_path, monkeypatch, capsys):
    out, _ = prepared
    write_delimited(tmp_path / "ok.txt", DOCS[:20])
    (tmp_path / "ro").mkdir()
    real_mkdir = Path.mkdir

    def mkdir_on_a_read_only_file_system(self, *args, **kwargs):
        # what the kernel answers there, even to root (whom permission bits do not stop)
        if self.parent == tmp_path / "ro":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_on_a_read_only_file_system)
    err = _refusal([str(tmp_path / "ok.txt"), "--out", str(tmp_path / "ro" / "ds"), "--tokenizer",
                    str(out / "tokenizer.model")], capsys)
    # not the temporary '.ds.tmp-PID' beside it, which the user never named
    assert err == (f"error: cannot write --out '{tmp_path / 'ro' / 'ds'}': Read-only file system; "
                   "choose a writable --out; nothing was written\n")
    assert leftovers(tmp_path / "ro") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="file permissions do not bind root (the read-only test above covers it)")
def test_a_directory_without_write_permission_is_named_at_the_output_directory(prepared, tmp_path, capsys):
    out, _ = prepared
    write_delimited(tmp_path / "ok.txt", DOCS[:20])
    (tmp_path / "locked").mkdir(mode=0o555)
    err = _refusal([str(tmp_path / "ok.txt"), "--out", str(tmp_path / "locked" / "ds"), "--tokenizer",
                    str(out / "tokenizer.model")], capsys)
    assert err == (f"error: cannot write --out '{tmp_path / 'locked' / 'ds'}': Permission denied; "
                   "choose a writable --out; nothing was written\n")


def test_batched_encoding_writes_the_same_bytes_as_one_document_at_a_time(prepared, tmp_path, monkeypatch):
    out, _ = prepared
    src = write_delimited(tmp_path / "corpus.txt", DOCS)
    files = ["train.bin", "train.idx", "val.bin", "val.idx", "tokenizer.model"]

    def prepared_bytes(name: str, workers: int | None) -> list[bytes]:
        prepare([str(src)], tmp_path / name, tokenizer=str(out / "tokenizer.model"), val_fraction=0.2, seed=7,
                workers=workers, verbose=False)
        return [(tmp_path / name / f).read_bytes() for f in files]

    batched = prepared_bytes("batched", workers=2)
    # one document per encode call, and batches whose edges fall mid-stream: the split draw must not notice
    monkeypatch.setattr(dataset_format, "ENCODE_BATCH_BYTES", 1)
    assert prepared_bytes("one_at_a_time", workers=1) == batched
    monkeypatch.setattr(dataset_format, "ENCODE_BATCH_BYTES", 3000)
    assert prepared_bytes("small_batches", workers=2) == batched
    assert len(batched[2]) > 0  # val got documents, so the per-document draw was exercised


def test_command_line_exit_code_and_single_stderr_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanotrain.prepare", str(tmp_path / "nope.txt"),
                             "--out", str(tmp_path / "out"), "--vocab_size", "300"],
                            capture_output=True, text=True, cwd=REPO, env=os.environ)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: input '{tmp_path / 'nope.txt'}' does not exist"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared TinyStories samples are not next to the repo")
def test_real_tinystories_sample(tmp_path):
    meta = prepare([str(SHARED / "tinystories_v2_train_head_10k_lines.txt")], tmp_path / "ts", vocab_size=1024,
                   verbose=False)
    # 1,727 delimited stories plus the last one, cut off by the 10k-line head
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 1728
    train = np.fromfile(tmp_path / "ts" / "train.bin", dtype=np.uint16)
    assert (train == 2).sum() == meta["splits"]["train"]["documents"]


def test_uint32_for_large_vocabularies():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
