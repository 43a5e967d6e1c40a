"""Run the text suite with a custom fine-tuning recipe (e.g. reduced settings on a busy CPU).

    python benchmarks/text/bench_text.py --methods benchmarks/text/methods.yaml \
        --steps 200 --batch-size 32 --max-length 64 --lr 1e-4 --n-test 500 \
        --out benchmarks/results/text

``--backbone smollm2`` fine-tunes the SmolLM2-135M decoder instead of MiniLM; recipe options
left out take the backbone's defaults. ``--optimizer adamw+recorder`` (AdamW with the curvature
recorder) or ``umtam`` (the merge-ready optimizer) trains merge-ready experts, cached apart from
the AdamW ones, for the ``umtam`` / ``ota`` rows of ``methods-curvature.yaml``.

Same as ``mergeforge bench text`` but with the recipe and sizes exposed; experts are cached by
recipe, so runs with different settings never mix.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mergeforge.evaluate.bench import register_suite, run_bench  # noqa: E402
from mergeforge.evaluate.text.backbones import BACKBONES  # noqa: E402
from mergeforge.evaluate.text.experts import OPTIMIZERS  # noqa: E402
from mergeforge.evaluate.text.suite import N_TRAIN, TextSuite  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="benchmarks/text/methods.yaml")
    p.add_argument("--out", default="mergeforge-bench-text")
    # Unset recipe options and --n-test take the backbone's defaults (evaluate/text/backbones.py).
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="encoder learning rate")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed (head init, batch order, dropout); default 0")  # fmt: skip
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--tasks", default=None, help="comma-separated subset")
    p.add_argument("--backbone", default="minilm", choices=sorted(BACKBONES))
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=OPTIMIZERS,
        help="how the experts train (adamw+recorder, umtam: with curvature sidecars)",
    )
    p.add_argument("--cache", default=None)
    p.add_argument("--resume", action="store_true", help="reuse finished rows of OUT")
    a = p.parse_args()
    backbone = BACKBONES[a.backbone]
    given = {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "lr": a.lr,
             "optimizer": a.optimizer, "seed": a.seed}  # fmt: skip
    recipe = replace(backbone.recipe, **{k: v for k, v in given.items() if v is not None})

    def suite(**kw):
        return TextSuite(
            **kw, recipe=recipe, n_train=a.n_train, n_test=a.n_test, backbone=a.backbone
        )

    register_suite("text-custom", suite)
    tasks = a.tasks.split(",") if a.tasks else None
    run_bench("text-custom", a.methods, a.out, cache_dir=a.cache, tasks=tasks, resume=a.resume)


if __name__ == "__main__":
    main()
