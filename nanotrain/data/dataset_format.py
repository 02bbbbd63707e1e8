"""The on-disk format of a prepared dataset: the one module that writes it and reads it back.

A dataset directory holds:

  train.bin, val.bin    every document's tokens, BOS + text + EOS, concatenated; raw numpy
                        memmaps, uint16 when the vocabulary fits, else uint32. When BOS and
                        EOS are one token (GPT-2's `<|endoftext|>`) a document is text + EOS,
                        so one separator, not two, lies between documents (meta.json's
                        document_layout says which)
  train.idx, val.idx    uint64 offsets of the documents in the .bin (n_docs + 1 entries), so
                        the padded loader finds document boundaries without a scan
  tokenizer.model       the tokenizer that produced the tokens, unchanged: a sentencepiece model,
  or tokenizer.json     or a Hugging Face tokenizer.json
  meta.json             written last: format version, identity hash, tokenizer sha256, ids,
                        dtype, per-split document and token counts, the largest token id,
                        sources and settings

Writing: `write_dataset(documents, out, ...)` turns any stream of documents (prepare.py's text
files, the built-in corpus of data/stories.py) into such a directory, training its tokenizer when
asked; each document goes to val with probability `val_fraction`, by one draw per document, in
input order, from a generator seeded with `seed`, unless the val set is given as a stream of its
own. Everything is written into a hidden temporary directory next to `out` and renamed only
when complete, so an error or Ctrl-C never leaves a dataset that looks usable, and a full or
read-only destination is an `UnwritableOutput` naming `out`; writing the same dataset again is
a no-op.

Reading: `open_meta(path)` checks meta.json, the file sizes and the document offsets once, so a
damaged dataset is refused in one line at start-up; `open_tokenizer` loads its tokenizer and
`TokenSplit` maps one split's files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from nanotrain.data.tokenizer import Tokenizer
from nanotrain.errors import DataError, PrepareError, TokenizerError, UnwritableOutput
from nanotrain.files import atomic_directory, destination_problem

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
DEFAULT_VAL_FRACTION = 0.05
BOS_TEXT_EOS, TEXT_EOS = "BOS text EOS", "text EOS"  # how a document's ids are stored; see document_layout
LAYOUTS = (BOS_TEXT_EOS, TEXT_EOS)
TOKENIZER_TRAINING_BYTES = 512 * 2**20  # the tokenizer sees at most the first 512 MiB of text
ENCODE_BATCH_BYTES = 8 * 2**20  # text handed to the encoder threads at a time


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def document_layout(tokenizer: Tokenizer) -> str:
    """How a document is stored: BOS text EOS, or text EOS when BOS and EOS are the same token.

    GPT-2's `<|endoftext|>` is both: BOS text EOS would put it twice between documents. As text
    EOS the packed stream is `A <|endoftext|> B <|endoftext|>`, GPT-2's own layout, in which
    every document still follows the token a prompt starts with.
    """
    return TEXT_EOS if tokenizer.bos_id == tokenizer.eos_id else BOS_TEXT_EOS


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists: where a directory would be created, or what blocks it."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def log(verbose: bool, message: str) -> None:
    """A progress line on stderr, unless quiet."""
    if verbose:
        print(message, file=sys.stderr, flush=True)


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


# ----------------------------------------------------------------------------- writing


def read_meta(directory: str | Path) -> dict | None:
    """The JSON object in `directory/meta.json`, or None when there is none (its fields are not checked here)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _check_out_dir(out: Path, identity: str) -> dict | None:
    """The existing dataset's meta if --out already holds this very dataset; raise if another."""
    existing = nearest_existing(out)
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


Documents = Callable[[], Iterable[tuple[str, int]]]


