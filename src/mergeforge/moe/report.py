"""How a MoE's routers send held-out prompts to the experts (beyond mergekit-moe).

:func:`routing_report` runs a Mixtral or Qwen2-MoE folder (any, not only ours) with
``transformers`` on groups of texts (e.g. one group per domain, held out from the gate prompts)
and counts, over every token of a group and every MoE layer, which expert the router ranks first
(``top1``) and which fill its ``num_experts_per_tok`` slots (``topk``). Each row of the routing
matrix sums to 1; a working MoE puts each domain's mass on that domain's expert. Each text runs
alone (no padding), prefixed with BOS as the gate prompts are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergeforge.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class RoutingReport:
    groups: tuple[str, ...]
    experts: tuple[str, ...]
    tokens: tuple[int, ...]
    """Tokens per group (each counted once per MoE layer in the shares)."""
    top1: torch.Tensor
    """(groups, experts): share of (token, layer) pairs whose first-ranked expert is e."""
    topk: torch.Tensor
    """(groups, experts): share of the top-k slots that go to e."""
    per_layer_top1: torch.Tensor
    """(layers, groups, experts): ``top1`` layer by layer."""

    def to_dict(self) -> dict:
        rows = lambda m: {g: dict(zip(self.experts, map(float, r), strict=True))  # noqa: E731
                          for g, r in zip(self.groups, m, strict=True)}  # fmt: skip
        return {"experts": list(self.experts), "tokens": dict(zip(self.groups, self.tokens,
                strict=True)), "top1": rows(self.top1), "topk": rows(self.topk)}  # fmt: skip

    def to_markdown(self) -> str:
        """The top-1 routing matrix: one row a group, one column an expert, in percent."""
        head = "| group | tokens | " + " | ".join(self.experts) + " |"
        lines = [head, "|---|---:|" + "---:|" * len(self.experts)]
        for g, n, row in zip(self.groups, self.tokens, self.top1, strict=True):
            cells = " | ".join(f"{100 * float(x):.1f}" for x in row)
            lines.append(f"| {g} | {n} | {cells} |")
        return "\n".join(lines)


def load_prompt_groups(path: str | Path) -> dict[str, list[str]]:
    """Groups of texts from a file: YAML / JSON ``{group: [text, ...]}``, JSONL lines
    ``{"text": ..., "label": ...}`` (grouped by label), or plain text (one text a line, one
    group named after the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file; give a YAML/JSON mapping group -> texts, a JSONL "
                          "of {text, label}, or a text file of one prompt a line")  # fmt: skip
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        groups: dict[str, list[str]] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    groups.setdefault(str(d.get("label", "all")), []).append(str(d["text"]))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ConfigError(f"{p}:{n}: expected a JSON object with 'text'") from None
    elif p.suffix in (".yml", ".yaml", ".json"):
        try:
            groups = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML/JSON: {e}") from None
        ok = isinstance(groups, Mapping) and all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in groups.values()
        )
        if not ok:
            raise ConfigError(f"{p}: expected a mapping group -> list of texts")
        groups = {str(k): list(v) for k, v in groups.items()}
    else:
        groups = {p.stem: [t for t in text.splitlines() if t.strip()]}
    empty = [g for g, v in groups.items() if not v] or ([] if groups else ["(none)"])
    if empty:
        raise ConfigError(f"{p}: group(s) {', '.join(empty)} hold no text; give each some")
    return groups


def _expert_names(folder: Path, n: int) -> tuple[str, ...]:
    try:
        doc = yaml.safe_load((folder / "mergeforge_resolved.yml").read_text(encoding="utf-8"))
        names = [Path(str(e)).name for e in doc["experts"]]
        if len(names) == n:
            return tuple(f"{i}:{x}" for i, x in enumerate(names))
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    return tuple(f"expert {i}" for i in range(n))


@torch.no_grad()
def routing_report(
    model_dir: str | Path, groups: Mapping[str, Sequence[str]], *, max_length: int = 512,
    device: str | torch.device = "cpu",
) -> RoutingReport:  # fmt: skip
    """Route every text of every group through the MoE at ``model_dir`` and count (see the
    module docstring). ``max_length``: tokens kept per text; ``device``: as ``--device``
    (cpu, cuda, auto...)."""
    import transformers as tf

    from mergeforge.device import resolve_device
    from mergeforge.moe.layout import check_transformers

    check_transformers()
    device = resolve_device(device)  # "auto", or a bad name as a ConfigError, before loading
    empty = [g for g, v in groups.items() if not v] or ([] if groups else ["(none)"])
    if empty:
        raise ConfigError(f"routing report: group(s) {', '.join(empty)} hold no text")
    folder = Path(model_dir)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load the MoE or its tokenizer ({e})") from None
    n = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", 0)
    k = model.config.num_experts_per_tok
    if not n:
        raise CheckpointError(f"{folder}: {model.config.model_type} is not a MoE with a router")
    model.eval().to(device)
    counts1, countsk, tokens = [], [], []
    for texts in groups.values():
        c1, ck, t = None, torch.zeros(n), 0
        for text in texts:
            enc = tok((tok.bos_token or "") + text, return_tensors="pt", add_special_tokens=False,
                      truncation=True, max_length=max_length).to(device)  # fmt: skip
            logits = model(**enc, output_router_logits=True).router_logits  # L x (T, E)
            top = torch.stack([lg.float().cpu().topk(k, dim=-1).indices for lg in logits])
            one = torch.nn.functional.one_hot(top[..., 0], n).sum(dim=1).float()  # (L, E)
            c1 = one if c1 is None else c1 + one
            ck += torch.nn.functional.one_hot(top, n).sum(dim=(0, 1, 2)).float()
            t += top.shape[1]
        counts1.append(c1 / max(t, 1))
        countsk.append(ck / max(t * k * len(logits), 1))
        tokens.append(t)
    per_layer = torch.stack(counts1, dim=1)  # (L, G, E)
    return RoutingReport(
        groups=tuple(groups), experts=_expert_names(folder, n), tokens=tuple(tokens),
        top1=per_layer.mean(dim=0), topk=torch.stack(countsk), per_layer_top1=per_layer,
    )  # fmt: skip
