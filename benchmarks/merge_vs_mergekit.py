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
    python benchmarks/merge_vs_mergekit.py --small --methods sce,karcher  # smoke test
    python benchmarks/merge_vs_mergekit.py --methods sce,karcher,multislerp,union_linear \
        --stem merge_vs_mergekit_issue18                    # issue 18's speed acceptance

``union_linear`` / ``union_ties`` merge the same models given tokenizers whose vocabularies
differ (``tokenizer_source: union``; see :func:`make_vocab_models`). Each run also records the
child's CPU time (user+sys) and the 1-min load average before, during and after it.

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

# --small: a ~5M-parameter model of the same family for smoke tests (vocab 4000, so the
# union case still has thousands of tokens to align).
LLAMA_SMALL = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=4000,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
SMALL_WORKDIR = Path("/tmp/mf_bench_small")

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
# vocabulary family (the `union` cases)
# --------------------------------------------------------------------------
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
N_ADDED = 64  # tokens the "added" expert adds (62 plain + 2 special)
ADDED_PAD = 64  # extra embedding rows past its tokenizer's length (like a pad-to-multiple)


def word_tokenizer(words, *, added=(), special_added=()):
    """A real fast tokenizer (BPE over whole words, no merges; ``[UNK]``, ``<s>``, ``</s>``):
    ``[UNK]`` then ``words`` in that id order, then ``<s>``/``</s>``, then the plain ``added``
    and special ``special_added`` tokens (the benchmark's copy of the tests' ``tiny_tokenizer``,
    which benchmarks may not import)."""
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_tokens(list(added))
    if special_added:
        fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_added])
    return fast


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_reindexed(
    src: Path, dst: Path, tokenizer, base_vocab: dict[str, int], n_rows: int, seed: int
) -> None:
    """``dst`` = the checkpoint ``src`` with its embedding and LM-head rows re-laid for
    ``tokenizer``: a token the base knows gets ``src``'s row at the base's id for it (so the
    rows of a token agree across models up to the experts' deltas); a new token, and every
    row past the tokenizer's length, gets a seeded Gaussian row of the tensor's scale."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id))), "ids must be dense"
    dst.mkdir(parents=True)
    for f in _st_files(src):
        out = {}
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {"format": "pt"}
            for name in fh.keys():
                t = fh.get_tensor(name)
                if name in VOCAB_TENSORS:
                    g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
                    rows = torch.randn((n_rows, t.shape[1]), generator=g, dtype=torch.float32)
                    rows = rows.mul_(t.float().std().item()).to(t.dtype)
                    have = [(i, base_vocab[tok]) for tok, i in by_id if tok in base_vocab]
                    dst_ids = torch.tensor([i for i, _ in have], dtype=torch.long)
                    src_ids = torch.tensor([j for _, j in have], dtype=torch.long)
                    rows[dst_ids] = t[src_ids]
                    t = rows
                out[name] = t
        save_file(out, str(dst / f.name), metadata=meta)
        del out
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = n_rows
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in src.iterdir():
        if extra.name == "generation_config.json":
            shutil.copy2(extra, dst / extra.name)
    tokenizer.save_pretrained(str(dst))


def make_vocab_models(info: dict, force: bool = False, verbose: bool = True) -> dict:
    """Four models whose vocabularies differ, from ``make_models``' base and experts, each with
    real tokenizer files (``vocab_*`` folders beside them):

    * ``vocab_base``: the base's tensors (hard links), a tokenizer of exactly ``vocab_size``
      tokens: ``[UNK]``, words ``w0 … w{V-4}``, ``<s>``, ``</s>``;
    * ``vocab_shifted``: expert 1, a tokenizer of the same size over words shifted by V/32 and in
      reverse order (other ids for every word, V/32 words the base lacks), rows re-laid;
    * ``vocab_added``: expert 2, the base's words plus 62 added and 2 special tokens, and
      ``vocab_size`` = V + 128 (64 padding rows past its tokenizer), rows re-laid;
    * ``vocab_same``: expert 3's tensors (hard links) with the base's tokenizer.

    A ``union`` of them has V + V/32 + 64 tokens.
    """
    log = print if verbose else (lambda *a, **k: None)
    root = Path(info["workdir"])
    base, experts = Path(info["base"]), [Path(e) for e in info["experts"]]
    assert len(experts) >= 3, "the vocabulary family needs 3 experts"
    V = info["arch"]["vocab_size"]
    n_words = V - 3  # + [UNK], <s>, </s>
    shift = V // 32
    words = [f"w{i}" for i in range(n_words + shift)]
    added = [f"<extra_{i}>" for i in range(N_ADDED - 2)]
    special = ["<|im_start|>", "<|im_end|>"]
    toks = {
        "vocab_base": word_tokenizer(words[:n_words]),
        "vocab_shifted": word_tokenizer(words[shift : shift + n_words][::-1]),
        "vocab_added": word_tokenizer(words[:n_words], added=added, special_added=special),
        "vocab_same": word_tokenizer(words[:n_words]),
    }
    assert len(toks["vocab_base"]) == V, (len(toks["vocab_base"]), V)
    assert len(toks["vocab_added"]) == V + N_ADDED
    base_vocab = toks["vocab_base"].get_vocab()
    dirs = {k: root / k for k in toks}
    for name, d in dirs.items():
        if force:
            shutil.rmtree(d, ignore_errors=True)
        if _complete(d):
            log(f"[gen] {name} present")
            continue
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        if name in ("vocab_base", "vocab_same"):  # same tensors as base / expert 3
            src = base if name == "vocab_base" else experts[2]
            d.mkdir(parents=True)
            for f in src.iterdir():
                if f.suffix == ".safetensors":
                    _link_or_copy(f, d / f.name)
                elif f.name != ".complete" and f.is_file():
                    shutil.copy2(f, d / f.name)
            toks[name].save_pretrained(str(d))
        elif name == "vocab_shifted":
            _write_reindexed(experts[0], d, toks[name], base_vocab, V, seed=101)
        else:
            _write_reindexed(experts[1], d, toks[name], base_vocab, V + N_ADDED + ADDED_PAD, 202)
        (d / ".complete").write_text("ok\n")
        log(f"[gen] {name} written in {time.perf_counter() - t0:.1f}s")
    union = set(base_vocab)
    for t in toks.values():
        union |= set(t.get_vocab())
    return {
        "models": {k: str(v) for k, v in dirs.items()},
        "tokenizer_lengths": {k: len(t) for k, t in toks.items()},
        "vocab_sizes": {
            k: json.loads((d / "config.json").read_text())["vocab_size"] for k, d in dirs.items()
        },
        "union_tokens": len(union),
        "shift": shift,
    }


# --------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------
# Deterministic methods: outputs of both tools are compared tensor by tensor.
MAIN_METHODS = ["task_arithmetic", "ties"]
EXTRA_METHODS = ["linear", "slerp", "breadcrumbs", "dare_ties", "della"]
# issue 18's speed acceptance: three spherical / selective methods and a vocabulary merge
ISSUE18_METHODS = ["sce", "karcher", "multislerp", "union_linear"]
UNION_METHODS = {"union_linear", "union_ties"}
DETERMINISTIC = {
    "task_arithmetic",
    "ties",
    "linear",
    "slerp",
    "breadcrumbs",
    "sce",
    "karcher",
    "multislerp",
    *UNION_METHODS,
}


def method_config(method: str, base: str, experts: list[str], vocab: dict | None = None) -> dict:
    """A mergekit-format config dict (same YAML is fed to both tools). ``vocab``: the
    ``models`` of :func:`make_vocab_models`, for the ``union_*`` cases."""
    m = lambda p, **params: {"model": p, "parameters": params} if params else {"model": p}  # noqa: E731
    if method == "sce":  # select_topk < 1: the variance top-k mask is part of the work
        return {
            "merge_method": "sce",
            "base_model": base,
            "models": [m(e) for e in experts],
            "parameters": {"select_topk": 0.5},
            "dtype": "float32",
        }
    if method == "karcher":  # every model one point (no base role in karcher)
        return {
            "merge_method": "karcher",
            "models": [m(p) for p in [base, *experts]],
            "parameters": {"max_iter": 10, "tol": 1e-5},
            "dtype": "float32",
        }
    if method == "multislerp":
        return {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                m(e, weight=[0.5, 0.3, 0.2][i] if i < 3 else 0.1) for i, e in enumerate(experts)
            ],
            "dtype": "float32",
        }
    if method in UNION_METHODS:
        if vocab is None:
            raise ValueError(f"{method} needs the vocabulary family (make_vocab_models)")
        vb, vs, va, v3 = (
            vocab[k] for k in ("vocab_base", "vocab_shifted", "vocab_added", "vocab_same")
        )
        if method == "union_linear":
            return {
                "merge_method": "linear",
                "base_model": vb,
                "models": [
                    m(vb, weight=0.4),
                    m(vs, weight=0.3),
                    m(va, weight=0.2),
                    m(v3, weight=0.1),
                ],
                "parameters": {"normalize": True},
                "tokenizer_source": "union",
                "dtype": "float32",
            }
        return {
            "merge_method": "ties",
            "base_model": vb,
            "models": [m(e, density=0.5, weight=1.0) for e in (vs, va, v3)],
            "parameters": {"normalize": True},
            "tokenizer_source": "union",
            "dtype": "float32",
        }
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
            yaml.safe_dump(
                method_config(
                    meth, info["base"], info["experts"], (info.get("vocab") or {}).get("models")
                ),
                sort_keys=False,
            )
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
    loadavg_during: dict = field(default_factory=dict)  # 1-min load sampled each 2 s: mean/max
    loadavg_after: float = 0.0  # 1-min load average right after the run
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
    import threading

    subprocess.run(["sync"], check=False)  # flush previous outputs outside the timing
    load = os.getloadavg()[0]
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:  # the 1-min load while the tool runs (it includes the tool itself)
        while not stop.wait(2.0):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    with tempfile.TemporaryDirectory() as td:
        js = Path(td) / "r.json"
        launcher = [sys.executable, "-S", str(HERE / "timed_run.py"), "--json", str(js)]
        if log_path:
            launcher += ["--log", str(log_path)]
        if timeout:
            launcher += ["--timeout", str(timeout)]
        sampler.start()
        try:
            subprocess.run([*launcher, "--", *cmd], check=True, env=env)
        finally:
            stop.set()
            sampler.join()
        r = json.loads(js.read_text())
    after = os.getloadavg()[0]
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
        loadavg_during=(
            {"mean": statistics.fmean(samples), "max": max(samples), "n": len(samples)}
            if samples
            else {}
        ),
        loadavg_after=after,
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


def _out_vocab(folder: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def max_abs_diff(a_dir: Path, b_dir: Path, align_vocab: bool = False) -> dict:
    """Tensor-by-tensor max |a-b| over the common names (+ name-set mismatch).

    ``align_vocab``: the embedding / LM-head rows are compared token by token through each
    output's own tokenizer (a union's appended tokens get other ids in each tool: mergekit
    orders them by a hash map's iteration), rows past the tokenizer (padding) by position."""
    import torch
    from safetensors import safe_open

    vocab_info: dict = {}
    rows_a = rows_b = None
    if align_vocab:
        va, vb = _out_vocab(a_dir), _out_vocab(b_dir)
        toks = sorted(set(va) & set(vb))
        rows_a = torch.tensor([va[t] for t in toks], dtype=torch.long)
        rows_b = torch.tensor([vb[t] for t in toks], dtype=torch.long)
        ca = json.loads((a_dir / "config.json").read_text()).get("vocab_size")
        cb = json.loads((b_dir / "config.json").read_text()).get("vocab_size")
        vocab_info = {
            "tokens_a": len(va),
            "tokens_b": len(vb),
            "same_token_set": set(va) == set(vb),
            "only_in_a_tokens": sorted(set(va) - set(vb))[:10],
            "only_in_b_tokens": sorted(set(vb) - set(va))[:10],
            "same_ids": va == vb,
            "config_vocab_size_a": ca,
            "config_vocab_size_b": cb,
        }

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
            return {
                "error": f"shape mismatch for {k}: {tuple(x.shape)} vs {tuple(y.shape)}",
                **vocab_info,
            }
        if rows_a is not None and k in VOCAB_TENSORS:  # token by token, then the padding rows
            n = len(rows_a)
            x = torch.cat([x[rows_a], x[n:]])
            y = torch.cat([y[rows_b], y[n:]])
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
        **({"vocab": vocab_info} if vocab_info else {}),
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
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),  # inherited by both tools
        "python": platform.python_version(),
        "mergekit": mk,
        "mergeforge": mf,
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
TARGETS = {
    "task_arithmetic": 3.0,
    "ties": 10.0,
    **{m: 3.0 for m in ISSUE18_METHODS},
    "union_ties": 3.0,
}


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
        mkc, mfc = row["mergekit_cpu_s"], row["mergeforge_cpu_s"]
        row["cpu_speedup"] = mkc / mfc if mkc and mfc else None
        for tool in ("mergekit", "mergeforge"):
            during = [
                r["loadavg_during"]["mean"]
                for r in tools.get(tool, [])
                if r["returncode"] == 0 and r.get("loadavg_during")
            ]
            row[f"{tool}_load"] = _med(during)
        row["mergekit_x_io"] = mk / io_med if mk and io_med else None
        row["mergeforge_x_io"] = mf / io_med if mf and io_med else None
        row["max_abs_diff"] = (results.get("diffs", {}).get(meth) or {}).get("max_abs_diff")
        tgt = TARGETS.get(meth)
        row["target_speedup"] = tgt
        if tgt and row["speedup"] is not None:
            rss_ok = (row["mergeforge_rss"] or 0) <= (row["mergekit_rss"] or 0)
            row["rss_ok"] = rss_ok
            row["meets_target"] = bool(row["speedup"] >= tgt and rss_ok)
            row["meets_target_cpu"] = bool((row["cpu_speedup"] or 0) >= tgt and rss_ok)
        else:
            row["meets_target"] = row["meets_target_cpu"] = row["rss_ok"] = None
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
        f"torch {mi['torch']} ({mi['torch_threads']} threads"
        + (
            f"; OMP_NUM_THREADS={mi['omp_num_threads_env']} for both tools"
            if mi.get("omp_num_threads_env")
            else ""
        )
        + f"), python {mi['python']}, "
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
    ]
    vocab = info.get("vocab")
    if vocab:
        lines += [
            "Vocabulary family (`union_*` rows; same tensors as above, embedding and LM-head rows "
            "re-laid per tokenizer): tokenizer lengths "
            + ", ".join(f"{k} {v:,}" for k, v in vocab["tokenizer_lengths"].items())
            + "; config vocab_size "
            + ", ".join(f"{k} {v:,}" for k, v in vocab["vocab_sizes"].items())
            + f"; union {vocab['union_tokens']:,} tokens. Word-level BPE tokenizers built with "
            "`tokenizers`; `vocab_shifted` has every word at another id and "
            f"{vocab['shift']:,} words the base lacks, `vocab_added` {N_ADDED} added tokens "
            f"(2 special) and {ADDED_PAD} padding rows.",
            "",
        ]
    lines += [
        "| method | mergekit wall s | mergeforge wall s | wall speed-up | mergekit CPU s "
        "| mergeforge CPU s | CPU speed-up | target (wall / CPU) | mergekit ÷ I/O floor "
        "| mergeforge ÷ I/O floor | peak RSS mergekit | peak RSS mergeforge | 1-min load during mk/mf "
        "| max abs diff | runs mk/mf |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = lambda v: "" if v is None else (" ✅" if v else " ❌")  # noqa: E731
    for r in s["rows"]:
        tgt = "–" if r["target_speedup"] is None else f"≥{r['target_speedup']:.0f}×"
        if r["meets_target"] is not None:
            tgt += f"{ok(r['meets_target'])} /{ok(r.get('meets_target_cpu'))}"
            if not r.get("rss_ok", True):
                tgt += " (RSS higher)"
        diff = "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        dd = results.get("diffs", {}).get(r["method"]) or {}
        if dd.get("n_elements_differing"):
            diff += (
                f" ({dd['n_elements_differing']:,} of {dd['n_elements']:,} elements, "
                f"{dd['n_tensors_differing']}/{dd['n_common']} tensors)"
            )
        if dd.get("vocab"):
            v = dd["vocab"]
            diff += (
                f"; rows compared token by token ({v['tokens_a']:,} tokens, same set: "
                f"{'yes' if v['same_token_set'] else 'NO'}, same ids: "
                f"{'yes' if v['same_ids'] else 'no'}, vocab_size {v['config_vocab_size_a']:,} / "
                f"{v['config_vocab_size_b']:,})"
            )
        if dd.get("error"):
            diff = dd["error"]
        lines.append(
            f"| {r['method']} | {f(r['mergekit_s'])} | {f(r['mergeforge_s'])} | "
            f"{f(r['speedup'])}{'×' if r['speedup'] else ''} | {f(r['mergekit_cpu_s'], '.1f')} | "
            f"{f(r['mergeforge_cpu_s'], '.1f')} | "
            f"{f(r.get('cpu_speedup'))}{'×' if r.get('cpu_speedup') else ''} | {tgt} | "
            f"{f(r['mergekit_x_io'])}× | {f(r['mergeforge_x_io'])}× | {gb(r['mergekit_rss'])} | "
            f"{gb(r['mergeforge_rss'])} | {f(r.get('mergekit_load'))} / {f(r.get('mergeforge_load'))} | "
            f"{diff} | {r['mergekit_n']}/{r['mergeforge_n']}"
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
        "touched included. CPU s = child user+sys seconds (median, from the same `wait4`); "
        "it is less sensitive than wall-clock to other load on the machine, so its ratio is the "
        "steadier comparison. Target: speed-up ≥ the target with peak RSS no higher, judged on "
        "wall and on CPU time. 1-min load average before runs: "
        f"{results.get('load_summary', '?')}; while the tools ran (sampled every 2 s, the tool "
        f"itself included; median over runs of the per-run mean): {results.get('load_during_summary', '?')}.",
        "",
        f"mergekit command: `mergekit-yaml CONFIG OUT {' '.join(MERGEKIT_FAST_FLAGS)}`  ",
        f"mergeforge command: `mergeforge merge CONFIG OUT {' '.join(MERGEFORGE_FLAGS)}`  ",
        "I/O floor: `python benchmarks/io_floor.py --out OUT BASE EXPERT1 EXPERT2 EXPERT3`",
    ]
    if results.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def save(results: dict, stem: str = "merge_vs_mergekit", out_dir: Path = RESULTS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
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
    during = [
        r["loadavg_during"]["mean"]
        for t in results["methods"].values()
        for rs in t.values()
        for r in rs
        if r.get("loadavg_during")
    ]
    if during:
        results["load_during_summary"] = (
            f"min {min(during):.2f}, median {statistics.median(during):.2f}, max {max(during):.2f}"
        )
    results["summary"] = summarize(results)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / f"{stem}.md").write_text(markdown(results))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"default {DEFAULT_WORKDIR} ({SMALL_WORKDIR} with --small)",
    )
    ap.add_argument(
        "--small",
        action="store_true",
        help="smoke test: a ~5M-parameter Llama (4 layers, hidden 256, vocab 4000); results "
        "go to WORKDIR/results, not benchmarks/results",
    )
    ap.add_argument(
        "--stem",
        default="merge_vs_mergekit",
        help="results file name stem (benchmarks/results/STEM.{json,md})",
    )
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regen", action="store_true", help="regenerate models even if present")
    ap.add_argument(
        "--methods",
        default=",".join(MAIN_METHODS),
        help="comma-separated cases: task_arithmetic, ties, sce, karcher, multislerp, "
        f"union_linear, union_ties, {', '.join(EXTRA_METHODS)}; 'issue18' = {','.join(ISSUE18_METHODS)}",
    )
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
        help="mergekit repetitions for slow methods (ties/dare_ties/breadcrumbs/della/sce/karcher)",
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

    arch = dict(LLAMA_SMALL if a.small else LLAMA_250M)
    if a.layers:
        arch["num_hidden_layers"] = a.layers
    if a.workdir is None:
        a.workdir = SMALL_WORKDIR if a.small else DEFAULT_WORKDIR
    results_dir = a.workdir / "results" if a.small else RESULTS
    methods = []
    for m in a.methods.split(","):
        for x in ISSUE18_METHODS if m == "issue18" else [m] if m else []:
            if x not in methods:
                methods.append(x)
    if a.extras:
        methods += [m for m in EXTRA_METHODS if m not in methods]
    info = make_models(a.workdir, n_experts=a.experts, arch=arch, seed=a.seed, force=a.regen)
    if UNION_METHODS & set(methods):
        info["vocab"] = make_vocab_models(info, force=a.regen)
    if a.generate_only:
        return 0
    cfgs = write_configs(info, methods, a.workdir / "configs")
    outroot = a.workdir / "out"
    logdir = a.workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    prev = results_dir / f"{a.stem}.json"
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

    inputs = [Path(info["base"]), *map(Path, info["experts"])]
    if info.get("vocab"):  # vocab_base / vocab_same are hard links to base / expert 3
        inputs += [Path(info["vocab"]["models"][k]) for k in ("vocab_shifted", "vocab_added")]
    nb, ts = warm_cache(inputs)
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

    slow = {"ties", "dare_ties", "breadcrumbs", "della", "sce", "karcher", "union_ties"}
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
            d = max_abs_diff(mk_out, mf_out, align_vocab=meth in UNION_METHODS)
            results["diffs"][meth] = d
            print(
                f"[{meth}] max |mergekit - mergeforge| = {d.get('max_abs_diff')} "
                f"(worst {d.get('worst_tensor')}; {d.get('n_common')} tensors; "
                f"{d.get('n_elements_differing')} of {d.get('n_elements')} elements differ; "
                f"only mk {d.get('only_in_a')} only mf {d.get('only_in_b')}"
                + (f"; vocab {d['vocab']}" if d.get("vocab") else "")
                + (f"; ERROR {d['error']}" if d.get("error") else "")
                + ")",
                flush=True,
            )
        save(results, a.stem, results_dir)

    save(results, a.stem, results_dir)
    md = (results_dir / f"{a.stem}.md").read_text()
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
