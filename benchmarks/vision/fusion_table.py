#!/usr/bin/env python
"""Issue 15's table: every fusion method on the vision suite's families, zero-shot.

    python benchmarks/vision/fusion_table.py                            # everything below
    python benchmarks/vision/fusion_table.py --datasets digits --archs mlp --regimes seeds2
    python benchmarks/vision/fusion_table.py --report-only              # re-aggregate

For each family DATASET/ARCH/REGIME (datasets × archs × regimes) and seed, the plateau parents
(``recipe_for(..., plateau=True)`` with ``seed``; cached under ``$MERGEFORGE_CACHE/vision``) are
fused by every row of ``methods-fusion.yaml`` through ``mergeforge bench vision`` (its
``run_bench``; fusion set: 400 class-stratified training examples, seeded by the same seed),
one results folder per family and seed under ``--out`` (reruns resume). HF pairs two parents,
so its rows are left out of 4-parent regimes (shown as "n/a"). Fashion-MNIST runs
``--fashion-seeds`` seeds (default 3), the other datasets ``--seeds`` (default 1).

Aggregates into ``OUT/table.md`` / ``table.json``: accuracy and normalized accuracy (÷ output
ensemble), mean ± std over seeds, fusion seconds; the issue's checks (KF / HF above OT-Fusion and
Git Re-Basin in every non-IID family; the best fused model above the best parent in every non-IID
family); ``OUT/normalized.png``: normalized accuracy, method × family.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DATASETS = ("fashion_mnist", "mnist", "digits")
ARCHS = ("mlp", "vgg", "resnet", "vit")
REGIMES = ("seeds2", "halves2", "dirichlet4")
NON_IID = ("halves", "dirichlet")
REFERENCES = ("experts (own task)", "ensemble", "ensemble_weighted")


def methods_for(n_parents: int) -> dict:
    doc = yaml.safe_load((HERE / "methods-fusion.yaml").read_text())
    rows = []
    for row in doc["methods"]:
        if row["method"].startswith("parent"):
            continue
        if row["method"] == "hf" and n_parents != 2:
            continue
        rows.append(row)
    parents = [{"name": f"parent{k}", "method": f"parent{k}"} for k in range(n_parents)]
    return {"methods": parents + rows}


def run_family(family: str, seed: int, out: Path, *, cache: str | None) -> Path:
    from mergeforge.evaluate.bench import run_bench
    from mergeforge.evaluate.vision.suite import n_parents, parse_family, recipe_for

    dataset, arch, regime = parse_family([family])
    recipe = replace(recipe_for(dataset, arch, regime, plateau=True), seed=seed)
    folder = out / f"{family.replace('/', '-')}-s{seed}"
    options = {"recipe": recipe, "parents": "plateau", "fusion_seed": seed}
    run_bench("vision", methods_for(n_parents(regime)), folder, tasks=[family],
              cache_dir=cache, plots=False, resume=True, suite_options=options)  # fmt: skip
    return folder


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(out: Path) -> dict:
    """``{family: {row: {acc, acc_std, norm, norm_std, seconds, seeds}}}`` from every folder."""
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    for res in sorted(out.glob("*-s*/results.json")):
        doc = json.loads(res.read_text())
        family = doc["settings"]["family"]
        fam = per.setdefault(family, {})
        for run in doc["runs"]:
            if run.get("average") is None:
                continue
            cell = fam.setdefault(run["name"], {"acc": [], "norm": [], "seconds": []})
            cell["acc"].append(run["average"])
            cell["norm"].append(run["normalized_average"])
            if run.get("merge_seconds") is not None:
                cell["seconds"].append(run["merge_seconds"])
    table: dict[str, dict[str, dict]] = {}
    for family, rows in per.items():
        table[family] = {}
        for name, cell in rows.items():
            acc, acc_sd = _stats(cell["acc"])
            norm, norm_sd = _stats(cell["norm"])
            secs = statistics.fmean(cell["seconds"]) if cell["seconds"] else None
            table[family][name] = {"acc": acc, "acc_std": acc_sd, "norm": norm,
                                   "norm_std": norm_sd, "seconds": secs,
                                   "seeds": len(cell["acc"])}  # fmt: skip
    return table


def checks(table: dict) -> list[str]:
    """The issue's targets, one line per non-IID family."""
    lines = []
    for family, rows in sorted(table.items()):
        if not any(family.split("/")[2].startswith(r) for r in NON_IID):
            continue

        def best(prefix: str, rows: dict = rows) -> tuple[str, float]:
            cands = [(n, r["acc"]) for n, r in rows.items() if n.split(" ")[0] == prefix]
            return max(cands, key=lambda c: c[1]) if cands else ("-", float("nan"))

        ours = max([best("kf"), best("hf"), best("kf_gradient")], key=lambda c: c[1])
        rivals = max([best("ot_fusion"), best("rebasin_weight"), best("rebasin_activation")],
                     key=lambda c: c[1])  # fmt: skip
        parents = max((r["acc"], n) for n, r in rows.items() if n.startswith("parent"))
        fused = [(r["acc"], n) for n, r in rows.items()
                 if n not in REFERENCES and not n.startswith("parent")]  # fmt: skip
        top = max(fused)
        lines.append(
            f"| {family} | {ours[0]} {ours[1]:.3f} | {rivals[0]} {rivals[1]:.3f} | "
            f"{'✅' if ours[1] > rivals[1] else '❌'} | {parents[1]} {parents[0]:.3f} | "
            f"{top[1]} {top[0]:.3f} | {'✅' if top[0] > parents[0] else '❌'} |"
        )
    return lines


