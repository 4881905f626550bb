"""The atomic-write helper (potentials/io.py): complete file or none, never a partial one."""

import json

import pytest

from potentials.io import atomic_open, atomic_path, atomic_write_text


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_open_writes_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_open(target, "w") as fh:
        json.dump({"a": 1}, fh)
        assert not target.exists()  # nothing visible under the final name while writing
    assert json.loads(target.read_text()) == {"a": 1}
    assert _listing(target.parent) == ["out.json"]


@pytest.mark.parametrize("use", ["open", "path"])
def test_writer_raising_leaves_old_file_and_no_partial(tmp_path, use):
    target = tmp_path / "data.txt"
    target.write_text("old complete content")
    with pytest.raises(RuntimeError, match="disk full"):
        if use == "open":
            with atomic_open(target, "w") as fh:
                fh.write("half of the new")
                raise RuntimeError("disk full")
        else:
            with atomic_path(target) as tmp:
                tmp.write_text("half of the new")
                raise RuntimeError("disk full")
    assert target.read_text() == "old complete content"
    assert _listing(tmp_path) == ["data.txt"]  # the temporary file is gone


def test_writer_raising_with_no_previous_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "new.bin", "wb") as fh:
            fh.write(b"\0" * 10)
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_atomic_path_keeps_extension_and_replaces(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("v1")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target
        tmp.write_text("v2")
    assert target.read_text() == "v2"
    atomic_write_text(target, "v3")
    assert target.read_text() == "v3" and _listing(tmp_path) == ["plot.png"]


def test_atomic_open_refuses_read_mode(tmp_path):
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "x", "r"):
            pass
