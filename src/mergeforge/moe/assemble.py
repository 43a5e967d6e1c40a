"""``mergeforge moe CONFIG OUT``: a mixture of experts from dense experts, written as ``merge``
writes (mergekit-moe's ``build``, ``mergekit/scripts/moe.py``, re-done on mergeforge's I/O).

:func:`prepare_moe` parses, opens headers and validates everything (``config.py``,
``inputs.py``, ``layout.py``) and returns the complete list of output tensors. :func:`build_moe`
then refuses an output that is an input or a folder it does not own and probes that it can
write (the checks of ``mergeforge merge``, ``engine/output.py``), and opens the atomic
:class:`~mergeforge.checkpoint.ShardedWriter`. Every tensor but the gate rows is known at that
point, so three things run at once: a thread reads the base model for the prompt gates
(``gates.load_gate_model``), worker threads stream the expert, attention and embedding tensors
one at a time (torch's kernels and ``pwrite`` release the GIL), and the calling thread builds
the output's ``config.json`` (importing ``transformers``: a config it refuses stops the build)
and computes the gates (the only step that runs a model: ``gates.py``), then writes the
remaining tensors too, then the gate rows. Memory: one layer's expert MLPs per writing thread,
plus the base model until the gates are computed. Nothing appears at ``out`` until the folder
is complete; a failure on any thread stops the others after the tensor in hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
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
from mergeforge.errors import ValidationError
from mergeforge.moe.config import MoEConfig, load_moe_config
from mergeforge.moe.gates import compute_gates, degenerate_layers, load_gate_model, unit
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
GATE_KINDS = ("gate", "shared_gate")
"""The jobs made from the gates (``layout.Job.kind``); every other tensor is known before."""
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
    out_config: dict[str, Any] | None
    """The output's ``config.json`` (``None`` until :meth:`make_out_config` when deferred)."""
    dims: tuple[int, int, int]
    """(layers, hidden, intermediate)."""
    dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)
    base_config: dict[str, Any] = field(default_factory=dict)
    sidecars: dict = field(default_factory=dict)  # none: read by engine/output.input_paths

    @property
    def total_bytes(self) -> int:
        return sum(torch.Size(j.shape).numel() * j.dtype.itemsize for j in self.jobs)

    def make_out_config(self) -> dict[str, Any]:
        """The output's ``config.json`` from the base's, in ``transformers``' MoE config class
        (importing ``transformers``: ~0.9 CPU s, which :func:`build_moe` overlaps with writing
        the tensors)."""
        if self.out_config is None:
            c = self.config
            self.out_config = output_config(
                self.layout, self.base_config, n_experts=len(c.experts),
                n_shared=len(c.shared_experts), experts_per_token=c.experts_per_token,
                dtype=self.dtype,
            )  # fmt: skip
        return self.out_config

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
    config: str | Path | Mapping[str, Any] | MoEConfig,
    *,
    allow_same_experts: bool = False,
    defer_config: bool = False,
) -> MoEPlan:
    """Parse, open (headers only) and validate: everything that can fail before heavy work.
    Close the returned plan (``plan.close()``). ``defer_config``: leave the output's
    ``config.json`` (``plan.out_config``) to :meth:`MoEPlan.make_out_config`."""
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
        # the output config's tie_word_embeddings (MixtralConfig / Qwen2MoeConfig default: False;
        # checked against the config.json written, see _check_tied)
        tied = bool(base_cfg.get("tie_word_embeddings", False))
        heads = base_cfg.get("num_attention_heads", 1)
        head_dim = base_cfg.get("head_dim") or dims[1] // heads
        base = {k: (cks[0].info(k).shape, cks[0].info(k).dtype) for k in cks[0].keys()}
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
        plan = MoEPlan(cfg, layout, models, cks, roles, jobs, None, dims, dtype, warnings,
                       base_config=base_cfg)  # fmt: skip
        if not defer_config:
            plan.make_out_config()
        return plan
    except BaseException:
        for ck in cks:
            ck.close()
        raise


