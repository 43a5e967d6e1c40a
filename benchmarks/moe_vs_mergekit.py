#!/usr/bin/env python
# ruff: noqa: E501  (report strings)
"""Speed / memory benchmark: ``mergeforge moe`` versus ``mergekit-moe`` (issue 16).

Acceptance being measured: a Mixtral MoE built from the ~250M-parameter Llama set of
BENCHMARKS §1 (base + 4 experts, fp32 safetensors, ~1.08 GB each) from one mergekit-moe YAML;
target: mergeforge >= 3x faster than mergekit-moe with peak RSS no higher.

Two gate modes, each its own YAML (otherwise identical; ``dtype: bfloat16``,
``architecture: mixtral``, 2 experts per token):

* ``random``: no forward pass, the pure read + assemble + write comparison (both tools seeded
  with 0, so the gates are the same numbers);
* ``hidden``: the base model (bfloat16) runs 3 prompts per expert (one expert also has a
  negative prompt) and each gate row is the normalised last-token hidden state.

Models are made by ``merge_vs_mergekit.make_models`` (the §1 builder, imported) in ``--workdir``
(default /tmp/mf_bench_moe, or /tmp/mf_bench_moe_small with ``--small``) and reused when
present; every model gets a word-level tokenizer (tokens ``w0 .. w{V-4}``, each word one
token), as mergekit-moe loads the base's tokenizer in every gate mode. Each tool
runs as a subprocess through ``timed_run.py`` (wall clock, the child's user+sys CPU and
``ru_maxrss`` from ``os.wait4``), one torch thread each (``OMP_NUM_THREADS=1``, mergekit also
``-j 1``), warm page cache, ``sync`` before each run, 1-min load average sampled during it. The
outputs are then compared tensor by tensor: same names / shapes / dtypes / config.json, every
non-gate tensor bit for bit, the gates' max abs difference.

    python benchmarks/moe_vs_mergekit.py --small          # smoke test (~5M params, seconds)
    python benchmarks/moe_vs_mergekit.py                  # the 250M run, both gate modes, once
    python benchmarks/moe_vs_mergekit.py --modes random --reps 3

Results: benchmarks/results/moe_vs_mergekit.{json,md} (``--small``: WORKDIR/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge_vs_mergekit as mvm  # noqa: E402  (the §1 model builder and measurement)

RESULTS = HERE / "results"
DEFAULT_WORKDIR = Path("/tmp/mf_bench_moe")
SMALL_WORKDIR = Path("/tmp/mf_bench_moe_small")
N_EXPERTS = 4
MODES = ("random", "hidden")
TARGET = 3.0

# mergekit-moe's fastest CPU settings (`mergekit-moe --help`): --lazy-unpickle is passed to
# its loaders (no effect on safetensors; kept as "best settings"); --async-write hands the
# shard to a writer thread (the output is one shard here, so it overlaps nothing); no
# tokenizer copy and no model card (mergeforge gets --no-copy-tokenizer too); -j 1 = one torch
# thread (OMP_NUM_THREADS=1 for both tools); --random-seed 0 = mergeforge's default seed, so
# the random gates are the same numbers. The output (1.37 GB in bf16) is one shard for both.
MERGEKIT_FLAGS = [
    "--device",
    "cpu",
    "--random-seed",
    "0",
    "-j",
    "1",
    "--lazy-unpickle",
    "--async-write",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--quiet",
]
MERGEFORGE_FLAGS = ["--overwrite", "--device", "cpu", "--random-seed", "0", "--no-copy-tokenizer"]
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def prompts(expert: int, n: int = 3, vocab: int = 32000) -> list[str]:
    """Prompts of ``w`` words (every word one token of the benchmark tokenizer): 3 per expert,
    6 / 9 / 12 words (different lengths: left padding is exercised), each expert from its own
    range of words."""
    span = (vocab - 3) // (N_EXPERTS + 1) - 1  # words w1 .. w{5 span} all exist
    lo = 1 + expert * span
    return [
        " ".join(f"w{lo + (7 * (i + 1) * j) % span}" for j in range(6 + 3 * i)) for i in range(n)
    ]


def word_level_tokenizer(vocab_size: int):
    """A real fast tokenizer whose every token is a whole word: ``[UNK]`` 0, ``<s>`` 1, ``</s>``
    2 (the models' bos / eos ids), then ``w0 .. w{V-4}`` (a word-level model, so ``w123`` is one
    token; ``merge_vs_mergekit.word_tokenizer`` is a BPE without merges, which splits such words
    into characters, all unknown)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


