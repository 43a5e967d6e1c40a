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
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergeforge._signals import Interrupted, deferred, handle_signals
from mergeforge.cli import main
from tests.test_output_safety import _hashes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and Linux pipes")


def _family(tmp: Path, n: int, dim: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    dirs = []
    for name in ("base", "e1", "e2"):
        d = tmp / "models" / name
        d.mkdir(parents=True)
        sd = {f"model.layers.{i}.mlp.weight": torch.randn(dim, dim, generator=g)
              for i in range(n)}  # fmt: skip
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def _config(tmp: Path, dirs: list[Path], method: str = "task_arithmetic", w: float = 0.5) -> Path:
    base, *experts = dirs
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(e), "parameters": {"weight": w}} for e in experts]}  # fmt: skip
    if method == "ties":
        cfg["parameters"] = {"density": 0.5}
    p = tmp / f"{method}-{w}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _full_pipe() -> tuple[int, int, int]:
    """A pipe whose buffer is already full: ``(read fd, write fd, bytes in it)``."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)  # the child's writes must block, not fail
    return r, w, filled


def _start_blocked(cfg: Path, out: Path, *flags: str, preexec=None):
    """Start the CLI merge (progress lines on) with a full stderr pipe; return once its main
    thread sleeps in a write to that pipe: ``(process, read fd, filler length)``."""
    r, w, filled = _full_pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeforge.cli", "merge", str(cfg), str(out), *flags],
        stdout=subprocess.DEVNULL, stderr=w, preexec_fn=preexec,
    )  # fmt: skip
    os.close(w)
    deadline = time.monotonic() + 120
    wchan = ""
    while time.monotonic() < deadline and proc.poll() is None:
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
        if "pipe_write" in wchan:
            return proc, r, filled
        time.sleep(0.005)
    proc.kill()
    os.close(r)
    raise AssertionError(f"the merge never blocked on its stderr (rc={proc.poll()}, {wchan=})")


def _finish(proc, r: int, filled: int) -> str:
    """Drain the child's stderr to the end, wait for it; its stderr minus the filler."""
    with os.fdopen(r, "rb") as f:
        data = f.read()
    proc.wait(timeout=60)
    return data[filled:].decode(errors="replace")


def _written_fraction(partial: Path, total: int) -> float:
    """Share of the declared shard bytes already allocated on disk (the shards are sparse
    until tensors arrive)."""
    return sum(p.stat().st_blocks * 512 for p in partial.iterdir()) / total


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
    ids=["SIGTERM", "SIGINT", "SIGHUP"],
)
def test_stop_signal_half_way_leaves_nothing(tmp_path, sig, code):
    dirs = _family(tmp_path, n=20, dim=256)
    cfg, out = _config(tmp_path, dirs), tmp_path / "out"
    inputs = _hashes(tmp_path / "models")
    proc, r, filled = _start_blocked(cfg, out)
    partial = tmp_path / f".out.mergeforge-partial-{proc.pid}"
    frac = _written_fraction(partial, 20 * 256 * 256 * 4)
    assert 0.05 < frac < 0.9, f"not half-way: {frac:.0%} of the shard bytes written"
    proc.send_signal(sig)
    err = _finish(proc, r, filled)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert not out.exists() and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", cfg.name])
    assert _hashes(tmp_path / "models") == inputs


def test_sigterm_during_overwrite_keeps_the_previous_output(tmp_path, capsys):
    dirs = _family(tmp_path, n=20, dim=256)
    out = tmp_path / "out"
    assert main(["merge", str(_config(tmp_path, dirs, w=0.2)), str(out), "--no-progress"]) == 0
    capsys.readouterr()
    previous = _hashes(out)
    proc, r, filled = _start_blocked(_config(tmp_path, dirs, w=0.9), out, "--overwrite")
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, r, filled)
    assert proc.returncode == 143, err
    assert _hashes(out) == previous
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_while_workers_merge(tmp_path):
    """Bigger TIES tensors: when the main thread blocks, the worker threads are still merging
    the tensors submitted after the one it reports; the signal lands while they run, the
    executor joins them, then the writer removes the folder."""
    dirs = _family(tmp_path, n=12, dim=1024)
    cfg, out = _config(tmp_path, dirs, method="ties"), tmp_path / "out"
    proc, r, filled = _start_blocked(cfg, out)
    busy = [
        t.name for t in Path(f"/proc/{proc.pid}/task").iterdir()
        if (t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    ]  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, r, filled)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    print(f"threads running when the signal was sent: {len(busy)}")


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """``nohup mergeforge merge ...``: SIGHUP is ignored on entry, so a closed terminal does
    not stop the merge."""
    dirs = _family(tmp_path, n=20, dim=256)
    cfg, out = _config(tmp_path, dirs), tmp_path / "out"
    proc, r, filled = _start_blocked(
        cfg, out, preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
    )
    proc.send_signal(signal.SIGHUP)
    err = _finish(proc, r, filled)
    assert proc.returncode == 0, err
    assert (out / "model.safetensors.index.json").is_file()


# the mechanism, in this process


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
