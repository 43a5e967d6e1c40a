"""The streaming merge engine: one engine, two sources and two sinks.

Data flow: ``config`` -> open checkpoints (headers only; files, or state dicts in memory) ->
:func:`build_plan` (validate everything, one job per output tensor, a complete plan) ->
optional statistics passes -> stream jobs through the method, one tensor at a time -> a sink:
the atomic sharded writer (:func:`run_merge`, ``mergeforge merge``) or a
:class:`~mergeforge.checkpoint.memory.MemorySink` (:func:`merge_state_dicts`). See ``plan.py``
and ``execute.py``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergeforge.checkpoint._staging import probe_writable
from mergeforge.config import MergeConfig, load_config, yaml_field_map
from mergeforge.device import resolve_device
from mergeforge.engine.execute import Loader, Progress, run_jobs, run_statistics
from mergeforge.engine.output import (
    check_not_among,
    check_not_an_input,
    check_output_location,
    check_replaceable,
    checkpoint_paths,
    is_previous_output,
)
from mergeforge.engine.plan import MergePlan, build_plan, output_config
from mergeforge.errors import CheckpointError

log = logging.getLogger("mergeforge")

__all__ = [
    "run_merge", "merge_state_dicts", "prepare", "MergeResult", "build_plan", "MergePlan",
    "vocabulary_report",
    # engine/output.py's checks, for other producers of model folders (fusion): where an output
    # may go, never over an input, --overwrite replacing only that producer's earlier output
    "check_output_location", "check_not_among", "check_replaceable", "checkpoint_paths",
    "is_previous_output", "probe_writable",
    # engine/multi.py: multi-stage recipes (mergekit-multi's YAML)
    "run_multimerge", "load_recipe", "is_recipe", "Recipe",
]  # fmt: skip


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


def _resolve_path(cfg: MergeConfig, spec: str) -> str:
    """A model reference of the config as local paths that ``open_checkpoint`` opens: relative
    paths as given (current folder), else against the YAML's folder (each side of a
    ``BASE+ADAPTER`` spec on its own); Hugging Face ids ``org/name[@rev]`` that are no local
    path become their snapshot folder in the local Hugging Face cache (see
    ``checkpoint.loader.locate``). The config and the model card keep the spec as written."""
    from mergeforge.checkpoint.loader import resolve_model_spec

    return resolve_model_spec(spec, cfg.root)


def prepare(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    *,
    models: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
) -> MergePlan:
    """Parse, open (headers only) and validate: everything that can fail before heavy work.
    Returns the complete plan (close it with ``plan.close()``); ``models`` and ``stats``: the
    in-memory models and statistics, as for :func:`merge_state_dicts` (a model given as an
    opened ``Checkpoint`` is used as it is, and closed with the plan)."""
    from mergeforge.checkpoint import Checkpoint, open_checkpoint
    from mergeforge.checkpoint.memory import memory_checkpoint

    cfg = load_config(config)
    names = cfg.referenced_models()
    given = dict(models or {})  # may hold more models than the config names (a pool)
    cks = []
    try:
        for m in names:
            if m in given:
                ck = given[m]
                cks.append(ck if isinstance(ck, Checkpoint) else memory_checkpoint(m, ck))
                continue
            try:
                cks.append(open_checkpoint(_resolve_path(cfg, m)))
            except CheckpointError as e:
                if not given:
                    raise
                raise CheckpointError(
                    f"{e} (It is not one of the models given in memory either: "
                    f"{', '.join(map(repr, given))}.)"
                ) from None
        return build_plan(cfg, names, cks, stats=stats)  # closes its sidecars if it fails
    except BaseException:
        for ck in cks:
            ck.close()
        raise


def vocabulary_report(config: str | Path | Mapping[str, Any] | MergeConfig) -> list[str]:
    """How the inputs' vocabularies differ (``mergeforge validate``'s table, see
    ``engine/vocab.py``'s ``report``): reads config.json and tokenizer files only (checkpoints
    opened for their headers). Empty when no input has a tokenizer."""
    from mergeforge.checkpoint import open_checkpoint
    from mergeforge.engine.vocab import report

    cfg = load_config(config)
    names = cfg.referenced_models()
    cks = []
    try:
        for m in names:
            cks.append(open_checkpoint(_resolve_path(cfg, m)))
        return report(cfg, names, cks)
    finally:
        for ck in cks:
            ck.close()


_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})  # fmt: skip
"""The carried files left out by ``copy_tokenizer=False`` (mergekit's ``--no-copy-tokenizer``)."""


def _copy_carried_files(plan: MergePlan, writer, copy_tokenizer: bool = True) -> None:
    """config.json (see ``output_config``) and the reference model's carried files; without
    ``copy_tokenizer`` the tokenizer files are left out, unless the config asks for
    ``tokenizer_source`` (as mergekit, which then writes a tokenizer whatever the flag)."""
    from mergeforge.checkpoint import CARRIED_FILES

    vocab = plan.vocab  # a tokenizer option or chat_template: the tokenizer is written anew
    cfg = plan.config
    copy_tokenizer = copy_tokenizer or cfg.tokenizer_source is not None or cfg.tokenizer is not None
    written = vocab is not None and vocab.tokenizer is not None and copy_tokenizer
    if vocab is not None and vocab.tokenizer is not None and not copy_tokenizer:
        log.warning("chat_template is not written: the tokenizer is not copied (copy_tokenizer "
                    "off, mergekit's --no-copy-tokenizer)")  # fmt: skip
    if written:
        vocab.save(writer.copy_file)

    ref = plan.checkpoints[plan.reference]
    cfg_json = output_config(plan)
    if cfg_json is not None:
        writer.write_text("config.json", json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    if ref.folder is None:
        return
    folder = Path(ref.folder)
    for name in CARRIED_FILES:
        skip_tokenizer = written or not copy_tokenizer
        if name == "config.json" or (skip_tokenizer and name in _TOKENIZER_FILES):
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
    from mergeforge.version import __version__

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
    """A parameters dataclass as YAML names its fields."""
    return {name: getattr(obj, f) for name, f in yaml_field_map(type(obj)).items()}


def _warm_up(plan: MergePlan, dev: torch.device) -> None:
    """The method's optional start-up hook, once per merge (e.g. load a kernel in the
    background); called with the parameters and inputs of the first merged tensor."""
    job = next((j for j in plan.jobs if j.call is not None), None)
    if job is not None and job.call.method.warm_up is not None:
        job.call.method.warm_up(job.call.params, len(job.inputs), plan.compute_dtype, dev)


def _run_plan(
    plan: MergePlan,
    dev: torch.device,
    open_sink: Callable[[], Any],
    *,
    workers: int | None,
    progress: bool | None,
    finish: Callable[[Any], None] | None = None,
) -> None:
    """Run a complete plan into a sink: log its warnings, warm the method up, run its
    statistics passes, then every job into the sink ``open_sink()`` makes (a context manager
    with ``write(name, tensor)``: the files' ``ShardedWriter`` or a ``MemorySink``), then
    ``finish(sink)`` inside it. The sink is opened only after the statistics passes; the plan
    stays open (the caller closes it)."""
    for w in plan.warnings:
        log.warning(w)
    _warm_up(plan, dev)
    loader = Loader(plan, dev)
    bar = Progress(plan.total_bytes, len(plan.jobs), progress) if progress is not False else None
    say = bar.message if bar is not None else (lambda _m: None)
    try:
        fitted = run_statistics(plan, loader, say)
        with open_sink() as sink:
            run_jobs(plan, loader, fitted, dev, sink, workers or default_workers(),
                     bar.advance if bar is not None else (lambda _j: None))  # fmt: skip
            if finish is not None:
                finish(sink)
    finally:
        if bar is not None:
            bar.close()


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
    models: Mapping[str, Any] | None = None,
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
    ``models``: models held in memory, as for :func:`merge_state_dicts`.
    A multi-stage recipe (a YAML of several documents, mergekit-multi's format) is run by
    :func:`run_multimerge` with these options.
    """
    from mergeforge.checkpoint import ShardedWriter

    if models is None and is_recipe(config):
        return run_multimerge(
            config, out, device=device, overwrite=overwrite, progress=progress,
            shard_size=shard_size, workers=workers, durable=durable,
            copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
        )  # fmt: skip
    t0 = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    # inputs are never written and only our own outputs replaced: engine/output.py
    check_output_location(out)
    plan = prepare(config, models=models)
    try:
        check_not_an_input(out, plan)
        check_replaceable(out, overwrite=overwrite)
        probe_writable(out)
        specs = [(j.out_name, j.shape, j.out_dtype) for j in plan.jobs]
        meta = {"format": "pt", "mergeforge_method": plan.method.name}

        def open_writer() -> ShardedWriter:
            return ShardedWriter(
                out, specs, max_shard_bytes=shard_size or plan.config.out_shard_size,
                metadata=meta, overwrite=overwrite, durable=durable,
                replaceable=is_previous_output,
            )  # fmt: skip

        def finish(writer: ShardedWriter) -> None:
            _copy_carried_files(plan, writer, copy_tokenizer)
            seconds = time.perf_counter() - t0
            writer.write_text("mergeforge_config.yml", plan.config.to_yaml())
            writer.write_text("mergeforge_resolved.yml", _resolved(plan))
            if write_model_card:
                writer.write_text("README.md", _model_card(plan, seconds))
            writer.commit()

        _run_plan(plan, dev, open_writer, workers=workers, progress=progress, finish=finish)
    finally:
        plan.close()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MergeResult(
        out=out, method=plan.method.name, tensors=len(plan.jobs), bytes_written=plan.total_bytes,
        seconds=seconds, peak_rss_bytes=peak, warnings=tuple(plan.warnings),
    )  # fmt: skip


def merge_state_dicts(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    models: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge models held in memory as ``config`` says and return the merged state dict.

    The engine of :func:`run_merge` (``mergeforge merge``): the same planner, statistics
    passes, executor and methods, with state dicts as the source and a
    :class:`~mergeforge.checkpoint.memory.MemorySink` as the sink, so for the same tensors and
    config the result is bit-identical to the safetensors ``mergeforge merge`` writes.

    ``config``: as for :func:`run_merge` (a YAML path or string, a mapping, a ``MergeConfig``).
    Each model it names (``base_model``, ``models[].model``, slice sources) is looked up first
    in ``models``, else opened as a path or Hugging Face id (lazily, as on disk), so in-memory
    and stored models mix; models it does not name are not read (one pool, many configs).
    E.g. ``{"merge_method": "ties", "base_model": "base", "models": [{"model": "math",
    "parameters": {"density": 0.5}}]}`` with ``{"base": sd0, "math": sd1}``.

    ``models``: name -> state dict (tensor name -> ``torch.Tensor``, on any device). Any
    ``Mapping`` will do: a lazy one loads a tensor when it is looked up, once while planning
    (for its shape and dtype) and once when it is merged, from the worker threads (``workers=1``
    for a mapping that is not thread-safe). Inputs are never modified.

    ``stats``: per-model statistics of data-using methods (RegMean, Fisher), ``{name: {kind:
    {tensor name: statistic}}}`` with ``kind`` and tensors as ``mergeforge stats`` stores them
    (``regmean``: input Grams; ``fisher-empirical`` / ``fisher-sampled``: diagonal Fisher;
    keyed by the model's tensor names). Giving a
    :class:`~mergeforge.checkpoint.memory.MemorySource` instead of the mapping also gives the
    metadata a sidecar carries (Fisher's normalization reads ``fisher_norm``). A model
    without statistics here reads its sidecar, as on disk; a model given in memory
    must have them here. They are used as given (no staleness check: there is no file).

    ``device``: where tensors are merged (default cpu). ``workers``: tensors merged at once
    (default 2). ``progress``: a progress bar / log lines (default silent).

    Returns a new dict in the output's tensor order (the reference model's), each tensor on the
    CPU in its output dtype (the inputs', or the config's ``out_dtype`` / ``dtype``) and in
    memory of its own (never a view of an input). Stochastic methods are seeded as on disk: per
    tensor from the config's ``seed``, each model's random stream named by a fingerprint of its
    weights (not by its name). The config's output settings (``out_shard_size``, tokenizer
    files) do not apply; warnings go to the ``mergeforge`` logger.
    """
    from mergeforge.checkpoint.memory import MemorySink

    dev = resolve_device(device)
    plan = prepare(config, models=models, stats=stats)
    try:
        sink = MemorySink((j.out_name, j.shape, j.out_dtype) for j in plan.jobs)
        _run_plan(plan, dev, lambda: sink, workers=workers, progress=progress)
        return sink.result()
    finally:
        plan.close()


from mergeforge.engine.multi import Recipe, is_recipe, load_recipe, run_multimerge  # noqa: E402
