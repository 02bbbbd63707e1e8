"""Turn text files into a tokenized dataset directory that training reads with `--data.path=DIR`.

    python -m nanotrain.prepare INPUT [INPUT ...] --out DIR (--vocab_size N | --tokenizer PATH)

INPUT is a file or a directory (its .txt and .jsonl files, recursively, in sorted order).
Formats (`--format`, default `auto`: .jsonl files are `jsonl`, everything else `delimited`):
  delimited  documents separated by a line holding only the delimiter (`<|endoftext|>`)
  lines      one document per non-empty line
  jsonl      one JSON object per line; the document is its `--text_field` (default "text")

The output directory holds:
  train.bin, val.bin    every document's tokens, BOS + text + EOS, concatenated; raw numpy
                        memmaps, uint16 when the vocabulary fits, else uint32
  train.idx, val.idx    uint64 offsets of the documents in the .bin (n_docs + 1 entries), so
                        the padded loader finds document boundaries without a scan
  tokenizer.model       the sentencepiece model that produced the tokens
  meta.json             written last: format version, identity hash, tokenizer sha256, ids,
                        dtype, per-split document and token counts, the largest token id,
                        sources and settings

Each document goes to val with probability --val_fraction, by a draw from a generator seeded
with --seed, in input order: the split is a function of the inputs and the seed only.
Encoding runs on all cores (sentencepiece's C++ threads; --workers sets how many). Everything
is written into a hidden temporary directory next to --out and renamed only when complete,
so an error or Ctrl-C never leaves a dataset that looks usable. Running the same command
again is a no-op; pointing --out at a different dataset is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from nanotrain.errors import ArgumentParser, NanotrainError, exit_on_error
from nanotrain.files import atomic_directory, sha256_file
from nanotrain.stories import GENERATOR_VERSION, generate_stories
from nanotrain.tokenizer import Tokenizer, TokenizerError

FORMAT_VERSION = 1
DEFAULT_DELIMITER = "<|endoftext|>"
DEFAULT_VAL_FRACTION = 0.05
FORMATS = ("auto", "delimited", "lines", "jsonl")
INPUT_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_TRAINING_BYTES = 512 * 2**20  # the tokenizer sees at most the first 512 MiB of text
ENCODE_BATCH_BYTES = 8 * 2**20  # text handed to the encoder threads at a time
SPLITS = ("train", "val")


class PrepareError(NanotrainError):
    """A problem with the inputs or options of `prepare`, in one line that says how to fix it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------- reading inputs


