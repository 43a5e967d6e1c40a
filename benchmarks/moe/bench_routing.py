"""MoE that routes (issue 16): three SmolLM2-135M domain experts behind one router.

    OMP_NUM_THREADS=1 python benchmarks/moe/bench_routing.py \
        --out benchmarks/moe/results/routing

Takes the text suite's SmolLM2-135M base (``base_model_dir``) and the three language-model
domain experts of issue 17 (``domain_lm_expert``: news, tweets, reviews; cached ones are
reused, a missing one is trained first unless ``--no-train``), writes a mergekit-moe YAML per
``--experts-per-token`` value (base = SmolLM2, experts = the domain experts, each expert's
``positive_prompts`` = ``--n-prompts`` of its domain's *training* texts cut at
``--prompt-chars`` characters; ``--gate-mode``, default ``hidden``; ``--dtype``) and builds the
MoE with ``mergeforge.moe.build_moe`` (what ``mergeforge moe CONFIG OUT`` runs). Then, on
``--n-eval`` held-out *test* texts of each domain:

* the routing matrix (``mergeforge.moe.routing_report``: domain x expert share of the (token,
  MoE layer) pairs whose top-1 router choice is that expert; averaged over layers and layer by
  layer; each text alone, BOS first, cut at ``--max-length`` tokens);
* the LM loss (``lm_loss``: nats per token, first ``--max-length`` tokens, as
  ``bench_domain.py``) of the base, each expert, each MoE, and dense merges of the three experts
  through the engine in memory: linear (equal weights), task arithmetic (``--ta-lambdas``),
  TIES (``--ties-densities``, lambda 1), ACE (data-free; ``--no-ace`` skips it).

Verdicts (issue 16): on each domain the router sends the majority (> 50 %) of the top-1 choices
to that domain's expert, and the MoE's loss is below the best dense merge's on that domain.
Writes ``results.json``, ``results.md``, ``routing_matrix.png`` and the MoE YAMLs into ``--out``
(results.json after every step). The MoE folders and the causal-LM copies of the inputs go to
``--work`` (default: a temporary folder, removed at the end).

``--moe-base best-dense``: the MoE's ``base_model`` (attention, norms, embeddings, and the
hidden states the gates see) is the dense merge with the lowest mean loss on ``--n-eval``
*validation* texts per domain instead of the pretrained base, so the MoE keeps what the experts
learnt outside their MLPs (mergekit-moe takes any model as its base; this one is a merge).

``--smoke``: the same pipeline on tiny random Llama models and synthetic texts (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_DOMAINS = ("news", "tweets", "reviews")
DEFAULT_KS = (1, 2)
DEFAULT_TA_LAMBDAS = (0.5, 1.0)
DEFAULT_TIES_DENSITIES = (0.2, 0.5)
N_PROMPTS = 8
PROMPT_CHARS = 300
MAJORITY = 0.5
from mergeforge.moe.config import GATE_MODES, RANDOM_MODES  # noqa: E402

ROUTE_MODES = tuple(m for m in GATE_MODES if m not in RANDOM_MODES)
"""The prompt gate modes (a random router has nothing to route by)."""
MOE_BASES = ("base", "best-dense")
"""What the MoE's ``base_model`` is (:func:`run_routing`)."""


@dataclass(frozen=True)
class Inputs:
    """What the benchmark runs on: the base and one expert per domain (``LlamaModel`` folders,
    as ``base_model_dir`` / ``domain_lm_expert`` write them; the base with its tokenizer), and
    each domain's training texts (gate prompts), test texts (scored) and validation texts
    (held out like the test texts; they choose the MoE's base with ``moe_base="best-dense"``)."""

    base: Path
    experts: dict[str, Path]
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    validation: dict[str, list[str]] | None = None


# ------------------------------------------------------------------------------- the inputs


