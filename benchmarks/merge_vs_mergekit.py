#!/usr/bin/env python
# ruff: noqa: E501  (report strings)
"""Speed / memory benchmark: ``mergeforge merge`` versus ``mergekit-yaml``.

Acceptance being measured: base + 3 experts of a ~250M-parameter Llama model
in fp32 safetensors (~1 GB each); task arithmetic >= 3x and TIES >= 10x faster
than mergekit with peak RSS no higher; every time is also reported as a ratio
to an I/O floor (read all inputs once, write one output of the same size).

Both tools run as subprocesses from the same YAML, alternating, with a warm
page cache. Wall-clock is measured around the subprocess; peak RSS is the
child's ``ru_maxrss`` from ``os.wait4`` (kernel accounting, no polling).

    python benchmarks/merge_vs_mergekit.py                  # full run
    python benchmarks/merge_vs_mergekit.py --only mergekit  # skip mergeforge
    python benchmarks/merge_vs_mergekit.py --extras         # + linear/slerp/...

Nothing in ``src/`` imports this file; it only needs torch, transformers,
safetensors, PyYAML and (for the comparison) mergekit on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_WORKDIR = Path("/tmp/mf_bench")

# ~271M parameters, 1.08 GB in fp32 (16 layers).  Untied embeddings.
LLAMA_250M = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

# mergekit options that make it fastest on CPU (see `mergekit-yaml --help`):
#  * --lazy-unpickle only matters for pickled .bin inputs (ours are safetensors);
#    harmless, kept on as "best settings".
#  * --async-write overlaps shard writes with compute (one shard here).
#  * -j N sets torch intra/inter-op threads (torch already defaults to nproc).
#  * --no-copy-tokenizer / --no-write-model-card: there is no tokenizer and we
#    want no extra work that mergeforge does not do.
#  * --quiet: no progress bars (mergeforge gets --no-progress).
MERGEKIT_FAST_FLAGS = [
    "--out-shard-size",
    "5B",
    "--lazy-unpickle",
    "--async-write",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--quiet",
]
MERGEFORGE_FLAGS = ["--overwrite", "--device", "cpu", "--no-progress"]


# --------------------------------------------------------------------------
# model generation
# --------------------------------------------------------------------------
def _st_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in _st_files(model_dir))


def _complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").exists() and (model_dir / ".complete").exists()


def count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in _st_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                shape = fh.get_slice(k).get_shape()
                c = 1
                for s in shape:
                    c *= s
                n += c
    return n


def make_models(
    workdir: Path | str = DEFAULT_WORKDIR,
    n_experts: int = 3,
    arch: dict | None = None,
    seed: int = 0,
    delta_scale: float = 1e-3,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """Create ``workdir/base`` and ``workdir/expert{1..n}`` (fp32 safetensors).

    base: ``LlamaForCausalLM`` randomly initialised by transformers with
    ``torch.manual_seed(seed)``, written with ``save_pretrained`` (single file
    or shards, whatever transformers does).  Experts: base + Gaussian delta
    with std ``delta_scale * tensor.std()`` (``delta_scale * mean|t|`` for
    constant tensors such as RMSNorm weights), seeded per (expert, tensor
    name); written shard by shard with the same file layout as base, so at
    most one shard is in memory.  Existing complete folders are reused.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    arch = dict(LLAMA_250M if arch is None else arch)
    base = workdir / "base"
    experts = [workdir / f"expert{i}" for i in range(1, n_experts + 1)]
    log = print if verbose else (lambda *a, **k: None)

    if force:
        for d in [base, *experts]:
            shutil.rmtree(d, ignore_errors=True)

    if not _complete(base):
        from transformers import LlamaConfig, LlamaForCausalLM

        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        cfg = LlamaConfig(**arch)
        cfg.dtype = "float32"
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
        model.save_pretrained(str(base), safe_serialization=True)
        del model
        (base / ".complete").write_text("ok\n")
        log(f"[gen] base written in {time.perf_counter() - t0:.1f}s -> {base}")
    else:
        log(f"[gen] base present: {base}")

    base_files = _st_files(base)
    for ei, ed in enumerate(experts, start=1):
        if _complete(ed):
            log(f"[gen] {ed.name} present")
            continue
        shutil.rmtree(ed, ignore_errors=True)
        ed.mkdir(parents=True)
        t0 = time.perf_counter()
        for bf in base_files:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(bf), framework="pt") as fh:
                meta = fh.metadata() or {"format": "pt"}
                for name in fh.keys():
                    t = fh.get_tensor(name)
                    g = torch.Generator().manual_seed(
                        seed * 1_000_003 + ei * 7919 + zlib.crc32(name.encode())
                    )
                    tf = t.float()
                    scale = tf.std().item() if t.numel() > 1 else 0.0
                    if not scale > 0:
                        scale = tf.abs().mean().item() or 1.0
                    noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
                    noise.mul_(delta_scale * scale).add_(tf)
                    out[name] = noise.to(t.dtype)
                    del t, tf
            save_file(out, str(ed / bf.name), metadata=meta)
            del out
        for extra in base.iterdir():
            if extra.suffix != ".safetensors" and extra.name != ".complete":
                shutil.copy2(extra, ed / extra.name)
        (ed / ".complete").write_text("ok\n")
        log(f"[gen] {ed.name} written in {time.perf_counter() - t0:.1f}s")

    n_params = count_params(base)
    sizes = {d.name: model_bytes(d) for d in [base, *experts]}
    info = {
        "workdir": str(workdir),
        "base": str(base),
        "experts": [str(e) for e in experts],
        "arch": arch,
        "n_params": n_params,
        "bytes_per_model": sizes,
        "input_total_bytes": sum(sizes.values()),
        "files_per_model": len(base_files),
        "delta_scale": delta_scale,
        "seed": seed,
    }
    log(
        f"[gen] params per model: {n_params:,} ({n_params / 1e6:.1f}M); "
        f"{sizes['base'] / 1e9:.3f} GB fp32 in {len(base_files)} file(s); "
        f"inputs total {info['input_total_bytes'] / 1e9:.2f} GB"
    )
    return info


