import hashlib

import pytest

from nanotrain.files import atomic_directory, publish, sha256_file, temp_directory


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
