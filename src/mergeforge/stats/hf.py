"""``mergeforge stats``: compute a Hugging Face model folder's statistics on a user's texts and
write them as its sidecar.

Examples come from a text file (one example a line) or JSONL (``{"text": ..., "label": ...}``);
``labels`` optionally gives one label a line beside a plain text file. Labels are class ids or
names of the model's ``config.label2id``. The first ``num_examples`` non-empty examples are used,
in file order (deterministic). The model is loaded with the class its ``config.json`` names:

* ``regmean``: any model; Grams over batches of 8 (padding masked), in eval mode;
* ``fisher``: a ``...ForSequenceClassification`` model (log-likelihood of the label) or a causal
  LM (``...ForCausalLM`` / ``...LMHeadModel``: sum over next-token log-likelihoods), one
  example at a time, in eval mode (no dropout).

Statistics are keyed by the checkpoint's tensor names; parameters the checkpoint does not hold
(a tied ``lm_head``) are left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mergeforge.checkpoint.sidecar import save_sidecar
from mergeforge.device import resolve_device
from mergeforge.errors import ConfigError
from mergeforge.stats.fisher import MODES, FisherMode, diagonal_fisher
from mergeforge.stats.grams import compute_grams

Example = tuple[str, int | str | None]


def read_examples(texts: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None
                  ) -> list[Example]:  # fmt: skip
    """``[(text, label or None)]`` from a text/JSONL file (and an optional labels file)."""
    lines = [x for x in Path(texts).read_text().splitlines() if x.strip()]
    if not lines:
        raise ConfigError(f"{texts}: no examples (empty file)")
    if Path(texts).suffix == ".jsonl":
        out: list[Example] = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                out.append((str(row["text"]), row.get("label")))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{texts}:{i}: expected a JSON object with 'text' ({e})") from e
    else:
        out = [(x, None) for x in lines]
    if labels is not None:
        ys = [x.strip() for x in Path(labels).read_text().splitlines() if x.strip()]
        if len(ys) != len(out):
            raise ConfigError(f"{labels}: {len(ys)} labels for {len(out)} texts in {texts}")
        out = [(t, y) for (t, _), y in zip(out, ys, strict=True)]
    return out


def _label_id(y: int | str | None, label2id: dict, where: str) -> int:
    if y is None:
        raise ConfigError(f"{where}: empirical Fisher needs a label for every example "
                          "(JSONL 'label' or --labels), or use --fisher sampled")  # fmt: skip
    if isinstance(y, int) or (isinstance(y, str) and y.lstrip("-").isdigit()):
        return int(y)
    if y in label2id:
        return int(label2id[y])
    raise ConfigError(f"{where}: label {y!r} is neither a class id nor one of {sorted(label2id)}")


def load_model(model: str | os.PathLike[str], device: torch.device) -> tuple[nn.Module, str]:
    """The model with the head its config names: ``(model in eval mode, task)`` where task is
    ``classification``, ``causal_lm`` or ``other``."""
    import transformers as tf

    cfg = json.loads((Path(model) / "config.json").read_text())
    arch = (cfg.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        cls, task = tf.AutoModelForSequenceClassification, "classification"
    elif arch.endswith(("ForCausalLM", "LMHeadModel")):
        cls, task = tf.AutoModelForCausalLM, "causal_lm"
    else:
        cls, task = tf.AutoModel, "other"
    return cls.from_pretrained(str(model)).to(device).eval(), task


def key_map(names: Sequence[str], ckpt_keys: Sequence[str], prefix: str) -> dict[str, str]:
    """Module-parameter name -> checkpoint key, tolerating a base-model ``prefix`` added or
    dropped on load; names without a checkpoint tensor (tied weights) are left out."""
    keys, out = set(ckpt_keys), {}
    for n in names:
        for cand in (n, f"{prefix}.{n}", n.removeprefix(f"{prefix}.")):
            if cand in keys:
                out[n] = cand
                break
    return out


def _batches(tok, texts: Sequence[str], size: int, max_length: int, device) -> Iterator[dict]:
    for s in range(0, len(texts), size):
        b = tok(list(texts[s : s + size]), padding=True, truncation=True,
                max_length=max_length, return_tensors="pt")  # fmt: skip
        yield {k: v.to(device) for k, v in b.items()}


def _bar(total: int, what: str, enabled: bool):
    from rich.progress import Progress

    bar = Progress(transient=True, disable=not enabled)
    return bar, bar.add_task(what, total=total)


def compute_model_stats(
    model: str | os.PathLike[str],
    method: str,
    texts: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    num_examples: int = 256,
    max_length: int = 128,
    fisher: FisherMode = "sampled",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Compute and save ``model``'s ``method`` (``regmean`` or ``fisher``) statistics; returns
    the written file (see :mod:`mergeforge.checkpoint.sidecar`)."""
    from transformers import AutoTokenizer

    from mergeforge.checkpoint import open_checkpoint

    if method not in ("regmean", "fisher") or fisher not in MODES or num_examples < 1:
        raise ConfigError(
            f"stats: method must be regmean or fisher, --fisher one of {MODES}, "
            f"--num-examples >= 1 (got {method!r}, {fisher!r}, {num_examples})"
        )
    dev = resolve_device(device)
    examples = read_examples(texts, labels)[:num_examples]
    ck = open_checkpoint(model)
    ckpt_keys = ck.keys()
    ck.close()
    net, task = load_model(model, dev)
    tok = AutoTokenizer.from_pretrained(str(model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prefix = getattr(net, "base_model_prefix", "")
    source = f"{Path(texts).name}: first {len(examples)} examples, max_length {max_length}"
    bar, job = _bar(len(examples), f"{method} statistics of {Path(model).name}", progress)
    with bar:
        if method == "regmean":
            text_list = [t for t, _ in examples]

            def fwd(b: dict) -> None:
                net(**b)
                bar.advance(job, b["input_ids"].shape[0])

            grams = compute_grams(net, _batches(tok, text_list, 8, max_length, dev), fwd)
            kmap = key_map([k.removesuffix(".weight") + ".weight" for k in grams], ckpt_keys,
                           prefix)  # fmt: skip
            out = {kmap[k]: g for k, g in grams.items() if k in kmap}
            kind, extra = "regmean", {"max_length": str(max_length)}
        else:
            out, n = _fisher(net, task, tok, examples, fisher, seed, max_length, dev,
                             lambda: bar.advance(job))  # fmt: skip
            kmap = key_map(list(out), ckpt_keys, prefix)
            out = {kmap[k]: f for k, f in out.items() if k in kmap}
            kind = f"fisher-{fisher}"
            extra = {"max_length": str(max_length), "seed": str(seed), "fisher_norm": repr(
                fisher_norm(out.values()))}  # fmt: skip
    if not out:
        raise ConfigError(f"{model}: no statistics matched the checkpoint's tensor names")
    return save_sidecar(model, kind, out, num_examples=num_examples, examples_used=len(examples),
                      source=source, extra=extra)  # fmt: skip


def fisher_norm(fishers) -> float:
    """‖F‖₂ over every entry of every tensor (FusionBench's normalisation), in fp64."""
    return float(sum(f.double().square().sum() for f in fishers) ** 0.5)


def _fisher(net, task, tok, examples, mode, seed, max_length, dev, tick):
    if task == "other":
        raise ConfigError("fisher needs a model with an output head: a ...ForSequenceClassification"
                          " or a causal LM (config.json 'architectures')")  # fmt: skip
    label2id = dict(getattr(net.config, "label2id", {}) or {})

    def logits_fn(ex: Example) -> tuple[Tensor, Tensor]:
        b = tok(ex[0], truncation=True, max_length=max_length, return_tensors="pt").to(dev)
        logits = net(**b).logits[0]
        if task == "causal_lm":  # position t predicts token t + 1
            return logits[:-1], b["input_ids"][0, 1:]
        y = 0 if mode == "sampled" else _label_id(ex[1], label2id, "fisher")
        return logits[None], torch.tensor([y])

    params = dict(net.named_parameters())
    return diagonal_fisher(params, examples, logits_fn, mode=mode, seed=seed, on_example=tick)