def _has_word_level_tokenizer(folder: Path) -> bool:
    f = folder / "tokenizer.json"
    try:
        return json.loads(f.read_text())["model"]["type"] == "WordLevel"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def add_tokenizers(info: dict, verbose: bool = True) -> None:
    """Save the word-level tokenizer (``vocab_size`` tokens) into the base and every expert
    that does not have it yet."""
    vocab = info["arch"]["vocab_size"]
    tok = None
    for d in [info["base"], *info["experts"]]:
        if _has_word_level_tokenizer(Path(d)):
            continue
        if tok is None:
            tok = word_level_tokenizer(vocab)
            assert len(tok) == vocab, (len(tok), vocab)
        tok.save_pretrained(d)
        if verbose:
            print(f"[gen] tokenizer ({len(tok):,} words) -> {d}")


def moe_config(info: dict, mode: str, dtype: str = "bfloat16") -> dict:
    vocab = info["arch"]["vocab_size"]
    experts = []
    for e, path in enumerate(info["experts"]):
        d = {"source_model": path, "positive_prompts": prompts(e, vocab=vocab)}
        if e == 0:
            d["negative_prompts"] = [prompts(N_EXPERTS, n=1, vocab=vocab)[0]]
        experts.append(d)
    return {
        "base_model": info["base"],
        "gate_mode": mode,
        "architecture": "mixtral",
        "dtype": dtype,
        "experts_per_token": 2,
        "experts": experts,
    }


def mergekit_cmd(cfg: Path, out: Path) -> list[str]:
    return [mvm.console_script("mergekit-moe"), str(cfg), str(out), *MERGEKIT_FLAGS]


def mergeforge_cmd(cfg: Path, out: Path) -> list[str]:
    return [mvm.console_script("mergeforge"), "moe", str(cfg), str(out), *MERGEFORGE_FLAGS]


def compare(mk_dir: Path, mf_dir: Path) -> dict:
    """mergekit's output against mergeforge's: name sets, shapes, dtypes, config.json, every
    non-gate tensor bit for bit, the max abs difference of the gates (and of anything else)."""
    import torch
    from safetensors import safe_open

    wa, wb = mvm.output_tensors(mk_dir), mvm.output_tensors(mf_dir)
    handles: dict = {}

    def get(p: Path, k: str):
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt")
        return handles[p].get_tensor(k)

    common = sorted(set(wa) & set(wb))
    r = {
        "n_tensors_mergekit": len(wa),
        "n_tensors_mergeforge": len(wb),
        "only_mergekit": sorted(set(wa) - set(wb))[:10],
        "only_mergeforge": sorted(set(wb) - set(wa))[:10],
        "shape_or_dtype_mismatch": [],
        "n_non_gate": 0,
        "n_non_gate_identical": 0,
        "non_gate_max_abs_diff": 0.0,
        "n_gate": 0,
        "n_gate_identical": 0,
        "gate_max_abs_diff": 0.0,
        "gate_worst_tensor": None,
        "n_elements": 0,
    }
    for k in common:
        x, y = get(wa[k], k), get(wb[k], k)
        r["n_elements"] += x.numel()
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            r["shape_or_dtype_mismatch"].append(
                f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
            )
            continue
        same = torch.equal(x, y)
        d = 0.0 if same else float((x.double() - y.double()).abs().max())
        kind = "gate" if k.endswith("mlp.gate.weight") else "non_gate"
        r[f"n_{kind}"] += 1
        r[f"n_{kind}_identical"] += int(same)
        if d > r[f"{kind}_max_abs_diff"]:
            r[f"{kind}_max_abs_diff"] = d
            if kind == "gate":
                r["gate_worst_tensor"] = k
    ca = json.loads((mk_dir / "config.json").read_text())
    cb = json.loads((mf_dir / "config.json").read_text())
    r["config_equal"] = ca == cb
    if ca != cb:
        r["config_diff"] = {
            k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)
        }
    r["agree"] = bool(
        not r["only_mergekit"]
        and not r["only_mergeforge"]
        and not r["shape_or_dtype_mismatch"]
        and r["n_non_gate_identical"] == r["n_non_gate"]
        and r["config_equal"]
    )
    return r


