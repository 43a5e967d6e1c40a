"""The import layers of ``src/mergeforge``: nothing imports upward.

Every import of every module is read with ``ast`` (module level, inside functions, under
``TYPE_CHECKING``: all of them) and checked against :data:`LAYERS`, the floors of the README's
architecture section, lowest first. A module may import its own room (the longest prefix of
:data:`LAYERS` it falls under) and any room on a lower floor; never a room on its own floor (the
text and vision domains, or two scenarios, stay apart) and never one above. A module that falls
under no room fails too, so a new package is placed in the table (and the README) when it is
added. The table also holds the packages still to come (``train``, ``fusion``, ``moe``,
``evolve``, ``federated``): their place is decided before their first line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mergeforge"

# (floor, rooms): module prefixes relative to ``mergeforge`` ("" is the package root alone).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("errors",)),
    ("ground", ("version", "device", "cache", "_signals")),
    ("checkpoint", ("checkpoint",)),
    ("methods", ("methods",)),
    ("config", ("config",)),
    ("stats", ("stats",)),
    ("train", ("train",)),
    ("engine", ("engine",)),
    ("api", ("",)),
    ("fusion", ("fusion",)),
    ("evaluate", ("evaluate",)),
    ("domains", ("evaluate.text", "evaluate.vision")),
    ("bench", ("evaluate.bench",)),
    ("scenarios", ("moe", "evolve", "federated", "quickstart", "extract_lora")),
    ("mergekit_cli", ("mergekit_cli",)),
    ("cli", ("cli",)),
)
OUTSIDE = ("tests", "benchmarks", "scripts")  # import mergeforge, never the reverse
# Rooms used from outside only through the package itself (its ``__init__``), never its modules:
# the engine's planner and executor are its own business (the bench once reached into the plan).
SEALED = ("engine",)


def _qualify(room: str) -> str:
    return f"mergeforge.{room}" if room else "mergeforge"


def room_of(module: str) -> tuple[int, str] | None:
    """``(floor index, room)`` of a ``mergeforge`` module: the longest room prefix it is under;
    the package root is only the root module itself. ``None`` when no room holds it."""
    best: tuple[int, str] | None = None
    for i, (_, rooms) in enumerate(LAYERS):
        for room in rooms:
            q = _qualify(room)
            under = module == q if not room else module == q or module.startswith(q + ".")
            if under and (best is None or len(q) > len(_qualify(best[1]))):
                best = (i, room)
    return best


def imports(
    module: str, source: str, *, is_package: bool, known: set[str]
) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement in ``source``, relative imports
    resolved; ``from X import name`` is the module ``X.name`` when that is one of ``known``."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def violations(sources: dict[str, tuple[str, str, bool]]) -> list[str]:
    """Every upward, sideways, unplaced or outside import of ``sources``: module -> (where, source
    text, is_package). Returns one message a problem, naming the file, line, both modules and
    floors, and the fix."""
    known = set(sources)
    out = []
    for module, (where, source, is_package) in sorted(sources.items()):
        mine = room_of(module)
        if mine is None:
            out.append(f"{where}: module {module} is on no floor; add it to LAYERS in "
                       "tests/test_layers.py and to the README's layer table")  # fmt: skip
            continue
        for line, target in imports(module, source, is_package=is_package, known=known):
            top = target.partition(".")[0]
            if top in OUTSIDE:
                out.append(f"{where}:{line}: {module} imports {target}; the package never "
                           f"imports {top}/ (it imports mergeforge, not the reverse)")  # fmt: skip
                continue
            if top != "mergeforge":
                continue
            theirs = room_of(target)
            if theirs is None or theirs[1] == mine[1]:
                continue  # same room; an unplaced target is reported as a module of its own
            if theirs[0] >= mine[0]:
                how = "sideways (same floor, another room)" if theirs[0] == mine[0] else "upward"
                out.append(
                    f"{where}:{line}: {module} (floor {LAYERS[mine[0]][0]}) imports {target} "
                    f"(floor {LAYERS[theirs[0]][0]}): {how}; move what both need down to a "
                    "lower floor, or the importer up (README, Architecture: layers)"
                )
            elif theirs[1] in SEALED and target != _qualify(theirs[1]):
                out.append(
                    f"{where}:{line}: {module} imports {target}, inside the sealed "
                    f"{_qualify(theirs[1])}; use what {_qualify(theirs[1])} itself exports, or "
                    "move the function down to a floor both may import"
                )
    return out


def package_sources() -> dict[str, tuple[str, str, bool]]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (str(path.relative_to(ROOT)), path.read_text(), is_package)
    return out


def test_nothing_imports_upward():
    sources = package_sources()
    assert len(sources) > 50 and "mergeforge.engine" in sources  # the walk found the package
    problems = violations(sources)
    assert not problems, "import layers broken:\n" + "\n".join(problems)


def _fake(module: str, source: str, *, is_package: bool = False) -> dict:
    return {module: (f"<{module}>", source, is_package)}


def _with(*fakes: dict) -> dict:
    sources = {m: ("<stub>", "", False) for m in package_sources()}
    for f in fakes:
        sources.update(f)
    return sources


@pytest.mark.parametrize(
    "module, source, needle",
    [
        # the four imports of issue 13, written the old way
        (
            "mergeforge.stats.hf",
            "def f():\n    from mergeforge.engine import resolve_device\n",
            "mergeforge.stats.hf (floor stats) imports mergeforge.engine (floor engine): upward",
        ),
        (
            "mergeforge.checkpoint.sidecar",
            "from mergeforge import __version__\n",
            "imports mergeforge (floor api): upward",
        ),
        (
            "mergeforge.evaluate.vision.data",
            "from mergeforge.evaluate.text.tasks import DataPackageMissing\n",
            "imports mergeforge.evaluate.text.tasks (floor domains): sideways",
        ),
        (
            "mergeforge.evaluate.pool",
            "from mergeforge.evaluate.text import suite\n",
            "imports mergeforge.evaluate.text.suite (floor domains): upward",
        ),
        # relative imports resolve, and a root module reaching for a room above is caught
        (
            "mergeforge.methods.fake",
            "from ..engine.plan import build_plan\n",
            "imports mergeforge.engine.plan (floor engine): upward",
        ),
        ("mergeforge.errors", "import mergeforge.checkpoint\n", "upward"),
        (
            "mergeforge.evaluate.bench",
            "def f():\n    from mergeforge.engine.plan import build_params\n",
            "imports mergeforge.engine.plan, inside the sealed mergeforge.engine",
        ),
        ("mergeforge.engine.fake", "from tests.helpers import load_dir\n", "never imports tests/"),
        ("mergeforge.widgets", "import os\n", "module mergeforge.widgets is on no floor"),
    ],
)
def test_the_checker_catches(module, source, needle):
    problems = violations(_with(_fake(module, source)))
    assert len(problems) == 1 and needle in problems[0], problems


def test_the_checker_allows_downward_and_own_room_imports():
    fake = _fake(
        "mergeforge.evaluate.vision.fake",
        "import torch\nfrom mergeforge.evaluate.metrics import accuracy\n"
        "from mergeforge.evaluate.vision import data\nfrom . import models\n"
        "def f():\n    from mergeforge.checkpoint.atomic import atomic_folder\n"
        "    import mergeforge\n",
    )
    assert violations(_with(fake)) == []


def test_the_readme_states_the_same_layers():
    """The README's layer table lists the floors of :data:`LAYERS`, in order, with their rooms."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| *(\d+) *\| *([a-z_]+) *\| *(.*?) *\|", text, flags=re.M)
    assert rows, "README.md has no layer table (| floor | name | modules | ...)"
    readme = [(name, tuple(re.findall(r"`([a-z_.]*)`", mods))) for _, name, mods in rows]
    expected = [(name, tuple(r or "mergeforge" for r in rooms)) for name, rooms in LAYERS]
    assert readme == expected
    assert [int(n) for n, _, _ in rows] == list(range(len(LAYERS)))
