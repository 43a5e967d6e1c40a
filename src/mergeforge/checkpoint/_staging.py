"""An output folder that appears whole or not at all.

Files are written into ``<parent>/.<name>.mergeforge-partial-<pid>`` and the folder is renamed
onto ``<parent>/<name>`` at commit. A run killed half-way leaves only the hidden folder, which the
next run targeting the same output removes (its pid is dead). Replacing an existing output is two
renames (old aside to ``.<name>.mergeforge-old-<pid>``, new in place): if the process dies between
them, the next start puts the old folder back.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

from mergeforge.errors import CheckpointError

_ACTIVE: set[Path] = set()  # staging folders owned by live writers in this process
_ACTIVE_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but unreaped child is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


class Staging:
    """The hidden temporary folder for one output folder."""

    def __init__(self, target: Path, *, overwrite: bool) -> None:
        self.target = target
        self.overwrite = overwrite
        if target.parent.is_dir():
            self._cleanup_stale()  # first: it may put back an output a killed run moved aside
        if target.exists() and not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a folder; choose another output.")
        if _is_nonempty_dir(target) and not overwrite:
            raise CheckpointError(
                f"{target} exists and is not empty; choose another output folder or pass "
                "overwrite=True (--overwrite) to replace it when the merge succeeds."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = target.parent / f".{target.name}.mergeforge-partial-{os.getpid()}"
        with _ACTIVE_LOCK:
            if self.path in _ACTIVE:
                raise CheckpointError(
                    f"{target}: another writer in this process is already writing it."
                )
            if self.path.exists():  # left by an earlier writer of this process
                shutil.rmtree(self.path)
            self.path.mkdir()
            _ACTIVE.add(self.path)

    def _cleanup_stale(self) -> None:
        pattern = re.compile(rf"\.{re.escape(self.target.name)}\.mergeforge-(partial|old)-(\d+)")
        for entry in self.target.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if not m or int(m[2]) == os.getpid() or _pid_alive(int(m[2])):
                continue
            if m[1] == "old" and not self.target.exists():
                entry.rename(self.target)  # died between the two renames of a replace
            else:
                shutil.rmtree(entry, ignore_errors=True)

    def commit(self) -> None:
        """Rename the staging folder onto the target (fsync the files before calling)."""
        fsync_path(self.path)
        old = None
        if self.target.exists():
            if _is_nonempty_dir(self.target):
                if not self.overwrite:
                    raise CheckpointError(
                        f"{self.target} appeared (non-empty) while writing; choose another "
                        "output folder or pass overwrite=True (--overwrite)."
                    )
                old = self.target.parent / f".{self.target.name}.mergeforge-old-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                self.target.rename(old)
            else:
                self.target.rmdir()
        self.path.rename(self.target)
        fsync_path(self.target.parent)
        self._release()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self.path)
