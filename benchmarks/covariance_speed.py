#!/usr/bin/env python
"""Speed and peak memory of merging one square layer: WUDI (ours), SWUDI, SWUDI-A and
FusionBench's ``wudi_merging`` (the WUDI reference: autograd + ``torch.optim.Adam``).

    python benchmarks/covariance_speed.py                                # 384 … 4096, N 8, 300 its
    python benchmarks/covariance_speed.py --sizes 384 768 --stem covariance_speed_cpu_small
    python benchmarks/covariance_speed.py --device cuda --fb-iterations 300
    python benchmarks/covariance_speed.py --fb-iterations 10             # FusionBench extrapolated

Every (method, size) runs in a fresh subprocess (``--child``): it warms up on a 32×32 layer,
builds N task vectors (D, D) of std 1e-2 and a base on the device, measures its baseline,
merges the layer ``--repeats`` times (default 3), and prints one JSON line. Time is the
wall clock of the fastest merge alone (CUDA synchronised; the minimum resists the noise of a
shared machine), peak memory that of the first.
Peak memory is, on CPU, the peak RSS increase over the baseline after the inputs are built
(the kernel's high-water mark ``VmHWM`` reset to the current RSS through
``/proc/self/clear_refs``; ``ru_maxrss`` − baseline where that is not allowed), on CUDA
``torch.cuda.max_memory_allocated`` − the allocation at the baseline.

With ``--fb-iterations K`` < ``--iterations``, FusionBench runs K Adam steps and its time is
scaled by iterations/K (its cost is linear in the steps; the set-up is negligible): such
rows are labelled "extrapolated from K iterations". ``--wudi-iterations K`` does the same for
our WUDI (its set-up, two products, is scaled up with the steps: an over-estimate).

Writes ``results/covariance/STEM.json``, ``STEM.md`` (table) and ``STEM.png`` (log-log).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("wudi", "swudi", "swudi_a", "fusion_bench_wudi")
LABELS = {
    "wudi": "WUDI (mergeforge)",
    "swudi": "SWUDI",
    "swudi_a": "SWUDI-A",
    "fusion_bench_wudi": "WUDI (FusionBench)",
}
RESULTS = Path(__file__).resolve().parent / "results" / "covariance"


# --- child: one measurement ----------------------------------------------------------------


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset: bool) -> int:
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_inputs(size: int, n: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=g) * 0.02
    deltas = [torch.randn(size, size, generator=g) * 1e-2 for _ in range(n)]
    return base.to(device), [d.to(device) for d in deltas]


def merge_once(method: str, base, deltas, iterations: int, device: str):
    """A callable that merges the layer once (inputs already built)."""
    if method == "fusion_bench_wudi":
        from fusion_bench.method.wudi.wudi import wudi_merging

        tvs = [{"layer.weight": d} for d in deltas]

        def run():
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                return wudi_merging(tvs, accelerator=device, iter_num=iterations)["layer.weight"]

        return run
    from mergeforge.methods import TensorContext, get_method

    m = get_method(method)
    params = m.params(iterations=iterations) if method == "wudi" else m.params()
    experts = [base + d for d in deltas]
    ctx = TensorContext(key="layer.weight")
    return lambda: m.fn(base, experts, params, (), ctx)


def child(args) -> None:
    import gc

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # warm-up on a 32×32 layer: loads the LAPACK/BLAS kernels and the optimiser modules,
    # one-off costs of the first call that are not the merge's
    merge_once(args.method, *build_inputs(32, args.n, args.device), 2, args.device)()
    base, deltas = build_inputs(args.size, args.n, args.device)
    run = merge_once(args.method, base, deltas, args.iterations, args.device)
    cuda = args.device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    baseline_rss = rss_bytes()
    reset = reset_peak_rss()
    times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0:  # the peak of one merge (later repeats hold the previous output too)
            peak = (
                torch.cuda.max_memory_allocated() - baseline
                if cuda
                else peak_rss_bytes(reset) - baseline_rss
            )
    seconds = min(times)
    assert torch.isfinite(out).all()
    print(
        json.dumps(
            {
                "method": args.method,
                "size": args.size,
                "n": args.n,
                "iterations": args.iterations,
                "seconds": seconds,
                "all_seconds": times,
                "peak_bytes": max(int(peak), 0),
                "memory": "cuda max_memory_allocated"
                if cuda
                else ("VmHWM" if reset else "ru_maxrss"),
                "threads": torch.get_num_threads(),
            }
        )
    )


# --- parent: the sweep ---------------------------------------------------------------------


def measure(method: str, size: int, iterations: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--size", str(size)]
    cmd += ["--n", str(args.n), "--iterations", str(iterations), "--device", args.device]
    cmd += ["--repeats", str(args.repeats)]
    env = dict(os.environ)
    if args.threads:  # also for OpenMP/MKL pools that start before torch.set_num_threads
        cmd += ["--threads", str(args.threads)]
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "size": size, "error": f"timeout after {args.timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"method": method, "size": size, "error": p.stderr[-2000:]}
    return json.loads(lines[-1])


def sweep(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for method in args.methods:
            its = args.iterations
            fb_its = args.fb_iterations or its
            ours_its = args.wudi_iterations or its
            if method == "fusion_bench_wudi" and fb_its < its:
                its = fb_its
            if method == "wudi" and ours_its < its:
                its = ours_its
            row = measure(method, size, its, args)
            if "seconds" in row and its < args.iterations:
                row["measured_seconds"] = row["seconds"]
                row["seconds"] = row["seconds"] * args.iterations / its
                row["extrapolated_from"] = its
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def fmt_time(row: dict | None) -> str:
    if row is None:
        return "–"
    if "error" in row:
        return "failed"
    s = f"{row['seconds']:.3g} s"
    return s + (
        f" (extrapolated from {row['extrapolated_from']} iterations)"
        if "extrapolated_from" in row
        else ""
    )


def fmt_mem(row: dict | None) -> str:
    return "–" if row is None or "error" in row else f"{row['peak_bytes'] / 2**20:.1f} MiB"


def table(rows: list[dict], args) -> str:
    by = {(r["method"], r["size"]): r for r in rows}
    head = ["hidden"] + [f"{LABELS[m]} time" for m in args.methods]
    head += [f"{LABELS[m]} peak" for m in args.methods]
    ratios = [m for m in ("swudi", "swudi_a", "wudi") if m in args.methods]
    fb = "fusion_bench_wudi" in args.methods
    if fb:
        head += [f"FusionBench WUDI / {LABELS[m]} time" for m in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in args.sizes:
        cells = [str(size)] + [fmt_time(by.get((m, size))) for m in args.methods]
        cells += [fmt_mem(by.get((m, size))) for m in args.methods]
        for m in ratios if fb else ():
            a, b = by.get(("fusion_bench_wudi", size)), by.get((m, size))
            ok = a and b and "seconds" in a and "seconds" in b
            cells.append(f"{a['seconds'] / b['seconds']:.1f}×" if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in args.methods:
        pts = sorted((r["size"], r["seconds"]) for r in rows if r["method"] == m and "seconds" in r)
        if pts:
            extra = any("extrapolated_from" in r for r in rows if r["method"] == m)
            label = LABELS[m] + (" (extrapolated)" if extra else "")
            ax.loglog(*zip(*pts, strict=True), marker="o", label=label, ls="--" if extra else "-")
    ax.set_xlabel("hidden size D (layer D×D)")
    ax.set_ylabel("merge time of one layer (s)")
    ax.set_title(f"N={args.n} task vectors, {args.iterations} iterations, {args.device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 768, 1024, 2048, 4096])
    ap.add_argument("--n", type=int, default=8, help="number of task vectors")
    ap.add_argument("--iterations", type=int, default=300, help="WUDI Adam steps")
    ap.add_argument(
        "--fb-iterations", type=int, default=None, help="FusionBench steps (extrapolated)"
    )
    ap.add_argument(
        "--wudi-iterations",
        type=int,
        default=None,
        help="our WUDI's steps (extrapolated; its set-up is counted in every step, so the "
        "extrapolation over-estimates it)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per run (default: torch's). On a busy machine use 1: "
        "OpenMP barriers wait for descheduled threads (measured 140x slower on 2 loaded cores)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="merges per run; the fastest counts")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    ap.add_argument(
        "--stem", default=None, help="output file stem (default covariance_speed_DEVICE)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch

    rows = sweep(args)
    stem = args.stem or f"covariance_speed_{args.device.split(':')[0]}"
    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "sizes": args.sizes,
        "n": args.n,
        "iterations": args.iterations,
        "fb_iterations": args.fb_iterations,
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    (args.out / f"{stem}.json").write_text(json.dumps({"config": info, "rows": rows}, indent=1))
    md = "# Covariance methods: merge time and peak memory of one D×D layer\n\n"
    md += f"```\n{json.dumps(info)}\n```\n\n"
    md += table(rows, args) + "\n"
    (args.out / f"{stem}.md").write_text(md)
    plot(rows, args, args.out / f"{stem}.png")
    print(md)


if __name__ == "__main__":
    main()
