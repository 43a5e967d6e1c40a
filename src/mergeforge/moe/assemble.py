"""``mergeforge moe CONFIG OUT``: a mixture of experts from dense experts, written as ``merge``
writes (mergekit-moe's ``build``, ``mergekit/scripts/moe.py``, re-done on mergeforge's I/O).

:func:`prepare_moe` parses, opens headers and validates everything (``config.py``,
``inputs.py``, ``layout.py``) and returns the complete list of output tensors. :func:`build_moe`
then, in this order: refuses an output that is an input or a folder it does not own and probes
that it can write (the checks of ``mergeforge merge``, ``engine/output.py``); computes the gates
(the only step that runs a model: ``gates.py``); and streams the tensors one at a time through
the atomic :class:`~mergeforge.checkpoint.ShardedWriter` (memory: one layer's expert MLPs at a
time, plus the base model while the gates are computed). Nothing appears at ``out`` until the
folder is complete.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mergeforge.checkpoint import CARRIED_FILES, Checkpoint, ShardedWriter
from mergeforge.checkpoint._staging import probe_writable
from mergeforge.device import resolve_device
from mergeforge.engine import (  # the output checks of `merge` (engine/output.py)
    check_not_an_input,
    check_output_location,
    check_replaceable,
    is_previous_output,
)
from mergeforge.moe.config import MoEConfig, load_moe_config
from mergeforge.moe.gates import compute_gates, degenerate_layers, unit
from mergeforge.moe.inputs import check_inputs, open_inputs
from mergeforge.moe.layout import (
    HEAD,
    Job,
    Layout,
    check_transformers,
    mlp_name,
    output_config,
    plan_tensors,
    select_layout,
)

log = logging.getLogger("mergeforge")
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})  # fmt: skip


@dataclass
class MoEPlan:
    """A validated MoE build: inputs open (headers only), every output tensor known."""

    config: MoEConfig
    layout: Layout
    models: list[str]
    checkpoints: list[Checkpoint]
    roles: list[int]
    """Checkpoint index of each expert, then each shared expert."""
    jobs: list[Job]
    out_config: dict[str, Any]
    dims: tuple[int, int, int]
    """(layers, hidden, intermediate)."""
    dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)
    sidecars: dict = field(default_factory=dict)  # none: read by engine/output.input_paths

    @property
    def total_bytes(self) -> int:
        return sum(torch.Size(j.shape).numel() * j.dtype.itemsize for j in self.jobs)

    def close(self) -> None:
        for ck in self.checkpoints:
            ck.close()


@dataclass(frozen=True)
class MoEResult:
    out: Path
    architecture: str
    experts: int
    shared_experts: int
    tensors: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    gates: torch.Tensor
    """(layers, experts + shared experts, hidden) float32, as computed."""
    warnings: tuple[str, ...] = ()


def _out_dtype(cfg: MoEConfig, base_cfg: dict, base: Checkpoint) -> torch.dtype:
    """The config's ``dtype``, else the base's config.json dtype (mergekit's ``select_dtype``),
    else the dtype of the base's embeddings."""
    name = cfg.dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return base.info("model.embed_tokens.weight").dtype


def prepare_moe(
    config: str | Path | Mapping[str, Any] | MoEConfig, *, allow_same_experts: bool = False
) -> MoEPlan:
    """Parse, open (headers only) and validate: everything that can fail before heavy work.
    Close the returned plan (``plan.close()``)."""
    check_transformers()  # the layout written is transformers v5's
    cfg = load_moe_config(config, allow_same_experts=allow_same_experts)
    models, cks, roles = open_inputs(cfg)
    try:
        base_cfg = check_inputs(cfg, cks, roles)
        layout = select_layout(cfg, base_cfg["model_type"])
        dims = tuple(base_cfg[k] for k in ("num_hidden_layers", "hidden_size",
                                           "intermediate_size"))  # fmt: skip
        dtype = _out_dtype(cfg, base_cfg, cks[0])
        n, s = len(cfg.experts), len(cfg.shared_experts)
        out_cfg = output_config(layout, base_cfg, n_experts=n, n_shared=s,
                                experts_per_token=cfg.experts_per_token, dtype=dtype)  # fmt: skip
        heads = base_cfg.get("num_attention_heads", 1)
        head_dim = base_cfg.get("head_dim") or dims[1] // heads
        base = {k: (cks[0].info(k).shape, cks[0].info(k).dtype) for k in cks[0].keys()}
        tied = bool(out_cfg.get("tie_word_embeddings"))
        jobs = plan_tensors(
            layout, base, layers=dims[0], hidden=dims[1], intermediate=dims[2], n_experts=n,
            n_shared=s, dtype=dtype, tied=tied,
            heads=(heads, base_cfg.get("num_key_value_heads") or heads, head_dim),
        )  # fmt: skip
        warnings = list(cfg.warnings)
        if HEAD not in base and not tied:
            warnings.append("base_model stores no lm_head.weight and its config is untied: the "
                            "output's lm_head.weight is the base's embeddings")  # fmt: skip
        used = {j.src for j in jobs}
        dropped = [k for k in base if k not in used and ".mlp." not in k and "inv_freq" not in k]
        if dropped:
            warnings.append(f"{len(dropped)} base tensor(s) have no place in {layout.name} and "
                            f"are left out: {', '.join(dropped[:5])}")  # fmt: skip
        return MoEPlan(cfg, layout, models, cks, roles, jobs, out_cfg, dims, dtype, warnings)
    except BaseException:
        for ck in cks:
            ck.close()
        raise


def _noise(shape, seed: int, role: int, name: str) -> torch.Tensor:
    """N(0, 1) for one expert tensor, from its own generator (seed, expert, tensor name)."""
    key = hashlib.sha256(f"{seed}/{role}/{name}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(key[:8])))


class _Producer:
    """Makes each output tensor from the inputs and the gates (``Job.kind``, ``layout.py``)."""

    def __init__(self, plan: MoEPlan, gates: torch.Tensor):
        self.plan, self.gates = plan, gates
        self.experts = (*plan.config.experts, *plan.config.shared_experts)

    def mlp(self, role: int, layer: int, proj: str) -> torch.Tensor:
        """An expert's dense MLP weight, with mergekit's noise / residual scale (in its dtype),
        cast to the output dtype."""
        name, e = mlp_name(layer, proj), self.experts[role]
        t = self.plan.checkpoints[self.plan.roles[role]].get(name)
        if e.noise_scale is not None:
            t = t + (_noise(t.shape, self.plan.config.seed, role, name) * e.noise_scale).to(t.dtype)
        if proj == "down_proj" and e.residual_scale is not None:
            t = t * e.residual_scale
        return t.to(self.plan.dtype)

    def __call__(self, j: Job) -> torch.Tensor:
        dt, g = self.plan.dtype, self.gates
        if j.kind == "copy":
            return self.plan.checkpoints[0].get(j.src).to(dt)
        if j.kind == "zeros":
            return torch.zeros(j.shape, dtype=dt)
        if j.kind == "gate":
            return g[j.layer, list(j.rows)].to(dt)
        if j.kind == "shared_gate":
            return g[j.layer, list(j.rows)].mean(dim=0, keepdim=True).to(dt)
        if j.kind == "expert":
            return self.mlp(j.rows[0], j.layer, j.proj)
        n = len(self.plan.config.experts)
        if j.kind == "fused_gate_up":
            pairs = [(self.mlp(e, j.layer, "gate_proj"), self.mlp(e, j.layer, "up_proj"))
                     for e in range(n)]  # fmt: skip
            return torch.stack([torch.cat(pair) for pair in pairs])
        if j.kind == "fused_down":
            return torch.stack([self.mlp(e, j.layer, "down_proj") for e in range(n)])
        parts = [self.mlp(r, j.layer, j.proj) for r in j.rows]  # shared experts, side by side
        if len(parts) == 1:
            return parts[0]
        if j.proj == "down_proj":  # their mean, not their sum
            return torch.cat([(p.float() / len(parts)).to(dt) for p in parts], dim=1)
        return torch.cat(parts, dim=0)


def _resolved(plan: MoEPlan, gates: torch.Tensor, degenerate: list[int]) -> str:
    c = plan.config
    cos = unit(gates[0]) @ unit(gates[0]).T if gates.shape[0] else torch.zeros(0, 0)
    doc = {
        "architecture": plan.layout.name, "model_type": plan.layout.model_type,
        "base_model": c.base_model, "experts": [e.source_model for e in c.experts],
        "shared_experts": [e.source_model for e in c.shared_experts],
        "gate_mode": c.gate_mode, "gate_dtype": c.gate_dtype, "seed": c.seed,
        "experts_per_token": c.experts_per_token, "dtype": str(plan.dtype).removeprefix("torch."),
        "gate_cosines_layer0": [[round(float(x), 4) for x in row] for row in cos],
        "degenerate_layers": degenerate, "warnings": plan.warnings,
    }  # fmt: skip
    return yaml.safe_dump(doc, sort_keys=False)


def _card(plan: MoEPlan) -> str:
    from mergeforge.version import __version__

    c = plan.config
    lines = ["---", "library_name: transformers", "tags: [moe, merge, mergeforge]", "---",
             f"# {plan.layout.name} mixture of experts", "",
             f"Made with mergeforge {__version__} (`mergeforge moe`) from `{c.base_model}` and "
             f"{len(c.experts)} expert(s), gate mode `{c.gate_mode}`, "
             f"{c.experts_per_token} expert(s) per token.", "",
             *[f"- expert {i}: `{e.source_model}`" for i, e in enumerate(c.experts)],
             *[f"- shared expert: `{e.source_model}`" for e in c.shared_experts], "",
             "## Configuration", "", "```yaml", c.text.rstrip(), "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _finish(plan: MoEPlan, writer: ShardedWriter, gates, degenerate, copy_tokenizer: bool) -> None:
    import json

    writer.write_text("config.json", json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    folder = plan.checkpoints[0].folder
    for name in CARRIED_FILES if folder is not None else ():
        if name == "config.json" or (not copy_tokenizer and name in TOKENIZER_FILES):
            continue
        if (Path(folder) / name).is_file():
            writer.copy_file(Path(folder) / name, name)
    writer.write_text("mergeforge_config.yml", plan.config.text)
    writer.write_text("mergeforge_resolved.yml", _resolved(plan, gates, degenerate))
    writer.write_text("README.md", _card(plan))


def build_moe(
    config: str | Path | Mapping[str, Any] | MoEConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    allow_same_experts: bool = False,
    copy_tokenizer: bool = True,
    device: str | torch.device | None = None,
    durable: bool = False,
) -> MoEResult:
    """Build the MoE the mergekit-moe YAML ``config`` describes into the folder ``out``,
    atomically. ``overwrite`` replaces a previous mergeforge output only (as ``merge``);
    ``device``: where the base model runs the prompts (cpu by default); ``durable``: fsync
    before the output appears. Returns what was written, the gates and the warnings (also
    logged to the ``mergeforge`` logger)."""
    t0 = time.perf_counter()
    out = Path(out)
    dev = resolve_device(device)  # "auto", or a bad name as a ConfigError, before any reading
    check_output_location(out)
    plan = prepare_moe(config, allow_same_experts=allow_same_experts)
    try:
        check_not_an_input(out, plan)
        check_replaceable(out, overwrite=overwrite)
        probe_writable(out)
        for w in plan.warnings:
            log.warning(w)
        layers, hidden, _ = plan.dims
        gates = compute_gates(plan.config, plan.checkpoints[0], layers=layers, hidden=hidden,
                              device=dev)  # fmt: skip
        degenerate = degenerate_layers(gates)
        if degenerate:
            plan.warnings.append(f"layer(s) {degenerate} have near-degenerate gates (condition "
                                 "number > 5): the prompts are too alike, some experts will "
                                 "be used little")  # fmt: skip
            log.warning(plan.warnings[-1])
        make = _Producer(plan, gates)
        specs = [(j.name, j.shape, j.dtype) for j in plan.jobs]
        meta = {"format": "pt", "mergeforge_moe": plan.layout.model_type}
        with ShardedWriter(out, specs, max_shard_bytes=plan.config.out_shard_size, metadata=meta,
                           overwrite=overwrite, durable=durable,
                           replaceable=is_previous_output) as writer:  # fmt: skip
            for j in plan.jobs:
                writer.write(j.name, make(j).contiguous())
            _finish(plan, writer, gates, degenerate, copy_tokenizer)
            writer.commit()
    finally:
        plan.close()
    c = plan.config
    return MoEResult(
        out=out, architecture=plan.layout.name, experts=len(c.experts),
        shared_experts=len(c.shared_experts), tensors=len(plan.jobs),
        bytes_written=plan.total_bytes, seconds=time.perf_counter() - t0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, gates=gates,
        warnings=tuple(plan.warnings),
    )  # fmt: skip