def _noise(shape, seed: int, role: int, name: str) -> torch.Tensor:
    """N(0, 1) for one expert tensor, from its own generator (seed, expert, tensor name)."""
    key = hashlib.sha256(f"{seed}/{role}/{name}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(key[:8])))


class _Producer:
    """Makes each output tensor from the inputs and the gates (``Job.kind``, ``layout.py``).

    A tensor that needs a conversion (or is assembled from several) is made in a buffer of its
    shape and dtype that belongs to the calling thread and is reused by that thread's next
    call of that shape: write it before asking the same thread for the next tensor. Converting
    straight into the (reused) output saves the separate per-expert casts, the
    ``cat`` / ``stack`` copies and the page faults of fresh allocations (one layer's fused
    experts: 46 MB in bfloat16 on the 271M-parameter benchmark models)."""

    def __init__(self, plan: MoEPlan, gates: torch.Tensor | None = None):
        self.plan, self.gates = plan, gates
        self.experts = (*plan.config.experts, *plan.config.shared_experts)
        self._local = threading.local()

    def _buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = {}
        key = (tuple(shape), dtype)
        if key not in bufs:
            bufs[key] = torch.empty(key[0], dtype=dtype)
        return bufs[key]

    def _into(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the output dtype: itself when it already is, else cast into a buffer (the
        same rounding as ``t.to(dtype)``)."""
        if t.dtype == self.plan.dtype:
            return t
        return self._buffer(t.shape, self.plan.dtype).copy_(t)

    def raw(self, role: int, layer: int, proj: str) -> torch.Tensor:
        """An expert's dense MLP weight, with mergekit's noise / residual scale, in its own
        dtype (a read-only view of the input when neither applies)."""
        name, e = mlp_name(layer, proj), self.experts[role]
        t = self.plan.checkpoints[self.plan.roles[role]].get(name)
        if e.noise_scale is not None:
            t = t + (_noise(t.shape, self.plan.config.seed, role, name) * e.noise_scale).to(t.dtype)
        if proj == "down_proj" and e.residual_scale is not None:
            t = t * e.residual_scale
        return t

    def mlp(self, role: int, layer: int, proj: str) -> torch.Tensor:
        """:meth:`raw` cast to the output dtype (a fresh tensor)."""
        return self.raw(role, layer, proj).to(self.plan.dtype)

    def __call__(self, j: Job) -> torch.Tensor:
        dt, g = self.plan.dtype, self.gates
        if j.kind == "copy":
            return self._into(self.plan.checkpoints[0].get(j.src))
        if j.kind == "zeros":
            return torch.zeros(j.shape, dtype=dt)
        if j.kind in ("gate", "shared_gate"):
            assert g is not None, "the gates are computed before their tensors are made"
            if j.kind == "gate":
                return g[j.layer, list(j.rows)].to(dt)
            return g[j.layer, list(j.rows)].mean(dim=0, keepdim=True).to(dt)
        if j.kind == "expert":
            return self._into(self.raw(j.rows[0], j.layer, j.proj))
        n = len(self.plan.config.experts)
        if j.kind == "fused_gate_up":  # expert e: its gate_proj rows, then its up_proj rows
            out = self._buffer(j.shape, dt)
            inter = j.shape[1] // 2
            for e in range(n):
                out[e, :inter].copy_(self.raw(e, j.layer, "gate_proj"))
                out[e, inter:].copy_(self.raw(e, j.layer, "up_proj"))
            return out
        if j.kind == "fused_down":
            out = self._buffer(j.shape, dt)
            for e in range(n):
                out[e].copy_(self.raw(e, j.layer, "down_proj"))
            return out
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

    config_json = json.dumps(plan.make_out_config(), indent=2, sort_keys=True) + "\n"
    writer.write_text("config.json", config_json)
    folder = plan.checkpoints[0].folder
    for name in CARRIED_FILES if folder is not None else ():
        if name == "config.json" or (not copy_tokenizer and name in TOKENIZER_FILES):
            continue
        if (Path(folder) / name).is_file():
            writer.copy_file(Path(folder) / name, name)
    writer.write_text("mergeforge_config.yml", plan.config.text)
    writer.write_text("mergeforge_resolved.yml", _resolved(plan, gates, degenerate))
    writer.write_text("README.md", _card(plan))


def _check_tied(plan: MoEPlan) -> None:
    """The output's tensors were planned with ``tie_word_embeddings`` read from the base's
    config.json (default False, as transformers v5's MoE config classes); refuse an output
    whose config.json says otherwise (a transformers with another default) rather than write
    a head that does not match it."""
    tied = bool(plan.base_config.get("tie_word_embeddings", False))
    if bool(plan.make_out_config().get("tie_word_embeddings")) != tied:
        raise ValidationError(
            f"base_model: tie_word_embeddings is not set in {plan.checkpoints[0].folder}/"
            f"config.json and the installed transformers' {plan.layout.architecture} config "
            "defaults it to true; set tie_word_embeddings in the base's config.json"
        )


class _Writers:
    """Make and write ``jobs`` in order, each thread holding one tensor at a time: ``workers``
    threads start at once (torch's kernels and ``pwrite`` release the GIL, so they run beside
    the caller's gate computation); the caller joins in with :meth:`help` once it is done.
    After a failure or :meth:`stop` every thread finishes the tensor in hand and returns."""

    def __init__(self, make: _Producer, jobs: list[Job], writer: ShardedWriter, workers: int):
        self._make, self._writer = make, writer
        self._pending = iter(jobs)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeforge-moe")
        try:
            self._futures = [pool.submit(self._drain) for _ in range(workers)]
        finally:
            pool.shutdown(wait=False)

    def _drain(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                j = next(self._pending, None)
            if j is None:
                return
            try:
                self._writer.write(j.name, self._make(j).contiguous())
            except BaseException:
                self._stop.set()
                raise

    def help(self) -> None:
        """Write the remaining tensors on this thread too, then wait for the workers;
        re-raise the first failure."""
        self._drain()
        wait(self._futures)
        for f in self._futures:
            f.result()

    def stop(self) -> None:
        """Stop after the tensors in hand (nothing is left half-written: the writer is
        aborted by the caller)."""
        self._stop.set()
        wait(self._futures)


class _Background(threading.Thread):
    """``fn(*args)`` on a thread of its own; :meth:`take` waits for its value (handed over,
    not kept) or raises its exception."""

    def __init__(self, fn, *args):
        super().__init__(name="mergeforge-moe-gates", daemon=True)
        self._call = (fn, args)
        self._value: Any = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        fn, args = self._call
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to the caller by take()
            self._error = e

    def take(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        value, self._value = self._value, None
        return value


def _default_workers() -> int:
    """Writer threads beside the gate computation: one per core that the calling thread
    leaves free, at most 2 (one on 1 or 2 cores)."""
    return max(1, min(2, (os.cpu_count() or 1) - 1))


def build_moe(
    config: str | Path | Mapping[str, Any] | MoEConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    allow_same_experts: bool = False,
    copy_tokenizer: bool = True,
    device: str | torch.device | None = None,
    durable: bool = False,
    workers: int | None = None,
) -> MoEResult:
    """Build the MoE the mergekit-moe YAML ``config`` describes into the folder ``out``,
    atomically. ``overwrite`` replaces a previous mergeforge output only (as ``merge``);
    ``device``: where the base model runs the prompts (cpu by default); ``durable``: fsync
    before the output appears; ``workers``: threads writing the expert, attention and
    embedding tensors while this thread computes the gates and the output's config.json
    (then this thread writes too; default: one per other core, at most 2). Returns what was
    written, the gates and the warnings (also logged to the ``mergeforge`` logger)."""
    t0 = time.perf_counter()
    out = Path(out)
    dev = resolve_device(device)  # "auto", or a bad name as a ConfigError, before any reading
    check_output_location(out)
    plan = prepare_moe(config, allow_same_experts=allow_same_experts, defer_config=True)
    try:
        check_not_an_input(out, plan)
        check_replaceable(out, overwrite=overwrite)
        probe_writable(out)
        for w in plan.warnings:
            log.warning(w)
        layers, hidden, _ = plan.dims
        make = _Producer(plan)
        gated = [j for j in plan.jobs if j.kind in GATE_KINDS]
        specs = [(j.name, j.shape, j.dtype) for j in plan.jobs]
        meta = {"format": "pt", "mergeforge_moe": plan.layout.model_type}
        with ShardedWriter(out, specs, max_shard_bytes=plan.config.out_shard_size, metadata=meta,
                           overwrite=overwrite, durable=durable,
                           replaceable=is_previous_output) as writer:  # fmt: skip
            # the base model for the prompt gates is read and converted on a thread of its own,
            # every tensor but the gate rows (known now) is written by the worker threads, while
            # this thread imports transformers (config.json, the tokenizer), then runs the
            # prompts, then writes tensors too
            loader = _Background(load_gate_model, plan.config, plan.checkpoints[0], dev)
            writers = _Writers(make, [j for j in plan.jobs if j.kind not in GATE_KINDS], writer,
                               workers or _default_workers())  # fmt: skip
            try:
                _check_tied(plan)  # first: a config transformers refuses stops the build early
                gates = compute_gates(plan.config, plan.checkpoints[0], layers=layers,
                                      hidden=hidden, device=dev, model=loader.take())  # fmt: skip
                writers.help()
            except BaseException:
                writers.stop()
                loader.join()
                raise
            degenerate = degenerate_layers(gates, gate_mode=plan.config.gate_mode)
            if degenerate:
                plan.warnings.append(f"layer(s) {degenerate} have near-degenerate gates "
                                     "(condition number > 5): the prompts are too alike, some "
                                     "experts will be used little")  # fmt: skip
                log.warning(plan.warnings[-1])
            make.gates = gates
            for j in gated:
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
