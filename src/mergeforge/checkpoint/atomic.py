"""Atomic writes of small files and cache folders: they appear whole or not at all.

A merged model goes through :class:`~mergeforge.checkpoint.writer.ShardedWriter` and its
staging folder (``_staging.py``: overwrite rules, stale-folder clean-up). Everything else that
must never be seen half-written — sidecars, results files, trained experts and parents in the
cache — goes through here: write a temporary sibling (named with the pid, so two processes never
share one), then ``os.replace`` it onto the target. A run killed meanwhile leaves only the
temporary sibling, never a truncated target, and the next write of that target removes the
siblings of processes that are no longer alive (SIGKILL, or a script that installs no signal
handler, leaves them behind). No fsync: these survive a killed process, not a
power cut (they are rebuilt or rewritten by the next run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergeforge._signals import deferred


def _sibling(path: Path) -> Path:
    _remove_stale(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove_stale(path: Path) -> None:
    """Remove ``path``'s temporary siblings left by processes that have died."""
    from mergeforge.checkpoint._staging import _pid_alive, _remove

    prefix = f"{path.name}.tmp-"
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # no parent yet: nothing to clean
        return
    for entry in entries:
        pid = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(entry)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, rename
    it onto ``path`` (replacing any previous file). The temporary file is removed either way."""
    path = Path(path)
    tmp = _sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_folder(dest: str | os.PathLike[str], build: Callable[[Path], None]) -> None:
    """Run ``build(tmp)`` in an empty sibling folder, then put it in place of ``dest``
    (replacing a previous one): no half-built folder is ever seen at ``dest``. The parent folders
    are created; the temporary folder is removed if ``build`` fails."""
    dest = Path(dest)
    tmp = _sibling(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        with deferred():  # no stop signal between removing the old folder and renaming the new
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
