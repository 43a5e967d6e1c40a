#!/usr/bin/env python
"""Vision suite: independently trained parents, their output ensemble and plain weight averaging.

For every dataset × architecture × regime, trains (or loads from the cache) the parents of a
:class:`~mergeforge.evaluate.vision.train.VisionRecipe` and reports on the test subsample each
parent's accuracy, the output ensemble (mean softmax; class-weighted by each parent's class share
for non-IID regimes) and plain weight averaging, which is expected to collapse for parents from
different inits. Writes ``results/vision.json`` and ``results/vision.md``.

    python benchmarks/vision/run.py                                   # fashion_mnist, all archs
    python benchmarks/vision/run.py --datasets mnist digits --archs mlp vgg
    python benchmarks/vision/run.py --quick                           # 2k train, 1 epoch: minutes
    python benchmarks/vision/run.py --parents plateau --archs vgg --regimes seeds2 \
        --threads 1 --name vision-plateau                             # parents worth fusing

``--parents plateau``: the suite's plateau recipe (``recipe_for(..., plateau=True)``: every
training example, 10 epochs on Fashion-MNIST, Adam 1e-3 with a cosine decay, batch 128); the
sizes, steps and optimiser flags are then ignored.

Regimes: ``seeds<P>`` (same data, P seeds), ``halves<P>`` (disjoint class groups),
``dirichlet<P>`` (per-class Dirichlet(α) shares). Parents are cached under
``$MERGEFORGE_CACHE/vision/<recipe hash>/``; a rerun only evaluates.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mergeforge.evaluate.vision.data import load_dataset
from mergeforge.evaluate.vision.models import ARCHS
from mergeforge.evaluate.vision.suite import recipe_for
from mergeforge.evaluate.vision.train import VisionRecipe, evaluate_family, get_parents

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--datasets",
        nargs="+",
        default=["fashion_mnist"],
        choices=["fashion_mnist", "mnist", "digits"],
    )
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--regimes", nargs="+", default=["seeds2", "halves2", "dirichlet4"])
    ap.add_argument(
        "--n-train", type=int, default=10_000, help="stratified subsample (digits: all)"
    )
    ap.add_argument("--n-test", type=int, default=2_000, help="stratified subsample (digits: 360)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="steps per parent (overrides epochs)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2k train, 1k test, 1 epoch")
    ap.add_argument(
        "--parents",
        choices=["custom", "plateau"],
        default="custom",
        help="custom: the recipe of the flags above; plateau: the suite's plateau recipe",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="vision", help="output file stem")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.steps = 2_000, 1_000, 1, None
    torch.set_num_threads(args.threads)
    console = Console()

    rows = []
    plateau = args.parents == "plateau"
    for dataset in args.datasets:
        n_train = None if dataset == "digits" or plateau else args.n_train
        n_test = 360 if dataset == "digits" else args.n_test
        if plateau:
            n_test = recipe_for(dataset, args.archs[0], args.regimes[0], plateau=True).n_test
        data = load_dataset(dataset, n_train=n_train, n_test=n_test, seed=0)
        console.print(f"[bold]{dataset}[/]: {len(data.train_y)} train / {len(data.test_y)} test")
        for arch in args.archs:
            for regime in args.regimes:
                recipe = (
                    recipe_for(dataset, arch, regime, plateau=True)
                    if plateau
                    else VisionRecipe(
                        dataset=dataset,
                        arch=arch,
                        regime=regime,
                        alpha=args.alpha,
                        n_train=n_train,
                        n_test=n_test,
                        epochs=args.epochs,
                        steps=args.steps,
                        batch_size=args.batch_size,
                        lr=args.lr,
                    )
                )
                start = time.perf_counter()
                with Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.fields[loss]}"),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                ) as bar:
                    tasks: dict[int, int] = {}

                    def started(
                        k: int, total: int, bar=bar, tasks=tasks, tag=f"{arch}/{regime}"
                    ) -> None:
                        tasks[k] = bar.add_task(f"{tag} parent {k}", total=total, loss="")

                    def stepped(k: int, step: int, loss: float, bar=bar, tasks=tasks) -> None:
                        bar.update(tasks[k], completed=step, loss=f"loss {loss:.3f}")

                    parents, split, _ = get_parents(
                        recipe, data=data, on_step=stepped, on_parent_start=started
                    )
                result = evaluate_family(recipe, parents, split, data)
                row = {
                    "dataset": dataset,
                    "arch": arch,
                    "regime": regime,
                    "recipe": recipe.to_dict(),
                    "recipe_key": recipe.key(),
                    **result,
                    "wall_seconds": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                console.print(_md_row(row))
                _write(args, rows)
    console.print(f"wrote {args.out / (args.name + '.json')} and .md")


def _md_row(r: dict) -> str:
    parents = " / ".join(f"{a:.3f}" for a in r["parents"])
    weighted = f"{r['ensemble_weighted']:.3f}" if not r["regime"].startswith("seeds") else "—"
    train_s = sum(r["train_seconds"])
    threads = "/".join(str(t) for t in sorted(set(r["train_threads"])))
    return (
        f"| {r['dataset']} | {r['arch']} | {r['regime']} | {parents} | {r['ensemble']:.3f} | "
        f"{weighted} | {r['weight_average']:.3f} | {train_s:.0f} ({threads}t) |"
    )


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if args.parents == "plateau":  # every row has its own recipe (recipe_for, plateau=True)
        settings = {"parents": "plateau", "recipe": rows[0]["recipe"] if rows else None}
        return _write_files(args, env, settings, rows)
    settings = {
        "n_train": args.n_train,
        "n_test": args.n_test,
        "epochs": args.epochs if args.steps is None else None,  # steps override epochs
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "optimizer": "adam",
        "alpha": args.alpha,
    }
    _write_files(args, env, settings, rows)


def _write_files(args: argparse.Namespace, env: dict, settings: dict, rows: list[dict]) -> None:
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"env": env, "settings": settings, "rows": rows}, indent=1)
    )
    lines = [
        "# Vision suite: parents, output ensemble, plain weight averaging",
        "",
        f"Settings: {json.dumps(settings)} (digits: all 1,437 train / 360 test); parent k seeded "
        f"with k (different inits); torch {env['torch']}, {env['threads']} CPU threads. "
        "Accuracy on the stratified test subsample. `ens. (w)`: ensemble weighted "
        "class-wise by each parent's share of the class. `train s`: training seconds of "
        "all parents with the torch threads used (cached parents keep their original time; the "
        "machine was shared, so times are loose).",
        "",
        "| dataset | arch | regime | parents | ensemble | ens. (w) | weight avg | train s |",
        "|---|---|---|---|---|---|---|---|",
        *(_md_row(r) for r in rows),
        "",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
