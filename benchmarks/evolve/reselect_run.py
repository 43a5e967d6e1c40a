"""Re-select a finished evolve run of ``bench_evolve.py`` from its ``history.json``: its K best
distinct candidates (by validation fitness) scored on a selection split the search never saw
(``search.reselect``'s :func:`mergeforge.evolve.search.reselect`, the same code), the best there
scored once on the test split (and the search's own best, for the analysis). For runs whose
saved state is gone (a resumed ``bench_evolve.py --reselect K`` does the same on a run that
still has it).

    # session 13's TIES run: 9 grid + 285 searched, the budget's 6 left for re-selection
    python benchmarks/evolve/reselect_run.py --method ties --validation 128 --k 6 \\
        --run benchmarks/results/evolve-grid-start/run-memory-w2
    # session 15's runs (their selection.json made again, and the search's best on test)
    python benchmarks/evolve/reselect_run.py --method dare_ties --validation 128 --k 13 \\
        --run benchmarks/results/evolve-dare-ties-stratified/run-memory-w2

The rule (K = what the 300-evaluation budget leaves, 256 selection texts per task, the best on
the selection split is the result) is fixed before any test number is seen. Writes
``RUN/selection.json`` and ``RUN/test-reselected.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from bench_evolve import config  # noqa: E402

from mergeforge.checkpoint.atomic import write_text_atomic  # noqa: E402
from mergeforge.engine import merge_state_dicts  # noqa: E402
from mergeforge.evolve.config import load_evolve_config  # noqa: E402
from mergeforge.evolve.search import SELECTION_FILE, _setup, reselect  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a bench_evolve run folder (history.json)")
    p.add_argument("--method", default="ties")
    p.add_argument("--layer-groups", type=int, default=3)
    p.add_argument("--lambda-range", default="0.3,1.5")
    p.add_argument("--validation", type=int, default=64)
    p.add_argument("--selection", type=int, default=256)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--tasks", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--optimizer", default=None)
    a = p.parse_args()
    a.evaluations, a.seed, a.reselect, a.init = 300, 0, a.k, None
    run = Path(a.run)
    saved = json.loads((run / "history.json").read_text())
    history = saved["candidates"]
    setup = _setup(load_evolve_config(config(a, True)), None, {}, None)
    if setup.genome.labels() != saved["settings"]["genes"]:
        raise SystemExit(f"{run}: its genes are not this genome's; check --method, --layer-groups")
    t0 = time.perf_counter()
    rows = reselect(history, setup.genome, setup.selection, a.k, say=print)
    seconds = time.perf_counter() - t0
    doc = {"k": a.k, "seconds": seconds, "chosen": rows[0], "rows": rows}
    write_text_atomic(run / SELECTION_FILE, json.dumps(doc, indent=1) + "\n")
    pool = setup.suite.test
    pool.setup()
    picks = {"chosen": rows[0], "search_best": next(r for r in rows if r["rank"] == 1)}
    tests = {}
    for name, r in picks.items():  # the search's own best: for the analysis, never the result
        doc = setup.genome.document(setup.genome.decode(r["genes"]))
        score = pool(merge_state_dicts(doc, {}))
        tasks = {t.name: score.metrics[t.name] for t in pool.tasks}
        tests[name] = {
            "generation": r["generation"], "candidate": r["candidate"], "tasks": tasks,
            "average": sum(tasks.values()) / len(tasks), "validation_fitness": r["fitness"],
            "selection_fitness": r["selection"]}  # fmt: skip
    write_text_atomic(run / "test-reselected.json", json.dumps(tests, indent=1) + "\n")
    for name, t in tests.items():
        print(f"{name}: generation {t['generation'] + 1} candidate {t['candidate'] + 1}, "
              f"validation {t['validation_fitness']:.4f}, selection {t['selection_fitness']:.4f}, "
              f"test {100 * t['average']:.1f}")  # fmt: skip
    print(f"re-selection: {a.k} candidates in {seconds:.0f} s")


if __name__ == "__main__":
    main()
