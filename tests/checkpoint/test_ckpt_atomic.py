"""Atomic writes of small files and cache folders: the target is whole or untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergeforge.checkpoint.atomic import atomic_file, atomic_folder, write_text_atomic


def test_write_text_replaces_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "r.json"
    target.write_text("old")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half-way"), atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f"w.safetensors.tmp-{os.getpid()}"
        tmp.write_bytes(b"half")
        raise RuntimeError("killed half-way")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_folder_appears_whole_and_replaces_the_previous_one(tmp_path: Path):
    dest = tmp_path / "cache" / "expert"  # parents are created

    def build(tmp: Path) -> None:
        assert not dest.exists() and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("1")

    atomic_folder(dest, build)
    assert [p.name for p in dest.iterdir()] == ["a.txt"]
    atomic_folder(dest, lambda tmp: (tmp / "b.txt").write_text("2"))
    assert [p.name for p in dest.iterdir()] == ["b.txt"]  # nothing of the old folder is left
    assert sorted(p.name for p in dest.parent.iterdir()) == ["expert"]


def test_a_failed_folder_build_keeps_the_old_folder(tmp_path: Path):
    dest = tmp_path / "expert"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def build(tmp: Path) -> None:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        atomic_folder(dest, build)
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_the_next_write_removes_what_a_killed_process_left(tmp_path: Path):
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(child.stdout)  # exited and reaped: a dead pid
    live = os.getppid()  # this test's parent process: alive
    (tmp_path / f"expert.tmp-{dead}").mkdir()
    (tmp_path / f"expert.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f"expert.tmp-{live}").mkdir()  # another live process's build: left alone
    (tmp_path / f"r.json.tmp-{dead}").write_text("half")
    (tmp_path / "other.tmp-x").write_text("not ours")
    atomic_folder(tmp_path / "expert", lambda d: (d / "a").write_text("1"))
    write_text_atomic(tmp_path / "r.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "expert",
        f"expert.tmp-{live}",
        "other.tmp-x",
        "r.json",
    ]
