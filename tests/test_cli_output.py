"""What the listing commands print, in a pipe and on a real 80-column terminal (a pseudo-terminal):
one line per method, parameter and tensor names never split, plain lines when not a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from rich.cells import cell_len

from mergeforge.config import yaml_name
from mergeforge.methods import all_methods, get_method

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# rich decides "terminal or not" from these before looking at the stream itself
RICH_ENV = ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR", "NO_COLOR", "COLUMNS", "LINES")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RICH_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_in_pipe(*args: str) -> str:
    """``mergeforge ARGS | cat``: stdout is a pipe."""
    done = subprocess.run(
        [sys.executable, "-m", "mergeforge.cli", *args],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_on_terminal(*args: str, columns: int = 80) -> str:
    """``mergeforge ARGS`` on a pseudo-terminal ``columns`` wide; its screen text (colours
    removed, one entry per line the program wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**_env(), "COLUMNS": str(columns), "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeforge.cli", *args],
        env=env, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 1.0)[0]:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child exited and the terminal closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 0, err
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


def test_methods_in_a_pipe_is_one_whole_line_per_method():
    lines = run_in_pipe("methods").splitlines()
    methods = list(all_methods())
    assert len(lines) == len(methods)
    for line, m in zip(lines, methods, strict=True):
        assert line.split(None, 1) == [m.name, m.summary]  # whole: a pipe has no width


@pytest.mark.parametrize("args", [["methods"], ["methods", "ties"], ["methods", "--markdown"]])
def test_a_reader_that_stops_early_ends_it_quietly(args):
    """`mergeforge methods | head -1`, made deterministic: the pipe's reading end is closed
    before anything is written, so every write fails (EPIPE) as after head has quit."""
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run(
        [sys.executable, "-m", "mergeforge.cli", *args],
        env={**_env(), "PYTHONUNBUFFERED": "1"}, stdout=write, stderr=subprocess.PIPE,
        text=True, timeout=300,
    )  # fmt: skip
    os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_methods_on_an_80_column_terminal_is_one_line_per_method():
    lines = run_on_terminal("methods").splitlines()
    methods = list(all_methods())
    assert len(lines) == len(methods) + 1  # + a hint naming `methods NAME`
    assert "mergeforge methods NAME" in lines[-1]
    cut = 0
    for line, m in zip(lines, methods, strict=False):
        assert cell_len(line) <= 80, line
        name, summary = line.split(None, 1)
        assert name == m.name
        if summary != m.summary:
            assert summary.endswith("…") and m.summary.startswith(summary[:-1]), line
            cut += 1
    assert cut > 0, "no summary was longer than the terminal: the test shows nothing"


def _table_cells(lines: list[str], first: str, last: str) -> list[list[str]]:
    """Cells of the rich table whose header row names columns ``first`` ... ``last``: one list
    per text line of the body, cut at the header's column starts."""
    header = next(i for i, line in enumerate(lines) if first in line and last in line)
    names = lines[header].split()
    starts = [lines[header].index(n) for n in names]
    rows = []
    for line in lines[header + 2 :]:  # skip the rule under the header
        if not line.strip():
            break
        bounds = zip(starts, [*starts[1:], None], strict=True)
        rows.append([line[a:b].strip() for a, b in bounds])
    return rows


@pytest.mark.parametrize("name", ["ties", "swudi_a"])
def test_one_method_on_an_80_column_terminal_never_splits_a_parameter_name(name):
    """The acceptance check of `COLUMNS=80 mergeforge methods ties`: each parameter's name and
    default are whole cells on one line (only the meaning wraps), and nothing is wider than 80.
    swudi_a has the longest default ('participation_sqrt')."""
    m = get_method(name)
    fields = m.param_fields()
    scopes = ("shared", "per_model")
    expected = [(yaml_name(k), repr(v)) for s in scopes for k, v in fields[s].items()]
    lines = run_on_terminal("methods", name).splitlines()
    assert all(cell_len(line) <= 80 for line in lines), max(lines, key=cell_len)
    rows = _table_cells(lines, "parameter", "meaning")
    starts = [(r[0], r[2]) for r in rows if r[0]]  # continuation lines have an empty name cell
    assert starts == expected
    assert all(not r[1] and not r[2] for r in rows if not r[0])  # only the meaning goes on
    wrapped = sum(not r[0] for r in rows)
    assert wrapped > 0, "no meaning wrapped at 80 columns: the test shows nothing"


def test_one_method_in_a_pipe_is_one_whole_line_per_parameter():
    m = get_method("ties")
    fields, docs = m.param_fields(), m.param_docs()
    lines = run_in_pipe("methods", "ties").splitlines()
    assert lines[0] == f"ties: {m.summary}"
    at = lines.index("ties parameters:")
    assert lines[at + 1].split() == ["parameter", "scope", "default", "meaning"]
    body = [line.split(None, 3) for line in lines[at + 2 :]]
    assert body == [
        [yaml_name(k), s.replace("_", "-"), repr(v), docs[s][k]]
        for s in ("shared", "per_model")
        for k, v in fields[s].items()
    ]


def test_the_console_never_breaks_lines_when_not_on_a_terminal(capsys):
    """What quickstart and bench print through it (paths, results) stays one line in a log."""
    from mergeforge.cli import _console

    con = _console()  # stdout is pytest's capture: not a terminal
    long = "expert subjectivity: cached (" + "/very/long/cache/folder" * 8 + ")"
    con.print(long)
    assert capsys.readouterr().out == long + "\n"


def _tensor_names(folder) -> list[str]:
    from mergeforge.checkpoint import inspect_checkpoint

    return [i.name for i in inspect_checkpoint(folder)]


def test_inspect_in_a_pipe_is_tab_separated_lines(llama_family):
    base = llama_family["base"]
    names = _tensor_names(base)
    lines = run_in_pipe("inspect", str(base)).splitlines()
    assert lines[0].split("\t") == ["tensor", "shape", "dtype", "MB", "file"]
    rows = [line.split("\t") for line in lines[1 : len(names) + 1]]
    assert [r[0] for r in rows] == names
    assert all(len(r) == 5 and r[2] == "float32" for r in rows)
    assert lines[-1].startswith(f"{len(names)} tensors, ")


@pytest.mark.parametrize("columns", [100, 60, 30])
def test_inspect_on_a_terminal_never_wraps_tensor_names(llama_family, columns):
    """Wide: a table; narrower: columns dropped from the right, the names' column kept whole;
    narrower than the longest name: plain lines (the names still whole)."""
    base = llama_family["base"]
    names = _tensor_names(base)
    longest = max(map(len, names))
    lines = run_on_terminal("inspect", str(base), columns=columns).splitlines()
    if columns > longest + 4:
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
        assert [c[0] for c in cells[1:]] == names  # after the header row; one row per tensor
        assert all(cell_len(line) <= columns for line in lines)
        assert ("shape" in cells[0]) == (columns == 100)
    else:
        assert [line.split("\t")[0] for line in lines[1 : len(names) + 1]] == names
