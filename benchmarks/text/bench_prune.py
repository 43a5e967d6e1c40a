"""Saliency pruning on the seven text experts (issue 14's pruning acceptance measurement).

    python benchmarks/text/bench_prune.py --out benchmarks/text/results-prune

Each expert of the text suite, trained merge-ready (``--optimizer adamw+recorder``, default: the
experts of ``bench_text.py --optimizer adamw+recorder``, reused from the cache; a missing one is
trained), is pruned by the engine's ``prune`` method (``mergeforge prune``: keep the global top
``density`` of a score over every 2-D weight, the rest return to the base) with three scores,
``saliency`` (τ² ⊙ √(R ⊗ C) from the curvature recorded in training), ``magnitude`` (|τ|) and
``fisher`` (F ⊙ τ², the diagonal Fisher computed post hoc by the suite on 256 training texts, once,
into the expert's ``encoder/mergeforge-stats/``), and the pruned encoder is scored on the
expert's own task with the expert's own head. Also, per 2-D weight, the Spearman correlation
between the saliency and F ⊙ τ² (and between the curvatures √(R ⊗ C) and F alone, without the
shared τ² factor).

Writes ``results.json`` (every number; ``--resume`` reuses its finished rows), ``results.md``
(mean over tasks per density and score, the per-task table, the Spearman summary) and
``accuracy_vs_density.png`` into ``--out``. ``--quick``: the suite's quick setting (three tasks,
96 train / 60 test texts, 6 training steps), a smoke test, not a result; give it its own
``--cache`` so it never touches the real experts' folders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mergeforge.checkpoint.atomic import write_text_atomic  # noqa: E402
from mergeforge.checkpoint.sidecar import open_sidecar  # noqa: E402
from mergeforge.engine import merge_state_dicts  # noqa: E402
from mergeforge.evaluate.text.cache import quiet_transformers  # noqa: E402
from mergeforge.evaluate.text.eval import embed, head_accuracy, load_encoder  # noqa: E402
from mergeforge.evaluate.text.experts import OPTIMIZERS  # noqa: E402
from mergeforge.evaluate.text.suite import TextSuite  # noqa: E402
from mergeforge.methods.curvature import (  # noqa: E402
    curvature,
    curvature_inputs,
    factored,
    moments,
    saliency,
)
from mergeforge.methods.fisher import FisherParams, fisher_sidecars  # noqa: E402
from mergeforge.methods.prune import SCORES  # noqa: E402

DENSITIES = (1, 5, 10, 20, 40, 60, 90)  # percent, issue 14
VERSION = 1  # bump when what a result row means changes (--resume then recomputes)


def accuracy(encoder, suite: TextSuite, task: str) -> float:
    """The encoder with ``task``'s expert head on ``task``'s test texts (as the suite scores)."""
    texts, labels = zip(*suite.data[task].test, strict=True)
    emb = embed(encoder, suite.pool.tokenizer, texts, max_length=suite.recipe.max_length)
    return head_accuracy(suite.pool.heads[task], emb, labels)


def prune_config(base: Path, expert: Path, density: float, score: str, fisher: str) -> dict:
    """The config ``mergeforge prune EXPERT --base BASE --density D --score S`` runs."""
    return {
        "merge_method": "prune",
        "base_model": str(base),
        "models": [{"model": str(expert), "parameters": {"density": density}}],
        "parameters": {"score": score, "fisher": fisher},
    }


def kept_fraction(pruned: dict, base: dict, expert: dict) -> float:
    """Fraction of the 2-D weights' entries that hold the expert's value and not the base's."""
    kept = total = 0
    for k, x in pruned.items():
        if factored(x.shape):
            kept += int(((x == expert[k]) & (expert[k] != base[k])).sum())
            total += x.numel()
    return kept / total


def spearman(base: dict, expert: dict, expert_dir: Path, fisher_kind: str) -> dict:
    """Per 2-D weight, Spearman's ρ of saliency τ² ⊙ √(R ⊗ C) vs F ⊙ τ² (``saliency``) and of
    √(R ⊗ C) vs F (``curvature``); ``None`` where undefined (see :func:`summary`)."""
    from scipy.stats import spearmanr

    curv = open_sidecar(expert_dir, "curvature", command="")
    fish = open_sidecar(expert_dir, fisher_kind, command="")
    rows = {}
    try:
        for k, w in expert.items():
            if not factored(w.shape):
                continue
            tau = w.float() - base[k].float()
            stat = {s: curv.get(k + s).float() for s in (":R", ":C")}
            F = fish.get(k).float()
            s = saliency(tau, *moments(stat)).flatten().numpy()
            ft = (F * tau.square()).flatten().numpy()
            K = curvature(*moments(stat), tau.shape).flatten().numpy()
            with warnings.catch_warnings():  # constant input: NaN, reported in the summary
                warnings.simplefilter("ignore")
                rho = spearmanr(s, ft).statistic, spearmanr(K, F.flatten().numpy()).statistic
            rows[k] = {f: None if math.isnan(r) else float(r)
                       for f, r in zip(("saliency", "curvature"), rho, strict=True)}  # fmt: skip
    finally:
        curv.close()
        fish.close()

    return {"layers": rows}


