"""Benchmark reports: results JSON, a printed table, a markdown table and PNG plots.

Accuracies are shown in percent with one decimal (as merging papers report them); the JSON keeps
fractions. Plots need matplotlib (``pip install "mergeforge[bench]"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mergeforge.checkpoint.atomic import write_text_atomic
from mergeforge.evaluate.pool import RunResult

FIXED_COLUMNS = ("average", "normalized", "merge s", "peak RSS GiB")


def columns(tasks: Sequence[str]) -> list[str]:
    """The table's header: method, one column per task, then :data:`FIXED_COLUMNS`."""
    return ["method", *tasks, *FIXED_COLUMNS]


def table_rows(results: Sequence[RunResult], tasks: Sequence[str]) -> list[list[str]]:
    """Formatted cells, one list per result (missing values are blank)."""
    rows = []
    for r in results:
        cells = [r.name]
        cells += [_pct(r.accuracy.get(t)) for t in tasks]
        cells += [_pct(r.average), _pct(r.normalized_average)]
        cells.append("" if r.merge_seconds is None else f"{r.merge_seconds:.1f}")
        cells.append("" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 2**30:.2f}")
        rows.append(cells)
    return rows


def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown_table(results: Sequence[RunResult], tasks: Sequence[str]) -> str:
    """A GitHub markdown table (accuracy %, normalized %: merged / own expert) for BENCHMARKS.md."""
    head = columns(tasks)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for cells in table_rows(results, tasks):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def rich_table(
    results: Sequence[RunResult], tasks: Sequence[str], *, title: str = "",
    normalized_by: str = "own expert",
):  # fmt: skip
    from rich.table import Table

    caption = f"accuracy %; normalized = merged / {normalized_by}, %"
    table = Table(title=title or None, caption=caption)
    for i, col in enumerate(columns(tasks)):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for cells in table_rows(results, tasks):
        table.add_row(*cells)
    return table


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON (atomically: a crash never leaves half a file)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_report(
    payload: Mapping,
    out_dir: str | Path,
    *,
    complete: bool,
    markdown: Callable[[Mapping], str],
    plot: Callable[[Mapping, Path], Path] | None = None,
    png: str = "",
) -> list[Path]:
    """A scenario's report in ``out_dir``: ``results.json`` always (every number, so a resumed
    run starts from it); once ``complete``, ``results.md`` from ``markdown(payload)`` and, when
    ``plot`` is given, ``plot(payload, out_dir / png)``. Every file is written atomically.
    Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json"]
    write_json(paths[0], dict(payload))
    if complete:
        paths.append(out_dir / "results.md")
        write_text_atomic(paths[-1], markdown(payload))
        if plot is not None:
            paths.append(plot(payload, out_dir / png))
    return paths


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        from mergeforge.errors import MergeforgeError

        raise MergeforgeError(
            'plots need matplotlib: pip install "mergeforge[bench]" (or pip install matplotlib)'
        ) from exc
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def best_per_family(results: Sequence[RunResult]) -> list[RunResult]:
    """The run with the best average accuracy of each methods-file entry, in first-seen order."""
    best: dict[str, RunResult] = {}
    for r in results:
        key = r.family or r.name
        if key not in best or r.average > best[key].average:
            best[key] = r
    return list(best.values())


def plot_results(results: Sequence[RunResult], tasks: Sequence[str], out_dir: Path) -> list[Path]:
    """``accuracy_by_task.png`` (bars: best run of each method, per task and average) and one
    ``sweep_<family>.png`` per swept methods-file entry (average accuracy vs the swept value)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = []
    rows = best_per_family(results)
    groups = [*tasks, "average"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)) + 3, 4.5))
    colors = plt.get_cmap("tab20").colors  # tab10 repeats after ten methods
    for i, r in enumerate(rows):
        values = [100 * r.accuracy.get(t, math.nan) for t in tasks] + [100 * r.average]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=r.name, color=colors[i % len(colors)])
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per task (best setting of each method)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, bars
    fig.tight_layout()
    paths.append(out_dir / "accuracy_by_task.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    references = [r for r in results if not r.swept and r.method in ("experts", "pretrained")]
    for family in dict.fromkeys(r.family for r in results if r.swept):
        runs = [r for r in results if r.family == family]
        x_key = "lambda" if "lambda" in runs[0].swept else runs[0].swept[0]
        others = [k for k in runs[0].swept if k != x_key]
        fig, ax = plt.subplots(figsize=(6, 4))
        for line in dict.fromkeys(tuple(r.params[k] for k in others) for r in runs):
            pts = sorted(
                (r.params[x_key], 100 * r.average)
                for r in runs
                if tuple(r.params[k] for k in others) == line
            )
            label = " ".join(f"{k}={v}" for k, v in zip(others, line, strict=True)) or family
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        for ref in references:
            ax.axhline(100 * ref.average, ls="--", lw=1, color="gray")
            ax.annotate(ref.name, (0, 100 * ref.average), xycoords=("axes fraction", "data"),
                        fontsize=7, color="gray", va="bottom")  # fmt: skip
        ax.set_xlabel(x_key)
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"{family}: sweep over {', '.join(runs[0].swept)}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in family)
        paths.append(out_dir / f"sweep_{safe}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
