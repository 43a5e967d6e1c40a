#!/usr/bin/env python
"""Bounded memory: a merge whose inputs together exceed the memory the process
may use still completes.

Generates base + 3 experts of a ~106M-parameter Llama (fp32, ~0.42 GB each,
~1.7 GB together), then runs ``mergeforge merge`` under an address-space limit
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

LLAMA_100M = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=32000,
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--limit-gib", type=float, default=None, help="RLIMIT_AS in GiB (default: fraction x inputs)")
    ap.add_argument("--limit-fraction", type=float, default=0.70, help="limit = fraction x sum of input sizes")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args(argv)

    info = make_models(a.workdir, n_experts=3, arch=LLAMA_100M, seed=1)
    total = info["input_total_bytes"]
    methods = [m for m in a.methods.split(",") if m]
    cfgs = write_configs(info, methods, a.workdir / "configs")
    outroot, logdir = a.workdir / "out", a.workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    ok, msg = mergeforge_available()
    mods = "torch, mergeforge" if ok else "torch"
    vm_import = import_vmpeak(mods)
    limit = int(a.limit_gib * 2**30) if a.limit_gib else int(total * a.limit_fraction)
    print(f"[bounded] inputs total {total / 2**30:.2f} GiB; VmPeak of `import {mods}` "
          f"{vm_import / 2**30:.2f} GiB; RLIMIT_AS {limit / 2**30:.2f} GiB")
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
        "runs": {},
        "notes": [],
    }
    if not ok:
        res["notes"].append("mergeforge CLI not available: " + msg.splitlines()[-1][:200])
    warm_cache([Path(info["base"]), *map(Path, info["experts"])])

    for meth in methods:
        r_m = res["runs"].setdefault(meth, {})
        tools = []
        if ok:
            tools.append(("mergeforge", lambda c, o: ["mergeforge", "merge", str(c), str(o), *MERGEFORGE_FLAGS]))
        if not a.no_mergekit:
            tools.append(("mergekit", lambda c, o: ["mergekit-yaml", str(c), str(o), *MERGEKIT_FAST_FLAGS]))
        for tool, build in tools:
            # unlimited reference run, then the limited one
            ref_out = outroot / f"{tool}_{meth}_unlimited"
            lim_out = outroot / f"{tool}_{meth}_limited"
            for d in (ref_out, lim_out):
                shutil.rmtree(d, ignore_errors=True)
            ref = run_measured(build(cfgs[meth], ref_out), logdir / f"{tool}_{meth}_unlimited.log",
                               timeout=a.timeout)
            lim = run_measured(limited(build(cfgs[meth], lim_out), limit), logdir / f"{tool}_{meth}_limited.log",
                               timeout=a.timeout)
            entry = {"unlimited": asdict(ref), "limited": asdict(lim)}
            passed = lim.returncode == 0 and any(lim_out.glob("*.safetensors"))
            entry["passed"] = passed
            if passed and any(ref_out.glob("*.safetensors")):
                entry["diff_vs_unlimited"] = max_abs_diff(ref_out, lim_out)
            if not passed:
                entry["error"] = last_error_line(lim.log)
            r_m[tool] = entry
            print(f"[bounded] {meth:16s} {tool:10s} unlimited: {ref.wall_s:6.1f}s rss "
                  f"{ref.maxrss_bytes / 2**30:.2f} GiB rc={ref.returncode} | limited: "
                  f"{'PASS' if passed else 'FAIL'} {lim.wall_s:6.1f}s rss {lim.maxrss_bytes / 2**30:.2f} GiB "
                  f"rc={lim.returncode} {entry.get('error', '')}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bounded_memory.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (RESULTS / "bounded_memory.md").write_text(md)
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
        f"mergekit {mi['mergekit']}, mergeforge {mi['mergeforge']}.",
        "",
        f"Inputs: base + 3 experts, {info['n_params']:,} params each (fp32 safetensors, "
        f"{info['bytes_per_model']['base'] / 1e9:.3f} GB each), **{g(res['input_total_bytes'])} total**. "
        f"VmPeak of `python -c 'import {res['import_modules']}'`: {g(res['import_vmpeak_bytes'])}. "
        f"Limit: **RLIMIT_AS = {g(res['limit_bytes'])}** via `prlimit --as={res['limit_bytes']} -- CMD` "
        "(= `ulimit -v`; counts every mapping, mmapped input files included).",
        "",
        "| method | tool | limited run | wall s | peak RSS (limited) | unlimited wall s | peak RSS (unlimited) "
        "| max abs diff vs unlimited | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for meth, tools in res["runs"].items():
        for tool, e in tools.items():
            lim, ref = e["limited"], e["unlimited"]
            d = e.get("diff_vs_unlimited", {}).get("max_abs_diff")
            lines.append(
                f"| {meth} | {tool} | {'PASS' if e['passed'] else 'FAIL'} (rc {lim['returncode']}) | "
                f"{lim['wall_s']:.1f} | {g(lim['maxrss_bytes'])} | {ref['wall_s']:.1f} | {g(ref['maxrss_bytes'])} | "
                f"{'–' if d is None else f'{d:.1e}'} | {e.get('error', '').replace('|', '/')} |"
            )
    if res["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
