"""Turn text files into a tokenized dataset directory that training reads with `--data.path=DIR`.

    python -m nanotrain.prepare INPUT [INPUT ...] [--val VAL_INPUT ...] --out DIR (--vocab_size N | --tokenizer PATH)

INPUT is a file or a directory (its .txt, .jsonl, .parquet and .arrow files, recursively, in
sorted order). Formats (`--format`, default `auto`: .jsonl files are `jsonl`, .parquet and .arrow
files what their suffix says, everything else `delimited`):
  delimited  documents separated by a line holding only the delimiter (`<|endoftext|>`)
  lines      one document per non-empty line
  jsonl      one JSON object per line; the document is its `--text_field` (default "text")
  parquet    one document per row, in the `--text_field` column (a Hub dataset's shards)
  arrow      the same in Arrow IPC stream or file format (the `data-*.arrow` files of a
             `datasets.Dataset.save_to_disk` directory; cache files its state.json does not
             list are skipped)
A .parquet or .arrow file is read as its suffix says whatever `--format` says; `--format parquet`
or `arrow` names the format of files whose name does not. Both need pyarrow
(`pip install 'nanotrain[parquet]'`).

The output directory (format: nanotrain/data/dataset_format.py) holds train.bin/val.bin (the
documents' tokens, BOS + text + EOS, or text + EOS when BOS and EOS are one token, concatenated),
train.idx/val.idx (document offsets), the tokenizer (tokenizer.model, or tokenizer.json when
--tokenizer names a Hugging Face tokenizer.json) and meta.json (written last).

Each document goes to val with probability --val_fraction, by a draw from a generator seeded
with --seed, in input order: the split is a function of the inputs and the seed only. Unless the
val set is given: `--val VAL_INPUT` (repeatable) makes its documents val and every INPUT
document train; with no INPUT the dataset is val only (to evaluate on; needs --tokenizer). An
INPUT that is a saved `datasets.DatasetDict` (dataset_dict.json beside one directory per split)
gives its `train` split as train and its `validation` split (or `valid`, `val`) as the val set;
other splits are left out with a note, and without a validation split the val set is drawn
from `train`.

Encoding runs on all cores (sentencepiece's C++ threads, --workers sets how many; a tokenizer.json
uses the tokenizers library's thread pool, one thread with --workers 1). Everything
is written into a hidden temporary directory next to --out and renamed only when complete,
so an error or Ctrl-C never leaves a dataset that looks usable; a read-only or full disk is
named as the --out given. Running the same command again is a no-op; pointing --out at a
different dataset is refused. Docs: docs/03-data.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

from nanotrain.data.dataset_format import DEFAULT_VAL_FRACTION, log, write_dataset
from nanotrain.errors import ArgumentParser, PrepareError, exit_on_error
from nanotrain.files import sha256_file

DEFAULT_DELIMITER = "<|endoftext|>"
COLUMNAR_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}  # by suffix, whatever --format says
FORMATS = ("auto", "delimited", "lines", "jsonl", *COLUMNAR_FORMATS.values())
INPUT_SUFFIXES = (".txt", ".jsonl", *COLUMNAR_FORMATS)
PARQUET_BATCH_ROWS = 4096  # rows read at a time: memory stays flat however large a row group is
DATASET_DICT_FILE = "dataset_dict.json"  # beside the split directories of a saved datasets.DatasetDict
TRAIN_SPLIT = "train"
VALIDATION_SPLITS = ("validation", "valid", "val")  # what a DatasetDict's val split is called, first found wins


# ----------------------------------------------------------------------------- reading inputs


def find_sources(inputs: list[str], fmt: str = "auto", val_inputs: list[str] = ()) -> tuple[list[dict], list[str]]:
    """Resolve INPUT and --val arguments to files, each with its format, size and split; errors for bad inputs.

    A source's "split" is None when the val set is drawn from the documents (--val_fraction); when a
    val set is given (--val, or the validation split of a DatasetDict INPUT) it is "val" for those
    files and "train" for every other. Also returns notes for the user (splits left unused).
    """
    if fmt not in FORMATS:
        raise PrepareError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not inputs and not val_inputs:
        raise PrepareError("no inputs given; pass one or more text files or directories")
    files: list[tuple[Path, str]] = []  # (file, "train" or "val")
    notes: list[str] = []
    for name in inputs:
        splits = _dataset_dict_splits(Path(name))
        if splits is None:
            files += [(path, "train") for path in _input_files(name)]
            continue
        train, val = _train_and_val_splits(Path(name), splits)
        files += [(path, "train") for path in _input_files(str(Path(name) / train))]
        if val is not None:
            files += [(path, "val") for path in _input_files(str(Path(name) / val))]
        else:
            notes.append(f"DatasetDict '{name}' has no validation split: the val set is drawn from its '{train}' "
                         f"split (--val_fraction); pass --val DIR to take it from elsewhere")
        for split in splits:
            if split not in (train, val):
                notes.append(f"DatasetDict '{name}' also holds the split '{split}', not used; pass its directory "
                             f"'{Path(name) / split}' as an INPUT or with --val to use it")
    for name in val_inputs:
        splits = _dataset_dict_splits(Path(name))
        if splits is not None:
            raise PrepareError(f"--val '{name}' is a DatasetDict (splits: {', '.join(splits)}); "
                               f"name the directory of one split, e.g. --val {Path(name) / splits[-1]}")
        files += [(path, "val") for path in _input_files(name)]
    val_is_given = any(split == "val" for _, split in files)
    sources = []
    for path, split in files:
        size = path.stat().st_size
        if size == 0:
            raise PrepareError(f"input '{path}' is empty")
        file_format = COLUMNAR_FORMATS.get(path.suffix) or (
            fmt if fmt != "auto" else ("jsonl" if path.suffix == ".jsonl" else "delimited"))
        sources.append({"path": str(path), "name": path.name, "bytes": size, "format": file_format,
                        "split": split if val_is_given else None})
    return sources, notes


def _input_files(name: str) -> list[Path]:
    """The files one INPUT names: itself, or a directory's input files, recursively, in sorted order."""
    path = Path(name)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrepareError(f"input '{name}' does not exist")
    nested = sorted(p.parent for p in path.rglob(DATASET_DICT_FILE) if p.parent != path)
    if nested:
        raise PrepareError(f"input directory '{name}' holds a DatasetDict, '{nested[0]}', whose splits would be "
                           f"merged; pass '{nested[0]}' as an INPUT of its own")
    found = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix in INPUT_SUFFIXES and _listed_by_datasets_state(p))
    if not found:
        raise PrepareError(f"input directory '{name}' holds no .txt, .jsonl, .parquet or .arrow files")
    return found


