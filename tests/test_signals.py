"""Every way a run can end leaves nothing behind (issue 12, item 2): SIGTERM, SIGINT and SIGHUP
half-way through a real merge in a child process end with 143 / 130 / 129, a message on stderr,
nothing at the output path (a previous output kept as it was) and no hidden partial folder.

"Half-way" without timers: the child's stderr is a pipe that the test has filled, so the
child's main thread blocks in its first progress line, which it writes after merging at least
10% of the tensors; the test waits until the kernel reports the main thread asleep in a pipe
write (``/proc/PID/wchan``), checks that some but not all of the shard bytes are on disk, and
only then sends the signal. The merge cannot finish meanwhile: its main thread is stuck.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from mergeforge._signals import Interrupted, deferred, handle_signals
from mergeforge.cli import main
from tests.helpers import (
    finish,
    layer_family,
    merge_argv,
    sha_tree,
    start_blocked,
    written_fraction,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and Linux pipes")


def _config(tmp: Path, dirs: list[Path], method: str = "task_arithmetic", w: float = 0.5) -> Path:
    base, *experts = dirs
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "parameters": {"weight": w}} for e in experts]}  # fmt: skip
    if method == "ties":
        cfg["parameters"] = {"density": 0.5}
    p = tmp / f"{method}-{w}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _start_blocked(cfg: Path, out: Path, *flags: str, preexec=None):
    """The CLI merge (progress lines on), blocked on its first progress line."""
    return start_blocked(merge_argv(cfg, out, *flags), preexec=preexec)


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
    ids=["SIGTERM", "SIGINT", "SIGHUP"],
)
def test_stop_signal_half_way_leaves_nothing(tmp_path, sig, code):
    dirs = layer_family(tmp_path, n=20, dim=256)
    cfg, out = _config(tmp_path, dirs), tmp_path / "out"
    inputs = sha_tree(tmp_path / "models")
    proc, r, filled = _start_blocked(cfg, out)
    partial = tmp_path / f".out.mergeforge-partial-{proc.pid}"
    frac = written_fraction(partial, 20 * 256 * 256 * 4)
    assert 0.05 < frac < 0.9, f"not half-way: {frac:.0%} of the shard bytes written"
    proc.send_signal(sig)
    err = finish(proc, r, filled)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert not out.exists() and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", cfg.name])
    assert sha_tree(tmp_path / "models") == inputs


def test_sigterm_during_overwrite_keeps_the_previous_output(tmp_path, capsys):
    dirs = layer_family(tmp_path, n=20, dim=256)
    out = tmp_path / "out"
    assert main(["merge", str(_config(tmp_path, dirs, w=0.2)), str(out), "--no-progress"]) == 0
    capsys.readouterr()
    previous = sha_tree(out)
    proc, r, filled = _start_blocked(_config(tmp_path, dirs, w=0.9), out, "--overwrite")
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, r, filled)
    assert proc.returncode == 143, err
    assert sha_tree(out) == previous
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_while_workers_merge(tmp_path):
    """Bigger TIES tensors, so that when the main thread blocks the worker threads may still be
    merging the tensors submitted after the one it reports (up to ``workers``; whether they are
    still busy when the signal is sent depends on timing, so it is only printed). Asserted: the
    run stops with 143 and the message, and nothing is left behind (the executor joins the
    workers before the writer removes the folder)."""
    dirs = layer_family(tmp_path, n=12, dim=1024)
    cfg, out = _config(tmp_path, dirs, method="ties"), tmp_path / "out"
    proc, r, filled = _start_blocked(cfg, out)
    busy = [
        t.name for t in Path(f"/proc/{proc.pid}/task").iterdir()
        if (t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    ]  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, r, filled)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    print(f"threads running when the signal was sent: {len(busy)}")


def test_sigterm_during_the_final_rename_reports_a_complete_output(tmp_path, capsys, monkeypatch):
    """SIGTERM while the new output replaces the previous one (delivered from inside the rename
    of the staging folder): the commit completes, the previous output set aside is removed, and
    the CLI says the output was written, still exiting with 143 (the job was stopped)."""
    dirs = layer_family(tmp_path, n=4, dim=32)
    out = tmp_path / "out"
    assert main(["merge", str(_config(tmp_path, dirs, w=0.2)), str(out), "--no-progress"]) == 0
    real = Path.rename

    def rename(self, target):
        res = real(self, target)
        if self.name.startswith(".out.mergeforge-partial-"):
            signal.raise_signal(signal.SIGTERM)
        return res

    monkeypatch.setattr(Path, "rename", rename)
    capsys.readouterr()
    cfg = _config(tmp_path, dirs, w=0.9)
    assert main(["merge", str(cfg), str(out), "--no-progress", "--overwrite"]) == 143
    err = capsys.readouterr().err
    assert f"interrupted by SIGTERM after the output was complete: {out} is written" in err
    assert "nothing was written" not in err
    assert "weight: 0.9" in (out / "mergeforge_config.yml").read_text()
    assert (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """``nohup mergeforge merge ...``: SIGHUP is ignored on entry, so a closed terminal does
    not stop the merge."""
    dirs = layer_family(tmp_path, n=20, dim=256)
    cfg, out = _config(tmp_path, dirs), tmp_path / "out"
    proc, r, filled = _start_blocked(
        cfg, out, preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
    )
    proc.send_signal(signal.SIGHUP)
    err = finish(proc, r, filled)
    assert proc.returncode == 0, err
    assert (out / "model.safetensors.index.json").is_file()


# the mechanism, in this process


@pytest.fixture(autouse=True)
def default_dispositions():
    """Each test starts from the usual dispositions even when pytest itself runs under nohup or
    as a background job (SIGHUP / SIGINT ignored), and leaves them as it found them."""
    wanted = {signal.SIGHUP: signal.SIG_DFL, signal.SIGTERM: signal.SIG_DFL,
              signal.SIGINT: signal.default_int_handler}  # fmt: skip
    saved = {s: signal.signal(s, h) for s, h in wanted.items()}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.2)  # the handler runs here (at the latest when the sleep is interrupted)


def test_handlers_raise_once_and_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    with handle_signals():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        with pytest.raises(Interrupted) as e:
            _deliver(signal.SIGTERM)
        assert (e.value.name, e.value.exit_code) == ("SIGTERM", 143)
        assert isinstance(e.value, KeyboardInterrupt)
        _deliver(signal.SIGHUP)  # already unwinding: ignored, so clean-up is not cut short
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_interrupts_the_main_thread_waiting_for_a_worker():
    """``run_jobs``' main thread waits in ``Future.result()`` while workers merge: the signal
    ends that wait at once (not when the worker finishes), and the worker is joined."""
    release = threading.Event()
    started = threading.Event()

    def work() -> str:
        started.set()
        release.wait(60)
        return "done"

    main_id = threading.get_ident()
    with ThreadPoolExecutor(1) as pool, handle_signals():
        fut = pool.submit(work)
        started.wait(10)
        threading.Timer(0.2, signal.pthread_kill, (main_id, signal.SIGTERM)).start()
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            fut.result()
        assert time.monotonic() - t0 < 10 and not fut.done()  # the worker is still busy
        release.set()
    assert fut.result() == "done"


def test_deferred_holds_a_signal_until_the_block_ends():
    reached = False
    with handle_signals():
        with pytest.raises(Interrupted) as e:
            with deferred():
                _deliver(signal.SIGHUP)
                reached = True  # the block ran to its end
        assert e.value.exit_code == 129
    assert reached


def test_an_ignored_signal_is_left_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with handle_signals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            _deliver(signal.SIGHUP)  # nothing happens
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
