"""Atomic outputs and file hashes.

Every directory nanotrain writes for users (checkpoints, exports, prepared datasets) is built in
a temporary directory next to its final name, synced to disk, and renamed into place only when
complete, so an error, Ctrl-C or crash never leaves an output that looks usable:

    with atomic_directory(out) as temp:
        (temp / "weights.bin").write_bytes(...)   # nothing named `out` exists until the block ends

Writers that span several processes (a multi-rank checkpoint) use `temp_directory` and
`publish` directly.

A process killed while writing (SIGKILL, power loss) leaves its temporary directory behind;
`remove_stale_temporaries` deletes those whose process is gone, and `atomic_directory` calls it
for its target before it starts.

`destination_problem(error)` says whether a failed write failed because of where it went (a
full, read-only or forbidden file system), so callers can name the output the user chose.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import os
import re
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


OUT_OF_SPACE, NOT_WRITABLE = "out of space", "not writable"
_DESTINATION_ERRNOS = {errno.ENOSPC: OUT_OF_SPACE, errno.EDQUOT: OUT_OF_SPACE,
                       errno.EROFS: NOT_WRITABLE, errno.EACCES: NOT_WRITABLE, errno.EPERM: NOT_WRITABLE}


def destination_problem(error: OSError) -> str | None:
    """OUT_OF_SPACE or NOT_WRITABLE when a write failed because of where it went, else None.

    For a one-line message naming the output the user chose, not the temporary path
    (`.ds.tmp-18525`) nor no path at all (a full disk's ENOSPC names no file).
    """
    return _DESTINATION_ERRNOS.get(error.errno)


# `[.]<target>.tmp-<pid>` is a directory being built; `<target>.old-<pid>` one being replaced (see publish).
_LEFTOVER = re.compile(r"(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)")


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a reader (or a crash) sees the old file or the new one, never a part.

    Written to `<path>.tmp` beside it, synced, renamed over `path`, and the rename synced.
    """
    temp = path.with_name(path.name + ".tmp")
    try:
        temp.write_text(text)
        fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def temp_directory(target: Path, tag: int | str | None = None, hidden: bool = False) -> Path:
    """Where `target` is built: `<target>.tmp-<tag>` beside it (tag: this process id), dot-prefixed if `hidden`.

    A numeric tag must be the id of the process that owns the directory (for a multi-process
    writer, the one that publishes it): `remove_stale_temporaries` deletes it once that process is gone.
    """
    prefix = "." if hidden else ""
    return target.with_name(f"{prefix}{target.name}.tmp-{os.getpid() if tag is None else tag}")


def process_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: only the existence check
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def remove_stale_temporaries(directory: Path, targets: str = "*") -> list[Path]:
    """Delete the leftovers of killed writers in `directory` whose target name matches the glob `targets`.

    A temporary directory (`temp_directory`) goes once its process is gone; a live process's is
    kept, so two writers may work side by side. A directory moved aside by `publish(replace=True)`
    goes only if its replacement is in place (otherwise it is the only copy). Only names of these
    two forms are touched, so unrelated files in `directory` are safe. Returns what was removed.
    """
    removed = []
    for child in sorted(directory.iterdir()) if directory.is_dir() else []:
        match = _LEFTOVER.fullmatch(child.name)
        if match is None or not child.is_dir():
            continue
        name, kind = match["name"], match["kind"]
        hidden_temp = kind == "tmp" and name.startswith(".") and fnmatch.fnmatchcase(name[1:], targets)
        if not (fnmatch.fnmatchcase(name, targets) or hidden_temp):
            continue
        if kind == "old" and not (directory / name).exists():
            continue
        if process_is_alive(int(match["pid"])):
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    return removed


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

    Stale temporaries of `target` (this process's own, and those of killed processes) are
    cleared first. If the block raises (any exception, KeyboardInterrupt included) or
    publishing fails, the temporary directory is deleted and the exception propagates (a
    FileExistsError if `target` was taken meanwhile).
    `hidden`: see `temp_directory`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, glob.escape(target.name))
    temp = temp_directory(target, hidden=hidden)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        publish(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
