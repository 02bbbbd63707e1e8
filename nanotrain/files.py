"""Atomic outputs and file hashes.

Every directory nanotrain writes for users (checkpoints, exports, prepared datasets) is built in
a temporary directory next to its final name, synced to disk, and renamed into place only when
complete, so an error, Ctrl-C or crash never leaves an output that looks usable:

    with atomic_directory(out) as temp:
        (temp / "weights.bin").write_bytes(...)   # nothing named `out` exists until the block ends

Writers that span several processes (a multi-rank checkpoint) use `temp_directory` and
`publish` directly.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_directory(target: Path, tag: int | str | None = None, hidden: bool = False) -> Path:
    """Where `target` is built: `<target>.tmp-<tag>` beside it (tag: this process id), dot-prefixed if `hidden`."""
    prefix = "." if hidden else ""
    return target.with_name(f"{prefix}{target.name}.tmp-{os.getpid() if tag is None else tag}")


def publish(temp: Path, target: Path, replace: bool = False) -> None:
    """Sync the finished directory `temp` and rename it to `target`, durably.

    An empty directory at `target` is taken over. With `replace`, any existing `target` is moved
    aside and deleted once the new one is in place; without, a non-empty `target` raises
    FileExistsError (someone else published there meanwhile) and `temp` is left as it is.
    """
    for path in sorted(temp.rglob("*")):
        fsync(path)
    fsync(temp)
    stale = None
    if replace and target.exists():
        stale = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, stale)
    elif target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    try:
        os.rename(temp, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(e.errno, f"'{target}' already exists", str(target)) from None
        raise
    fsync(target.parent)  # the rename itself must survive a power loss
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path, hidden: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; publish it as `target` when the block succeeds.

    A stale temporary directory of the same name is cleared first. If the block raises (any
    exception, KeyboardInterrupt included) or publishing fails, the temporary directory is
    deleted and the exception propagates (a FileExistsError if `target` was taken meanwhile).
    `hidden`: see `temp_directory`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_directory(target, hidden=hidden)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        publish(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