def write_dataset(documents: Documents | None, out: str | Path, *, sources: list[dict], total_bytes: int,
                  vocab_size: int | None = None, tokenizer: str | None = None,
                  val_fraction: float = DEFAULT_VAL_FRACTION, val_documents: Documents | None = None, seed: int = 0,
                  workers: int | None = None, verbose: bool = True, settings: dict | None = None) -> dict:
    """Write the documents as a dataset directory at `out` (see the module docstring); returns its meta.

    `documents()` returns a fresh iterator of (text, bytes consumed so far) each time it is
    called: once to train the tokenizer (when `vocab_size` is given), once to encode. Each of its
    documents goes to val with probability `val_fraction`, unless `val_documents` gives the val
    set: then they all go to train (`val_fraction` must be 0), and `documents` may be None for a
    dataset with no train documents (one to evaluate on, made with an existing tokenizer). Pass
    exactly one of `vocab_size` (train a tokenizer, on the train documents) and `tokenizer` (the
    path of a sentencepiece model or a Hugging Face tokenizer.json). `sources` and `settings`
    describe where the documents came from; with the other arguments they make the dataset's
    identity, which decides whether `out` already holds it. A destination that is out of space
    or not writable is an `UnwritableOutput` naming `out`; nothing is left behind either way.
    """
    if (vocab_size is None) == (tokenizer is None):
        raise PrepareError("pass exactly one of --vocab_size N (train a tokenizer) or --tokenizer PATH")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if val_documents is not None and val_fraction:
        raise PrepareError("a given val set and --val_fraction exclude each other: pass one")
    if documents is None and (val_documents is None or tokenizer is None):
        raise PrepareError("a val-only dataset (no INPUT, only --val) is evaluated with the tokenizer of the "
                           "model's own dataset: pass it with --tokenizer (e.g. DIR/tokenizer.model)")
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
    # named only when they differ from what every dataset had before: those keep the identity they always had
    if loaded is not None and document_layout(loaded) != BOS_TEXT_EOS:
        request["document_layout"] = document_layout(loaded)
    if val_documents is not None:
        request["val_set"] = "given"
    identity = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()  # same identity, same dataset
    existing = _check_out_dir(out, identity)
    if existing is not None:
        log(verbose, f"'{out}' already holds this dataset (identity {identity[:12]}); nothing to do")
        return existing

    try:
        with atomic_directory(out, hidden=True) as temp:  # errors and Ctrl-C alike leave nothing half-written
            start = time.perf_counter()
            if loaded is None:
                loaded = _train_tokenizer(documents, vocab_size, total_bytes, verbose)
            loaded.save(temp / loaded.file_name)
            splits, max_token_id = _encode(documents, val_documents, loaded, temp, val_fraction, seed, workers,
                                           total_bytes, verbose)
            meta = {
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "tokenizer": {"file": loaded.file_name, "sha256": loaded.sha256,
                              "trained_here": tokenizer is None, "from": str(tokenizer) if tokenizer else None},
                "vocab_size": loaded.vocab_size,
                "bos_id": loaded.bos_id, "eos_id": loaded.eos_id, "pad_id": loaded.pad_id,
                "dtype": token_dtype(loaded.vocab_size).name,
                "document_layout": document_layout(loaded),
                "splits": splits,
                "max_token_id": max_token_id,  # the reader checks it against the vocabulary at start-up
                "sources": sources,
                "val_fraction": val_fraction, "seed": seed, **(settings or {}),
                "prepare_seconds": round(time.perf_counter() - start, 2),
            }
            _check_split_sizes(splits, val_fraction, train_expected=documents is not None,
                               val_given=val_documents is not None)
            # meta.json last: a directory without it is never taken for a dataset
            (temp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except FileExistsError:  # another process published --out meanwhile: fine if it is this very dataset
        published = read_meta(out)
        if published is None or published.get("identity") != identity:
            raise PrepareError(
                f"--out '{out}' appeared while preparing and holds something else; choose another --out") from None
    except OSError as e:
        problem = destination_problem(e)
        if problem is None:
            raise
        raise UnwritableOutput(out, problem, e.strerror or str(e)) from None
    log(verbose, f"wrote '{out}': {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
                 f"({splits['train']['documents']:,} + {splits['val']['documents']:,} documents), "
                 f"vocab {loaded.vocab_size}, {meta['dtype']}")
    return read_meta(out)


def _check_split_sizes(splits: dict, val_fraction: float, train_expected: bool, val_given: bool) -> None:
    """Refuse a split left without documents, unless it is meant to be empty."""
    n = splits["train"]["documents"] + splits["val"]["documents"]
    if splits["train"]["documents"] == 0 and train_expected:
        fix = "lower --val_fraction" if val_fraction > 0 else "add documents"
        raise PrepareError(f"the train split got no documents ({n} in all, --val_fraction {val_fraction}); {fix}")
    if splits["val"]["documents"] == 0 and val_given:
        raise PrepareError("the given val set holds no documents (all empty after stripping whitespace); "
                           "pass a val set with text in it")
    if splits["val"]["documents"] == 0 and val_fraction > 0:
        raise PrepareError(f"the val split got no documents ({n} in all, --val_fraction {val_fraction}); "
                           "raise --val_fraction or add documents")


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


def _encode(documents: Documents | None, val_documents: Documents | None, tokenizer: Tokenizer, directory: Path,
            val_fraction: float, seed: int, workers: int | None, total_bytes: int, verbose: bool) -> tuple[dict, int]:
    """Tokenize every document into train.bin/val.bin and their .idx offsets.

    `documents` are drawn into the splits (see write_dataset), `val_documents` all go to val.
    Returns the per-split counts and the largest token id written.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    draw = np.random.default_rng(seed)  # one draw per document, in input order
    bins = {s: open(directory / f"{s}.bin", "wb") for s in SPLITS}
    lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    progress = Progress("encoding", total_bytes, verbose)
    count = max_token_id = 0
    try:
        for batch, done, all_val in _batches(documents, val_documents):
            encoded = tokenizer.encode_batch(batch, bos=document_layout(tokenizer) == BOS_TEXT_EOS, eos=True,
                                             num_threads=workers or os.cpu_count() or 1)
            is_val = np.ones(len(batch), dtype=bool) if all_val else draw.random(len(batch)) < val_fraction
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


def _batches(documents: Documents | None, val_documents: Documents | None) -> Iterator[tuple[list[str], int, bool]]:
    """Batches of about ENCODE_BATCH_BYTES of text, each with the progress position and whether it is all val."""
    for stream_of, all_val in ((documents, False), (val_documents, True)):
        if stream_of is None:
            continue
        stream = iter(stream_of())
        while True:
            batch, done = _take_bytes(stream, ENCODE_BATCH_BYTES)
            if not batch:
                break
            yield batch, done, all_val


def _take_bytes(stream: Iterator[tuple[str, int]], budget: int) -> tuple[list[str], int]:
    """Up to `budget` characters of documents from the stream, and the progress position."""
    batch, size, done = [], 0, 0
    for text, done in stream:
        batch.append(text)
        size += len(text)
        if size >= budget:
            break
    return batch, done


# ----------------------------------------------------------------------------- reading


def dataset_vocab_size(path: str | Path) -> int:
    """The vocabulary of the prepared dataset at `path`: what model.vocab_size follows when not set."""
    return open_meta(Path(path))["vocab_size"]


def open_meta(path: Path, remedy: str = "prepare it again") -> dict:
    """The dataset's meta.json, once checked in full against what the reader relies on.

    Every field the loader uses is validated here, and the files' sizes and document offsets
    against it, so a damaged or hand-edited dataset is refused in one line at start-up;
    `remedy` says how to get a good one.
    """
    if not path.exists():
        raise DataError(f"data.path '{path}' does not exist; "
                        f"make it with `python -m nanotrain.prepare INPUT --out {path} --vocab_size N`")
    if not path.is_dir():
        raise DataError(f"data.path '{path}' is a file, not a directory; "
                        "pass the directory `python -m nanotrain.prepare --out DIR` made")
    meta = read_meta(path)
    if meta is None:
        raise DataError(f"data.path '{path}' is not a prepared dataset (no readable meta.json); "
                        "make it with `python -m nanotrain.prepare`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"dataset '{path}' has format version {meta.get('format_version')}, this nanotrain reads "
                        f"{FORMAT_VERSION}; prepare it again")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"dataset '{path}' is damaged: meta.json {problem}; {remedy}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        info = meta["splits"][split]
        for name, expected in ((info["file"], info["tokens"] * itemsize), (info["index"], (info["documents"] + 1) * 8)):
            file = path / name
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"dataset '{path}' is damaged: {name} is missing or not {expected} bytes; {remedy}")
        if not _offsets_are_documents(path / info["index"], info["tokens"]):
            raise DataError(f"dataset '{path}' is damaged: {info['index']} does not hold increasing document "
                            f"offsets from 0 to {info['tokens']}; {remedy}")
    return meta


def _meta_problem(meta: dict) -> str | None:
    """What makes a meta.json unusable (the reader trusts every field it uses), or None."""
    vocab = meta.get("vocab_size")
    if not _is_count(vocab) or vocab == 0:
        return f"has vocab_size {vocab!r}, not a positive integer"
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32") or np.iinfo(dtype).max < vocab - 1:
        return f"has dtype {dtype!r}, not uint16 or uint32 wide enough for {vocab} token ids"
    if not isinstance(meta.get("identity"), str) or not meta["identity"]:
        return f"has identity {meta.get('identity')!r}, not a hash string"
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or not _is_file_name(tokenizer.get("file")) \
            or not isinstance(tokenizer.get("sha256"), str):
        return f"has tokenizer {tokenizer!r}, not a file name in the dataset and its sha256"
    if meta.get("document_layout", BOS_TEXT_EOS) not in LAYOUTS:
        return f"has document_layout {meta.get('document_layout')!r}, not one of {', '.join(map(repr, LAYOUTS))}"
    recorded_ids = ["bos_id", "eos_id", "pad_id"] + (["max_token_id"] if "max_token_id" in meta else [])
    for key in recorded_ids:  # (datasets prepared before max_token_id was recorded lack it; batches are checked)
        if not (_is_count(meta.get(key)) and meta[key] < vocab):
            return f"has {key} {meta.get(key)!r}, not a token id below vocab_size {vocab}"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(split), dict) for split in SPLITS):
        return f"has no 'splits' entries {' and '.join(map(repr, SPLITS))}"
    for split in SPLITS:
        info = splits[split]
        if not (_is_file_name(info.get("file")) and _is_file_name(info.get("index"))
                and _is_count(info.get("tokens")) and _is_count(info.get("documents"))
                and info["documents"] <= info["tokens"]):
            return f"has splits.{split} = {info!r}, not file and index names with document and token counts"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_file_name(value) -> bool:
    """A plain name of a file inside the dataset directory: meta.json never points elsewhere."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _offsets_are_documents(index_path: Path, num_tokens: int) -> bool:
    """Offsets start at 0, end at the token count and strictly increase (each document holds text and EOS).

    A decreasing pair would make an empty, fully masked padded row; read in chunks to keep memory flat.
    """
    offsets = np.memmap(index_path, dtype=np.uint64, mode="r")
    if offsets[0] != 0 or offsets[-1] != num_tokens:
        return False
    chunk = 2**24
    # neighbouring blocks share an entry, so every pair is compared
    blocks = (offsets[i : i + chunk + 1] for i in range(0, len(offsets) - 1, chunk))
    return all(bool((block[1:] > block[:-1]).all()) for block in blocks)


def open_tokenizer(path: Path, meta: dict, remedy: str = "prepare it again") -> Tokenizer:
    """The dataset's tokenizer, refused unless it is the one meta.json names (sha256 and vocabulary)."""
    try:
        tokenizer = Tokenizer.load(path / meta["tokenizer"]["file"])
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
        raise DataError(f"dataset '{path}': {meta['tokenizer']['file']} does not match the sha256 in meta.json; "
                        f"{remedy}")
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"dataset '{path}' is damaged: its tokenizer has {tokenizer.vocab_size} tokens but meta.json "
                        f"says vocab_size {meta['vocab_size']}; {remedy}")
    return tokenizer