def _dataset_dict_splits(path: Path) -> list[str] | None:
    """The split names of a directory `datasets.DatasetDict.save_to_disk` wrote, or None if `path` is not one.

    Such a directory holds dataset_dict.json, `{"splits": [...]}`, and one saved Dataset
    directory per split (its data-*.arrow files, state.json and dataset_info.json).
    """
    description = path / DATASET_DICT_FILE
    if not (path.is_dir() and description.is_file()):
        return None
    try:
        splits = json.loads(description.read_text())["splits"]
    except (ValueError, KeyError, TypeError):
        splits = None
    if not (isinstance(splits, list) and splits and all(isinstance(split, str) for split in splits)):
        raise PrepareError(f"'{description}' does not list the DatasetDict's splits ({{\"splits\": [...]}}); "
                           "save the DatasetDict again, or pass the directory of one split as INPUT")
    for split in splits:
        if not (path / split).is_dir():
            raise PrepareError(f"DatasetDict '{path}' lists the split '{split}' but has no directory '{path / split}'; "
                               "save it again, or pass the directory of one split as INPUT")
    return splits


def _train_and_val_splits(path: Path, splits: list[str]) -> tuple[str, str | None]:
    """The split of a DatasetDict INPUT to train on, and its validation split (None when it has none)."""
    if TRAIN_SPLIT not in splits:
        raise PrepareError(f"DatasetDict '{path}' has no '{TRAIN_SPLIT}' split (it has: {', '.join(splits)}); "
                           f"pass the directory of the split to train on as INPUT (e.g. '{path / splits[0]}'), "
                           "and one to take the val set from with --val")
    return TRAIN_SPLIT, next((name for name in VALIDATION_SPLITS if name in splits), None)