def summary(rows: dict, field: str) -> dict:
    """Median / min / max of ``field``'s ρ over the weights. ρ is undefined (``None``) for a
    constant score: a weight that never had a gradient (the pooler: the suite mean-pools and
    never calls it) has R = C = F = 0; those are listed, not counted."""
    ok = {n: r[field] for n, r in rows.items() if r[field] is not None and r[field] == r[field]}
    vals = list(ok.values())
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "argmin": min(ok, key=ok.get),
        "undefined": sorted(set(rows) - set(ok)),
    }


def run_task(suite, task, densities, scores, fisher_kind, fisher, out: dict, save) -> None:
    """Fill ``out`` (this task's entry of results.json, saved by ``save`` after every row)."""
    from safetensors.torch import load_file

    base_dir, expert_dir = suite.base_dir, suite.expert_dirs[task]
    out.setdefault("scores", {})
    with quiet_transformers():
        encoder = load_encoder(expert_dir)
    expert = {k: v.clone() for k, v in encoder.state_dict().items()}
    files = sorted(base_dir.glob("*.safetensors"))
    base = {k: v for f in files for k, v in load_file(f).items()}
    if "base" not in out:
        with quiet_transformers():
            out["base"] = accuracy(load_encoder(base_dir), suite, task)
        save()
    if "spearman" not in out:
        t0 = time.perf_counter()
        weights = {k: v for k, v in expert.items() if k in base}
        out["spearman"] = spearman(base, weights, expert_dir, fisher_kind)
        out["spearman"]["seconds"] = time.perf_counter() - t0
        save()
    for score in scores:
        for d in densities:
            row = out["scores"].setdefault(score, {})
            if str(d) in row:
                continue
            t0 = time.perf_counter()
            config = prune_config(base_dir, expert_dir, d / 100, score, fisher)
            pruned = merge_state_dicts(config, {})
            t1 = time.perf_counter()
            loaded = encoder.load_state_dict(pruned, strict=False)  # buffers (position_ids) stay
            if loaded.unexpected_keys or set(loaded.missing_keys) - set(
                dict(encoder.named_buffers())
            ):
                raise RuntimeError(f"pruned weights do not fit the encoder: {loaded}")
            acc = accuracy(encoder, suite, task)
            row[str(d)] = {"accuracy": acc, "kept": kept_fraction(pruned, base, expert),
                           "prune_s": t1 - t0, "eval_s": time.perf_counter() - t1}  # fmt: skip
            suite.console.print(f"{task} {score} {d}%: {acc:.4f} ({row[str(d)]['kept']:.4f} kept,"
                                f" {time.perf_counter() - t0:.0f} s)")  # fmt: skip
            save()


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def report(res: dict, out: Path) -> None:
    tasks, dens, scores = res["tasks"], res["densities"], res["scores"]
    per = res["per_task"]
    done = [t for t in tasks if all(str(d) in per.get(t, {}).get("scores", {}).get(s, {})
                                    for s in scores for d in dens)]  # fmt: skip
    lines = [f"# Pruning the text experts ({res['settings']['optimizer']}), own-task accuracy", "",
             f"Mean over {len(done)} of {len(tasks)} tasks ({', '.join(done)}); "
             "`kept`: fraction of the 2-D weights' entries that hold the expert's value (entries "
             "tied at the threshold are kept, entries scored 0 return to the base).",
             "",
             "| density % | " + " | ".join(scores) + " | saliency − magnitude | kept "
             + " / ".join(scores) + " |", "|---|" + "---|" * (len(scores) + 2)]  # fmt: skip
    if not done:
        write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
        return

    def acc(t, s, d):
        return per[t]["scores"][s][str(d)]["accuracy"]

    lines.append("| 0 (base) | " + " | ".join(f"{mean(per[t]['base'] for t in done):.4f}"
                                            for _ in scores) + " | | |")  # fmt: skip
    avg, gaps = {}, {}
    for d in dens:
        avg[d] = {s: mean(acc(t, s, d) for t in done) for s in scores}
        gap = gaps[d] = avg[d].get("saliency", math.nan) - avg[d].get("magnitude", math.nan)
        kept = " / ".join(f"{mean(per[t]['scores'][s][str(d)]['kept'] for t in done):.3f}"
                          for s in scores)  # fmt: skip
        lines.append(f"| {d} | " + " | ".join(f"{avg[d][s]:.4f}" for s in scores)
                     + f" | {gap:+.4f} | {kept} |")  # fmt: skip
    lines.append("| 100 (expert) | " + " | ".join(f"{mean(res['expert'][t] for t in done):.4f}"
                                                  for _ in scores) + " | | |")  # fmt: skip
    worse = [d for d in dens if gaps[d] < 0]
    lines += ["", "Saliency < magnitude (mean over tasks) at densities: "
              + (", ".join(f"{d} %" for d in worse) or "none"), "",
              "## Per task (saliency / magnitude / fisher)", "",
              "| task | base | expert | " + " | ".join(f"{d} %" for d in dens) + " |",
              "|---|---|---|" + "---|" * len(dens)]  # fmt: skip
    for t in done:
        cells = ["/".join(f"{100 * acc(t, s, d):.1f}" for s in scores) for d in dens]
        lines.append(f"| {t} | {100 * per[t]['base']:.1f} | {100 * res['expert'][t]:.1f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    both = {"saliency", "magnitude"} <= set(scores)
    losses = [(t, d) for t in done for d in dens
              if both and acc(t, "saliency", d) < acc(t, "magnitude", d)]  # fmt: skip
    lines += ["", "Saliency < magnitude per task: "
              + (", ".join(f"{t} {d} %" for t, d in losses) or "none"), "",
              "## Spearman ρ per 2-D weight: saliency vs F ⊙ τ² (curvature √(R⊗C) vs F)", "",
              "| task | weights | median | min | max | curvature median | min | max |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    undefined = set()
    for t in done:
        sp = per[t]["spearman"]
        a, c = summary(sp["layers"], "saliency"), summary(sp["layers"], "curvature")
        sp["saliency"], sp["curvature"] = a, c
        undefined |= set(a["undefined"]) | set(c["undefined"])
        n = len(sp["layers"]) - len(a["undefined"])
        lines.append(
            f"| {t} | {n} | {a['median']:.3f} | {a['min']:.3f} | "
            f"{a['max']:.3f} | {c['median']:.3f} | {c['min']:.3f} | {c['max']:.3f} |"
        )
    s_med = statistics.median(per[t]["spearman"]["saliency"]["median"] for t in done)
    c_med = statistics.median(per[t]["spearman"]["curvature"]["median"] for t in done)
    lines += ["", f"Median over tasks of the per-task medians: {s_med:.3f} (saliency vs F ⊙ τ²), "
              f"{c_med:.3f} (√(R⊗C) vs F). Undefined (constant: no gradient), left out: "
              + (", ".join(sorted(undefined)) or "none") + "."]  # fmt: skip
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    plot(avg, mean(per[t]["base"] for t in done), mean(res["expert"][t] for t in done), out)


def plot(avg: dict, base: float, expert: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dens = sorted(avg)
    for s in next(iter(avg.values())):
        ax.plot(dens, [avg[d][s] for d in dens], marker="o", label=s)
    ax.axhline(expert, ls="--", c="grey", label="expert (100 %)")
    ax.axhline(base, ls=":", c="grey", label="base (0 %)")
    ax.set(xscale="log", xlabel="density (% of 2-D weight entries kept)",
           ylabel="own-task accuracy, mean over tasks",
           title="Pruning the text experts")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_density.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/text/results-prune")
    p.add_argument("--tasks", default=None, help="comma-separated subset")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)), help="percent, e.g. 1,5")
    p.add_argument("--scores", default=",".join(SCORES))
    p.add_argument("--optimizer", default="adamw+recorder", choices=OPTIMIZERS[1:])
    p.add_argument("--fisher", default="sampled", choices=("sampled", "empirical"))
    p.add_argument("--quick", action="store_true", help="smoke test (tiny experts)")
    p.add_argument("--cache", default=None)
    p.add_argument("--resume", action="store_true", help="reuse finished rows of OUT")
    a = p.parse_args()
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = a.tasks.split(",") if a.tasks else None
    densities = [float(d) if "." in d else int(d) for d in a.densities.split(",")]
    scores = a.scores.split(",")
    suite = TextSuite(quick=a.quick, cache_dir=a.cache, tasks=tasks, optimizer=a.optimizer)
    suite.prepare()
    fisher_req = fisher_sidecars(FisherParams(fisher=a.fisher))
    suite.prepare_statistics(curvature_inputs())  # checked: recorded while training
    suite.prepare_statistics(fisher_req)  # computed once per expert, cached beside it
    settings = {k: v for k, v in suite.settings().items() if k != "timings"}
    settings |= {"version": VERSION, "fisher": fisher_req.kind, "quick": a.quick}
    res = {"settings": settings, "tasks": list(suite.tasks), "densities": densities,
           "scores": scores, "expert": suite.expert_accuracy(), "per_task": {}}  # fmt: skip
    old = out / "results.json"
    if a.resume and old.exists():
        prev = json.loads(old.read_text())
        if prev["settings"] == json.loads(json.dumps(settings)):
            res["per_task"] = prev["per_task"]
            res["prior_seconds"] = prev.get("seconds", 0) + prev.get("prior_seconds", 0)
        else:
            suite.console.print("--resume: settings differ from OUT's, starting afresh")

    def save() -> None:
        res["seconds"] = time.perf_counter() - t0
        write_text_atomic(old, json.dumps(res, indent=1) + "\n")

    for t in suite.tasks:
        entry = res["per_task"].setdefault(t, {})
        run_task(suite, t, densities, scores, fisher_req.kind, a.fisher, entry, save)
        report(res, out)
    res["timings"] = suite.timings
    report(res, out)
    save()
    suite.console.print(f"wrote {out}/results.md ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