# --------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------
# Deterministic methods: outputs of both tools are compared tensor by tensor.
MAIN_METHODS = ["task_arithmetic", "ties"]
EXTRA_METHODS = ["linear", "slerp", "breadcrumbs", "dare_ties", "della"]
DETERMINISTIC = {"task_arithmetic", "ties", "linear", "slerp", "breadcrumbs"}


def method_config(method: str, base: str, experts: list[str]) -> dict:
    """A mergekit-format config dict (same YAML is fed to both tools)."""
    m = lambda p, **params: {"model": p, "parameters": params} if params else {"model": p}  # noqa: E731
    if method == "task_arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [m(e, weight=0.3) for e in experts],
            "dtype": "float32",
        }
    if method == "ties":
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [m(e, density=0.5, weight=1.0) for e in experts],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    if method == "dare_ties":
        return {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [m(e, density=0.5, weight=1.0) for e in experts],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    if method == "breadcrumbs":
        return {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [m(e, density=0.9, gamma=0.01, weight=0.3) for e in experts],
            "dtype": "float32",
        }
    if method == "della":
        return {
            "merge_method": "della",
            "base_model": base,
            "models": [m(e, density=0.5, epsilon=0.1, weight=1.0) for e in experts],
            "parameters": {"lambda": 1.0, "normalize": True},
            "dtype": "float32",
        }
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [m(p, weight=1.0) for p in [base, *experts]],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [m(base), m(experts[0])],
            "parameters": {"t": 0.5},
            "dtype": "float32",
        }
    raise ValueError(f"unknown method {method!r}")