def _listed_by_datasets_state(path: Path) -> bool:
    """False for an .arrow file that its directory's `datasets` state.json does not list.

    `Dataset.map` and friends leave `cache-*.arrow` files next to the saved `data-*.arrow`
    ones; they hold derived data, not the dataset's documents.
    """
    state = path.parent / "state.json"
    if path.suffix != ".arrow" or not state.is_file():
        return True
    try:
        listed = {entry["filename"] for entry in json.loads(state.read_text())["_data_files"]}
    except (ValueError, KeyError, TypeError):  # not a datasets state file: take every .arrow file
        return True
    return path.name in listed


def _decode(raw: bytes, path: str, offset: int, replace_invalid: bool) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if replace_invalid:
            return raw.decode("utf-8", errors="replace")
        raise PrepareError(
            f"'{path}' is not valid UTF-8 at byte offset {offset + e.start}; "
            f"fix the file or pass --replace_invalid_utf8"
        ) from None


def iter_documents(source: dict, delimiter: str = DEFAULT_DELIMITER, text_field: str = "text",
                   replace_invalid_utf8: bool = False) -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes of the file consumed so far) for one source file.

    Streams the file line by line, so memory stays flat however large the input is.
    Documents are stripped of surrounding whitespace; empty ones are skipped.
    """
    path, fmt = source["path"], source["format"]
    if fmt in COLUMNAR_FORMATS.values():
        yield from iter_columnar_documents(source, text_field)
        return
    marker = delimiter.encode("utf-8")
    offset = 0  # byte offset of the current line, for error messages
    pending: list[bytes] = []  # lines of the document being read (delimited format)
    pending_start = 0
    delimiters_seen = 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if fmt == "delimited":
                if line.strip() == marker:
                    delimiters_seen += 1
                    text = _decode(b"".join(pending), path, pending_start, replace_invalid_utf8).strip()
                    pending, pending_start = [], offset + len(line)
                    if text:
                        yield text, offset + len(line)
                else:
                    pending.append(line)
            elif fmt == "lines":
                text = _decode(line, path, offset, replace_invalid_utf8).strip()
                if text:
                    yield text, offset + len(line)
            else:  # jsonl
                text = _decode(line, path, offset, replace_invalid_utf8).strip()
                if text:
                    yield _json_text(text, text_field, path, line_number), offset + len(line)
            offset += len(line)
    if fmt == "delimited":
        if delimiters_seen == 0:
            raise PrepareError(
                f"no documents found in '{path}': no line holds only the delimiter '{delimiter}'; "
                f"pass --format lines (one document per line) or the right --delimiter"
            )
        text = _decode(b"".join(pending), path, pending_start, replace_invalid_utf8).strip()
        if text:  # a last document without a closing delimiter (e.g. a file cut short)
            yield text, offset


def _json_text(line: str, text_field: str, path: str, line_number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PrepareError(f"'{path}' line {line_number} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise PrepareError(
            f"'{path}' line {line_number} has no string field '{text_field}' (it has: {keys}); "
            f"pass --text_field NAME"
        )
    return record[text_field].strip()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise PrepareError("reading .parquet and .arrow inputs needs pyarrow; "
                           "pip install 'nanotrain[parquet]' (or pip install pyarrow)") from None
    return pyarrow


@contextlib.contextmanager
def _columnar_reader(source: dict, text_field: str) -> Iterator[tuple[Callable[[], Iterator], Callable[[int], int]]]:
    """Open a .parquet/.arrow source: (a function giving its record batches, rows read -> bytes consumed)."""
    pa, path, fmt = _pyarrow(), source["path"], source["format"]
    with open(path, "rb") as raw:
        try:
            if fmt == "parquet":
                parquet = pa.parquet.ParquetFile(raw)
                schema, rows = parquet.schema_arrow, max(parquet.metadata.num_rows, 1)

                def consumed(rows_done: int) -> int:
                    return source["bytes"] * rows_done // rows

                def batches() -> Iterator:
                    # one row group at a time: iter_batches over the whole file held ~all of it in memory
                    # (683 MB peak RSS for a 594 MB file, against 152 MB this way)
                    return (batch for group in range(parquet.num_row_groups)
                            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                                              columns=[text_field], row_groups=[group]))
            else:  # `datasets` writes the stream format; the file format starts with a magic string
                is_file_format = raw.read(6) == b"ARROW1"
                raw.seek(0)
                if is_file_format:
                    reader = pa.ipc.open_file(raw)

                    def batches() -> Iterator:
                        return (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    reader = pa.ipc.open_stream(raw)

                    def batches() -> Iterator:
                        return iter(reader)
                schema, consumed = reader.schema, lambda rows_done: raw.tell()
            _check_text_column(schema, text_field, path)
            yield batches, consumed
        except (pa.ArrowException, OSError) as e:  # a stream cut short is an OSError
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PrepareError(f"'{path}' is not a readable {fmt} file ({reason}); "
                               f"replace it with an intact copy") from None


def _check_text_column(schema, text_field: str, path: str) -> None:
    pa = _pyarrow()
    if text_field not in schema.names:
        raise PrepareError(f"'{path}' has no column '{text_field}' (it has: {', '.join(schema.names)}); "
                           f"pass --text_field NAME")
    kind = schema.field(text_field).type
    if pa.types.is_dictionary(kind):  # a categorical column (e.g. written from pandas) reads as its values
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise PrepareError(f"'{path}' column '{text_field}' holds {kind}, not strings; "
                           f"pass --text_field NAME of a text column")


def check_columnar_source(source: dict, text_field: str) -> None:
    """Refuse an unreadable .parquet/.arrow source or one without a string `text_field` column."""
    with _columnar_reader(source, text_field):
        pass


def iter_columnar_documents(source: dict, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes of the file consumed so far) for one .parquet/.arrow source.

    Reads one record batch at a time (only the text column from parquet), so memory stays flat.
    Each row is a document, stripped like the text formats' ones; empty and null rows are skipped,
    and once the whole file is read `source["null_rows"]` says how many were null.
    """
    with _columnar_reader(source, text_field) as (batches, consumed):
        rows_done = null_rows = 0
        for batch in batches():
            column = batch.column(batch.schema.get_field_index(text_field))
            null_rows += column.null_count
            texts = column.to_pylist()
            rows_done += len(texts)
            done = consumed(rows_done)
            for text in texts:
                text = text.strip() if text is not None else ""
                if text:
                    yield text, done
        source["null_rows"] = null_rows