def _med(xs):
    return statistics.median(xs) if xs else None


def summarize(results: dict) -> list[dict]:
    rows = []
    for mode, tools in results["modes"].items():
        row: dict = {"gate_mode": mode}
        for tool in ("mergekit", "mergeforge"):
            ok = [r for r in tools.get(tool, []) if r["returncode"] == 0]
            row[f"{tool}_wall_s"] = _med([r["wall_s"] for r in ok])
            row[f"{tool}_cpu_s"] = _med([r["cpu_s"] for r in ok])
            row[f"{tool}_rss"] = max((r["maxrss_bytes"] for r in ok), default=None)
            row[f"{tool}_load_before"] = _med([r["loadavg_before"] for r in ok])
            row[f"{tool}_load_during"] = _med(
                [r["loadavg_during"]["mean"] for r in ok if r.get("loadavg_during")]
            )
            row[f"{tool}_n"] = len(ok)
            row[f"{tool}_failed"] = len(tools.get(tool, [])) - len(ok)
        mk, mf = row["mergekit_wall_s"], row["mergeforge_wall_s"]
        row["wall_speedup"] = mk / mf if mk and mf else None
        mkc, mfc = row["mergekit_cpu_s"], row["mergeforge_cpu_s"]
        row["cpu_speedup"] = mkc / mfc if mkc and mfc else None
        mkr, mfr = row["mergekit_rss"], row["mergeforge_rss"]
        row["rss_ratio"] = mkr / mfr if mkr and mfr else None
        row["rss_ok"] = None if not (mkr and mfr) else mfr <= mkr
        for k, v in (
            ("meets_target_wall", row["wall_speedup"]),
            ("meets_target_cpu", row["cpu_speedup"]),
        ):
            row[k] = (
                None if v is None or row["rss_ok"] is None else bool(v >= TARGET and row["rss_ok"])
            )
        row["agreement"] = results.get("agreement", {}).get(mode)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    mi, info = results["machine"], results["models"]
    gb = lambda b: f"{b / 2**30:.2f} GiB" if b else "–"  # noqa: E731
    f = lambda x, spec=".2f": "–" if x is None else format(x, spec)  # noqa: E731
    ok = lambda v: "–" if v is None else ("✅" if v else "❌")  # noqa: E731
    a = info["arch"]
    lines = [
        "# mergeforge moe vs mergekit-moe: speed and peak RSS",
        "",
        f"Run {results['started']} – {results['finished']}. Machine: {mi['cpu_model']}, "
        f"{mi['cpus']} CPUs, {mi['ram_gib']} GiB RAM; torch {mi['torch']}, python "
        f"{mi['python']}, mergekit {mi['mergekit']}, mergeforge {mi['mergeforge']} (sha256 of its "
        f"src/*.py: {mi.get('mergeforge_src_sha256')}).",
        "",
        f"Inputs: base + {len(info['experts'])} experts, Llama {a['num_hidden_layers']}L/"
        f"h{a['hidden_size']}/ff{a['intermediate_size']}/v{a['vocab_size']} (untied), "
        f"{info['n_params']:,} params each, fp32 safetensors, "
        f"{info['bytes_per_model']['base'] / 1e9:.3f} GB each, "
        f"{info['input_total_bytes'] / 1e9:.2f} GB in all (made by "
        "`merge_vs_mergekit.make_models`: experts = base + seeded Gaussian deltas), each with a "
        f"word-level tokenizer of {a['vocab_size']:,} tokens. Output: Mixtral, "
        f"{len(info['experts'])} experts, 2 per token, bfloat16: "
        f"{results.get('output_bytes', 0) / 1e9:.2f} GB ({results.get('output_params', 0):,} "
        "params). Page cache warmed by one untimed read of all inputs "
        f"({results['warm_cache']['bytes'] / 1e9:.2f} GB in {results['warm_cache']['s']:.1f} s).",
        "",
        "| gate mode | mergekit-moe wall s | mergeforge wall s | wall speed-up | mergekit-moe CPU s "
        "| mergeforge CPU s | CPU speed-up | peak RSS mergekit-moe | peak RSS mergeforge "
        "| RSS mk ÷ mf | target ≥3× at ≤ RSS (wall / CPU) | 1-min load before / during mk "
        "| 1-min load before / during mf | runs mk/mf |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        lines.append(
            f"| {r['gate_mode']} | {f(r['mergekit_wall_s'])} | {f(r['mergeforge_wall_s'])} | "
            f"{f(r['wall_speedup'])}× | {f(r['mergekit_cpu_s'], '.1f')} | "
            f"{f(r['mergeforge_cpu_s'], '.1f')} | {f(r['cpu_speedup'])}× | {gb(r['mergekit_rss'])} | "
            f"{gb(r['mergeforge_rss'])} | {f(r['rss_ratio'])}× | "
            f"{ok(r['meets_target_wall'])} / {ok(r['meets_target_cpu'])} | "
            f"{f(r['mergekit_load_before'])} / {f(r['mergekit_load_during'])} | "
            f"{f(r['mergeforge_load_before'])} / {f(r['mergeforge_load_during'])} | "
            f"{r['mergekit_n']}/{r['mergeforge_n']}"
            + (
                f" (failed {r['mergekit_failed']}/{r['mergeforge_failed']})"
                if r["mergekit_failed"] or r["mergeforge_failed"]
                else ""
            )
            + " |"
        )
    lines += ["", "Agreement (mergekit-moe's output against mergeforge's, tensor by tensor):", ""]
    for mode, d in results.get("agreement", {}).items():
        if d.get("error"):
            lines.append(f"- `{mode}`: {d['error']}")
            continue
        lines.append(
            f"- `{mode}`: {d['n_tensors_mergekit']} / {d['n_tensors_mergeforge']} tensors, same "
            f"names {ok(not d['only_mergekit'] and not d['only_mergeforge'])}, same shapes and "
            f"dtypes {ok(not d['shape_or_dtype_mismatch'])}, same config.json "
            f"{ok(d['config_equal'])}; non-gate tensors bit-identical: "
            f"{d['n_non_gate_identical']}/{d['n_non_gate']} (max abs diff "
            f"{d['non_gate_max_abs_diff']:.3g}); gates: {d['n_gate_identical']}/{d['n_gate']} "
            f"bit-identical, max abs diff {d['gate_max_abs_diff']:.3g}"
            + (f" ({d['gate_worst_tensor']})" if d.get("gate_worst_tensor") else "")
        )
    lines += [
        "",
        "Wall = seconds around the subprocess; CPU = the child's user+sys seconds; peak RSS = "
        "its `ru_maxrss` (`os.wait4` in the stdlib-only launcher `timed_run.py`, so the driver's "
        "own memory is not counted), file-backed pages of memory-mapped inputs it touched "
        "included. CPU time is the steadier number when other jobs share the machine. Load = "
        "1-min load average just before each run and its mean while it ran (the tool itself "
        "included; 2 CPUs).",
        "",
        f"mergekit-moe: `mergekit-moe CONFIG OUT {' '.join(MERGEKIT_FLAGS)}`  ",
        f"mergeforge: `mergeforge moe CONFIG OUT {' '.join(MERGEFORGE_FLAGS)}`  ",
        "environment of both: " + " ".join(f"{k}={v}" for k, v in CHILD_ENV.items()),
        "",
        "Config (`hidden`; `random` differs only in `gate_mode`):",
        "",
        "```yaml",
        results.get("config_yaml", {}).get("hidden", "").rstrip()
        or next(iter(results.get("config_yaml", {}).values()), "").rstrip(),
        "```",
    ]
    if results.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def save(results: dict, stem: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["summary"] = summarize(results)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / f"{stem}.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"models, configs, outputs, logs (default {DEFAULT_WORKDIR}; "
        f"{SMALL_WORKDIR} with --small)",
    )
    ap.add_argument(
        "--small",
        action="store_true",
        help="smoke test: the ~5M-parameter Llama of merge_vs_mergekit --small; "
        "results go to WORKDIR/results",
    )
    ap.add_argument("--modes", default=",".join(MODES), help="gate modes, comma-separated")
    ap.add_argument("--reps", type=int, default=1, help="runs per tool and gate mode")
    ap.add_argument("--dtype", default="bfloat16", help="the YAML's output dtype")
    ap.add_argument("--only", choices=["mergekit", "mergeforge"], default=None)
    ap.add_argument("--stem", default="moe_vs_mergekit", help="results file name stem")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-run timeout (s)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the MoE folders")
    ap.add_argument("--generate-only", action="store_true")
    a = ap.parse_args(argv)

    arch = dict(mvm.LLAMA_SMALL if a.small else mvm.LLAMA_250M)
    workdir = a.workdir or (SMALL_WORKDIR if a.small else DEFAULT_WORKDIR)
    results_dir = workdir / "results" if a.small else RESULTS
    modes = [m for m in a.modes.split(",") if m]
    info = mvm.make_models(workdir, n_experts=N_EXPERTS, arch=arch, seed=0)
    add_tokenizers(info)
    if a.generate_only:
        return 0

    import yaml

    cfg_dir, outroot, logdir = workdir / "configs", workdir / "out", workdir / "logs"
    for d in (cfg_dir, outroot, logdir):
        d.mkdir(parents=True, exist_ok=True)
    cfgs = {}
    for mode in modes:
        cfgs[mode] = cfg_dir / f"moe_{mode}.yaml"
        cfgs[mode].write_text(yaml.safe_dump(moe_config(info, mode, a.dtype), sort_keys=False))

    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "models": info,
        "machine": mvm.machine_info(),
        "config_yaml": {m: p.read_text() for m, p in cfgs.items()},
        "commands": {
            "mergekit": " ".join(mergekit_cmd(Path("CONFIG"), Path("OUT"))),
            "mergeforge": " ".join(mergeforge_cmd(Path("CONFIG"), Path("OUT"))),
        },
        "env": CHILD_ENV,
        "modes": {},
        "agreement": {},
        "notes": [],
    }
    env = {**os.environ, **CHILD_ENV}
    nb, ts = mvm.warm_cache([Path(info["base"]), *map(Path, info["experts"])])
    results["warm_cache"] = {"bytes": nb, "s": ts}
    print(f"[cache] one untimed read of all inputs: {nb / 1e9:.2f} GB in {ts:.1f}s", flush=True)

    tools = [a.only] if a.only else ["mergekit", "mergeforge"]
    builders = {"mergekit": mergekit_cmd, "mergeforge": mergeforge_cmd}
    for mi, mode in enumerate(modes):
        runs = results["modes"].setdefault(mode, {t: [] for t in tools})
        for i in range(a.reps):
            order = tools if (mi + i) % 2 == 0 else tools[::-1]  # alternate who goes first
            for tool in order:
                out = outroot / f"{tool}_{mode}"
                shutil.rmtree(out, ignore_errors=True)
                r = mvm.run_measured(
                    builders[tool](cfgs[mode], out),
                    logdir / f"{tool}_{mode}_{i}.log",
                    env=env,
                    timeout=a.timeout,
                )
                print(
                    f"[{mode}] {tool:10s} rep {i}: wall {r.wall_s:7.2f}s  cpu {r.cpu_s:7.2f}s  "
                    f"maxrss {r.maxrss_bytes / 2**30:.2f} GiB  load {r.loadavg_before:.2f} -> "
                    f"{r.loadavg_during.get('mean', float('nan')):.2f}  rc={r.returncode}",
                    flush=True,
                )
                if r.returncode != 0:
                    print(r.log[-2000:])
                runs[tool].append(asdict(r))
        mk_out, mf_out = outroot / f"mergekit_{mode}", outroot / f"mergeforge_{mode}"
        if mvm._st_files(mk_out) and mvm._st_files(mf_out):
            try:
                d = compare(mk_out, mf_out)
            except Exception as e:  # noqa: BLE001  (report it, keep the timings)
                d = {"error": f"comparison failed: {e!r}"}
            results["agreement"][mode] = d
            print(f"[{mode}] agreement: {json.dumps(d)}", flush=True)
        for p in (mk_out, mf_out):
            if mvm._st_files(p) and "output_bytes" not in results:
                results["output_bytes"] = mvm.model_bytes(p)
                results["output_params"] = mvm.count_params(p)
        if not a.keep_outputs:
            for p in (mk_out, mf_out):
                shutil.rmtree(p, ignore_errors=True)
        save(results, a.stem, results_dir)

    save(results, a.stem, results_dir)
    print()
    print((results_dir / f"{a.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