COMPACT = (
    ("best parent", ("parent",)),
    ("ensemble", ("ensemble",)),
    ("average", ("average",)),
    ("last-layer KD", ("last_layer_kd",)),
    ("best OT-Fusion", ("ot_fusion",)),
    ("best Re-Basin", ("rebasin_weight", "rebasin_activation")),
    ("ZipIt", ("zipit",)),
    ("KF U", ("kf U",)),
    ("HF U", ("hf U",)),
    ("KF-grad U", ("kf_gradient U",)),
    ("best ours", ("kf", "hf", "kf_gradient")),
)
"""The compact table's columns: (heading, row names or row-name prefixes it takes the best of;
a prefix without a space matches a method's rows, ``parent`` every parent)."""


def _pick(acc: dict[str, float], keys: tuple[str, ...]) -> float:
    def hit(n: str) -> bool:
        return (
            n in keys or n.split(" ")[0] in keys or (keys == ("parent",) and n.startswith("parent"))
        )

    got = [a for n, a in acc.items() if hit(n)]
    return max(got) if got else float("nan")


def compact(out: Path, dataset: str) -> list[str]:
    """One line per family of ``dataset`` with finished seeds: the main rows' accuracy, mean ±
    std over the seeds, and the issue's two checks counted seed by seed."""
    fams: dict[str, dict[int, dict[str, float]]] = {}
    for res in sorted(out.glob(f"{dataset}-*-s*/results.json")):
        doc = json.loads(res.read_text())
        acc = {r["name"]: r["average"] for r in doc["runs"] if r.get("average") is not None}
        if not any(n.startswith("kf_gradient") for n in acc):  # unfinished folder
            continue
        seed = int(res.parent.name.rsplit("-s", 1)[1])
        fams.setdefault(doc["settings"]["family"], {})[seed] = acc
    if not fams:
        return []
    lines = ["| family | seeds | " + " | ".join(h for h, _ in COMPACT)
             + " | ours > OT / Re-Basin | best fused > best parent |",
             "|---|---:|" + "---:|" * len(COMPACT) + "---|---|"]  # fmt: skip
    for family, seeds in sorted(fams.items()):
        cells = []
        for _, keys in COMPACT:
            v = [100 * _pick(seeds[k], keys) for k in sorted(seeds)]
            if any(math.isnan(x) for x in v):
                cells.append("–")
            elif len(v) > 1:
                cells.append(f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}")
            else:
                cells.append(f"{v[0]:.1f}")
        checks = ["–", "–"]
        if any(family.split("/")[2].startswith(r) for r in NON_IID):
            ours = [_pick(a, ("kf", "hf", "kf_gradient")) for a in seeds.values()]
            rivals = [_pick(a, ("ot_fusion", "rebasin_weight", "rebasin_activation"))
                      for a in seeds.values()]  # fmt: skip
            fused = [max(v for n, v in a.items() if n not in REFERENCES
                         and not n.startswith("parent")) for a in seeds.values()]  # fmt: skip
            parents = [_pick(a, ("parent",)) for a in seeds.values()]
            n = len(seeds)
            checks = [f"{sum(o > r for o, r in zip(ours, rivals, strict=True))}/{n}",
                      f"{sum(f > p for f, p in zip(fused, parents, strict=True))}/{n}"]  # fmt: skip
        lines.append(f"| {family} | {len(seeds)} | " + " | ".join(cells + checks) + " |")
    return lines


