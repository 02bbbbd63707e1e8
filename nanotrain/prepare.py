"""Turn text files into a tokenized dataset directory that training reads with `--data.path=DIR`.

    python -m nanotrain.prepare INPUT [INPUT ...] --out DIR (--vocab_size N | --tokenizer PATH)

INPUT is a file or a directory (its .txt and .jsonl files, recursively, in sorted order).
Formats (`--format`, default `auto`: .jsonl files are `jsonl`, everything else `delimited`):
  delimited  documents separated by a line holding only the delimiter (`<|endoftext|>`)
  lines      one document per non-empty line
  jsonl      one JSON object per line; the document is its `--text_field` (default "text")

The output directory (format: nanotrain/dataset_format.py) holds train.bin/val.bin (the
documents' tokens, BOS + text + EOS, concatenated), train.idx/val.idx (document offsets),
tokenizer.model and meta.json (written last).

Each document goes to val with probability --val_fraction, by a draw from a generator seeded
with --seed, in input order: the split is a function of the inputs and the seed only.
Encoding runs on all cores (sentencepiece's C++ threads; --workers sets how many). Everything
is written into a hidden temporary directory next to --out and renamed only when complete,
so an error or Ctrl-C never leaves a dataset that looks usable. Running the same command
again is a no-op; pointing --out at a different dataset is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

from nanotrain.dataset_format import DEFAULT_VAL_FRACTION, PrepareError, write_dataset
from nanotrain.errors import ArgumentParser, exit_on_error
from nanotrain.files import sha256_file

DEFAULT_DELIMITER = "<|endoftext|>"
FORMATS = ("auto", "delimited", "lines", "jsonl")
INPUT_SUFFIXES = (".txt", ".jsonl")


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


# ----------------------------------------------------------------------------- preparing


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
    return write_dataset(documents, out, sources=described, total_bytes=sum(s["bytes"] for s in sources),
                         vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction, seed=seed,
                         workers=workers, verbose=verbose, settings=settings)


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