def write_configs(info: dict, methods: list[str], cfg_dir: Path) -> dict[str, Path]:
    import yaml

    cfg_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for meth in methods:
        p = cfg_dir / f"{meth}.yaml"
        p.write_text(
            yaml.safe_dump(method_config(meth, info["base"], info["experts"]), sort_keys=False)
        )
        paths[meth] = p
    return paths


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------
@dataclass
class RunResult:
    cmd: list[str]
    wall_s: float
    maxrss_bytes: int
    returncode: int
    cpu_s: float = 0.0  # child user+sys CPU seconds (less sensitive to other load)
    loadavg_before: float = 0.0  # 1-min load average just before the run
    log: str = ""
    extra: dict = field(default_factory=dict)


def run_measured(
    cmd: list[str],
    log_path: Path | None = None,
    env: dict | None = None,
    timeout: float | None = None,
) -> RunResult:
    """Run ``cmd``; wall-clock around it and the child's ru_maxrss via os.wait4.

    The measuring is done by ``timed_run.py``, a fresh stdlib-only interpreter, because
    ``ru_maxrss`` survives execve: a child forked from this (large, torch-importing)
    driver would start from the driver's own RSS high-water mark.
    """
    import tempfile

    subprocess.run(["sync"], check=False)  # flush previous outputs outside the timing
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as td:
        js = Path(td) / "r.json"
        launcher = [sys.executable, "-S", str(HERE / "timed_run.py"), "--json", str(js)]
        if log_path:
            launcher += ["--log", str(log_path)]
        if timeout:
            launcher += ["--timeout", str(timeout)]
        subprocess.run([*launcher, "--", *cmd], check=True, env=env)
        r = json.loads(js.read_text())
    tail = ""
    if log_path and log_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
    return RunResult(
        cmd=cmd,
        wall_s=r["wall_s"],
        maxrss_bytes=r["maxrss_bytes"],
        returncode=r["returncode"],
        cpu_s=r["cpu_s"],
        loadavg_before=load,
        log=tail,
        extra={k: r[k] for k in ("user_s", "sys_s", "timed_out")},
    )


def warm_cache(paths: list[Path], chunk: int = 64 << 20) -> tuple[int, float]:
    """Read every byte of every file once (untimed) so the page cache is warm."""
    n = 0
    t0 = time.perf_counter()
    buf = bytearray(chunk)
    for d in paths:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while k := fh.readinto(buf):
                        n += k
    return n, time.perf_counter() - t0