# ----------------------------------------------------------------------------- preparing


def prepare(inputs: list[str], out: str | Path, *, val_inputs: list[str] = (), vocab_size: int | None = None,
            tokenizer: str | None = None, delimiter: str = DEFAULT_DELIMITER, fmt: str = "auto",
            text_field: str = "text", val_fraction: float | None = None, seed: int = 0,
            replace_invalid_utf8: bool = False, workers: int | None = None, verbose: bool = True) -> dict:
    """Prepare text/jsonl/parquet/arrow inputs into a dataset directory (see the module docstring); returns its meta.

    The val set is drawn from the documents, each with probability `val_fraction` (default
    DEFAULT_VAL_FRACTION), unless it is given: by `val_inputs` (--val) or a DatasetDict INPUT's
    validation split; then every other document is train. `val_inputs` without `inputs` make a
    val-only dataset (to evaluate on), which needs `tokenizer`.
    """
    sources, notes = find_sources(inputs, fmt, val_inputs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    val_sources = [s for s in sources if s["split"] == "val"]
    train_sources = [s for s in sources if s["split"] != "val"]
    if val_sources and val_fraction:
        raise PrepareError(f"--val_fraction {val_fraction} draws the val set from the inputs, but it is given "
                           "(--val, or a DatasetDict's validation split); drop --val_fraction, or pass the "
                           "directory of the split to draw from as the only INPUT")
    if val_fraction is None:
        val_fraction = 0.0 if val_sources else DEFAULT_VAL_FRACTION
    for source in sources:  # content hashes make the identity survive moves and renames
        source["sha256"] = sha256_file(source["path"])
        if source["format"] in COLUMNAR_FORMATS.values():  # a bad column fails now, not after tokenizer training
            check_columnar_source(source, text_field)
    settings = {"delimiter": delimiter, "text_field": text_field, "replace_invalid_utf8": replace_invalid_utf8}

    def reader(chosen: list[dict], start: int) -> Callable[[], Iterator[tuple[str, int]]]:
        def documents() -> Iterator[tuple[str, int]]:
            done = start
            for source in chosen:
                for text, consumed in iter_documents(source, **settings):
                    yield text, done + consumed
                done += source["bytes"]
        return documents

    if val_sources:
        shown = ", ".join(s["path"] for s in val_sources[:3]) + (", ..." if len(val_sources) > 3 else "")
        rest = "every other document is train" if train_sources else "no train documents: a dataset to evaluate on"
        log(verbose, f"val set: {len(val_sources)} file{'s' * (len(val_sources) > 1)} ({shown}), not drawn; {rest}")
    # a source's split enters the identity only when the val set is given: drawn datasets keep theirs
    keys = ("name", "bytes", "sha256", "format") + (("split",) if val_sources else ())
    train_bytes = sum(s["bytes"] for s in train_sources)
    meta = write_dataset(reader(train_sources, 0) if train_sources else None, out,
                         val_documents=reader(val_sources, train_bytes) if val_sources else None,
                         sources=[{k: s[k] for k in keys} for s in sources],
                         total_bytes=sum(s["bytes"] for s in sources),
                         vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed,
                         workers=workers, verbose=verbose, settings=settings)
    null_rows = {s["path"]: s["null_rows"] for s in sources if s.get("null_rows")}
    if null_rows:
        total = sum(null_rows.values())
        print(f"note: skipped {total:,} row{'s' * (total > 1)} whose '{text_field}' is null "
              f"({', '.join(f'{path}: {n:,}' for path, n in null_rows.items())})", file=sys.stderr, flush=True)
    return meta


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nanotrain-prepare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text/jsonl/parquet/arrow files or directories of them, or a saved DatasetDict directory")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--vocab_size", type=int, help="train a BPE tokenizer of this size on the inputs")
    p.add_argument("--tokenizer", help="use this existing tokenizer instead of training one: a sentencepiece "
                   ".model or a Hugging Face tokenizer.json")
    p.add_argument("--delimiter", default=DEFAULT_DELIMITER, help="line that separates documents (delimited format)")
    p.add_argument("--format", default="auto", choices=FORMATS, dest="fmt",
                   help="format of the input files (default: by suffix; .parquet and .arrow files always by suffix)")
    p.add_argument("--text_field", default="text", help="jsonl field or parquet/arrow column holding the document text")
    p.add_argument("--val", action="append", default=[], metavar="VAL_INPUT", dest="val_inputs",
                   help="the val set: a file or directory (e.g. a DatasetDict's split) whose documents are all val, "
                        "while every INPUT document is train; repeatable; alone (no INPUT), a val-only dataset")
    p.add_argument("--val_fraction", type=float, default=None,
                   help=f"share of documents drawn for val (default {DEFAULT_VAL_FRACTION}; not with a given val set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val draw")
    p.add_argument("--replace_invalid_utf8", action="store_true", help="replace undecodable bytes with U+FFFD")
    p.add_argument("--workers", type=int, default=None, help="encoding threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """`python -m nanotrain.prepare` / `nanotrain-prepare`: errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        prepare(args.inputs, args.out, val_inputs=args.val_inputs, vocab_size=args.vocab_size,
                tokenizer=args.tokenizer, delimiter=args.delimiter, fmt=args.fmt, text_field=args.text_field,
                val_fraction=args.val_fraction, seed=args.seed, replace_invalid_utf8=args.replace_invalid_utf8,
                workers=args.workers, verbose=not args.quiet)
    except OSError as e:  # an unreadable input: still one line (an unwritable --out is named by write_dataset)
        raise PrepareError(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
