"""Forgetting by negation on the text suite (issue 17): θ_MT − λ·τ_t for each task t.

    OMP_NUM_THREADS=1 python benchmarks/editing/bench_forget.py \
        --out benchmarks/editing/results/forget

The seven MiniLM experts of the text suite's default recipe (reused from the cache, trained if
missing: 40 min on 2 cores), the multi-task model (default: task arithmetic of the seven at
λ 0.1, ``--multitask`` for another data-free merge), and for each task to forget (``--tasks``,
default all seven) a λ sweep (``--lambdas``) scored on a validation split carved from the
training pool (``--n-validation`` texts a task, the test split's class proportions), λ chosen
by the rule of ``mergeforge.evaluate.editing.select_forget_lambda`` (kept tasks ≥ 95 % of their
accuracy before negation; forgotten task closest to chance), then the test split at that λ
(``--test-curve TASKS|all``: at every λ, for those tasks). Writes ``results.json`` (after every
task; ``--resume`` reuses the finished ones), ``results.md`` and ``forget_curves.png`` into
``--out``. ``--quick``: the suite's smoke setting (three tasks, tiny splits, 6 training steps;
give it its own ``--cache``), not a result. See ``mergeforge.evaluate.text.forget``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mergeforge.evaluate.text.experts import OPTIMIZERS  # noqa: E402
from mergeforge.evaluate.text.forget import (  # noqa: E402
    DEFAULT_LAMBDAS,
    DEFAULT_MULTITASK,
    EXPERT_OPTIMIZER,
    N_VALIDATION,
    ForgetBench,
    run_forget,
    write_forget_report,
)


def main(argv: list[str] | None = None) -> dict:
    import yaml
    from rich.console import Console

    from mergeforge.evaluate.text.suite import TextSuite

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/editing/results/forget")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to forget (default all)")
    p.add_argument("--lambdas", default=",".join(f"{x:g}" for x in DEFAULT_LAMBDAS))
    p.add_argument("--n-validation", type=int, default=N_VALIDATION)
    p.add_argument(
        "--multitask", default=None,
        help="the multi-task merge as a YAML mapping {method, parameters, model_parameters} "
        f"(default {json.dumps(dict(DEFAULT_MULTITASK))})",
    )  # fmt: skip
    p.add_argument(
        "--test-curve", default="",
        help="tasks (comma-separated) or 'all' whose test split is scored at every lambda "
        "(default: at the chosen one only)",
    )  # fmt: skip
    p.add_argument("--optimizer", default=EXPERT_OPTIMIZER, choices=OPTIMIZERS,
                   help="the experts' training (default: AdamW with the recorder beside it, "
                   "whose weights are AdamW's; the experts the cache holds)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run (not a result)")
    p.add_argument("--cache", default=None)
    p.add_argument("--resume", action="store_true", help="reuse finished tasks of OUT")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--render", action="store_true",
        help="only rewrite results.md and the plot from OUT/results.json (no scoring)",
    )  # fmt: skip
    a = p.parse_args(argv)
    console = Console()
    if a.render:
        payload = json.loads((Path(a.out) / "results.json").read_text())
        write_forget_report(payload, a.out, plots=not a.no_plots)
        return payload
    multitask = yaml.safe_load(a.multitask) if a.multitask else dict(DEFAULT_MULTITASK)
    suite = TextSuite(quick=a.quick, cache_dir=a.cache, optimizer=a.optimizer, console=console)
    bench = ForgetBench(suite, multitask=multitask, n_validation=a.n_validation, console=console)
    out = Path(a.out)
    previous = None
    if a.resume and (out / "results.json").exists():
        previous = json.loads((out / "results.json").read_text())
    curve = True if a.test_curve == "all" else [t for t in a.test_curve.split(",") if t]
    t0 = time.perf_counter()
    payload = run_forget(
        bench,
        a.tasks.split(",") if a.tasks else None,
        [float(x) for x in a.lambdas.split(",")],
        test_curve=curve,
        previous=previous,
        on_update=lambda pl: write_forget_report(pl, out, plots=False),
        console=console,
    )
    payload["wall_seconds"] = time.perf_counter() - t0
    for path in write_forget_report(payload, out, plots=not a.no_plots):
        console.print(f"wrote {path}")
    console.print((out / "results.md").read_text())
    return payload


if __name__ == "__main__":
    main()
