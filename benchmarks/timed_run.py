#!/usr/bin/env python
"""Run one command; report its wall-clock, peak RSS (``ru_maxrss`` via ``os.wait4``) and CPU.

    python benchmarks/timed_run.py --json RESULT.json [--log LOG] [--timeout S] -- CMD ARGS...

Why a separate, stdlib-only launcher: on Linux ``ru_maxrss`` survives ``execve`` — the
child's value starts at the RSS high-water mark of the process it was forked (or vforked)
from. A benchmark driver that has imported torch or loaded tensors would leak its own
RSS into every measurement. This launcher is a fresh, small interpreter (~10 MB), so the
commands it starts are measured from (almost) zero.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(cmd: list[str], log: str | None = None, timeout: float | None = None) -> dict:
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else t0 + timeout
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                timed_out = True
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    finally:
        if log:
            out.close()
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc  # the pid is reaped; keep Popen from waiting on it
    return {
        "wall_s": wall,
        "maxrss_bytes": ru.ru_maxrss * 1024,
        "returncode": rc,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "timed_out": timed_out,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True)
    ap.add_argument("--log", default=None)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    r = measure(cmd, a.log, a.timeout)
    with open(a.json, "w") as f:
        json.dump(r, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
