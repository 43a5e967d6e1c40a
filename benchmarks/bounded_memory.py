#!/usr/bin/env python
# ruff: noqa: E501  (report strings)
"""Bounded memory: a merge whose inputs together exceed the memory the process
may use still completes.

Generates base + 3 experts of a ~97M-parameter Llama (fp32, ~0.39 GB each,
~1.56 GB together), then runs ``mergeforge merge`` under an address-space limit
(``prlimit --as=BYTES``, same thing as ``ulimit -v``) that is *below the sum of
the input sizes* but above what ``import torch, mergeforge`` needs (its VmPeak is
measured first).  RLIMIT_AS counts every mapping, including mmapped input
files, so a process that maps or loads all inputs at once cannot run under it.
The same is tried with ``mergekit-yaml`` for contrast.

    python benchmarks/bounded_memory.py                 # default limit: 0.70 x inputs
    python benchmarks/bounded_memory.py --limit-gib 1.0

Results: benchmarks/results/bounded_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_vs_mergekit import (  # noqa: E402
    MERGEFORGE_FLAGS,
    MERGEKIT_FAST_FLAGS,
    RESULTS,
    machine_info,
    make_models,
    max_abs_diff,
    mergeforge_available,
    run_measured,
    warm_cache,
    write_configs,
)

# 97M parameters, 0.39 GB fp32; 12 layers and a small vocabulary so that no single
# tensor is a large fraction of the model (largest: 8000 x 768 embeddings, 24.6 MB).
LLAMA_100M = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=8000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
DEFAULT_WORKDIR = Path("/tmp/mf_bench/small")


def import_vmpeak(modules: str = "torch, mergeforge") -> int:
    """VmPeak (bytes) of a fresh python that only imports ``modules``."""
    code = (
        f"import {modules}, re\n"
        "print(re.search(r'VmPeak:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(p.stdout.strip().splitlines()[-1]) * 1024


def limited(cmd: list[str], limit: int) -> list[str]:
    return ["prlimit", f"--as={limit}", "--", *cmd]


def last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error|Killed|Exception|cannot|Cannot|failed)", ln):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--set",
        choices=["small", "main"],
        default="small",
        help="small: 97M-param models in /tmp/mf_bench/small; main: the 271M set of "
        "merge_vs_mergekit.py in /tmp/mf_bench",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--limit-gib",
        type=float,
        default=None,
        help="RLIMIT_AS in GiB (default: fraction x inputs)",
    )
    ap.add_argument(
        "--limit-fraction",
        type=float,
        default=None,
        help="limit = fraction x sum of input sizes (default 0.75 small, 0.5 main)",
    )
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip the unlimited reference runs")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the merge commands, e.g. MALLOC_ARENA_MAX=2",
    )
    ap.add_argument(
        "--find-min",
        action="store_true",
        help="also bisect, per tool, the smallest RLIMIT_AS under which the first method passes",
    )
    ap.add_argument(
        "--stem", default=None, help="results file stem (default bounded_memory[_main])"
    )
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args(argv)
    import os

    extra_env = dict(kv.split("=", 1) for kv in a.env)
    env = {**os.environ, **extra_env} if extra_env else None

    if a.set == "main":
        from merge_vs_mergekit import DEFAULT_WORKDIR as MAIN_DIR
        from merge_vs_mergekit import LLAMA_250M

        workdir, arch, seed, frac = a.workdir or MAIN_DIR, LLAMA_250M, 0, 0.5
    else:
        workdir, arch, seed, frac = a.workdir or DEFAULT_WORKDIR, LLAMA_100M, 1, 0.75
    a.workdir = workdir
    if a.limit_fraction is None:
        a.limit_fraction = frac
    stem = a.stem or ("bounded_memory" if a.set == "small" else "bounded_memory_main")
    info = make_models(workdir, n_experts=3, arch=arch, seed=seed)
    total = info["input_total_bytes"]
    methods = [m for m in a.methods.split(",") if m]
    cfgs = write_configs(info, methods, a.workdir / "configs")
    outroot, logdir = a.workdir / "out_bounded", a.workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    ok, msg = mergeforge_available()
    mods = "torch, mergeforge" if ok else "torch"
    vm_import = import_vmpeak(mods)
    limit = int(a.limit_gib * 2**30) if a.limit_gib else int(total * a.limit_fraction)
    print(
        f"[bounded] inputs total {total / 2**30:.2f} GiB; VmPeak of `import {mods}` "
        f"{vm_import / 2**30:.2f} GiB; RLIMIT_AS {limit / 2**30:.2f} GiB"
    )
    if limit >= total:
        print("[bounded] WARNING: limit is not below the input total; the test proves nothing")
    if limit <= vm_import:
        print("[bounded] WARNING: limit is below what importing torch needs; nothing can run")

    res = {
        "machine": machine_info(),
        "models": info,
        "input_total_bytes": total,
        "import_vmpeak_bytes": vm_import,
        "import_modules": mods,
        "limit_bytes": limit,
        "mechanism": "prlimit --as (RLIMIT_AS, same as `ulimit -v`): counts all mappings incl. mmapped files",
        "env": extra_env,
        "runs": {},
        "notes": [],
    }
    if not ok:
        res["notes"].append("mergeforge CLI not available: " + msg.splitlines()[-1][:200])
    warm_cache([Path(info["base"]), *map(Path, info["experts"])])

    tools = []
    if ok:
        tools.append(
            ("mergeforge", lambda c, o: ["mergeforge", "merge", str(c), str(o), *MERGEFORGE_FLAGS])
        )
    if not a.no_mergekit:
        tools.append(
            ("mergekit", lambda c, o: ["mergekit-yaml", str(c), str(o), *MERGEKIT_FAST_FLAGS])
        )
    for meth in methods:
        r_m = res["runs"].setdefault(meth, {})
        for tool, build in tools:
            # unlimited reference run, then the limited one
            ref_out = outroot / f"{tool}_{meth}_unlimited"
            lim_out = outroot / f"{tool}_{meth}_limited"
            for d in (ref_out, lim_out):
                shutil.rmtree(d, ignore_errors=True)
            ref = None
            if not a.no_reference:
                ref = run_measured(
                    build(cfgs[meth], ref_out),
                    logdir / f"{tool}_{meth}_unlimited.log",
                    timeout=a.timeout,
                    env=env,
                )
            lim = run_measured(
                limited(build(cfgs[meth], lim_out), limit),
                logdir / f"{tool}_{meth}_limited.log",
                timeout=a.timeout,
                env=env,
            )
            entry = {"unlimited": asdict(ref) if ref else None, "limited": asdict(lim)}
            passed = lim.returncode == 0 and any(lim_out.glob("*.safetensors"))
            entry["passed"] = passed
            if passed and any(ref_out.glob("*.safetensors")):
                entry["diff_vs_unlimited"] = max_abs_diff(ref_out, lim_out)
                shutil.rmtree(ref_out, ignore_errors=True)
            if not passed:
                entry["error"] = last_error_line(lim.log)
            r_m[tool] = entry
            refs = (
                f"unlimited: {ref.wall_s:6.1f}s rss {ref.maxrss_bytes / 2**30:.2f} GiB rc={ref.returncode}"
                if ref
                else "no unlimited reference run"
            )
            print(
                f"[bounded] {meth:16s} {tool:10s} {refs} | limited: "
                f"{'PASS' if passed else 'FAIL'} {lim.wall_s:6.1f}s rss {lim.maxrss_bytes / 2**30:.2f} GiB "
                f"rc={lim.returncode} {entry.get('error', '')}",
                flush=True,
            )

    if a.find_min:
        meth = methods[0]
        res["min_passing_limit"] = {}
        for tool, build in tools:
            was_ok = res["runs"][meth][tool]["passed"]
            lo, hi = (vm_import, limit) if was_ok else (limit, 2 * total + (1 << 30))
            out = outroot / f"{tool}_bisect"
            steps = []
            while hi - lo > 32 << 20:
                mid = (lo + hi) // 2
                shutil.rmtree(out, ignore_errors=True)
                r = run_measured(
                    limited(build(cfgs[meth], out), mid),
                    logdir / f"{tool}_bisect.log",
                    timeout=a.timeout,
                    env=env,
                )
                good = r.returncode == 0 and any(out.glob("*.safetensors"))
                steps.append(
                    {
                        "limit_bytes": mid,
                        "passed": good,
                        "wall_s": r.wall_s,
                        "maxrss_bytes": r.maxrss_bytes,
                    }
                )
                print(
                    f"[bisect] {tool} {meth} RLIMIT_AS {mid / 2**30:.3f} GiB: {'PASS' if good else 'FAIL'}",
                    flush=True,
                )
                lo, hi = (lo, mid) if good else (mid, hi)
            shutil.rmtree(out, ignore_errors=True)
            res["min_passing_limit"][tool] = {
                "method": meth,
                "limit_bytes": hi,
                "resolution_bytes": 32 << 20,
                "steps": steps,
            }

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (RESULTS / f"{stem}.md").write_text(md)
    print()
    print(md)
    return 0


def markdown(res: dict) -> str:
    g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    mi, info = res["machine"], res["models"]
    lines = [
        "# Bounded memory: merge with inputs larger than the address-space limit",
        "",
        f"Machine: {mi['cpu_model']}, {mi['cpus']} CPUs, {mi['ram_gib']} GiB RAM, torch {mi['torch']}, "
        f"mergekit {mi['mergekit']}, mergeforge {mi['mergeforge']} (src sha256 {mi.get('mergeforge_src_sha256')}).",
        "",
        f"Inputs: base + 3 experts, {info['n_params']:,} params each (fp32 safetensors, "
        f"{info['bytes_per_model']['base'] / 1e9:.3f} GB each), **{g(res['input_total_bytes'])} total**. "
        f"VmPeak of `python -c 'import {res['import_modules']}'`: {g(res['import_vmpeak_bytes'])}. "
        f"Limit: **RLIMIT_AS = {g(res['limit_bytes'])}** via `prlimit --as={res['limit_bytes']} -- CMD` "
        "(= `ulimit -v`; counts every mapping, mmapped input files included)."
        + (
            f" Extra environment: `{' '.join(f'{k}={v}' for k, v in res['env'].items())}`."
            if res.get("env")
            else ""
        ),
        "",
        "| method | tool | limited run | wall s | peak RSS (limited) | unlimited wall s | peak RSS (unlimited) "
        "| max abs diff vs unlimited | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for meth, tools in res["runs"].items():
        for tool, e in tools.items():
            lim, ref = e["limited"], e["unlimited"]
            d = e.get("diff_vs_unlimited", {}).get("max_abs_diff")
            rw = "–" if not ref else f"{ref['wall_s']:.1f}"
            rr = "–" if not ref else g(ref["maxrss_bytes"])
            lines.append(
                f"| {meth} | {tool} | {'PASS' if e['passed'] else 'FAIL'} (rc {lim['returncode']}) | "
                f"{lim['wall_s']:.1f} | {g(lim['maxrss_bytes'])} | {rw} | {rr} | "
                f"{'–' if d is None else f'{d:.1e}'} | {e.get('error', '').replace('|', '/')} |"
            )
    for tool, mp in (res.get("min_passing_limit") or {}).items():
        lines += [
            "",
            f"Smallest RLIMIT_AS under which `{tool}` ({mp['method']}) completes "
            f"(bisection, 32 MiB resolution): **{g(mp['limit_bytes'])}** "
            f"= {mp['limit_bytes'] / res['input_total_bytes']:.2f} x the input total, "
            f"{(mp['limit_bytes'] - res['import_vmpeak_bytes']) / 2**20:.0f} MiB above the import VmPeak.",
        ]
    if res["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