def real_inputs(domains: Sequence[str], recipe=None, *, cache_dir=None, train: bool = True,
                console=None) -> Inputs:  # fmt: skip
    """SmolLM2's base folder and the cached domain experts (trained first when missing, saying
    so, unless ``train`` is false: then an error names the missing ones and the command)."""
    from mergeforge.cache import cache_folder
    from mergeforge.evaluate.text import domain as dom
    from mergeforge.evaluate.text.backbones import get_backbone

    recipe = recipe or dom.DomainRecipe()
    base = dom.base_model_dir(recipe.backbone, cache_dir=cache_dir, console=console)
    sha = get_backbone(recipe.backbone).sha256()
    root = cache_folder("text-suite", cache_dir) / "domain-experts"
    missing = []
    for d in domains:  # the folder domain_lm_expert looks in (same key, same digest)
        folder = root / f"{d}-{dom._digest(dom.domain_expert_key(d, recipe, sha))}"
        if not (folder / "train.json").exists():
            missing.append((d, folder))
    if missing and not train:
        names = ", ".join(d for d, _ in missing)
        raise SystemExit(
            f"no cached domain expert for {names} (recipe {recipe.to_dict()}); build each with "
            "`OMP_NUM_THREADS=1 python benchmarks/editing/bench_domain.py --domain DOMAIN` "
            "(or drop --no-train to train it here)"
        )
    for d, folder in missing:
        _say(console, f"[bold yellow]ABOUT TO TRAIN[/] the {d} domain expert ({recipe.steps} "
                      f"steps of SmolLM2-135M; none cached at {folder})")  # fmt: skip
    experts = {d: dom.domain_lm_expert(d, recipe, cache_dir=cache_dir, console=console)
               for d in domains}  # fmt: skip
    texts = {d: dom.domain_texts(d) for d in domains}
    return Inputs(base, experts, {d: t.train for d, t in texts.items()},
                  {d: t.test for d, t in texts.items()},
                  {d: t.validation for d, t in texts.items()})  # fmt: skip


SMOKE_SHARED = ("the", "a", "of", "and", "to", "in")


def smoke_words(domains: Sequence[str] = DEFAULT_DOMAINS) -> list[str]:
    """Every word of :func:`smoke_inputs`' texts (for a tokenizer of one's own)."""
    return [*SMOKE_SHARED, *(f"{d}{i}" for d in domains for i in range(16))]


