"""Evolutionary merge search on the MiniLM text suite (issue 16's acceptance, BENCHMARKS.md).

    # the search: ≤ 300 evaluations of per-layer-group TIES weights and densities (+ lambda),
    # fitness on a validation split carved from each task's training texts, test numbers on the
    # test split, beside the grid and static rows of benchmarks/text/results/results.json
    python benchmarks/evolve/bench_evolve.py --method ties --evaluations 300 --workers 2 \
        --grid-from benchmarks/text/results/results.json --out benchmarks/results/evolve

    # efficiency: the same short search in memory vs written to disk and read back (what
    # mergekit-evolve's default strategies do), and 1 vs 2 Ray workers on 2 cores
    python benchmarks/evolve/bench_evolve.py --evaluations 30 --modes memory,disk \
        --workers 1,2 --no-test --out benchmarks/results/evolve-speed

    # the search started from the grid's best cell *on the validation split* (the grid's
    # 9 evaluations counted in the budget: 291 searched + 9 = 300), with a larger split
    python benchmarks/evolve/bench_evolve.py --method ties --evaluations 300 --workers 2 \
        --validation 128 --start grid --grid-from benchmarks/text/results/results.json \
        --out benchmarks/results/evolve-grid-start

    # the same over DARE-TIES (its grid: lambda 0.6 and 1, density 0.5)
    python benchmarks/evolve/bench_evolve.py --method dare_ties --evaluations 300 --workers 2 \
        --validation 128 --start grid --grid-from benchmarks/text/results/results.json \
        --out benchmarks/results/evolve-dare-ties

    # the DARE-TIES search, then its 13 best (the 300 budget's rest: 2 grid + 285 searched)
    # re-scored on a selection split of 256 unseen texts per task; the best there is reported
    python benchmarks/evolve/bench_evolve.py --method dare_ties --evaluations 300 --workers 2 \
        --validation 128 --start grid --reselect 13 \
        --grid-from benchmarks/text/results/results.json --out benchmarks/results/evolve-dare-ties

    # smoke run (quick experts: 3 tasks, tiny sets; minutes)
    python benchmarks/evolve/bench_evolve.py --quick --validation 16 --evaluations 16 \
        --workers 1 --out /tmp/evolve-smoke

Each (mode, workers) pair runs the same search (same seed, budget) in its own folder
``OUT/run-MODE-wN/`` (state, history.json, best.yaml, fitness.png, model/ unless --no-model);
a finished run there is reused (the search resumes). Rows go to ``OUT/results.json`` and
``OUT/results.md``: evaluations per hour (search wall time, workers started included), mean
merge and fitness seconds per candidate, the best validation fitness, and the test-split
accuracy of the best merge (never seen by the search). ``--start grid`` first scores the
method's grid (below) on the *validation* split and starts CMA-ES at its best cell (``genome.init``:
that density and lambda, equal weights), the grid's evaluations taken from the budget; the test
split still decides nothing. ``--grid`` scores the method's own grid
(benchmarks/text/methods.yaml's ties rows: lambda x density, weight 1) on the test split here;
``--grid-from`` reads the grid and the static methods (ACE, SWUDI) from a results.json of
``mergeforge bench text`` made with the same experts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mergeforge.checkpoint.atomic import write_text_atomic  # noqa: E402
from mergeforge.evolve import evolve  # noqa: E402

GRID = {"ties": {"lambda": [0.3, 0.6, 1.0], "density": [0.1, 0.2, 0.5]},
        "dare_ties": {"lambda": [0.6, 1.0], "density": [0.5]}}  # fmt: skip
STATIC = ("ace", "swudi")


def config(a, in_memory: bool) -> dict:
    fitness = {"suite": "text", "validation": a.validation, "quick": a.quick, "seed": 0}
    if getattr(a, "reselect", 0):
        fitness["selection"] = a.selection
    if a.tasks:
        fitness["tasks"] = a.tasks.split(",")
    if a.optimizer:
        fitness["optimizer"] = a.optimizer
    genome = {"merge_method": a.method, "layer_groups": a.layer_groups,
              "per_model": ["weight", "density"], "parameters": {"normalize": True}}  # fmt: skip
    if a.lambda_range:
        lo, hi = (float(x) for x in a.lambda_range.split(","))
        genome["shared"] = {"lambda": [lo, hi]}  # starts at TIES's default 1 when inside
    if getattr(a, "init", None):
        genome["init"] = dict(a.init)
    return {
        "genome": genome,
        "fitness": fitness,
        "search": {
            "evaluations": a.evaluations,
            "seed": a.seed,
            "in_memory": in_memory,
            "reselect": getattr(a, "reselect", 0),
        },
    }


def grid_rows(a, suite_fitness, split: str = "test") -> list[dict]:
    """The method's grid (weight 1 per expert), merged in memory, scored on ``split`` (``test``
    or ``validation``, the search's fitness split)."""
    from mergeforge.config import merge_document
    from mergeforge.engine import merge_state_dicts

    grid, rows = GRID[a.method], []
    pool = suite_fitness.test if split == "test" else suite_fitness.fitness
    pool.setup()
    for lam, dens in itertools.product(grid["lambda"], grid["density"]):
        doc = merge_document(a.method, suite_fitness.models, base_model=suite_fitness.base_model,
                             parameters={"lambda": lam, "normalize": True},
                             model_parameters={"weight": 1.0, "density": dens})  # fmt: skip
        score = pool(merge_state_dicts(doc, {}))
        tasks = {t.name: score.metrics[t.name] for t in pool.tasks}
        rows.append({"name": f"{a.method} lambda={lam} density={dens}", "lambda": lam,
                     "density": dens, "average": sum(tasks.values()) / len(tasks),
                     "fitness": score.value, "tasks": tasks})  # fmt: skip
        print(f"grid {rows[-1]['name']}: {split} {100 * rows[-1]['average']:.1f}")
    return rows