def render(table: dict, out: Path) -> str:
    families = sorted(table)
    names: list[str] = []
    for fam in families:
        names += [n for n in table[fam] if n not in names]
    md = ["| row | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for name in names:
        cells = []
        for fam in families:
            r = table[fam].get(name)
            if r is None:
                cells.append("n/a")
                continue
            sd = f" ± {r['acc_std'] * 100:.1f}" if r["seeds"] > 1 else ""
            cells.append(f"{r['acc'] * 100:.1f}{sd} ({r['norm']:.3f})")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "Fusion seconds (mean over seeds):", "",
           "| row | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]  # fmt: skip
    for name in names:
        cells = [
            f"{table[f][name]['seconds']:.1f}"
            if name in table[f] and table[f][name]["seconds"] is not None
            else "–"
            for f in families
        ]
        if any(c != "–" for c in cells):
            md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "| non-IID family | best KF/HF | best OT-Fusion / Re-Basin | KF/HF above | "
           "best parent | best fused | fused above parent |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    md += checks(table)
    for dataset in DATASETS:
        lines = compact(out, dataset)
        if lines:
            md += ["", f"Compact, {dataset} (accuracy %, mean ± std over the finished seeds):",
                   "", *lines]  # fmt: skip
    text = "\n".join(md) + "\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(table, indent=1))
    _plot(table, families, names, out / "normalized.png")
    return text


def _plot(table: dict, families: list[str], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(names), len(families)), np.nan)
    for j, fam in enumerate(families):
        for i, name in enumerate(names):
            if name in table[fam]:
                grid[i, j] = table[fam][name]["norm"]
    fig, ax = plt.subplots(figsize=(1.1 * len(families) + 3, 0.32 * len(names) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1.1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(families)), [f.replace("/", "\n") for f in families], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(families)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if grid[i, j] < 0.6 else "k")  # fmt: skip
    fig.colorbar(im, ax=ax, label="accuracy ÷ output ensemble")
    ax.set_title("Zero-shot fusion, plateau parents (mergeforge bench vision)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES))
    ap.add_argument("--seeds", type=int, default=1, help="seeds per family (not Fashion-MNIST)")
    ap.add_argument("--fashion-seeds", type=int, default=3)
    ap.add_argument("--only-seeds", type=int, nargs="+", default=None,
                    help="run just these seeds (of those --seeds / --fashion-seeds give), e.g. "
                         "to run seeds in parallel processes; the report still covers every "
                         "folder under --out")  # fmt: skip
    ap.add_argument("--out", default=str(HERE / "results" / "fusion"))
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not args.report_only:
        for dataset in args.datasets:
            seeds = args.fashion_seeds if dataset == "fashion_mnist" else args.seeds
            for seed in range(seeds):
                if args.only_seeds is not None and seed not in args.only_seeds:
                    continue
                for arch in args.archs:
                    for regime in args.regimes:
                        family = f"{dataset}/{arch}/{regime}"
                        t0 = time.time()
                        try:
                            run_family(family, seed, out, cache=args.cache)
                        except Exception as exc:  # one family's failure must not stop the rest
                            print(f"{family} seed {seed}: FAILED {exc}", file=sys.stderr)
                            continue
                        print(f"{family} seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr)
    print(render(aggregate(out), out))
    print(f"total {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
