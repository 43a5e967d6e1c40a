"""Domain specialisation (issue 17): a SmolLM2-135M domain expert merged back into SmolLM2.

    OMP_NUM_THREADS=1 python benchmarks/editing/bench_domain.py --domain news \
        --out benchmarks/editing/results/domain-news

Fine-tunes (once; cached by its recipe) the text suite's SmolLM2-135M as a causal LM on one
domain of the bundled text (``--domain``: news, tweets or reviews; ``--steps``, ``--batch-size``,
``--max-length``, ``--lr``), merges it into the base with task arithmetic (``--lambdas``), TIES
(``--ties-densities``) and linear (``--linear-weights``) through the engine, scores base,
expert and every merge by LM loss on ``--n-eval`` held-out domain texts and as many general
texts (the other domains' held-out texts, mixed), validation and test, picks the merge on
validation (general loss within 5 % of the base's, largest kept share of the expert's domain
improvement) and reports it on test. Writes ``results.json``, ``results.md`` and
``domain_losses.png`` into ``--out``. See ``mergeforge.evaluate.text.domain``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mergeforge.evaluate.text.domain import (  # noqa: E402
    DEFAULT_LAMBDAS,
    DEFAULT_LINEAR_WEIGHTS,
    DEFAULT_TIES_DENSITIES,
    DOMAINS,
    N_EVAL,
    DomainRecipe,
    domain_merges,
    run_domain,
    write_domain_report,
)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", default="news", choices=sorted(DOMAINS))
    p.add_argument("--out", default=None, help="default benchmarks/editing/results/domain-DOMAIN")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--n-eval", type=int, default=N_EVAL, help="texts per scored set")
    p.add_argument("--lambdas", default=",".join(f"{x:g}" for x in DEFAULT_LAMBDAS))
    p.add_argument("--ties-densities", default=",".join(f"{x:g}" for x in DEFAULT_TIES_DENSITIES))
    p.add_argument("--linear-weights", default=",".join(f"{x:g}" for x in DEFAULT_LINEAR_WEIGHTS))
    p.add_argument("--cache", default=None)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--render", action="store_true",
        help="only rewrite results.md and the plot from OUT/results.json (no scoring)",
    )  # fmt: skip
    a = p.parse_args(argv)
    given = {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "lr": a.lr}
    recipe = replace(DomainRecipe(), **{k: v for k, v in given.items() if v is not None})
    out = a.out or f"benchmarks/editing/results/domain-{a.domain}"
    console = Console()
    if a.render:
        with open(os.path.join(out, "results.json")) as f:
            payload = json.load(f)
        write_domain_report(payload, out, plots=not a.no_plots)
        return payload
    merges = domain_merges(_floats(a.lambdas), _floats(a.ties_densities),
                           _floats(a.linear_weights))  # fmt: skip
    t0 = time.perf_counter()
    payload = run_domain(
        a.domain,
        recipe,
        merges=merges,
        n_eval=a.n_eval,
        cache_dir=a.cache,
        console=console,
        on_update=lambda pl: write_domain_report(pl, out, plots=False),
    )
    payload["wall_seconds"] = time.perf_counter() - t0
    for path in write_domain_report(payload, out, plots=not a.no_plots):
        console.print(f"wrote {path}")
    with open(os.path.join(out, "results.md")) as f:
        console.print(f.read())
    return payload


if __name__ == "__main__":
    main()