def output_tensors(out_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in _st_files(out_dir):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where[k] = f
    return where


def max_abs_diff(a_dir: Path, b_dir: Path) -> dict:
    """Tensor-by-tensor max |a-b| over the common names (+ name-set mismatch)."""
    import torch
    from safetensors import safe_open

    wa, wb = output_tensors(a_dir), output_tensors(b_dir)
    common = sorted(set(wa) & set(wb))
    worst, worst_name, max_rel = 0.0, None, 0.0
    dtype_mismatch = []
    n_diff_tensors = n_diff_elems = n_elems = 0
    handles: dict[Path, object] = {}

    def get(p: Path, k: str):
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt")
        return handles[p].get_tensor(k)

    for k in common:
        x, y = get(wa[k], k), get(wb[k], k)
        if x.dtype != y.dtype:
            dtype_mismatch.append(k)
        if x.shape != y.shape:
            return {"error": f"shape mismatch for {k}: {tuple(x.shape)} vs {tuple(y.shape)}"}
        diff = (x.double() - y.double()).abs()
        d = diff.max().item() if x.numel() else 0.0
        nz = int(torch.count_nonzero(diff)) if x.numel() else 0
        if nz:
            n_diff_tensors += 1
            n_diff_elems += nz
        n_elems += x.numel()
        del diff
        if d > worst:
            worst, worst_name = d, k
        s = x.double().abs().max().item() if x.numel() else 0.0
        if s > 0:
            max_rel = max(max_rel, d / s)
    return {
        "max_abs_diff": worst,
        "worst_tensor": worst_name,
        "max_rel_to_tensor_absmax": max_rel,
        "n_common": len(common),
        "n_tensors_differing": n_diff_tensors,
        "n_elements_differing": n_diff_elems,
        "n_elements": n_elems,
        "only_in_a": sorted(set(wa) - set(wb))[:10],
        "only_in_b": sorted(set(wb) - set(wa))[:10],
        "dtype_mismatch": dtype_mismatch[:10],
    }


def console_script(name: str) -> str:
    """The console script beside this interpreter, for both tools alike: a version-manager shim
    on PATH (pyenv's costs ~0.25 s per call) would add the same fixed cost to each run."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def mergekit_cmd(cfg: Path, out: Path) -> list[str]:
    return [console_script("mergekit-yaml"), str(cfg), str(out), *MERGEKIT_FAST_FLAGS]


def mergeforge_cmd(cfg: Path, out: Path) -> list[str]:
    return [console_script("mergeforge"), "merge", str(cfg), str(out), *MERGEFORGE_FLAGS]


def io_floor_cmd(info: dict, out: Path, mode: str = "raw") -> list[str]:
    return [
        sys.executable,
        str(HERE / "io_floor.py"),
        "--mode",
        mode,
        "--out",
        str(out),
        info["base"],
        *info["experts"],
    ]


def mergeforge_available() -> tuple[bool, str]:
    try:
        p = subprocess.run(
            ["mergeforge", "merge", "--help"], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, repr(e)
    txt = (p.stdout + p.stderr).strip()
    return p.returncode == 0, txt[-400:]


def machine_info() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    import torch

    model = sh("lscpu | sed -n 's/^Model name:[ \\t]*//p' | head -1")
    mem_kb = int(sh("awk '/MemTotal/ {print $2}' /proc/meminfo") or 0)
    try:
        from importlib.metadata import version

        mk = version("mergekit")
    except Exception:  # noqa: BLE001
        mk = "not installed"
    try:
        from importlib.metadata import version

        mf = version("mergeforge")
    except Exception:  # noqa: BLE001
        mf = "not installed"
    src_sha = None
    try:
        import hashlib

        import mergeforge

        h = hashlib.sha256()
        root = Path(mergeforge.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        src_sha = h.hexdigest()[:12]
    except Exception:  # noqa: BLE001
        pass
    return {
        "mergeforge_src_sha256": src_sha,
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "mergekit": mk,
        "mergeforge": mf,
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
TARGETS = {"task_arithmetic": 3.0, "ties": 10.0}


def _med(xs):
    return statistics.median(xs) if xs else None


def summarize(results: dict) -> dict:
    io = [r["wall_s"] for r in results.get("io_floor", {}).get("runs", []) if r["returncode"] == 0]
    io_med = _med(io)
    rows = []
    for meth, tools in results["methods"].items():
        row = {"method": meth}
        for tool in ("mergekit", "mergeforge"):
            ok = [r for r in tools.get(tool, []) if r["returncode"] == 0]
            row[f"{tool}_s"] = _med([r["wall_s"] for r in ok])
            row[f"{tool}_cpu_s"] = _med([r.get("cpu_s", 0.0) for r in ok])
            row[f"{tool}_rss"] = max((r["maxrss_bytes"] for r in ok), default=None)
            row[f"{tool}_n"] = len(ok)
            row[f"{tool}_failed"] = len(tools.get(tool, [])) - len(ok)
        mk, mf = row["mergekit_s"], row["mergeforge_s"]
        row["speedup"] = mk / mf if mk and mf else None
        row["mergekit_x_io"] = mk / io_med if mk and io_med else None
        row["mergeforge_x_io"] = mf / io_med if mf and io_med else None
        row["max_abs_diff"] = (results.get("diffs", {}).get(meth) or {}).get("max_abs_diff")
        tgt = TARGETS.get(meth)
        row["target_speedup"] = tgt
        if tgt and row["speedup"] is not None:
            rss_ok = (row["mergeforge_rss"] or 0) <= (row["mergekit_rss"] or 0)
            row["meets_target"] = bool(row["speedup"] >= tgt and rss_ok)
        else:
            row["meets_target"] = None
        rows.append(row)
    return {"io_floor_s": io_med, "rows": rows}


def markdown(results: dict) -> str:
    s = results["summary"]
    mi = results["machine"]
    info = results["models"]
    gb = lambda b: f"{b / 2**30:.2f} GiB" if b else "–"  # noqa: E731
    f = lambda x, spec=".2f": "–" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "# mergeforge vs mergekit: merge speed and peak RSS",
        "",
        f"Machine: {mi['cpu_model']}, {mi['cpus']} CPUs, {mi['ram_gib']} GiB RAM; "
        f"torch {mi['torch']} ({mi['torch_threads']} threads), python {mi['python']}, "
        f"mergekit {mi['mergekit']}, mergeforge {mi['mergeforge']} "
        f"(sha256 of its src/*.py: {mi.get('mergeforge_src_sha256')}).",
        "",
        f"Inputs: base + {len(info['experts'])} experts, Llama "
        f"{info['arch']['num_hidden_layers']}L/h{info['arch']['hidden_size']}/"
        f"ff{info['arch']['intermediate_size']}/v{info['arch']['vocab_size']}, "
        f"{info['n_params']:,} params each, fp32 safetensors, "
        f"{info['bytes_per_model']['base'] / 1e9:.3f} GB each, "
        f"{info['input_total_bytes'] / 1e9:.2f} GB total. "
        f"Page cache warmed by one untimed read of all inputs "
        f"({results['warm_cache']['bytes'] / 1e9:.2f} GB in {results['warm_cache']['s']:.1f} s).",
        "",
        f"I/O floor (read every input tensor once + write one {info['bytes_per_model']['base'] / 1e9:.2f} GB "
        f"safetensors output): **{f(s['io_floor_s'])} s** (median of "
        f"{len(results.get('io_floor', {}).get('runs', []))}), peak RSS "
        f"{gb(max((r['maxrss_bytes'] for r in results.get('io_floor', {}).get('runs', [])), default=0))}.",
        "",
        f"Same through the safetensors API (`safe_open` + `get_tensor().clone()` + `save_file`): "
        f"{f(_med([r['wall_s'] for r in results.get('io_floor_safetensors', {}).get('runs', [])]))} s. "
        "Both floors include interpreter start-up (the raw one does not import torch).",
        "",
        "| method | mergekit s | mergeforge s | speedup (mk/mf) | target | mergekit ÷ I/O floor "
        "| mergeforge ÷ I/O floor | peak RSS mergekit | peak RSS mergeforge | max abs diff | CPU s mk/mf | runs mk/mf |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        tgt = "–" if r["target_speedup"] is None else f"≥{r['target_speedup']:.0f}×"
        if r["meets_target"] is not None:
            tgt += " ✅" if r["meets_target"] else " ❌"
        diff = "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        dd = results.get("diffs", {}).get(r["method"]) or {}
        if dd.get("n_elements_differing"):
            diff += (
                f" ({dd['n_elements_differing']:,} of {dd['n_elements']:,} elements, "
                f"{dd['n_tensors_differing']}/{dd['n_common']} tensors)"
            )
        lines.append(
            f"| {r['method']} | {f(r['mergekit_s'])} | {f(r['mergeforge_s'])} | "
            f"{f(r['speedup'])}{'×' if r['speedup'] else ''} | {tgt} | {f(r['mergekit_x_io'])}× | "
            f"{f(r['mergeforge_x_io'])}× | {gb(r['mergekit_rss'])} | {gb(r['mergeforge_rss'])} | {diff} | "
            f"{f(r['mergekit_cpu_s'], '.1f')}/{f(r['mergeforge_cpu_s'], '.1f')} | {r['mergekit_n']}/{r['mergeforge_n']}"
            + (
                f" (failed {r['mergekit_failed']}/{r['mergeforge_failed']})"
                if r["mergekit_failed"] or r["mergeforge_failed"]
                else ""
            )
            + " |"
        )
    lines += [
        "",
        "Times are medians of wall-clock around each subprocess (tools alternated, `sync` before "
        "each); peak RSS is the child's `ru_maxrss` from `os.wait4` in a small stdlib-only "
        "launcher (`timed_run.py`; ru_maxrss survives exec, so the torch-importing driver must "
        "not be the parent), max over runs, file-backed pages of mmapped inputs that the process "
        "touched included. CPU s = child user+sys seconds (median); "
        "it is less sensitive than wall-clock to other load on the machine "
        f"(1-min load average before runs: {results.get('load_summary', '?')}).",
        "",
        f"mergekit command: `mergekit-yaml CONFIG OUT {' '.join(MERGEKIT_FAST_FLAGS)}`  ",
        f"mergeforge command: `mergeforge merge CONFIG OUT {' '.join(MERGEFORGE_FLAGS)}`  ",
        "I/O floor: `python benchmarks/io_floor.py --out OUT BASE EXPERT1 EXPERT2 EXPERT3`",
    ]
    if results.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def save(results: dict, stem: str = "merge_vs_mergekit") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    loads = [
        r.get("loadavg_before", 0.0)
        for t in results["methods"].values()
        for rs in t.values()
        for r in rs
    ]
    loads += [r.get("loadavg_before", 0.0) for r in results.get("io_floor", {}).get("runs", [])]
    if loads:
        results["load_summary"] = (
            f"min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}"
        )
    results["summary"] = summarize(results)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / f"{stem}.md").write_text(markdown(results))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--layers", type=int, default=LLAMA_250M["num_hidden_layers"])
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regen", action="store_true", help="regenerate models even if present")
    ap.add_argument("--methods", default=",".join(MAIN_METHODS))
    ap.add_argument("--extras", action="store_true", help=f"also run {','.join(EXTRA_METHODS)}")
    ap.add_argument(
        "--reps",
        type=int,
        default=3,
        help="repetitions (mergeforge, and mergekit for fast methods)",
    )
    ap.add_argument(
        "--mergekit-slow-reps",
        type=int,
        default=1,
        help="mergekit repetitions for slow methods (ties/dare_ties/breadcrumbs/della)",
    )
    ap.add_argument("--io-reps", type=int, default=3)
    ap.add_argument("--only", choices=["mergekit", "mergeforge"], default=None)
    ap.add_argument("--skip-io-floor", action="store_true")
    ap.add_argument(
        "--merge-results",
        action="store_true",
        help="merge into an existing results JSON (keep runs of the other tool)",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-run timeout (s)")
    ap.add_argument("--generate-only", action="store_true")
    a = ap.parse_args(argv)

    arch = dict(LLAMA_250M, num_hidden_layers=a.layers)
    info = make_models(a.workdir, n_experts=a.experts, arch=arch, seed=a.seed, force=a.regen)
    if a.generate_only:
        return 0
    methods = [m for m in a.methods.split(",") if m]
    if a.extras:
        methods += [m for m in EXTRA_METHODS if m not in methods]
    cfgs = write_configs(info, methods, a.workdir / "configs")
    outroot = a.workdir / "out"
    logdir = a.workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    prev = RESULTS / "merge_vs_mergekit.json"
    if a.merge_results and prev.exists():
        results = json.loads(prev.read_text())
        results["models"] = info
    else:
        results = {"models": info, "methods": {}, "diffs": {}, "notes": []}
    results["machine"] = machine_info()
    results["configs"] = {m: str(p) for p in cfgs.values() for m in [p.stem]}
    results["config_yaml"] = {m: p.read_text() for m, p in cfgs.items()}
    results["commands"] = {
        "mergekit": " ".join(mergekit_cmd(Path("CONFIG"), Path("OUT"))),
        "mergeforge": " ".join(mergeforge_cmd(Path("CONFIG"), Path("OUT"))),
    }

    tools = ["mergekit", "mergeforge"]
    if a.only:
        tools = [a.only]
    if "mergeforge" in tools:
        ok, msg = mergeforge_available()
        if not ok:
            print(f"[warn] `mergeforge merge --help` failed; skipping mergeforge:\n{msg}")
            tools.remove("mergeforge")
            results["notes"].append(
                "mergeforge CLI not available at run time: " + msg.splitlines()[-1][:200]
            )

    nb, ts = warm_cache([Path(info["base"]), *map(Path, info["experts"])])
    results["warm_cache"] = {"bytes": nb, "s": ts}
    print(
        f"[cache] warm page cache: one untimed read of all inputs, {nb / 1e9:.2f} GB in {ts:.1f}s"
    )

    if not a.skip_io_floor:
        for mode, key in (("raw", "io_floor"), ("safetensors", "io_floor_safetensors")):
            runs = []
            for i in range(a.io_reps):
                out = outroot / "io_floor"
                shutil.rmtree(out, ignore_errors=True)
                r = run_measured(
                    io_floor_cmd(info, out, mode),
                    logdir / f"io_floor_{mode}_{i}.log",
                    timeout=a.timeout,
                )
                print(
                    f"[io:{mode}] rep {i}: {r.wall_s:.2f}s  maxrss {r.maxrss_bytes / 2**30:.2f} GiB "
                    f"rc={r.returncode}  ({r.log.strip().splitlines()[-1] if r.log.strip() else ''})"
                )
                runs.append(asdict(r))
            results[key] = {"runs": runs}

    slow = {"ties", "dare_ties", "breadcrumbs", "della"}
    mk = lambda c, o: mergekit_cmd(c, o)  # noqa: E731
    mf = lambda c, o: mergeforge_cmd(c, o)  # noqa: E731
    builders = {"mergekit": mk, "mergeforge": mf}
    for meth in methods:
        mres = results["methods"].setdefault(meth, {})
        for tool in tools:
            mres[tool] = []
        reps = {t: a.reps for t in tools}
        if meth in slow and "mergekit" in reps:
            reps["mergekit"] = a.mergekit_slow_reps
        for i in range(max(reps.values())):
            order = tools if i % 2 == 0 else tools[::-1]  # alternate which tool goes first
            for tool in order:
                if i >= reps[tool]:
                    continue
                out = outroot / f"{tool}_{meth}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_measured(
                    builders[tool](cfgs[meth], out),
                    logdir / f"{tool}_{meth}_{i}.log",
                    timeout=a.timeout,
                )
                print(
                    f"[{meth}] {tool:10s} rep {i}: {r.wall_s:7.2f}s  maxrss "
                    f"{r.maxrss_bytes / 2**30:.2f} GiB rc={r.returncode}",
                    flush=True,
                )
                if r.returncode != 0:
                    print(r.log[-1500:])
                mres[tool].append(asdict(r))
        # verify
        mk_out, mf_out = outroot / f"mergekit_{meth}", outroot / f"mergeforge_{meth}"
        if meth in DETERMINISTIC and _st_files(mk_out) and _st_files(mf_out):
            d = max_abs_diff(mk_out, mf_out)
            results["diffs"][meth] = d
            print(
                f"[{meth}] max |mergekit - mergeforge| = {d.get('max_abs_diff')} "
                f"(worst {d.get('worst_tensor')}; {d.get('n_common')} tensors; "
                f"only mk {d.get('only_in_a')} only mf {d.get('only_in_b')})"
            )
        save(results)

    save(results)
    md = (RESULTS / "merge_vs_mergekit.md").read_text()
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