def smoke_inputs(root: str | Path, domains: Sequence[str] = DEFAULT_DOMAINS, *, tokenizer=None,
                 n_train: int = 12, n_test: int = 6, noise: float = 0.05,
                 seed: int = 0) -> Inputs:  # fmt: skip
    """Tiny stand-ins (seconds): a random 2-layer Llama saved as a ``LlamaModel`` folder (as the
    SmolLM2 base is) and experts = base + seeded N(0, ``noise``²) noise; each domain's texts
    are words of its own (``news3``, ...) with a few shared ones. ``tokenizer``: a fast
    tokenizer that knows those words (default: a word-level one built here), saved with the
    base."""
    import numpy as np
    import transformers as tf

    root = Path(root)
    words = {d: [f"{d}{i}" for i in range(16)] for d in domains}
    shared = list(SMOKE_SHARED)
    if tokenizer is None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3}
        for w in smoke_words(domains):
            vocab.setdefault(w, len(vocab))
        core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                               unk_token="[UNK]", bos_token="<s>",
                                               eos_token="</s>")  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = tf.LlamaModel(cfg)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = {}
    for i, d in enumerate(domains):
        g = torch.Generator().manual_seed(seed + 100 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(state[k] + noise * torch.randn(p.shape, generator=g))
        experts[d] = root / d
        model.save_pretrained(experts[d])
    rng = np.random.default_rng(seed)

    def text(d: str) -> str:
        n = int(rng.integers(5, 14))
        return " ".join(str(rng.choice(words[d])) if rng.random() < 0.8 else str(rng.choice(shared))
                        for _ in range(n))  # fmt: skip

    train = {d: [text(d) for _ in range(n_train)] for d in domains}
    test = {d: [text(d) for _ in range(n_test)] for d in domains}
    validation = {d: [text(d) for _ in range(n_test)] for d in domains}
    return Inputs(base, experts, train, test, validation)


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def causal_lm_folder(src: Path, dst: Path, *, tokenizer: bool,
                     state: Mapping[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """``src`` as a causal-LM folder (``model.*`` tensor names, ``LlamaForCausalLM``): what
    ``mergeforge moe`` reads. The suite's base and experts are ``LlamaModel`` folders (no
    ``model.`` prefix); the tensors are the same (the LM head is the tied embedding).
    ``state``: ``LlamaModel`` tensors to write instead of ``src``'s (a merge of the experts),
    with ``src``'s config and tokenizer."""
    from safetensors.torch import save_file

    cfg = json.loads((Path(src) / "config.json").read_text())
    if state is None and any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or ()):
        return Path(src)  # already one
    dst.mkdir(parents=True, exist_ok=True)
    state = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v
             for k, v in (_state(src) if state is None else state).items()}  # fmt: skip
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["architectures"] = [f"{cfg.get('model_type', 'llama').capitalize()}ForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in sorted(Path(src).iterdir()) if tokenizer else ():  # the tokenizer's files
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model."):
            shutil.copyfile(f, dst / f.name)
    return dst


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "right"  # lm_loss needs right padding
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------- the configs


def gate_prompts(texts: Sequence[str], n: int, chars: int) -> list[str]:
    """The first ``n`` non-empty texts, each cut at ``chars`` characters (at a space when one
    is in the last quarter), stripped."""
    out = []
    for t in texts:
        t = " ".join(t.split())
        if len(t) > chars:
            cut = t.rfind(" ", 0, chars + 1)
            t = t[: cut if cut > 0.75 * chars else chars]
        if t:
            out.append(t)
        if len(out) == n:
            break
    return out


def moe_config(base: Path, experts: Mapping[str, Path], prompts: Mapping[str, Sequence[str]], *,
               gate_mode: str, k: int, dtype: str, gate_dtype: str) -> dict:  # fmt: skip
    """The mergekit-moe YAML (as a mapping): one expert per domain, in order."""
    return {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": dtype,
        "gate_dtype": gate_dtype,
        "experts_per_token": k,
        "experts": [
            {"source_model": str(experts[d]), "positive_prompts": list(prompts[d])} for d in experts
        ],  # fmt: skip
    }


def dense_merges(domains: Sequence[str], *, ta_lambdas: Sequence[float] = DEFAULT_TA_LAMBDAS,
                 ties_densities: Sequence[float] = DEFAULT_TIES_DENSITIES,
                 ace: bool = True) -> list[tuple[str, dict]]:  # fmt: skip
    """``(name, engine config)`` of the dense merges of the experts (names = domains) over the
    base (``"base"``): linear with equal weights, task arithmetic θ₀ + λ·Σ τ_d per λ, TIES
    (weights 1, λ 1, disjoint mean) per density, ACE (data-free, its defaults)."""

    def models(**params) -> list[dict]:
        return [{"model": d, "parameters": dict(params)} for d in domains]

    out = [("linear (equal weights)", {"merge_method": "linear", "dtype": "float32",
                                       "models": models(weight=1.0 / len(domains))})]  # fmt: skip
    for lam in ta_lambdas:
        out.append((f"task_arithmetic lambda={lam:g}", {
            "merge_method": "task_arithmetic", "base_model": "base", "models": models(weight=1.0),
            "parameters": {"lambda": float(lam)}, "dtype": "float32"}))  # fmt: skip
    for density in ties_densities:
        out.append((f"ties density={density:g}", {
            "merge_method": "ties", "base_model": "base",
            "models": models(weight=1.0, density=float(density)),
            "parameters": {"lambda": 1.0}, "dtype": "float32"}))  # fmt: skip
    if ace:
        out.append(("ace", {"merge_method": "ace", "base_model": "base", "models": models(),
                            "dtype": "float32"}))  # fmt: skip
    return out


# ------------------------------------------------------------------------------- the run


def machine_info() -> dict:
    import transformers

    from mergeforge.version import __version__

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        git = ["git", "-C", str(root), "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python":
            platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mergeforge": __version__,
            "git_commit": commit, "platform": platform.platform()}  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_routing(
    inputs: Inputs,
    *,
    work: str | Path,
    out: str | Path | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    gate_mode: str = "hidden",
    dtype: str = "float32",
    gate_dtype: str = "bfloat16",
    n_eval: int = 64,
    n_prompts: int = N_PROMPTS,
    prompt_chars: int = PROMPT_CHARS,
    max_length: int = 128,
    merges: Sequence[tuple[str, dict]] | None = None,
    moe_base: str = "base",
    meta: Mapping[str, Any] | None = None,
    console=None,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Build the MoE(s), route and score them, score base, experts and dense merges; return
    the payload (:func:`write_routing_report` writes it). ``work``: where the causal-LM copies
    and the MoE folders go; ``out``: where the MoE YAMLs are copied (if given).

    ``moe_base``: the MoE's ``base_model``, which gives every tensor that is not an expert MLP
    (attention, norms, embeddings) and the hidden states the gates are computed from. ``base``:
    the pretrained base (mergekit-moe's usual recipe); ``best-dense``: the dense merge (of
    ``merges``) with the lowest mean LM loss on ``n_eval`` *validation* texts per domain, so
    the MoE keeps what the experts learnt outside their MLPs; the test texts choose nothing."""
    if moe_base not in MOE_BASES:
        raise ValueError(f"moe_base: {moe_base!r} is not one of {list(MOE_BASES)}")
    import yaml

    from mergeforge import merge_state_dicts
    from mergeforge.evaluate.text.domain import lm_loss, load_causal_lm
    from mergeforge.moe import build_moe, routing_report

    t_start = time.perf_counter()
    domains = list(inputs.experts)
    merges = list(dense_merges(domains) if merges is None else merges)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    test = {d: inputs.test[d][:n_eval] for d in domains}
    prompts = {d: gate_prompts(inputs.train[d], n_prompts, prompt_chars) for d in domains}
    payload: dict[str, Any] = {
        "issue": 16,
        **dict(meta or {}),
        "started": _now(),
        "domains": domains,
        "base": str(inputs.base),
        "experts": {d: str(p) for d, p in inputs.experts.items()},
        "settings": {
            "gate_mode": gate_mode,
            "experts_per_token": list(ks),
            "dtype": dtype,
            "gate_dtype": gate_dtype,
            "n_eval": n_eval,
            "n_prompts": n_prompts,
            "prompt_chars": prompt_chars,
            "max_length": max_length,
            "moe_base": moe_base,
        },
        "texts_scored": {d: len(v) for d, v in test.items()},
        "prompts": prompts,
        "moe": [],
        "rows": [],
        "not_run": [],
        "complete": False,
    }

    def update() -> None:
        if on_update is not None:
            on_update(payload)

    def losses(model, texts: Mapping[str, Sequence[str]]) -> tuple[dict, float]:
        t0 = time.perf_counter()
        loss = {d: lm_loss(model, tok, texts[d], max_length=max_length) for d in domains}
        return loss, time.perf_counter() - t0

    def scored(name: str, kind: str, model, config=None, extra=None, measured=None) -> dict:
        """Score ``model`` on the test texts (or take ``measured``: its (losses, seconds))."""
        loss, seconds = losses(model, test) if measured is None else measured
        row = {"name": name, "kind": kind, "loss": loss, "mean": sum(loss.values()) / len(loss),
               "config": config, "seconds": seconds, **(extra or {})}  # fmt: skip
        payload["rows"].append(row)
        _say(console, f"{name}: " + ", ".join(f"{d} {v:.4f}" for d, v in loss.items())
             + f" [{row['seconds']:.0f} s]")  # fmt: skip
        update()
        return row

    def merged(name: str, cfg: dict):
        t0 = time.perf_counter()
        try:
            state = merge_state_dicts(cfg, states)
        except Exception as e:  # noqa: BLE001 -- reported, the others still run
            payload["not_run"].append({"name": name, "reason": f"{type(e).__name__}: {e}"})
            _say(console, f"{name}: [red]not run[/] ({type(e).__name__}: {e})")
            update()
            return None, 0.0
        return state, time.perf_counter() - t0

    tok = _tokenizer(inputs.base)
    states = {"base": _state(inputs.base), **{d: _state(p) for d, p in inputs.experts.items()}}
    lm = load_causal_lm(inputs.base)
    base_state = None
    held: dict[str, tuple] = {}  # best-dense: each merge's test scores, taken while it is loaded
    if moe_base == "best-dense":  # choose on the validation texts
        if not merges:
            raise ValueError("moe_base='best-dense' needs dense merges to choose from")
        if not inputs.validation:
            raise ValueError("moe_base='best-dense' needs validation texts (Inputs.validation)")
        val = {d: inputs.validation[d][:n_eval] for d in domains}
        chosen = {"mode": moe_base, "validation_loss": {}, "texts": {d: len(v) for d, v in
                                                                      val.items()}}  # fmt: skip
        best = float("inf")
        for name, cfg in merges:
            state, merge_s = merged(name, cfg)
            if state is None:
                continue
            lm.get_decoder().load_state_dict(state, strict=True)
            loss, _ = losses(lm, val)
            mean = sum(loss.values()) / len(loss)
            chosen["validation_loss"][name] = {**loss, "mean": mean}
            _say(console, f"{name}: validation mean loss {mean:.4f}")
            held[name] = (losses(lm, test), merge_s)  # reported after the MoE rows
            if mean < best:
                best, chosen["name"], base_state = mean, name, state
            del state
        if base_state is None:
            raise RuntimeError("moe_base='best-dense': no dense merge could be built")
        payload["moe_base"] = chosen
        _say(console, f"MoE base: {chosen['name']} (lowest mean validation loss)")
        update()
    else:
        payload["moe_base"] = {"mode": moe_base, "name": "base"}

    # the MoE's inputs: causal-LM folders (mergeforge moe reads model.* tensor names)
    base_c = causal_lm_folder(inputs.base, work / "inputs" / "base", tokenizer=True,
                              state=base_state)  # fmt: skip
    del base_state
    experts_c = {d: causal_lm_folder(p, work / "inputs" / d, tokenizer=False)
                 for d, p in inputs.experts.items()}  # fmt: skip
    for k in ks:
        name = f"moe k={k}"
        cfg = moe_config(base_c, experts_c, prompts, gate_mode=gate_mode, k=k, dtype=dtype,
                         gate_dtype=gate_dtype)  # fmt: skip
        text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100)
        yml = work / f"moe_k{k}.yml"
        yml.write_text(text, encoding="utf-8")
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(yml, Path(out) / yml.name)
        _say(console, f"{name}: building ({gate_mode} gates from {n_prompts} training texts "
                      f"per domain)...")  # fmt: skip
        res = build_moe(yml, work / f"moe_k{k}", overwrite=True)
        rep = routing_report(res.out, test, max_length=max_length)
        own = {d: float(rep.top1[i, i]) for i, d in enumerate(domains)}
        entry = {
            "name": name, "k": k, "yaml": yml.name, "folder": str(res.out),
            "architecture": res.architecture, "build_seconds": res.seconds,
            "warnings": list(res.warnings), "experts": list(rep.experts),
            "tokens": dict(zip(domains, rep.tokens, strict=True)),
            "top1": rep.top1.tolist(), "topk": rep.topk.tolist(),
            "per_layer_top1": rep.per_layer_top1.tolist(), "own_share": own,
        }  # fmt: skip
        payload["moe"].append(entry)
        _say(console, f"{name}: top-1 share to the domain's own expert: "
             + ", ".join(f"{d} {100 * v:.1f} %" for d, v in own.items()))  # fmt: skip
        update()
        moe_lm = load_causal_lm(res.out)
        scored(name, "moe", moe_lm)
        del moe_lm

    # the dense models: base, experts, merges, through one decoder
    for name in ("base", *domains):
        lm.get_decoder().load_state_dict(states[name], strict=True)
        scored("base" if name == "base" else f"expert {name}", "base" if name == "base"
               else "expert", lm)  # fmt: skip
    failed = {n["name"] for n in payload["not_run"]}
    for name, cfg in merges:
        if name in held:  # scored on test in the validation pass
            measured, merge_s = held.pop(name)
            scored(name, "merge", None, cfg, {"merge_seconds": merge_s}, measured=measured)
            continue
        if name in failed:
            continue
        state, merge_s = merged(name, cfg)
        if state is None:
            continue
        lm.get_decoder().load_state_dict(state, strict=True)
        del state
        scored(name, "merge", lm, cfg, {"merge_seconds": merge_s})
    payload["verdicts"] = verdicts(payload)
    payload["finished"] = _now()
    payload["total_seconds"] = time.perf_counter() - t_start
    payload["complete"] = True
    update()
    return payload


def verdicts(payload: Mapping) -> dict:
    """Per MoE and domain: majority routing (own expert's top-1 share > 50 %) and loss below
    the best dense merge's on that domain; ``met`` when both hold on every domain."""
    domains = payload["domains"]
    merges = [r for r in payload["rows"] if r["kind"] == "merge"]
    best = {d: min(merges, key=lambda r: r["loss"][d]) for d in domains} if merges else {}
    out = {}
    for m in payload["moe"]:
        row = next(r for r in payload["rows"] if r["name"] == m["name"])
        per = {}
        for i, d in enumerate(domains):
            share = m["own_share"][d]
            b = best.get(d)
            per[d] = {
                "own_share": share, "majority": share > MAJORITY,
                "argmax_own": max(range(len(domains)), key=lambda e: m["top1"][i][e]) == i,
                "moe_loss": row["loss"][d], "best_dense": None if b is None else b["name"],
                "best_dense_loss": None if b is None else b["loss"][d],
                "below_dense": None if b is None else row["loss"][d] < b["loss"][d],
            }  # fmt: skip
        out[m["name"]] = {
            "domains": per,
            "routing_met": all(v["majority"] for v in per.values()),
            "loss_met": bool(best) and all(v["below_dense"] for v in per.values()),
        }
        out[m["name"]]["met"] = out[m["name"]]["routing_met"] and out[m["name"]]["loss_met"]
    return out


# ------------------------------------------------------------------------------- the report


def _ok(x) -> str:
    return "" if x is None else ("✅" if x else "❌")


def markdown(payload: Mapping) -> str:
    domains, s = payload["domains"], payload["settings"]
    short = [d[:1] for d in domains]
    lines = [
        "# MoE that routes (issue 16)",
        "",
        f"Command: `{payload.get('command', '')}`  ",
        f"Started {payload.get('started', '')}, finished {payload.get('finished', '')} "
        f"({payload.get('total_seconds', 0) / 60:.1f} min).  ",
    ]
    m = payload.get("machine") or {}
    if m:
        lines.append(f"Machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, torch threads "
                     f"{m.get('torch_threads', '?')}; torch {m.get('torch', '?')}, transformers "
                     f"{m.get('transformers', '?')}, mergeforge {m.get('mergeforge', '?')} "
                     f"(commit {m.get('git_commit') or '?'}).")  # fmt: skip
    lines += [
        "",
        f"Base `{payload['base']}`; experts (one per domain, in this order): "
        + ", ".join(f"{d} `{p}`" for d, p in payload["experts"].items())
        + ".",
        f"MoE: `mergeforge moe` (mergekit-moe YAML: moe_k*.yml), gate_mode `{s['gate_mode']}` "
        f"(gate dtype {s['gate_dtype']}), positive_prompts = {s['n_prompts']} training texts of "
        f"the expert's domain cut at {s['prompt_chars']} characters, dtype {s['dtype']}. "
        f"Scored on {s['n_eval']} held-out test texts per domain (first {s['max_length']} "
        "tokens; routing: BOS + text, each text alone).",
    ]
    mb = payload.get("moe_base") or {"mode": "base"}
    if mb["mode"] == "best-dense":
        lines.append("")
        lines.append(f"MoE base_model (every tensor but the expert MLPs, and the gates' hidden "
                     f"states): **{mb['name']}**, the dense merge with the lowest mean LM loss on "
                     f"{max(mb['texts'].values())} *validation* texts per domain (the test texts "
                     "chose nothing):")  # fmt: skip
        lines += ["", "| dense merge | " + " | ".join(domains) + " | mean |",
                  "|---|" + "---:|" * (len(domains) + 1)]  # fmt: skip
        for name, v in mb["validation_loss"].items():
            cells = [f"{v[d]:.4f}" for d in domains] + [f"{v['mean']:.4f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    else:
        lines.append("")
        lines.append("MoE base_model: the pretrained base (mergekit-moe's usual recipe): "
                     "attention, norms and embeddings are the base's.")  # fmt: skip
    for moe in payload["moe"]:
        experts = moe["experts"]
        lines += ["", f"## Routing: {moe['name']} (top-1 choice, % of tokens × MoE layers)", "",
                  "| domain | tokens | " + " | ".join(experts) + " | own expert |",
                  "|---|---:|" + "---:|" * len(experts) + ":---:|"]  # fmt: skip
        for i, d in enumerate(domains):
            cells = " | ".join(f"{100 * x:.1f}" for x in moe["top1"][i])
            share = moe["own_share"][d]
            lines.append(f"| {d} | {moe['tokens'][d]} | {cells} | {100 * share:.1f} "
                         f"{_ok(share > MAJORITY)} |")  # fmt: skip
        if moe["k"] > 1:
            lines += ["", f"Top-{moe['k']} slots (% of the {moe['k']} slots per token × layer):",
                      "", "| domain | " + " | ".join(experts) + " |",
                      "|---|" + "---:|" * len(experts)]  # fmt: skip
            for i, d in enumerate(domains):
                lines.append(f"| {d} | " + " | ".join(f"{100 * x:.1f}" for x in moe["topk"][i])
                             + " |")  # fmt: skip
        if moe["warnings"]:
            lines += ["", "Build warnings: " + "; ".join(moe["warnings"])]
        head = " | ".join(f"{d} → {'/'.join(short)}" for d in domains)
        lines += ["", "<details><summary>per layer (top-1 %, to experts "
                  + "/".join(f"{a} = {d}" for a, d in zip(short, domains, strict=True))
                  + ")</summary>", "", f"| layer | {head} |",
                  "|---:|" + "---:|" * len(domains)]  # fmt: skip
        for li, layer in enumerate(moe["per_layer_top1"]):
            cells = " | ".join("/".join(f"{100 * x:.0f}" for x in row) for row in layer)
            lines.append(f"| {li} | {cells} |")
        lines += ["", "</details>"]
    rows = payload["rows"]
    merges = [r for r in rows if r["kind"] == "merge"]
    best = {d: min(r["loss"][d] for r in merges) for d in domains} if merges else {}
    lines += ["", "## LM loss (nats per token, held-out test texts)", "",
              "| model | " + " | ".join(domains) + " | mean |",
              "|---|" + "---:|" * (len(domains) + 1)]  # fmt: skip
    for r in rows:
        cells = []
        for d in domains:
            v = r["loss"][d]
            cells.append(f"**{v:.4f}**" if r["kind"] == "merge" and v == best.get(d)
                         else f"{v:.4f}")  # fmt: skip
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['mean']:.4f} |")
    lines.append("")
    lines.append("Bold: the best dense merge on that domain.")
    for nr in payload.get("not_run") or ():
        lines.append(f"Not run: {nr['name']} ({nr['reason']}).")
    v = payload.get("verdicts")
    if v:
        head = (
            "| MoE | domain | own-expert top-1 share | majority | MoE loss | best dense merge "
            "| its loss | MoE below |"
        )
        lines += ["", "## Verdicts", "", head, "|---|---|---:|:---:|---:|---|---:|:---:|"]
        for name, res in v.items():
            for d, x in res["domains"].items():
                bl = "" if x["best_dense_loss"] is None else f"{x['best_dense_loss']:.4f}"
                cells = [name, d, f"{100 * x['own_share']:.1f} %", _ok(x["majority"]),
                         f"{x['moe_loss']:.4f}", x["best_dense"] or "", bl,
                         _ok(x["below_dense"])]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name, res in v.items():
            met = "met" if res["met"] else "not met"
            lines.append(f"- {name}: majority routing on every domain {_ok(res['routing_met'])}, "
                         "loss below the best dense merge on every domain "
                         f"{_ok(res['loss_met'])}: issue 16 {met}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(payload: Mapping, path: Path) -> Path:
    """One heatmap of the top-1 routing matrix per MoE, and each domain's own-expert share
    layer by layer."""
    from mergeforge.evaluate.report import _pyplot

    plt = _pyplot()
    domains, moes = payload["domains"], payload["moe"]
    fig, axes = plt.subplots(1, len(moes) + 1, figsize=(4.2 * (len(moes) + 1), 3.8),
                             squeeze=False)  # fmt: skip
    for ax, moe in zip(axes[0], moes, strict=False):
        m = torch.tensor(moe["top1"]).numpy()
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center",
                        color="white" if m[i, j] > 0.6 else "black", fontsize=10)  # fmt: skip
        ax.set_xticks(range(m.shape[1]), moe["experts"], rotation=20, ha="right")
        ax.set_yticks(range(m.shape[0]), domains)
        ax.set_xlabel("expert (top-1 router choice)")
        ax.set_ylabel("held-out texts of")
        ax.set_title(f"{moe['name']}: % of tokens × layers", fontsize=9)
    ax = axes[0][-1]
    for mi, moe in enumerate(moes):
        per = torch.tensor(moe["per_layer_top1"])  # (L, G, E)
        for i, d in enumerate(domains):
            ax.plot(100 * per[:, i, i].numpy(), color=f"C{i}", ls="-" if mi == 0 else "--",
                    label=f"{d} ({moe['name']})", lw=1.2)  # fmt: skip
    ax.axhline(100 * MAJORITY, color="gray", ls=":", lw=1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("MoE layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("% top-1 to the domain's own expert")
    ax.legend(fontsize=7)
    fig.suptitle(f"routing of held-out texts ({payload['settings']['gate_mode']} gates)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_routing_report(
    payload: Mapping, out_dir: str | Path, *, plots: bool = True
) -> list[Path]:
    from mergeforge.evaluate.report import write_report

    return write_report(payload, out_dir, complete=bool(payload.get("complete")),
                        markdown=markdown, plot=plot if plots else None,
                        png="routing_matrix.png")  # fmt: skip


# ------------------------------------------------------------------------------- the command


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="default benchmarks/moe/results/routing "
                   "(--smoke: a temporary folder)")  # fmt: skip
    p.add_argument("--work", default=None, help="causal-LM copies and MoE folders (kept); "
                   "default: a temporary folder, removed at the end")  # fmt: skip
    p.add_argument("--domains", default=",".join(DEFAULT_DOMAINS))
    p.add_argument("--gate-mode", default="hidden", choices=ROUTE_MODES)
    p.add_argument("--experts-per-token", default=",".join(map(str, DEFAULT_KS)),
                   help="comma list: one MoE per value (default 1,2)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gate-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="dtype the base runs the gate prompts in (mergekit: bfloat16)")  # fmt: skip
    p.add_argument("--n-prompts", type=int, default=N_PROMPTS, help="gate prompts per expert")
    p.add_argument("--prompt-chars", type=int, default=PROMPT_CHARS)
    p.add_argument("--n-eval", type=int, default=64, help="test texts per domain")
    p.add_argument("--moe-base", default="base", choices=MOE_BASES,
                   help="the MoE's base_model: the pretrained base, or the dense merge with the "
                   "lowest validation loss (best-dense)")  # fmt: skip
    p.add_argument("--ta-lambdas", default=",".join(f"{x:g}" for x in DEFAULT_TA_LAMBDAS))
    p.add_argument("--ties-densities",
                   default=",".join(f"{x:g}" for x in DEFAULT_TIES_DENSITIES))  # fmt: skip
    p.add_argument("--no-ace", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="the experts' recipe (their cache key)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None,
                   help="recipe's max_length, also the tokens scored per text (128)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--cache", default=None)
    p.add_argument("--no-train", action="store_true",
                   help="refuse to train a missing domain expert (say which and how)")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="tiny random Llama models and synthetic texts (seconds)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--render", action="store_true",
                   help="only rewrite results.md and the plot from OUT/results.json")  # fmt: skip
    a = p.parse_args(argv)
    console = Console()
    words = sys.argv if argv is None else ["benchmarks/moe/bench_routing.py", *argv]
    command = "python " + " ".join(shlex.quote(x) for x in words)
    if a.render:
        out = Path(a.out or "benchmarks/moe/results/routing")
        payload = json.loads((out / "results.json").read_text())
        write_routing_report(payload, out, plots=not a.no_plots)
        return payload
    domains = [d for d in a.domains.split(",") if d]
    ks = [int(x) for x in a.experts_per_token.split(",") if x.strip()]
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="mergeforge-moe-routing-")
        work = Path(tmp.name)
    else:
        work = Path(a.work)
    try:
        if a.smoke:
            inputs = smoke_inputs(work / "smoke", domains)
            out = Path(a.out or tempfile.mkdtemp(prefix="mergeforge-moe-routing-smoke-"))
            max_length = a.max_length or 32
            n_eval, n_prompts = min(a.n_eval, 6), min(a.n_prompts, 4)
        else:
            from mergeforge.evaluate.text.domain import DomainRecipe

            given = {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
                     "lr": a.lr}  # fmt: skip
            recipe = replace(DomainRecipe(), **{k: v for k, v in given.items() if v is not None})
            inputs = real_inputs(domains, recipe, cache_dir=a.cache, train=not a.no_train,
                                 console=console)  # fmt: skip
            out = Path(a.out or "benchmarks/moe/results/routing")
            max_length, n_eval, n_prompts = recipe.max_length, a.n_eval, a.n_prompts
        merges = dense_merges(
            domains, ta_lambdas=_floats(a.ta_lambdas), ties_densities=_floats(a.ties_densities),
            ace=not a.no_ace,
        )  # fmt: skip
        meta = {"command": command, "smoke": a.smoke, "machine": machine_info()}
        payload = run_routing(
            inputs, work=work, out=out, ks=ks, gate_mode=a.gate_mode, dtype=a.dtype,
            gate_dtype=a.gate_dtype, n_eval=n_eval, n_prompts=n_prompts,
            prompt_chars=a.prompt_chars, max_length=max_length, merges=merges,
            moe_base=a.moe_base, meta=meta,
            console=console, on_update=lambda pl: write_routing_report(pl, out, plots=False),
        )  # fmt: skip
        if a.no_ace:
            payload["not_run"].append({"name": "ace", "reason": "--no-ace"})
        for path in write_routing_report(payload, out, plots=not a.no_plots):
            console.print(f"wrote {path}")
        print((out / "results.md").read_text(encoding="utf-8"))
        return payload
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
