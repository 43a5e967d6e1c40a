"""Domain specialisation (issue 17): fine-tune a general language model on one domain of the
bundled text, merge the domain expert back into the general model, and measure both losses.

*Domains* (:data:`DOMAINS`) are texts of the text suite's data packages, labels ignored:
``news`` (BBC News articles, ``news_topic``), ``tweets`` (the sentiment-corpus tweets and the 2016
election tweets, ``tweet_sentiment`` + ``tweet_authorship``) and ``reviews`` (Rotten Tomatoes
review snippets, ``polarity``). Each domain withholds :data:`HELD_OUT` test texts (the source
tasks' seeded test splits) and as many validation texts (a seeded carve of their training pools)
from training (:func:`domain_texts`). No general corpus ships in a PyPI package, so *general*
text for a domain is the held-out texts of the *other* domains, in equal shares
(:func:`general_texts`): for ``news``, tweets and review snippets.

*The expert* (:func:`domain_lm_expert`): SmolLM2-135M (the text suite's ``smollm2`` backbone: the
packaged GGUF de-quantized once to fp32 and cached as a ``LlamaModel`` folder,
:func:`base_model_dir`) fine-tuned as a causal LM on the domain's training texts with a
:class:`DomainRecipe` (default: 100 AdamW steps, batch 8 texts × ≤ 128 tokens, lr 1e-4 with
10 warm-up steps and linear decay, float32, gradient norm clipped at 1, seeded), cached under
``$MERGEFORGE_CACHE/text-suite/domain-experts/<domain>-<key>/`` by a hash of everything it
depends on (base weights, data package versions, held-out split, recipe). The folder has the
base's exact tensor names (a ``LlamaModel``; the LM head is the tied embedding), so base and
expert merge tensor by tensor, and ``LlamaForCausalLM.from_pretrained(folder)`` loads it.

*The loss* (:func:`lm_loss`): mean next-token cross-entropy over every real token of the texts
(each text truncated at ``max_length`` tokens, no special tokens added; token t predicted from
tokens < t; padding masked; the mean is over tokens, not texts).

*The sweep* (:func:`run_domain`): base, expert and each merge of :func:`domain_merges` (task
arithmetic θ₀ + λ·τ, TIES on the one task vector, linear between base and expert), all through
:func:`mergeforge.merge_state_dicts`; the merge is picked on the validation split by
:func:`~mergeforge.evaluate.editing.select_domain_merge` and reported on the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeforge.errors import ConfigError
from mergeforge.evaluate.editing import (
    DOMAIN_TARGET,
    GENERAL_TOLERANCE,
    domain_fraction,
    select_domain_merge,
)

DOMAINS: dict[str, tuple[str, ...]] = {
    "news": ("news_topic",),
    "tweets": ("tweet_sentiment", "tweet_authorship"),
    "reviews": ("polarity",),
}
HELD_OUT = 200
"""Per domain: test texts, and as many validation texts, that the expert never trains on."""
N_EVAL = 64
"""Texts scored per split by default (the first of the held-out ones; general: split evenly)."""
DOMAIN_VERSION = 1  # bump when data or training code changes what a cached expert would be


@dataclass(frozen=True)
class DomainRecipe:
    """How a domain expert is fine-tuned (its cache key; :func:`domain_lm_expert`)."""

    steps: int = 100
    batch_size: int = 8
    max_length: int = 128
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    backbone: str = "smollm2"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"DomainRecipe.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"DomainRecipe.warmup_steps must be in [0, steps), got "
                              f"{self.warmup_steps}")  # fmt: skip
        if not self.lr > 0:
            raise ConfigError(f"DomainRecipe.lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DomainTexts:
    """One domain's texts: ``train`` (the expert's), ``validation`` and ``test`` (held out)."""

    name: str
    train: list[str]
    validation: list[str]
    test: list[str]


def _check_domain(domain: str) -> tuple[str, ...]:
    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain {domain!r}; known: {sorted(DOMAINS)}")
    return DOMAINS[domain]


def domain_texts(domain: str, *, held_out: int = HELD_OUT, seed: int = 0) -> DomainTexts:
    """The texts of ``domain`` split three ways, disjoint (texts are de-duplicated by the task
    loaders): ``test``: the source tasks' seeded test splits (``held_out`` in all, shared evenly
    between sources); ``validation``: ``held_out`` texts drawn (seeded) from their training
    pools; ``train``: the rest of the pools. Each list mixes the sources (seeded shuffle)."""
    from mergeforge.evaluate.text.tasks import TEXT_TASKS

    sources = _check_domain(domain)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    for i, task in enumerate(sources):
        share = held_out // len(sources) + (i < held_out % len(sources))
        data = TEXT_TASKS[task](n_train=None, n_test=share, seed=0)
        pool = [t for t, _ in data.train]
        order = np.random.default_rng([seed, i, 17]).permutation(len(pool))
        val += [pool[j] for j in order[:share]]
        train += [pool[j] for j in order[share:]]
        test += [t for t, _ in data.test]
    # across sources too: a text in test is nowhere else, one in validation not in train
    held = set(test)
    val = [t for t in dict.fromkeys(val) if t not in held]
    held |= set(val)
    train = [t for t in dict.fromkeys(train) if t not in held]
    rng = np.random.default_rng([seed, 29])
    shuffled = [[xs[j] for j in rng.permutation(len(xs))] for xs in (train, val, test)]
    return DomainTexts(domain, *shuffled)


def general_texts(domain: str, split: str, n: int, *, held_out: int = HELD_OUT) -> list[str]:
    """``n`` held-out texts (``split``: ``validation`` or ``test``) of the domains other than
    ``domain``, in equal shares (the first of each domain's list; the first domains get one more
    when ``n`` does not divide): the *general* text of the module docstring."""
    _check_domain(domain)
    others = [d for d in DOMAINS if d != domain]
    out: list[str] = []
    for i, other in enumerate(others):
        k = n // len(others) + (i < n % len(others))
        out += getattr(domain_texts(other, held_out=held_out), split)[:k]
    return out


# ---------------------------------------------------------------------------- the loss


def lm_loss_sums(
    model, tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 8
) -> tuple[float, int]:
    """``(sum of next-token cross-entropies, number of predicted tokens)`` of a causal LM on
    ``texts`` (see :func:`lm_loss`). Eval mode, no gradients; texts of similar length are
    batched together (same sums, less padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False, return_tensors="pt")  # fmt: skip
            ids, mask = enc["input_ids"], enc["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            target, keep = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            ).view_as(target)
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    model.train(was_training)
    return total, count


def lm_loss(
    model, tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 8
) -> float:
    """Mean next-token cross-entropy (nats per token) of a causal LM on ``texts``: each text
    tokenized alone without special tokens and truncated at ``max_length``; token t (t ≥ 2) is
    predicted from tokens 1..t−1; padding is masked; the mean is over all predicted tokens of
    all texts (a token-weighted mean, not a mean of per-text means). Needs right padding."""
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("lm_loss needs a tokenizer that pads on the right")
    total, count = lm_loss_sums(model, tokenizer, texts, max_length=max_length,
                                batch_size=batch_size)  # fmt: skip
    if count == 0:
        raise ValueError("no token to predict: every text is shorter than two tokens")
    return total / count


# ---------------------------------------------------------------------------- the expert


def base_model_dir(backbone: str = "smollm2", *, cache_dir=None, console=None) -> Path:
    """The text suite's base folder of ``backbone`` (built once, shared with ``mergeforge bench
    text-smollm2``): ``$MERGEFORGE_CACHE/text-suite/base-<sha256[:12]>``."""
    from mergeforge.cache import cache_folder
    from mergeforge.checkpoint.atomic import atomic_folder
    from mergeforge.evaluate.text.backbones import get_backbone
    from mergeforge.evaluate.text.cache import quiet_transformers

    b = get_backbone(backbone)
    folder = cache_folder("text-suite", cache_dir) / f"base-{b.sha256()[:12]}"
    if not (folder / "config.json").exists():
        if console is not None:
            console.print(f"Saving {b.label} as a Hugging Face folder...")
        with quiet_transformers():
            atomic_folder(folder, b.save)
    return folder


def load_causal_lm(folder: str | Path, state: Mapping[str, torch.Tensor] | None = None):
    """``LlamaForCausalLM`` (any causal LM) from a base-model folder, in float32 and eval mode;
    ``state``: backbone tensors (the folder's tensor names) loaded over the folder's, strictly.
    The LM head is tied to the embedding, so it follows the loaded embedding."""
    from transformers import AutoModelForCausalLM

    from mergeforge.evaluate.text.cache import quiet_transformers

    with quiet_transformers():
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if state is not None:
        lm.get_decoder().load_state_dict(state, strict=True)
    return lm.eval()


def _digest(key: Mapping) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def domain_expert_key(domain: str, recipe: DomainRecipe, base_sha256: str) -> dict:
    """Everything a cached domain expert depends on."""
    from mergeforge.evaluate.text.cache import dist_version
    from mergeforge.evaluate.text.tasks import TASK_PACKAGES

    return {
        "version": DOMAIN_VERSION,
        "base_sha256": base_sha256,
        "domain": domain,
        "sources": {t: dist_version(TASK_PACKAGES[t]) for t in _check_domain(domain)},
        "held_out": HELD_OUT,
        "recipe": recipe.to_dict(),
    }


def domain_lm_expert(
    domain: str,
    recipe: DomainRecipe | None = None,
    *,
    cache_dir: str | Path | None = None,
    console=None,
) -> Path:
    """The folder of ``domain``'s language-model expert: the recipe's backbone fine-tuned on
    the domain's training texts (module docstring); trained once (a progress bar), then reused
    from the cache. The folder holds the model (the base's tensor names), its tokenizer and
    ``train.json`` (losses, seconds, the number of training texts)."""
    from mergeforge.cache import cache_folder
    from mergeforge.checkpoint.atomic import atomic_folder, write_text_atomic
    from mergeforge.evaluate.text.backbones import get_backbone

    recipe = recipe or DomainRecipe()
    _check_domain(domain)
    base = base_model_dir(recipe.backbone, cache_dir=cache_dir, console=console)
    key = domain_expert_key(domain, recipe, get_backbone(recipe.backbone).sha256())
    root = cache_folder("text-suite", cache_dir) / "domain-experts"
    folder = root / f"{domain}-{_digest(key)}"
    if (folder / "train.json").exists():
        if console is not None:
            console.print(f"domain expert [bold]{domain}[/]: cached ({folder})")
        return folder
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / f"{folder.name}.json", json.dumps(key, indent=2) + "\n")
    texts = domain_texts(domain).train
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=console is None) as bar:
        job = bar.add_task(f"domain expert {domain}", total=recipe.steps)

        logs = console is not None and not console.is_terminal  # a log file: a line now and then
        every = max(1, recipe.steps // 10)
        t0 = time.perf_counter()

        def on_step(step: int, loss: float) -> None:
            bar.update(job, completed=step, description=f"domain expert {domain} loss {loss:.3f}")
            if logs and (step % every == 0 or step == recipe.steps):
                console.print(f"domain expert {domain}: step {step}/{recipe.steps}, loss "
                              f"{loss:.3f}, {time.perf_counter() - t0:.0f} s")  # fmt: skip

        def build(tmp: Path) -> None:
            summary = finetune_lm(base, texts, tmp, recipe=recipe, on_step=on_step)
            summary["domain"] = domain
            (tmp / "train.json").write_text(json.dumps(summary) + "\n")

        atomic_folder(folder, build)
    return folder


def finetune_lm(
    base_dir: str | Path,
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    recipe: DomainRecipe,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune the causal LM of ``base_dir`` on ``texts`` (the loss of :func:`lm_loss` on each
    batch) and save its backbone (the base's tensor names) and tokenizer to ``out_dir``.
    Batches walk seeded permutations of ``texts``. Returns ``{"losses", "seconds",
    "cpu_seconds", "n_texts", "tokens"}``."""
    from transformers import AutoTokenizer

    from mergeforge.evaluate.text.experts import _batches

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    lm = load_causal_lm(base_dir).train()
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm, steps = recipe.warmup_steps, recipe.steps

    def scale(t: int) -> float:  # linear warm-up, then linear decay to zero
        return (t + 1) / warm if t < warm else max(0.0, (steps - t) / (steps - warm))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses: list[float] = []
    tokens = 0
    for step, idx in enumerate(_batches(len(texts), recipe.batch_size, steps, recipe.seed), 1):
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=recipe.max_length, add_special_tokens=False,
                        return_tensors="pt")  # fmt: skip
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = lm(**enc, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        tokens += int(enc["attention_mask"].sum())
        if on_step is not None:
            on_step(step, losses[-1])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out_dir = Path(out_dir)
    lm.eval().get_decoder().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"losses": losses, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "n_texts": len(texts), "tokens": tokens, "recipe": recipe.to_dict()}  # fmt: skip


# ---------------------------------------------------------------------------- the sweep


DEFAULT_LAMBDAS = (0.25, 0.5, 0.7, 0.85)
DEFAULT_TIES_DENSITIES = (0.2, 0.5)
DEFAULT_LINEAR_WEIGHTS = (0.5,)


def domain_merges(
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    ties_densities: Sequence[float] = DEFAULT_TIES_DENSITIES,
    linear_weights: Sequence[float] = DEFAULT_LINEAR_WEIGHTS,
) -> list[tuple[str, dict]]:
    """``(name, merge config)`` of every merge of the base (``"base"``) and the expert
    (``"expert"``): task arithmetic θ₀ + λ·τ per λ; TIES (λ 1, the one task vector trimmed to
    ``density``); linear (1 − w)·θ₀ + w·θ_d (the same model as task arithmetic at λ = w, in
    exact arithmetic). λ = 1 is the expert itself, scored as its own row."""
    out = []
    for lam in lambdas:
        out.append((f"task_arithmetic lambda={lam:g}", {
            "merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "expert", "parameters": {"weight": 1.0}}],
            "parameters": {"lambda": float(lam)}, "dtype": "float32"}))  # fmt: skip
    for density in ties_densities:
        out.append((f"ties density={density:g}", {
            "merge_method": "ties", "base_model": "base",
            "models": [{"model": "expert", "parameters": {"weight": 1.0, "density": density}}],
            "parameters": {"lambda": 1.0}, "dtype": "float32"}))  # fmt: skip
    for w in linear_weights:
        out.append((f"linear weight={w:g}", {
            "merge_method": "linear",
            "models": [{"model": "base", "parameters": {"weight": 1.0 - w}},
                       {"model": "expert", "parameters": {"weight": float(w)}}],
            "dtype": "float32"}))  # fmt: skip
    return out


def run_domain(
    domain: str = "news",
    recipe: DomainRecipe | None = None,
    *,
    merges: Sequence[tuple[str, dict]] | None = None,
    n_eval: int = N_EVAL,
    tolerance: float = GENERAL_TOLERANCE,
    cache_dir: str | Path | None = None,
    console=None,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Train (or reuse) ``domain``'s expert, score base, expert and every merge on the domain's
    and the general held-out texts (``n_eval`` each, validation and test), pick the merge on
    validation (:func:`~mergeforge.evaluate.editing.select_domain_merge`) and return the
    payload (:func:`write_domain_report` writes it)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from mergeforge import merge_state_dicts

    recipe = recipe or DomainRecipe()
    merges = list(domain_merges() if merges is None else merges)
    t_start = time.perf_counter()
    base_dir = base_model_dir(recipe.backbone, cache_dir=cache_dir, console=console)
    expert_dir = domain_lm_expert(domain, recipe, cache_dir=cache_dir, console=console)
    train_summary = json.loads((expert_dir / "train.json").read_text())
    texts = domain_texts(domain)
    sets = {
        "validation": {"domain": texts.validation[:n_eval],
                       "general": general_texts(domain, "validation", n_eval)},
        "test": {"domain": texts.test[:n_eval], "general": general_texts(domain, "test", n_eval)},
    }  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.padding_side = "right"
    models = {"base": load_file(str(base_dir / "model.safetensors")),
              "expert": load_file(str(expert_dir / "model.safetensors"))}  # fmt: skip
    lm = load_causal_lm(base_dir)
    payload: dict[str, Any] = {
        "domain": domain,
        "sources": list(DOMAINS[domain]),
        "general_sources": {d: list(DOMAINS[d]) for d in DOMAINS if d != domain},
        "recipe": recipe.to_dict(),
        "expert": str(expert_dir),
        "train": {k: train_summary[k] for k in ("seconds", "cpu_seconds", "n_texts", "tokens")},
        "train_loss_first_last": [train_summary["losses"][0], train_summary["losses"][-1]],
        "n_eval": n_eval,
        "tolerance": tolerance,
        "target_fraction": DOMAIN_TARGET,
        "rule": (
            f"among the merges whose validation general loss is <= (1 + {tolerance:g}) x "
            "the base's, the largest validation fraction (L_base - L_merge) / (L_base - "
            "L_expert) of the domain loss (ties: the earlier in the sweep)"
        ),  # fmt: skip
        "rows": [],
        "complete": False,
    }
    candidates = [("base", None, None), ("expert", None, None)]
    candidates += [(name, cfg, None) for name, cfg in merges]
    for n, (name, cfg, _) in enumerate(candidates, 1):
        t0 = time.perf_counter()
        state = models[name] if cfg is None else merge_state_dicts(cfg, models)
        merge_s = None if cfg is None else time.perf_counter() - t0
        lm.get_decoder().load_state_dict(state, strict=True)
        row: dict[str, Any] = {"name": name, "config": cfg, "merge_seconds": merge_s}
        for split, parts in sets.items():
            row[split] = {part: lm_loss(lm, tokenizer, xs, max_length=recipe.max_length)
                          for part, xs in parts.items()}  # fmt: skip
        row["seconds"] = time.perf_counter() - t0
        payload["rows"].append(row)
        if console is not None:
            v, t = row["validation"], row["test"]
            console.print(f"[{n}/{len(candidates)}] {name}: domain {v['domain']:.4f} / general "
                          f"{v['general']:.4f} (validation), domain {t['domain']:.4f} / general "
                          f"{t['general']:.4f} (test) [{row['seconds']:.0f} s]")  # fmt: skip
        if on_update is not None:
            on_update(payload)
    rows = {r["name"]: r for r in payload["rows"]}
    for split in sets:
        b, e = rows["base"][split], rows["expert"][split]
        for r in payload["rows"]:
            r[split]["fraction"] = domain_fraction(b["domain"], e["domain"], r[split]["domain"])
            r[split]["general_change"] = r[split]["general"] / b["general"] - 1
    merged = [r for r in payload["rows"] if r["config"] is not None]
    val = [(r["name"], r["validation"]["domain"], r["validation"]["general"]) for r in merged]
    b = rows["base"]["validation"]
    choice = select_domain_merge(val, base=(b["domain"], b["general"]),
                                 expert_domain=rows["expert"]["validation"]["domain"],
                                 tolerance=tolerance)  # fmt: skip
    payload["choice"] = None if choice is None else choice.to_dict()
    if choice is not None:
        test = rows[choice.name]["test"]
        payload["verdict"] = {
            "merge": choice.name,
            "fraction_test": test["fraction"],
            "general_change_test": test["general_change"],
            "fraction_met": test["fraction"] >= DOMAIN_TARGET,
            "general_met": test["general_change"] <= tolerance,
        }
        payload["verdict"]["met"] = payload["verdict"]["fraction_met"] and payload["verdict"][
            "general_met"]  # fmt: skip
    payload["complete"] = True
    payload["total_seconds"] = time.perf_counter() - t_start
    return payload


def markdown(payload: Mapping) -> str:
    """The table: every row's losses (nats/token) on both splits, kept fraction, general change."""
    lines = [
        f"Domain `{payload['domain']}` ({', '.join(payload['sources'])}); general = held-out "
        f"texts of {', '.join(payload['general_sources'])}. LM loss in nats per token on "
        f"{payload['n_eval']} texts per set; kept = (L_base − L) / (L_base − L_expert) of the "
        "domain loss; general Δ = general loss ÷ the base's − 1.",
        "",
        "| model | domain val | general val | kept val | general Δ val | domain test | "
        "general test | kept test | general Δ test |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chosen = (payload.get("choice") or {}).get("name")
    for r in payload["rows"]:
        name = f"**{r['name']}** (chosen)" if r["name"] == chosen else r["name"]
        cells = []
        for split in ("validation", "test"):
            s = r[split]
            cells += [f"{s['domain']:.4f}", f"{s['general']:.4f}", _pct(s.get("fraction")),
                      _pct(s.get("general_change"), signed=True)]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    v = payload.get("verdict")
    lines.append("")
    if v is None:
        lines.append(f"No merge keeps the general loss within {payload['tolerance']:.0%} on "
                     "validation.")  # fmt: skip
    else:
        lines.append(
            f"Chosen on validation: {v['merge']}. Test: kept {100 * v['fraction_test']:.1f} % "
            f"of the expert's domain improvement (target ≥ {100 * payload['target_fraction']:.0f}"
            f" %: {'✅' if v['fraction_met'] else '❌'}), general loss "
            f"{100 * v['general_change_test']:+.1f} % (target ≤ +{100 * payload['tolerance']:.0f}"
            f" %: {'✅' if v['general_met'] else '❌'})."
        )
    return "\n".join(lines) + "\n"


def _pct(x, *, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{100 * x:+.1f} %" if signed else f"{100 * x:.1f} %"


def plot(payload: Mapping, path: Path) -> Path:
    """Domain loss against general loss (test split; validation hollow) for every row, with
    the task-arithmetic λ path and the 5 % general-loss line."""
    from mergeforge.evaluate.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    rows = payload["rows"]
    base = next(r for r in rows if r["name"] == "base")
    for split, filled in (("test", True), ("validation", False)):
        path_rows = [r for r in rows if r["name"] in ("base", "expert")
                     or r["name"].startswith("task_arithmetic")]  # fmt: skip
        path_rows.sort(key=lambda r: -r[split]["domain"])
        ax.plot([r[split]["general"] for r in path_rows], [r[split]["domain"] for r in path_rows],
                "-", color="C0" if filled else "C7", lw=1, alpha=0.6)  # fmt: skip
        for i, r in enumerate(rows):
            ax.scatter(r[split]["general"], r[split]["domain"], s=36,
                       facecolors=f"C{i % 10}" if filled else "none",
                       edgecolors=f"C{i % 10}", label=r["name"] if filled else None)  # fmt: skip
        ax.axvline((1 + payload["tolerance"]) * base[split]["general"],
                   color="C3" if filled else "C7", ls=":", lw=1)  # fmt: skip
    ax.set_xlabel("general LM loss (nats/token)")
    ax.set_ylabel(f"{payload['domain']} LM loss (nats/token)")
    ax.set_title(f"domain expert merged into SmolLM2 ({payload['domain']}); filled: test, "
                 "hollow: validation", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_domain_report(payload: Mapping, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """``results.json``, ``results.md`` (:func:`markdown`) and ``domain_losses.png``
    (:func:`plot`) in ``out_dir``."""
    from mergeforge.evaluate.report import write_report

    return write_report(payload, out_dir, complete=bool(payload.get("complete")), markdown=markdown,
                        plot=plot if plots else None, png="domain_losses.png")  # fmt: skip