def find_sources(inputs: list[str], fmt: str = "auto") -> list[dict]:
    """Resolve INPUT arguments to files, each with its format and size; errors for bad inputs."""
    if fmt not in FORMATS:
        raise PrepareError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not inputs:
        raise PrepareError("no inputs given; pass one or more text files or directories")
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
            if not found:
                raise PrepareError(f"input directory '{name}' holds no .txt or .jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PrepareError(f"input '{name}' does not exist")
    sources = []
    for path in files:
        size = path.stat().st_size
        if size == 0:
            raise PrepareError(f"input '{path}' is empty")
        file_format = fmt if fmt != "auto" else ("jsonl" if path.suffix == ".jsonl" else "delimited")
        sources.append({"path": str(path), "name": path.name, "bytes": size, "format": file_format})
    return sources


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


# ----------------------------------------------------------------------------- progress


class Progress:
    """Documents/s, MB/s and ETA on stderr, at most once a second."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True):
        self.label, self.total_bytes, self.enabled = label, total_bytes, enabled
        self.start = self.last = time.perf_counter()
        self.documents = 0
        self.bytes = 0

    def update(self, documents: int, done_bytes: int) -> None:
        self.documents, self.bytes = documents, done_bytes
        now = time.perf_counter()
        if now - self.last >= 1.0:
            self.last = now
            self._print(final=False)

    def finish(self) -> None:
        self.bytes = self.total_bytes
        self._print(final=True)

    def _print(self, final: bool) -> None:
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes / elapsed
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        tail = f"done in {elapsed:.1f}s" if final else f"{100 * self.bytes / self.total_bytes:.0f}%  ETA {eta:.0f}s"
        print(f"{self.label}: {self.documents:,} docs  {self.documents / elapsed:,.0f} docs/s  "
              f"{rate / 1e6:.1f} MB/s  {tail}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- writing the dataset


def _identity(request: dict) -> str:
    """Hash of everything that determines the output: same identity, same dataset."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def read_meta(directory: str | Path) -> dict | None:
    """The JSON object in `directory/meta.json`, or None when there is none (its fields are not checked here)."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _check_out_dir(out: Path, identity: str) -> dict | None:
    """The existing dataset's meta if --out already holds this very dataset; raise if another."""
    existing = _nearest_existing(out)
    if not existing.is_dir():
        where = "" if existing == out else f": '{existing}'"
        raise PrepareError(f"--out '{out}'{where} is a file, not a directory; choose another --out")
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    meta = read_meta(out)
    if meta is not None and meta.get("identity") == identity:
        return meta
    what = "a different dataset" if meta is not None else "other files"
    raise PrepareError(f"--out '{out}' already holds {what}; choose another --out or delete it first")


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists: where a directory would be created, or what blocks it."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def prepare(inputs: list[str], out: str | Path, *, vocab_size: int | None = None, tokenizer: str | None = None,
            delimiter: str = DEFAULT_DELIMITER, fmt: str = "auto", text_field: str = "text",
            val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, replace_invalid_utf8: bool = False,
            workers: int | None = None, verbose: bool = True) -> dict:
    """Prepare text files into a dataset directory (see the module docstring); returns its meta."""
    sources = find_sources(inputs, fmt)
    for source in sources:  # content hashes make the identity survive moves and renames
        source["sha256"] = sha256_file(source["path"])
    settings = {"delimiter": delimiter, "text_field": text_field, "replace_invalid_utf8": replace_invalid_utf8}

    def documents() -> Iterator[tuple[str, int]]:
        done = 0
        for source in sources:
            for text, consumed in iter_documents(source, **settings):
                yield text, done + consumed
            done += source["bytes"]

    described = [{k: s[k] for k in ("name", "bytes", "sha256", "format")} for s in sources]
    return prepare_documents(documents, out, sources=described, total_bytes=sum(s["bytes"] for s in sources),
                             vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed,
                             workers=workers, verbose=verbose, settings=settings)


