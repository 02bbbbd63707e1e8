import hashlib
import os
import subprocess
import sys

import pytest

from nanotrain.files import (
    atomic_directory,
    process_is_alive,
    publish,
    remove_stale_temporaries,
    sha256_file,
    temp_directory,
)


def test_sha256_file_matches_hashlib_across_blocks(tmp_path):
    data = bytes(range(256)) * 5000  # > 1 MiB: more than one read block
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_atomic_directory_publishes_only_when_complete(tmp_path):
    out = tmp_path / "nested" / "out"
    with atomic_directory(out, hidden=True) as temp:
        assert temp.parent == out.parent and temp.name.startswith(".out.tmp-")
        (temp / "sub").mkdir()
        (temp / "sub" / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "sub" / "a.txt").read_text() == "a"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


@pytest.mark.parametrize("interrupt", [ValueError, KeyboardInterrupt])
def test_atomic_directory_removes_temp_on_any_exception(tmp_path, interrupt):
    out = tmp_path / "out"
    stale = temp_directory(out)
    stale.mkdir()
    (stale / "leftover").write_text("from a killed run")
    with pytest.raises(interrupt):
        with atomic_directory(out) as temp:
            assert temp == stale and not any(temp.iterdir())  # the stale one was cleared
            (temp / "half").write_text("half-written")
            raise interrupt()
    assert list(tmp_path.iterdir()) == []


def test_publish_refuses_a_taken_target_unless_replacing(tmp_path):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        with atomic_directory(out) as temp:
            (temp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old").is_dir()

    temp = temp_directory(out, tag="rank0")
    temp.mkdir()
    (temp / "new").write_text("new")
    publish(temp, out, replace=True)
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def dead_pid():
    """The id of a process that has exited and been reaped."""
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    return finished.pid


@pytest.fixture
def live_pid():
    """The id of another process that runs for the whole test."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_atomic_directory_removes_temporaries_of_dead_writers_only(tmp_path, dead_pid, live_pid):
    out = tmp_path / "out"
    dead = [temp_directory(out, tag=dead_pid, hidden=True), temp_directory(out, tag=dead_pid)]
    live = temp_directory(out, tag=live_pid, hidden=True)  # another writer, still at work
    kept = [live, temp_directory(tmp_path / "other", tag=dead_pid, hidden=True),  # another target's
            tmp_path / f"out.old-{dead_pid}"]  # without `out` beside it, the only copy
    for directory in dead + kept:
        (directory / "part").mkdir(parents=True)
    (tmp_path / f"notes.tmp-{dead_pid}").write_text("a user's file, not a directory")
    with atomic_directory(out, hidden=True) as temp:
        (temp / "done").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f"notes.tmp-{dead_pid}", *(p.name for p in kept)])
    assert (live / "part").is_dir()


def test_remove_stale_temporaries_of_checkpoints(tmp_path, dead_pid, live_pid):
    for name in ("step_00000002", f"step_00000002.old-{dead_pid}", f"step_00000004.tmp-{dead_pid}",
                 f"step_00000006.tmp-{live_pid}", f"step_00000004.old-{dead_pid}", f"latest.tmp-{dead_pid}"):
        (tmp_path / name).mkdir()
    removed = remove_stale_temporaries(tmp_path, "step_*")
    assert sorted(p.name for p in removed) == [f"step_00000002.old-{dead_pid}", f"step_00000004.tmp-{dead_pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["step_00000002", f"step_00000006.tmp-{live_pid}", f"step_00000004.old-{dead_pid}", f"latest.tmp-{dead_pid}"])


def test_prepare_removes_the_temporary_of_a_killed_prepare(tmp_path, dead_pid, make_story_dataset):
    stale = temp_directory(tmp_path / "data", tag=dead_pid, hidden=True)  # what a SIGKILLed prepare leaves
    (stale / "train.bin").parent.mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"half")
    make_story_dataset(tmp_path, 20, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "stories.txt"]


def test_process_is_alive(dead_pid, live_pid):
    assert process_is_alive(os.getpid()) and process_is_alive(live_pid)
    assert not process_is_alive(dead_pid)
