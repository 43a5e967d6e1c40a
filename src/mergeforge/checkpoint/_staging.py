"""An output folder that appears whole or not at all.

Files are written into ``<parent>/.<name>.mergeforge-partial-<pid>`` and the folder is renamed
onto ``<parent>/<name>`` at commit. A run killed half-way leaves only the hidden folder, which the
next run targeting the same output removes (its pid is dead). Replacing an existing output is two
renames (old aside to ``.<name>.mergeforge-old-<pid>``, new in place): if the process dies between
them, the next start puts the old folder back. The renames and the removal of a partial folder
run with SIGINT/SIGTERM/SIGHUP held (:func:`mergeforge._signals.deferred`), so a stopped run
never leaves a replace half-done. The clean-up after the renames (fsync of the parent, removal
of the old folder) runs in the same held block: a signal that arrives during the commit is
raised only once the new output is in place and nothing of the old one is left, and
:func:`take_committed` tells the CLI that the output was written completely (it then says so
and still exits with ``128 + signum``: the job was stopped, as the scheduler asked, but its
result is usable). Missing parent folders created for the staging folder are removed again
(if still empty) when the run is aborted.

With ``overwrite``, an existing non-empty folder is replaced only if ``replaceable(folder)``
says so (the engine passes "a previous mergeforge output"); it is checked at the start and
again at the rename.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from mergeforge._signals import deferred
from mergeforge.errors import CheckpointError

_ACTIVE: dict[Path, Staging] = {}  # staging folders owned by live writers in this process
_ACTIVE_LOCK = threading.Lock()
_COMMITTED: deque[Path] = deque(maxlen=16)  # outputs put in place, for take_committed()


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


def _remove(path: Path) -> None:
    """Remove a folder tree, a file, or just the link if ``path`` is a symlink (never its
    target)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(target: str | os.PathLike[str]) -> None:
    """Make sure an output folder can be created or replaced at ``target``, by creating and
    removing an empty hidden folder where the staging folder will go (the parent, or its
    nearest existing ancestor when missing folders on the way are to be created). Catches what
    ``os.access`` cannot: a read-only file system or an immutable folder for root. Raises
    :class:`CheckpointError` naming the folder and the fix."""
    target = Path(target)
    where = nearest_existing(target.parent)
    if not where.is_dir():
        raise CheckpointError(
            f"cannot write the output {str(target)!r}: {where} is a file, not a folder; choose an "
            "output path whose parent folders are folders."
        )
    probe = where / f".{target.name}.mergeforge-probe-{os.getpid()}"
    try:
        with deferred():  # a stop signal must not leave the probe behind
            probe.mkdir()
            probe.rmdir()
    except FileExistsError:  # another writer of this process is probing: it exists, so fine
        pass
    except OSError as e:
        raise CheckpointError(
            f"cannot write the output {str(target)!r}: cannot create anything in {where} "
            f"({e.strerror}); choose an output folder you can write to, or fix the permissions "
            f"of {where}."
        ) from None


def discard_active() -> list[Path]:
    """Remove every staging folder of this process not yet committed or aborted, with the
    parent folders created for it (a last resort for the CLI when a stop signal unwound the
    run); returns the staging folders removed."""
    with _ACTIVE_LOCK:
        stagings = [_ACTIVE[p] for p in sorted(_ACTIVE)]
        _ACTIVE.clear()
    for st in stagings:
        st.abort()
    return [st.path for st in stagings]


def take_committed() -> list[Path]:
    """The output folders put in place by :meth:`Staging.commit` since the last call (oldest
    first), and forget them: the CLI asks when a stop signal ended a command, to tell a
    complete output from nothing written."""
    with _ACTIVE_LOCK:
        paths = list(_COMMITTED)
        _COMMITTED.clear()
    return paths