def prepare_documents(documents: Callable[[], Iterable[tuple[str, int]]], out: str | Path, *, sources: list[dict],
                      total_bytes: int, vocab_size: int | None = None, tokenizer: str | None = None,
                      val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, workers: int | None = None,
                      verbose: bool = True, settings: dict | None = None) -> dict:
    """The core of `prepare`, for any document source (the built-in corpus uses it directly).

    `documents()` returns a fresh iterator of (text, bytes consumed so far) each time it is
    called: once to train the tokenizer (when `vocab_size` is given), once to encode.
    """
    if (vocab_size is None) == (tokenizer is None):
        raise PrepareError("pass exactly one of --vocab_size N (train a tokenizer) or --tokenizer PATH")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    loaded = None
    if tokenizer is not None:
        try:
            loaded = Tokenizer.load(tokenizer)
        except TokenizerError as e:
            raise PrepareError(str(e)) from None
    out = Path(out)
    request = {"format_version": FORMAT_VERSION, "sources": sources, "val_fraction": val_fraction, "seed": seed,
               "settings": settings or {},
               "tokenizer": {"sha256": loaded.sha256} if loaded else {"train_vocab_size": vocab_size}}
    identity = _identity(request)
    existing = _check_out_dir(out, identity)
    if existing is not None:
        _log(verbose, f"'{out}' already holds this dataset (identity {identity[:12]}); nothing to do")
        return existing

    try:
        with atomic_directory(out, hidden=True) as temp:  # errors and Ctrl-C alike leave nothing half-written
            start = time.perf_counter()
            if loaded is None:
                loaded = _train_tokenizer(documents, vocab_size, total_bytes, verbose)
            loaded.save(temp / "tokenizer.model")
            splits, max_token_id = _encode(documents, loaded, temp, val_fraction, seed, workers, total_bytes,
                                           verbose)
            meta = {
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "tokenizer": {"file": "tokenizer.model", "sha256": loaded.sha256,
                              "trained_here": tokenizer is None, "from": str(tokenizer) if tokenizer else None},
                "vocab_size": loaded.vocab_size,
                "bos_id": loaded.bos_id, "eos_id": loaded.eos_id, "pad_id": loaded.pad_id,
                "dtype": token_dtype(loaded.vocab_size).name,
                "document_layout": "BOS text EOS",
                "splits": splits,
                "max_token_id": max_token_id,  # the reader checks it against the vocabulary at start-up
                "sources": sources,
                "val_fraction": val_fraction, "seed": seed, **(settings or {}),
                "prepare_seconds": round(time.perf_counter() - start, 2),
            }
            for split in SPLITS:
                if splits[split]["documents"] == 0 and (split == "train" or val_fraction > 0):
                    n = splits["train"]["documents"] + splits["val"]["documents"]
                    fix = "raise --val_fraction or add documents" if split == "val" else "lower --val_fraction"
                    raise PrepareError(f"the {split} split got no documents ({n} in all, --val_fraction {val_fraction}); {fix}")
            # meta.json last: a directory without it is never taken for a dataset
            (temp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except FileExistsError:  # another process published --out meanwhile: fine if it is this very dataset
        published = read_meta(out)
        if published is None or published.get("identity") != identity:
            raise PrepareError(f"--out '{out}' appeared while preparing and holds something else; choose another --out") from None
    _log(verbose, f"wrote '{out}': {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
                  f"({splits['train']['documents']:,} + {splits['val']['documents']:,} documents), "
                  f"vocab {loaded.vocab_size}, {meta['dtype']}")
    return read_meta(out)


def _train_tokenizer(documents, vocab_size: int, total_bytes: int, verbose: bool) -> Tokenizer:
    progress = Progress(f"training a {vocab_size}-token tokenizer", min(total_bytes, TOKENIZER_TRAINING_BYTES), verbose)

    def texts():
        for count, (text, done) in enumerate(documents(), start=1):
            if done > TOKENIZER_TRAINING_BYTES:
                break
            progress.update(count, done)
            yield text

    try:
        trained = Tokenizer.train(texts(), vocab_size)
    except TokenizerError as e:
        raise PrepareError(str(e)) from None
    progress.finish()
    return trained


def _encode(documents, tokenizer: Tokenizer, directory: Path, val_fraction: float, seed: int,
            workers: int | None, total_bytes: int, verbose: bool) -> tuple[dict, int]:
    """Tokenize every document into train.bin/val.bin and their .idx offsets.

    Returns the per-split counts and the largest token id written.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    draw = np.random.default_rng(seed)  # one draw per document, in input order
    bins = {s: open(directory / f"{s}.bin", "wb") for s in SPLITS}
    lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    progress = Progress("encoding", total_bytes, verbose)
    count = max_token_id = 0
    try:
        stream = iter(documents())
        while True:
            batch, done = _take_bytes(stream, ENCODE_BATCH_BYTES)
            if not batch:
                break
            encoded = tokenizer.encode_batch(batch, bos=True, eos=True, num_threads=workers or os.cpu_count() or 1)
            is_val = draw.random(len(batch)) < val_fraction
            for split, keep in (("train", ~is_val), ("val", is_val)):
                chosen = [ids for ids, k in zip(encoded, keep) if k]
                doc_lengths = np.fromiter((len(ids) for ids in chosen), dtype=np.uint64, count=len(chosen))
                flat = np.fromiter(itertools.chain.from_iterable(chosen), dtype=dtype, count=int(doc_lengths.sum()))
                bins[split].write(flat.tobytes())
                max_token_id = max(max_token_id, int(flat.max(initial=0)))
                lengths[split].append(doc_lengths)
            count += len(batch)
            progress.update(count, done)
    finally:
        for f in bins.values():
            f.close()
    progress.finish()
    if count == 0:
        raise PrepareError("no documents found in the inputs (all empty after stripping whitespace)")
    splits = {}
    for split in SPLITS:
        doc_lengths = np.concatenate(lengths[split])
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.uint64)
        offsets.tofile(directory / f"{split}.idx")
        splits[split] = {"file": f"{split}.bin", "index": f"{split}.idx",
                         "documents": int(len(doc_lengths)), "tokens": int(offsets[-1])}
    return splits, max_token_id


def _take_bytes(stream: Iterator[tuple[str, int]], budget: int) -> tuple[list[str], int]:
    """Up to `budget` characters of documents from the stream, and the progress position."""
    batch, size, done = [], 0, 0
    for text, done in stream:
        batch.append(text)
        size += len(text)
        if size >= budget:
            break
    return batch, done


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the built-in corpus


def cache_dir() -> Path:
    """$NANOTRAIN_CACHE, else $XDG_CACHE_HOME/nanotrain, else ~/.cache/nanotrain."""
    if os.environ.get("NANOTRAIN_CACHE"):
        return Path(os.environ["NANOTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanotrain"


def prepare_stories(count: int, vocab_size: int, seed: int = 0, verbose: bool = True) -> Path:
    """The built-in story corpus as a prepared dataset, built on first use and cached.

    Safe when several processes (ranks) ask at once: the first takes a file lock and builds,
    the others wait on the lock and then find the finished directory.
    """
    out = cache_dir() / f"stories-v{GENERATOR_VERSION}-n{count}-v{vocab_size}-s{seed}"
    if read_meta(out) is not None:
        return out  # the common case: no lock, no hashing
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f"{out.name}.lock", "w")
    except OSError as e:
        raise PrepareError(_unwritable_cache(out.parent, e)) from None
    with lock, _exclusive(lock):
        if read_meta(out) is not None:
            return out  # another process built it while we waited for the lock
        stories = generate_stories(count, seed)
        sources = [{"name": "nanotrain.stories", "generator_version": GENERATOR_VERSION, "count": count, "seed": seed}]

        def documents():
            done = 0
            for story in stories:
                done += len(story) + 1
                yield story, done

        _log(verbose, f"preparing the built-in story corpus ({count} stories) into '{out}'")
        try:
            prepare_documents(documents, out, sources=sources, total_bytes=sum(len(s) + 1 for s in stories),
                              vocab_size=vocab_size, seed=seed, verbose=verbose)
        except PrepareError as e:  # speak in the config keys the user actually set
            raise PrepareError(f"built-in story corpus: {e}".replace("--vocab_size", "data.stories_vocab_size")) from None
        except OSError as e:  # e.g. the disk filled up; the temporary directory is already gone
            raise PrepareError(_unwritable_cache(out.parent, e)) from None
    return out


def _unwritable_cache(directory: Path, error: OSError) -> str:
    """The one-line message for a cache directory that cannot be created or written, and its fix."""
    blocker = _nearest_existing(directory)
    reason = f"'{blocker}' is a file, not a directory" if not blocker.is_dir() else error.strerror or str(error)
    return (f"cannot write the built-in corpus cache '{directory}' ({reason}); set NANOTRAIN_CACHE to a writable "
            "directory, or train on a prepared dataset with --data.path=DIR")


@contextlib.contextmanager
def _exclusive(file):
    try:
        import fcntl  # POSIX only; elsewhere prepare's temp-dir-and-rename still keeps racers safe
    except ImportError:
        yield
        return
    fcntl.flock(file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nanotrain-prepare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text/jsonl files or directories of them")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--vocab_size", type=int, help="train a BPE tokenizer of this size on the inputs")
    p.add_argument("--tokenizer", help="use this existing sentencepiece .model instead of training one")
    p.add_argument("--delimiter", default=DEFAULT_DELIMITER, help="line that separates documents (delimited format)")
    p.add_argument("--format", default="auto", choices=FORMATS, dest="fmt")
    p.add_argument("--text_field", default="text", help="jsonl field holding the document text")
    p.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION, help="share of documents drawn for val")
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
        prepare(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer, delimiter=args.delimiter,
                fmt=args.fmt, text_field=args.text_field, val_fraction=args.val_fraction, seed=args.seed,
                replace_invalid_utf8=args.replace_invalid_utf8, workers=args.workers, verbose=not args.quiet)
    except OSError as e:  # unreadable input, full disk, no permission: still one line
        raise PrepareError(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