class TokenSplit:
    """One split of a prepared dataset: the token memmap and the document offsets, opened lazily.

    Objects are pickled into DataLoader workers without their memmaps; each worker reopens
    its own, because a file mapping must not be shared across a fork or a spawn.
    """

    def __init__(self, directory: Path, split: str, meta: dict):
        self.tokens_path = directory / meta["splits"][split]["file"]
        self.index_path = directory / meta["splits"][split]["index"]
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens = meta["splits"][split]["tokens"]
        self.num_documents = meta["splits"][split]["documents"]
        self.vocab_size = meta["vocab_size"]
        self._tokens = self._offsets = None

    def check(self, batch: dict) -> dict:
        """The batch, unless it holds a token id outside the vocabulary (a damaged or tampered .bin).

        One max over the batch, in the training process (an error raised in a DataLoader worker
        would arrive wrapped in its traceback): the id never reaches the embedding.
        """
        largest = int(batch["input_ids"].max())
        if largest >= self.vocab_size:
            raise DataError(
                f"'{self.tokens_path}' holds token id {largest}, outside the dataset's {self.vocab_size}-token "
                "vocabulary: the file is damaged; prepare the dataset again"
            )
        return batch

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.memmap(self.index_path, dtype=np.uint64, mode="r", shape=(self.num_documents + 1,))
        return self._offsets

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_offsets": None}
