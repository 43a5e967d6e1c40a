"""The streaming merge engine.

Data flow: ``config`` -> open checkpoints (headers only) -> :func:`build_plan` (validate
everything, one job per output tensor) -> optional statistics passes -> stream jobs through
the method, one tensor at a time -> atomic sharded writer. See ``plan.py`` and ``execute.py``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergeforge.checkpoint._staging import probe_writable
from mergeforge.config import MergeConfig, load_config
from mergeforge.engine.execute import Loader, Progress, run_jobs, run_statistics
from mergeforge.engine.output import (
    check_not_an_input,
    check_output_location,
    check_replaceable,
    is_previous_output,
)
from mergeforge.engine.plan import MergePlan, build_plan, model_fingerprint, output_config
from mergeforge.engine.side import close_side_files
from mergeforge.errors import ConfigError

log = logging.getLogger("mergeforge")

__all__ = ["run_merge", "prepare", "MergeResult", "build_plan", "MergePlan"]


@dataclass(frozen=True)
class MergeResult:
    out: Path
    method: str
    tensors: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    warnings: tuple[str, ...] = ()


def default_workers() -> int:
    return 2 if (os.cpu_count() or 1) > 1 else 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available to torch")
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"unsupported device {str(dev)!r}; use cpu or cuda")
    return dev


def _resolve_path(cfg: MergeConfig, spec: str) -> str:
    """A model reference of the config as local paths that ``open_checkpoint`` opens: relative
    paths as given (current folder), else against the YAML's folder (each side of a
    ``BASE+ADAPTER`` spec on its own); Hugging Face ids ``org/name[@rev]`` that are no local
    path become their snapshot folder in the local Hugging Face cache (see
    ``checkpoint.loader.locate``). The config and the model card keep the spec as written."""
    from mergeforge.checkpoint.loader import resolve_model_spec

    return resolve_model_spec(spec, cfg.root)


def prepare(config: str | Path | Mapping[str, Any] | MergeConfig) -> MergePlan:
    """Parse, open (headers only) and validate: everything that can fail before heavy work."""
    from mergeforge.checkpoint import open_checkpoint

    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    models = cfg.referenced_models()
    cks = []
    try:
        for m in models:
            cks.append(open_checkpoint(_resolve_path(cfg, m)))
        return build_plan(cfg, models, cks)  # closes its statistics files if it fails
    except BaseException:
        for ck in cks:
            ck.close()
        raise


_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})  # fmt: skip
"""The side files left out by ``copy_tokenizer=False`` (mergekit's ``--no-copy-tokenizer``)."""


def _side_files(plan: MergePlan, writer, copy_tokenizer: bool = True) -> None:
    """config.json (see ``output_config``) and the reference model's side files; without
    ``copy_tokenizer`` the tokenizer files are left out, unless the config asks for
    ``tokenizer_source`` (as mergekit, which then writes a tokenizer whatever the flag)."""
    from mergeforge.checkpoint import SIDE_FILES

    copy_tokenizer = copy_tokenizer or plan.config.tokenizer_source is not None

    ref = plan.checkpoints[plan.reference]
    cfg_json = output_config(plan)
    if cfg_json is not None:
        writer.write_text("config.json", json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    if ref.folder is None:
        return
    folder = Path(ref.folder)
    for name in SIDE_FILES:
        if name == "config.json" or (not copy_tokenizer and name in _TOKENIZER_FILES):
            continue
        p = folder / name
        if p.is_file():
            writer.copy_file(p, name)


def _hub_ids(spec: str, root: Path | None) -> list[str]:
    """The Hugging Face repo ids a model reference names: each ``+``-part (model, adapter) that
    reads as ``org/name[@revision]`` (``checkpoint.hub.parse_hub_ref``; the revision dropped)
    and is not a local path. Local folders are not ids: the Hub's ``base_model`` field must
    name repos that exist on the Hub."""
    from mergeforge.checkpoint.hub import parse_hub_ref

    ids = []
    for part in spec.split("+"):
        local = os.path.exists(part) or (root is not None and (root / part).exists())
        if not local and (ref := parse_hub_ref(part)) is not None:
            ids.append(ref.repo_id)
    return ids


def _card_data(plan: MergePlan):
    """The card's Hugging Face metadata (``huggingface_hub.ModelCardData``): ``library_name``,
    ``tags: [merge, mergeforge]``, and ``base_model`` = the inputs that are Hub repo ids (base
    first; local folders are listed in the card's text only), with ``base_model_relation:
    merge`` when the model is made from several inputs."""
    from huggingface_hub import ModelCardData

    bases: list[str] = []
    for spec in plan.models:
        bases += [i for i in _hub_ids(spec, plan.config.root) if i not in bases]
    data = ModelCardData(library_name="transformers", tags=["merge", "mergeforge"])
    if bases:
        data.base_model = bases[0] if len(bases) == 1 else bases
        if len(plan.models) > 1:
            data.base_model_relation = "merge"
    return data


def _model_card(plan: MergePlan, seconds: float) -> str:
    """The output's ``README.md``: Hugging Face metadata front matter (see :func:`_card_data`;
    loads with ``huggingface_hub.ModelCard``), then what was merged, how, and the config."""
    from mergeforge import __version__

    m = plan.method
    lines = [
        "---",
        _card_data(plan).to_yaml().rstrip(),
        "---",
        "# Merged model",
        "",
        f"Made with mergeforge {__version__} using **{m.name}** ({m.reference}).",
        "",
        f"- base model: `{plan.config.base_model}`" if plan.config.base_model else "- no base",
        "- inputs:",
        *[f"  - `{x}`" for x in plan.models],
        f"- tensors: {len(plan.jobs)}, {plan.total_bytes / 1e9:.3f} GB; merge time {seconds:.1f} s",
        "",
        "## Configuration",
        "",
        "```yaml",
        plan.config.to_yaml().rstrip(),
        "```",
        "",
        "The fully resolved parameters are in `mergeforge_resolved.yml`.",
    ]
    return "\n".join(lines) + "\n"


def _resolved(plan: MergePlan) -> str:
    """The method's parameters with every default filled in (for the first merged tensor of
    each distinct setting), so the output folder says exactly what was run."""
    seen, rows = set(), []
    for j in plan.jobs:
        if j.call is None:
            continue
        key = (repr(j.call.params), repr(j.call.model_params))
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "first_tensor": j.out_name,
                "parameters": _asdict(j.call.params),
                "model_parameters": {
                    plan.models[r.model]: _asdict(p)
                    for r, p in zip(j.inputs, j.call.model_params, strict=True)
                },
            }
        )
    doc = {
        "merge_method": plan.method.name,
        "models": plan.models,
        "base_model": plan.config.base_model,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
        "seed": plan.config.seed,
        "settings": rows[:50],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _asdict(obj) -> dict:
    import dataclasses

    return {f.name.rstrip("_"): getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _warm_up(plan: MergePlan, dev: torch.device) -> None:
    """The method's optional start-up hook, once per merge (e.g. load a kernel in the
    background); called with the parameters and inputs of the first merged tensor."""
    job = next((j for j in plan.jobs if j.call is not None), None)
    if job is not None and job.call.method.warm_up is not None:
        job.call.method.warm_up(job.call.params, len(job.inputs), plan.compute_dtype, dev)


def run_merge(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    out: str | Path,
    *,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    durable: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
) -> MergeResult:
    """Merge as the config says and write a Hugging Face-loadable folder at ``out``, atomically.

    ``out`` may not be, contain or lie inside any input (ConfigError), and must be writable
    (CheckpointError), both checked before any tensor is read. ``overwrite``: replace a
    previous mergeforge output at ``out`` once the new one is complete; any other non-empty
    folder is refused. See ``engine/output.py``.
    ``progress``: ``None`` = a bar on a terminal, log lines otherwise; ``False`` = silent.
    ``workers``: tensors merged concurrently (default: 2, or 1 on a single core).
    ``durable``: fsync the shards before the final rename (survives power loss; slower by the
    disk write-back). Without it the output is still atomic against crashes and kills.
    ``copy_tokenizer=False``: leave the tokenizer files out (mergekit's --no-copy-tokenizer).
    ``write_model_card=False``: no README.md (mergekit's --no-write-model-card); the config
    files mergeforge_config.yml and mergeforge_resolved.yml are still written.
    """
    from mergeforge.checkpoint import ShardedWriter

    t0 = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    # inputs are never written and only our own outputs replaced: engine/output.py
    check_output_location(out)
    plan = prepare(config)
    try:
        check_not_an_input(out, plan)
        check_replaceable(out, overwrite=overwrite)
        probe_writable(out)
    except BaseException:
        for ck in plan.checkpoints:
            ck.close()
        close_side_files(plan)
        raise
    for w in plan.warnings:
        log.warning(w)
    _warm_up(plan, dev)
    if any(j.call is not None and j.call.method.stochastic for j in plan.jobs):
        # only the models that are merged inputs draw random numbers (not a base-only model)
        inputs = {r.model for j in plan.jobs for r in j.inputs}
        plan.stream_names = tuple(
            model_fingerprint(ck) if i in inputs else "" for i, ck in enumerate(plan.checkpoints)
        )
    specs = [(j.out_name, j.shape, j.out_dtype) for j in plan.jobs]
    meta = {"format": "pt", "mergeforge_method": plan.method.name}
    loader = Loader(plan, dev)
    bar = Progress(plan.total_bytes, len(plan.jobs), progress) if progress is not False else None
    say = bar.message if bar is not None else (lambda _m: None)
    try:
        stat_plan = run_statistics(plan, loader, say)
        with ShardedWriter(
            out, specs, max_shard_bytes=shard_size or plan.config.out_shard_size,
            metadata=meta, overwrite=overwrite, durable=durable,
            replaceable=is_previous_output,
        ) as writer:  # fmt: skip
            run_jobs(plan, loader, stat_plan, dev, writer, workers or default_workers(),
                     bar.advance if bar is not None else (lambda _j: None))  # fmt: skip
            _side_files(plan, writer, copy_tokenizer)
            seconds = time.perf_counter() - t0
            writer.write_text("mergeforge_config.yml", plan.config.to_yaml())
            writer.write_text("mergeforge_resolved.yml", _resolved(plan))
            if write_model_card:
                writer.write_text("README.md", _model_card(plan, seconds))
            writer.commit()
    finally:
        if bar is not None:
            bar.close()
        for ck in plan.checkpoints:
            ck.close()
        close_side_files(plan)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MergeResult(
        out=out, method=plan.method.name, tensors=len(plan.jobs), bytes_written=plan.total_bytes,
        seconds=seconds, peak_rss_bytes=peak, warnings=tuple(plan.warnings),
    )  # fmt: skip
