"""What a search leaves in its folder besides the model: ``history.json`` (every candidate),
``best.yaml`` (the best recipe as a plain mergekit YAML), ``fitness.png`` (fitness over
generations). Each is written atomically (``checkpoint/atomic.py``) after every generation, so a
killed search leaves them consistent with its saved state."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergeforge.checkpoint.atomic import atomic_file, write_text_atomic


def best_of(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The record with the highest fitness (the earliest on a tie); ``None`` if all failed."""
    best = None
    for r in history:
        if r["fitness"] is not None and (best is None or r["fitness"] > best["fitness"]):
            best = r
    return best


def generation_rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per generation: best, mean and failed count of its candidates, best so far."""
    rows: list[dict[str, Any]] = []
    so_far = None
    for g in sorted({r["generation"] for r in history}):
        vals = [r["fitness"] for r in history if r["generation"] == g]
        ok = [v for v in vals if v is not None]
        if ok:
            so_far = max(ok) if so_far is None else max(so_far, max(ok))
        rows.append({"generation": g, "best": max(ok) if ok else None,
                     "mean": sum(ok) / len(ok) if ok else None,
                     "failed": len(vals) - len(ok), "best_so_far": so_far})  # fmt: skip
    return rows


def write_history(path: Path, history: Sequence[Mapping], settings: Mapping[str, Any]) -> None:
    doc = {"settings": dict(settings), "generations": generation_rows(history),
           "candidates": list(history)}  # fmt: skip
    write_text_atomic(path, json.dumps(doc, indent=1, default=str) + "\n")


def write_best(path: Path, doc: Mapping[str, Any], record: Mapping[str, Any], total: int,
               note: str = "") -> None:  # fmt: skip
    """The best recipe, with a comment saying where it came from (YAML comments are ignored
    by both mergeforge and mergekit); ``note``: more comment lines (``# ...\\n``)."""
    head = (f"# mergeforge evolve: best of {total} evaluations (generation "
            f"{record['generation'] + 1}, candidate {record['candidate'] + 1}), fitness "
            f"{record['fitness']:.6g} on the validation data\n{note}")  # fmt: skip
    text = yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=None)
    write_text_atomic(path, head + text)


def plot_fitness(path: Path, history: Sequence[Mapping[str, Any]], *, title: str = "") -> None:
    """Every candidate's fitness by generation (dots; failed ones as x on the axis), each
    generation's mean and best, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = generation_rows(history)  # generations are shown from 1
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [(r["generation"] + 1, r["fitness"]) for r in history if r["fitness"] is not None]
    if ok:
        ax.scatter(*zip(*ok, strict=True), s=8, color="0.65", label="candidate")
    gens = [r["generation"] + 1 for r in rows if r["best"] is not None]
    for key, style in (("mean", ".--"), ("best", ".-"), ("best_so_far", "o-")):
        ys = [r[key] for r in rows if r["best"] is not None]
        ax.plot(gens, ys, style, lw=2 if key == "best_so_far" else 1, ms=4,
                label=key.replace("_", " ") if key != "best" else "generation best")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    failed = [r["generation"] + 1 for r in history if r["fitness"] is None]
    if failed and ok:
        low = min(v for _, v in ok)
        ax.scatter(failed, [low] * len(failed), marker="x", color="tab:red", label="failed")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (validation)")
    ax.set_title(title or "mergeforge evolve")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
