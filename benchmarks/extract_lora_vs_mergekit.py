#!/usr/bin/env python
# ruff: noqa: E501  (report strings)
"""Speed / memory benchmark: ``mergeforge extract-lora`` versus ``mergekit-extract-lora``.

Acceptance being measured: on the ~250M-parameter Llama of ``merge_vs_mergekit.py`` (its model
builder, imported: base + one fine-tuned copy = base + Gaussian noise of std 1e-3 x each
tensor's std, fp32 safetensors, ~1.1 GB each), a rank-32 extraction >= 3x faster than
mergekit-extract-lora at no more peak RSS.

Each run is a subprocess started by ``timed_run.py`` (wall clock around it, the child's
``ru_maxrss`` from ``os.wait4``), the tools alternating, page cache warm, outputs removed
between runs (untimed). Both get the same thread settings (``--threads``: OMP/MKL threads,
default 1). mergekit runs with its defaults but ``--quiet``; mergeforge with ``--no-progress``
and each ``--svd`` method (``gram`` is the default; ``exact`` is mergekit's maths), plus ``exact`` with
one worker (mergeforge decomposes two matrices at a time on a multi-core machine; mergekit's
executor one). Every mergeforge adapter is compared with mergekit's: the applied update
``B·A`` per module (relative Frobenius difference) and the modules saved whole (bitwise).

    python benchmarks/extract_lora_vs_mergekit.py                     # full run
    python benchmarks/extract_lora_vs_mergekit.py --reps 1 --layers 4  # a quick one
    python benchmarks/extract_lora_vs_mergekit.py --only mergeforge

Writes ``benchmarks/results/extract_lora_vs_mergekit.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import (  # noqa: E402  (the model builder and the measuring, reused)
    DEFAULT_WORKDIR,
    LLAMA_250M,
    console_script,
    machine_info,
    make_models,
    run_measured,
    warm_cache,
)

RESULTS = HERE / "results"
STEM = "extract_lora_vs_mergekit"
TARGET_SPEEDUP = 3.0

VARIANTS = {
    "mergekit": [],
    "mergeforge exact": ["--svd", "exact"],
    "mergeforge exact 1-worker": ["--svd", "exact", "--workers", "1"],
    "mergeforge gram": ["--svd", "gram"],
    "mergeforge randomized": ["--svd", "randomized"],
}


def command(variant: str, ft: str, base: str, out: Path, rank: int) -> list[str]:
    if variant == "mergekit":
        return [console_script("mergekit-extract-lora"), "--model", ft, "--base-model", base,
                "--out-path", str(out), "--max-rank", str(rank), "--quiet"]  # fmt: skip
    return [console_script("mergeforge"), "extract-lora", ft, "--base", base, "--rank", str(rank),
            str(out), "--no-progress", *VARIANTS[variant]]  # fmt: skip


def compare(ours: Path, theirs: Path) -> dict:
    """Applied updates B·A per module (relative Frobenius difference to mergekit's) and the
    tensors saved whole (bitwise)."""
    import torch
    from safetensors import safe_open

    a = safe_open(str(ours / "adapter_model.safetensors"), framework="pt")
    b = safe_open(str(theirs / "adapter_model.safetensors"), framework="pt")
    ka, kb = set(a.keys()), set(b.keys())
    diffs, whole_equal, whole = [], 0, 0
    for k in sorted(kb):
        if k.endswith("lora_A.weight") and k in ka:
            kB = k.replace("lora_A", "lora_B")
            pa = a.get_tensor(kB).double() @ a.get_tensor(k).double()
            pb = b.get_tensor(kB).double() @ b.get_tensor(k).double()
            diffs.append(float((pa - pb).norm() / pb.norm()))
        elif ".lora_" not in k and k in ka:
            whole += 1
            whole_equal += bool(torch.equal(a.get_tensor(k), b.get_tensor(k)))
    return {
        "lora_modules_compared": len(diffs),
        "ba_rel_diff_max": max(diffs, default=None),
        "ba_rel_diff_median": statistics.median(diffs) if diffs else None,
        "saved_whole_equal": f"{whole_equal}/{whole}",
        "only_in_mergeforge": sorted(ka - kb)[:5],
        "only_in_mergekit": sorted(kb - ka)[:5],
    }


def summarize(results: dict) -> dict:
    def med(v: str, key: str) -> float | None:
        xs = [r[key] for r in results["runs"].get(v, []) if r["returncode"] == 0]
        return statistics.median(xs) if xs else None

    mk_t, mk_rss = med("mergekit", "wall_s"), med("mergekit", "maxrss_bytes")
    out = {}
    for v in results["runs"]:
        t, rss = med(v, "wall_s"), med(v, "maxrss_bytes")
        row = {"wall_s": t, "cpu_s": med(v, "cpu_s"), "maxrss_gib": rss and rss / 2**30}
        if v != "mergekit" and t and mk_t:
            row["speedup"] = mk_t / t
            row["rss_ratio"] = rss / mk_rss if rss and mk_rss else None
            row["meets_target"] = row["speedup"] >= TARGET_SPEEDUP and (row["rss_ratio"] or 9) <= 1
        row.update(results.get("errors", {}).get(v, {}))
        row.update(results.get("agreement", {}).get(v, {}))
        out[v] = row
    return out


def markdown(results: dict) -> str:
    s = results["summary"]
    m = results["models"]
    lines = [
        "# `mergeforge extract-lora` vs `mergekit-extract-lora`",
        "",
        f"Model: Llama, {m['n_params'] / 1e6:.0f}M parameters ({m['arch']['num_hidden_layers']} layers, "
        f"hidden {m['arch']['hidden_size']}, fp32, {m['bytes_per_model']['base'] / 1e9:.2f} GB a model); "
        f"fine-tuned = base + noise (std {m['delta_scale']} x each tensor's std). Rank {results['rank']}, "
        f"{results['threads']} OMP/MKL thread(s) for both tools, {results['reps']} run(s) each (median), "
        f"page cache warm. Machine: {results['machine']['cpu_model']}, {results['machine']['cpus']} CPUs "
        f"(load average before the runs: {results.get('load', 'n/a')}).",
        "",
        "| tool | wall s | CPU s | peak RSS GiB | speed-up | RSS ratio | mean rel. error | max ‖ΔBA‖/‖BA‖ vs mergekit | saved whole equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda x, p=2: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
    for v, r in s.items():
        lines.append(
            f"| {v} | {f(r['wall_s'], 1)} | {f(r['cpu_s'], 1)} | {f(r['maxrss_gib'])} | "
            f"{f(r.get('speedup'))}{'x' if r.get('speedup') else ''} | {f(r.get('rss_ratio'))} | "
            f"{f(r.get('mean_rel_error'), 4)} | "
            f"{'–' if r.get('ba_rel_diff_max') is None else format(r['ba_rel_diff_max'], '.2e')} | "
            f"{r.get('saved_whole_equal', '–')} |"
        )
    lines += ["", "Commands (OUT removed before each run):", ""]
    lines += [f"- {v}: `{c}`" for v, c in results["commands"].items()]
    if results.get("notes"):
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="models (cached: base, expert1) and outputs",
    )
    ap.add_argument("--layers", type=int, default=LLAMA_250M["num_hidden_layers"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of both tools")
    ap.add_argument("--only", choices=["mergekit", "mergeforge"], default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args(argv)

    arch = dict(LLAMA_250M, num_hidden_layers=a.layers)
    info = make_models(a.workdir, n_experts=1, arch=arch)
    ft, base = info["experts"][0], info["base"]
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if a.only:
        variants = [v for v in variants if v.startswith(a.only)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    outroot, logdir = a.workdir / "extract-lora-out", a.workdir / "extract-lora-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    outs = {v: outroot / v.replace(" ", "-").replace(",", "") for v in variants}
    results: dict = {
        "models": info, "rank": a.rank, "reps": a.reps, "threads": a.threads,
        "machine": machine_info(), "runs": {v: [] for v in variants}, "notes": [],
        "commands": {v: " ".join(command(v, "FINETUNED", "BASE", Path("OUT"), a.rank)) for v in variants},
    }  # fmt: skip
    warm_cache([Path(base), Path(ft)])
    loads = []
    for rep in range(a.reps):
        for v in variants:
            shutil.rmtree(outs[v], ignore_errors=True)
            outs[v].parent.mkdir(parents=True, exist_ok=True)
            loads.append(os.getloadavg()[0])
            r = run_measured(command(v, ft, base, outs[v], a.rank), logdir / f"{outs[v].name}-{rep}.log",
                             env=env, timeout=a.timeout)  # fmt: skip
            print(
                f"[{rep + 1}/{a.reps}] {v}: {r.wall_s:.1f} s, {r.maxrss_bytes / 2**30:.2f} GiB peak RSS, rc {r.returncode}",
                flush=True,
            )
            if r.returncode:
                print(r.log[-2000:])
            results["runs"][v].append(asdict(r))
    results["load"] = (
        f"min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}"
    )
    results["errors"], results["agreement"] = {}, {}
    for v in variants:
        rep_file = outs[v] / "mergeforge_extract_lora.json"
        if rep_file.exists():
            errs = [
                t["rel_error"]
                for t in json.loads(rep_file.read_text())["tensors"]
                if t["kind"] == "lora"
            ]
            results["errors"][v] = {
                "mean_rel_error": statistics.mean(errs),
                "max_rel_error": max(errs),
            }
        if (
            v != "mergekit"
            and "mergekit" in outs
            and (outs["mergekit"] / "adapter_model.safetensors").exists()
        ):
            results["agreement"][v] = compare(outs[v], outs["mergekit"])
    results["summary"] = summarize(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{STEM}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{STEM}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
