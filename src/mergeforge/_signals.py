"""Stop on SIGINT, SIGTERM and SIGHUP the way Ctrl-C stops: by an exception in the main thread.

:func:`handle_signals` (installed by the CLI around a command) turns each of the three signals
into :class:`Interrupted`, a :class:`KeyboardInterrupt`, so a run that a job scheduler
terminates (SIGTERM), whose terminal closes (SIGHUP) or that the user stops (SIGINT) unwinds
through every ``with``/``finally``: the output writer removes its hidden partial folder and
the CLI exits with the shell's code for the signal, ``128 + signum`` (130, 143, 129).

Python runs signal handlers in the main thread only, between bytecodes, and interrupts the
main thread's blocking waits (``Future.result``, lock acquires; a ``write`` to a full pipe runs
the handler before retrying, PEP 475). Worker threads are not interrupted: the engine's
executor cancels the queued jobs and joins the running ones (one tensor each) as the exception
passes, before the writer removes its folder.

Two rules keep the clean-up itself safe:

- only the first signal raises; later ones, while the run unwinds, are ignored (a second
  Ctrl-C must not cut the removal of the partial folder short). SIGKILL stays the way to stop
  at once, and the next run removes what a killed one left;
- inside :func:`deferred` (the renames that put an output in place, the removal of a partial
  folder) a signal is held and raised when the block ends, so a replace is never half-done.

A signal that is ignored when :func:`handle_signals` starts stays ignored (``nohup`` ignores
SIGHUP; a background job of a non-interactive shell ignores SIGINT).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A handled signal arrived; ``exit_code`` is the shell's code for it (128 + signum)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# Touched only from the main thread (the handler and deferred() run there).
_raised = False  # the run is already unwinding from a signal: ignore further ones
_depth = 0  # nesting of deferred() blocks
_pending: int | None = None  # a signal held by deferred()


def _handler(signum: int, _frame: object) -> None:
    global _raised, _pending
    if _raised:
        return
    if _depth:
        if _pending is None:
            _pending = signum
        return
    _raised = True
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread
    (once); the previous handlers are restored at its end. Outside the main thread, where
    Python cannot install handlers, a no-op."""
    global _raised, _pending
    if not _in_main_thread():
        yield
        return
    previous: dict[int, object] = {}
    saved = (_raised, _pending)
    _raised, _pending = False, None
    try:
        for s in HANDLED:
            old = signal.getsignal(s)
            if old == signal.SIG_IGN:
                continue
            signal.signal(s, _handler)
            # None: a handler not installed from Python; the default is the closest we can put back
            previous[s] = signal.SIG_DFL if old is None else old
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)  # type: ignore[arg-type]
        _raised, _pending = saved


@contextmanager
def deferred() -> Iterator[None]:
    """Hold handled signals for the block: one that arrives meanwhile is raised as
    :class:`Interrupted` when the block ends (replacing an exception the block raised). A no-op
    outside the main thread or without :func:`handle_signals`."""
    global _depth, _pending, _raised
    if not _in_main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None and not _raised:
            signum, _pending = _pending, None
            _raised = True
            raise Interrupted(signum)


@contextmanager
def own_handlers() -> Iterator[None]:
    """Keep this process's SIGTERM / SIGINT handlers over the block: a library that installs
    its own (``ray.init`` kills the driver at once) has them put back when the block ends, so a
    stopped run unwinds like a stopped merge. Outside the main thread a no-op."""
    if not _in_main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)