class Staging:
    """The hidden temporary folder for one output folder."""

    def __init__(
        self,
        target: Path,
        *,
        overwrite: bool,
        replaceable: Callable[[Path], bool] | None = None,
    ) -> None:
        self.target = target
        self.overwrite = overwrite
        self.replaceable = replaceable
        if target.parent.is_dir():
            self._cleanup_stale()  # first: it may put back an output a killed run moved aside
        if target.exists() and not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a folder; choose another output.")
        self._check_replace()
        self.path = target.parent / f".{target.name}.mergeforge-partial-{os.getpid()}"
        self.committed = False
        # missing folders on the way, deepest first: created below, removed again by abort()
        self._made: list[Path] = []
        p = Path(os.path.abspath(target.parent))
        while not p.exists() and p != p.parent:
            self._made.append(p)
            p = p.parent
        created = False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _ACTIVE_LOCK:
                if self.path in _ACTIVE:
                    raise CheckpointError(
                        f"{target}: another writer in this process is already writing it."
                    )
                if self.path.exists():  # left by an earlier writer of this process
                    shutil.rmtree(self.path)
                with deferred():  # created and registered together (see discard_active)
                    self.path.mkdir()
                    _ACTIVE[self.path] = self
                    created = True
        except BaseException as e:
            if created:  # a stop signal held over the creation: remove it again
                self.abort()
            else:
                self._remove_made()
            if isinstance(e, OSError):
                raise CheckpointError(
                    f"cannot write the output {str(target)!r}: creating {e.filename or self.path} "
                    f"failed ({e.strerror}); choose an output folder you can write to, or fix "
                    "the permissions."
                ) from None
            raise

    def _check_replace(self) -> None:
        """Refuse to replace a non-empty target without ``overwrite``, or one that
        ``replaceable`` does not accept."""
        if not _is_nonempty_dir(self.target):
            return
        if not self.overwrite:
            raise CheckpointError(
                f"{self.target} is not empty; choose another output folder or pass "
                "overwrite=True (--overwrite) to replace it when the merge succeeds."
            )
        if self.replaceable is not None and not self.replaceable(self.target):
            raise CheckpointError(
                f"{self.target} is not empty and is not a previous mergeforge output; "
                "overwrite only replaces an earlier output or an empty folder. Nothing in it was "
                "touched: choose another output folder, or move it away yourself."
            )

    def _cleanup_stale(self) -> None:
        pattern = re.compile(
            rf"\.{re.escape(self.target.name)}\.mergeforge-(partial|old|probe)-(\d+)"
        )
        for entry in self.target.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if not m or int(m[2]) == os.getpid() or _pid_alive(int(m[2])):
                continue
            if m[1] == "old" and not self.target.exists():
                entry.rename(self.target)  # died between the two renames of a replace
            else:
                _remove(entry)

    def commit(self) -> None:
        """Rename the staging folder onto the target (fsync the files before calling).

        Once the second rename has succeeded the output is complete and :attr:`committed` is
        true, whatever follows: an ``OSError`` from the clean-up (fsync of the parent, removal
        of the old folder) or a stop signal held over the commit is raised after it."""
        fsync_path(self.path)
        old = None
        # both renames and their clean-up, or neither: a signal is raised when all is done
        with deferred():
            if self.target.exists() or self.target.is_symlink():
                if _is_nonempty_dir(self.target):
                    self._check_replace()
                    old = self.target.parent / f".{self.target.name}.mergeforge-old-{os.getpid()}"
                    if old.exists() or old.is_symlink():
                        _remove(old)
                    self.target.rename(old)
                elif self.target.is_symlink():
                    self.target.unlink()  # a link to an empty folder: replace the link only
                else:
                    self.target.rmdir()
            try:
                self.path.rename(self.target)
            except BaseException:
                if old is not None:  # put the previous output back
                    old.rename(self.target)
                raise
            self._release()
            self.committed = True
            with _ACTIVE_LOCK:
                _COMMITTED.append(self.target)
            try:
                fsync_path(self.target.parent)
            finally:
                if old is not None:
                    _remove(old)

    def abort(self) -> None:
        if self.committed:
            return
        with deferred():  # a second signal must not cut the removal short
            shutil.rmtree(self.path, ignore_errors=True)
            self._release()
            self._remove_made()

    def _remove_made(self) -> None:
        """Remove the parent folders this staging created, deepest first, while empty."""
        for d in self._made:
            try:
                d.rmdir()
            except OSError:  # not empty (someone else uses it), or already gone
                if d.exists():
                    break
        self._made = []

    def _release(self) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE.pop(self.path, None)