def rows_from(path: str, method: str) -> tuple[list[dict], list[dict]]:
    """(grid rows of ``method``, static rows) of a ``mergeforge bench text`` results.json."""
    runs = json.loads(Path(path).read_text())["runs"]
    pick = [{"name": r["name"], "average": r["average"], "tasks": r["accuracy"]} for r in runs]
    grid = [p for p, r in zip(pick, runs, strict=True) if r["family"] == method]
    static = [p for p, r in zip(pick, runs, strict=True) if r["family"] in STATIC]
    return grid, static


def markdown(rows: list[dict], grid: list[dict], static: list[dict]) -> str:
    lines = ["| run | workers | evaluations | eval/h | merge s | fitness s | best val | test avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        test = "" if r["test"] is None else f"{100 * r['test']['average']:.1f}"
        lines.append(f"| evolve {r['mode']} | {r['workers']} | {r['evaluations']} | "
                     f"{r['evaluations_per_hour']:.0f} | {r['merge_s']:.2f} | {r['eval_s']:.2f} "
                     f"| {r['best_fitness']:.4f} | {test} |")  # fmt: skip
    best = max(grid, key=lambda g: g["average"], default=None)
    for label, row in [("best grid", best), *(("static", s) for s in static)]:
        if row is not None:
            lines.append(f"| {label}: {row['name']} | | | | | | | {100 * row['average']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="mergeforge-bench-evolve")
    p.add_argument("--method", default="ties", choices=sorted(GRID))
    p.add_argument("--layer-groups", type=int, default=3, help="MiniLM has 6 layers")
    p.add_argument("--lambda-range", default="0.3,1.5", help="'' to keep lambda at 1")
    p.add_argument("--evaluations", type=int, default=300)
    p.add_argument("--validation", type=int, default=64, help="validation texts per task")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the text tasks")
    p.add_argument("--quick", action="store_true", help="the suite's quick experts (smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--optimizer",
        default=None,
        help="how the suite's experts train (adamw, "
        "adamw+recorder: the same weights, cached apart, plus curvature; umtam)",
    )
    p.add_argument("--reselect", type=int, default=0,
                   help="re-score the K best on a selection split after the search")  # fmt: skip
    p.add_argument("--selection", type=int, default=256, help="selection texts per task")
    p.add_argument("--modes", default="memory", help="memory, disk or memory,disk")
    p.add_argument("--workers", default="2", help="Ray workers: 1, 2 or 1,2")
    p.add_argument("--address", default=None, help="an existing Ray cluster (HOST:PORT)")
    p.add_argument("--no-test", action="store_true", help="skip the test split (speed runs)")
    p.add_argument("--no-model", action="store_true", help="do not write the merged model")
    p.add_argument("--grid", action="store_true", help="score the method's grid here")
    p.add_argument("--grid-from", default=None, help="results.json of `mergeforge bench text`")
    p.add_argument("--start", choices=("default", "grid"), default="default",
                   help="grid: start at the grid's best cell on the validation split")  # fmt: skip
    a = p.parse_args()
    a.init, start_grid = None, []
    if a.start == "grid":
        from mergeforge.evolve.config import load_evolve_config
        from mergeforge.evolve.suite import text_suite_fitness

        suite = text_suite_fitness(load_evolve_config(config(a, True)).fitness.options)
        start_grid = grid_rows(a, suite, split="validation")
        best = max(start_grid, key=lambda g: g["fitness"])
        a.init = {"density": best["density"]}
        if a.lambda_range:
            a.init["lambda"] = best["lambda"]
        a.evaluations -= len(start_grid)
        print(f"start: {best['name']} (validation {100 * best['average']:.1f}); "
              f"{a.evaluations} evaluations left for the search")  # fmt: skip
    if a.reselect:  # the re-scored candidates come out of the budget too
        a.evaluations -= a.reselect
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode, workers in itertools.product(a.modes.split(","), a.workers.split(",")):
        run = out / f"run-{mode}-w{workers}"
        t0 = time.perf_counter()
        res = evolve(config(a, mode == "memory"), out=run, workers=int(workers),
                     address=a.address, write_model=not a.no_model, test=not a.no_test)  # fmt: skip
        wall = time.perf_counter() - t0
        fresh = [r for r in res.history if r["generation"] >= res.resumed_from]
        timed = fresh or res.history  # a reused finished run: its recorded per-candidate times
        rows.append({
            "mode": mode, "workers": int(workers), "evaluations": res.evaluations,
            "generations": res.generations, "resumed_from": res.resumed_from,
            "wall_seconds": wall, "start_seconds": res.start_seconds,
            "generation_seconds": res.generation_seconds,
            "evaluations_per_hour": (3600 * len(fresh) / res.generation_seconds
                                     if fresh else float("nan")),
            "merge_s": sum(r["merge_s"] for r in timed) / len(timed),
            "eval_s": sum(r["eval_s"] for r in timed) / len(timed),
            "best_fitness": res.best_fitness, "best_generation": res.best_generation,
            "failed": res.failed, "test": None if a.no_test else res.test,
            "selection": res.selection,
            "best_config": res.best_config, "notes": list(res.notes),
        })  # fmt: skip
        print(f"{mode} x{workers}: {rows[-1]['evaluations_per_hour']:.0f} evaluations/h, best "
              f"validation {res.best_fitness:.4f}"
              + (f", test {100 * res.test['average']:.1f}" if res.test else ""))  # fmt: skip
    grid, static = rows_from(a.grid_from, a.method) if a.grid_from else ([], [])
    if a.grid:
        from mergeforge.evolve.config import load_evolve_config
        from mergeforge.evolve.suite import text_suite_fitness

        grid = grid_rows(a, text_suite_fitness(load_evolve_config(config(a, True)).fitness
                                               .options))  # fmt: skip
    doc = {"args": vars(a), "runs": rows, "grid": grid, "static": static,
           "start_grid_validation": start_grid}  # fmt: skip
    write_text_atomic(out / "results.json", json.dumps(doc, indent=1) + "\n")
    write_text_atomic(out / "results.md", markdown(rows, grid, static))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
