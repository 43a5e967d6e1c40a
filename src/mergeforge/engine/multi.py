"""Multi-stage recipes: mergekit-multi's YAML, several named merges where a later one uses an
earlier one's result as a model.

The format (mergekit 0.1.5, ``mergekit-multi``): YAML documents separated by ``---``, each a
merge config plus ``name:``. A model reference whose path is a stage's name (``gradient-slerp``,
also ``NAME@REV`` and ``NAME+ADAPTER``) is that stage's output; the stage name wins over a local
folder or Hub id of the same name, as in mergekit. At most one document may be unnamed: it is
the final merge. Without one, the final merge is the one stage no other stage uses.

:func:`run_multimerge` runs a recipe in dependency order:

* everything is checked before any stage runs: each document as a merge config, the stage
  graph (duplicate names, two unnamed documents, cycles named stage by stage), the output
  locations, and a full plan of every stage (models opened, headers only; a stage's output is
  stood in for by the tensors, shapes and config its plan will produce and the tokenizer files
  it will carry, written to a temporary planning folder), so a missing model, a shape
  mismatch, a bad layer range or tokenizers that disagree in the last stage fail before the
  first tensor is read, naming the stage; then every output of the run (the final merge, each
  stage kept with ``-I DIR``) against every path any stage reads (:func:`plan_multimerge` is
  this part alone, for ``mergeforge validate``);
* intermediates are kept in memory when they fit (half of the memory available when the stage
  starts; ``intermediates="memory"|"disk"`` forces a choice), else written to a temporary folder
  beside the output (``.<OUT>.mergeforge-stages-<pid>``), removed when the run ends however it
  ends (a SIGKILLed run's folder is removed by the next run to the same output);
* the final merge is written by :func:`~mergeforge.engine.run_merge`: the same atomic writer,
  config, model card, carried files and signal handling as a single merge, so an error or a stop
  signal at any stage leaves nothing at the output. Its ``mergeforge_config.yml`` is the whole
  recipe (re-running it gives the same model).

With ``intermediate_dir`` (mergekit-multi's ``--intermediate-dir``) every named stage is
written to ``DIR/NAME`` and kept, reused when it is already there (``lazy``, mergekit's
``--lazy``, the default), and only the unnamed document is written to ``out``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergeforge._signals import deferred
from mergeforge.checkpoint import Checkpoint
from mergeforge.checkpoint.base import TensorInfo
from mergeforge.config import MergeConfig, load_config
from mergeforge.errors import CheckpointError, ConfigError, ValidationError

log = logging.getLogger("mergeforge")

DOCS = "the README, 'Multi-stage recipes'"

MODEL_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)  # fmt: skip
"""A folder with ``config.json`` and one of these holds a model (mergekit-multi's ``--lazy``
test for a stage already merged)."""

INTERMEDIATES = ("auto", "memory", "disk")


# ----------------------------------------------------------------------------------------------
# the recipe


@dataclass(frozen=True)
class Stage:
    """One document of a recipe: its merge config, and the stages its models name."""

    name: str | None
    """``None``: the unnamed document (the final merge)."""
    number: int
    """1-based document number, for messages."""
    config: MergeConfig
    uses: tuple[str, ...]
    """Names of the stages it reads, each once, in order of appearance."""

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name is not None else (
            f"the unnamed final merge (document {self.number})"
        )  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A parsed, checked multi-stage recipe (:func:`load_recipe`)."""

    stages: tuple[Stage, ...]
    text: str
    """The recipe as given."""
    root: Path | None
    where: str
    warnings: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages if s.name is not None]

    def stage(self, name: str | None) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def sinks(self) -> list[Stage]:
        """The named stages no other stage uses."""
        used = {u for s in self.stages for u in s.uses}
        return [s for s in self.stages if s.name is not None and s.name not in used]

    def final(self) -> Stage | None:
        """The unnamed document, else the one stage no other uses (``None``: several)."""
        unnamed = [s for s in self.stages if s.name is None]
        if unnamed:
            return unnamed[0]
        sinks = self.sinks()
        return sinks[0] if len(sinks) == 1 else None

    def plan(self, *, seed: int | None = None, report: bool = False) -> list[StagePlan]:
        """Every stage planned, none merged (:func:`plan_multimerge`)."""
        return plan_multimerge(self, seed=seed, report=report)[1]

    def order(self, targets: list[Stage]) -> list[Stage]:
        """``targets`` and every stage they use, each after the stages it uses."""
        done: list[Stage] = []

        def visit(s: Stage) -> None:
            if s in done:
                return
            for u in s.uses:
                visit(self.stage(u))
            done.append(s)

        for t in targets:
            visit(t)
        return done


def stage_ref(spec: str, names: list[str] | set[str]) -> tuple[str, str | None, str | None] | None:
    """``(stage, revision, adapter)`` when model reference ``spec`` names a stage (``NAME``,
    ``NAME@REV``, ``NAME+ADAPTER``: mergekit compares the path part of a reference with the
    stage names), else ``None``."""
    if spec in names:
        return spec, None, None
    head, _, adapter = spec.partition("+")
    path, _, rev = head.partition("@")
    if path in names:
        return path, rev or None, adapter or None
    return None


def _documents(text: str, where: str) -> list[tuple[Any, str]]:
    """Each non-empty YAML document of ``text`` with its own text."""
    loader = yaml.SafeLoader(text)
    out: list[tuple[Any, str]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            out.append((loader.construct_document(node),
                        text[node.start_mark.index : node.end_mark.index]))  # fmt: skip
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return out


def _read(source: str | os.PathLike[str]) -> tuple[str, Path | None, str]:
    """(text, folder, name for errors) of a recipe path or YAML string."""
    if isinstance(source, str) and "\n" in source:
        return source, None, "recipe"
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return p.read_text(encoding="utf-8"), p.resolve().parent, str(p)


def is_recipe(source: Any) -> bool:
    """Whether ``source`` (a YAML path or string) holds several merge documents, i.e. is a
    multi-stage recipe; ``False`` for anything else (a mapping, a ``MergeConfig``, a file that
    cannot be read or parsed: :func:`~mergeforge.config.load_config` then says why)."""
    if not isinstance(source, str | os.PathLike) or isinstance(source, MergeConfig):
        return False
    try:
        text, _, where = _read(source)
        return len(_documents(text, where)) > 1
    except (ConfigError, OSError, ValueError):
        return False


def _cycle(stages: dict[str | None, Stage]) -> list[str] | None:
    """A dependency cycle as the list of its stage names (first repeated at the end)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for u in stages[name].uses:
            if state.get(u) == 1:
                return [*path[path.index(u) :], u]
            if u not in state and (found := visit(u)) is not None:
                return found
        path.pop()
        state[name] = 2
        return None

    for s in stages.values():
        for u in s.uses:  # the unnamed stage is never used; start from what it uses too
            if u not in state and (found := visit(u)) is not None:
                return found
    return None


def load_recipe(source: str | os.PathLike[str]) -> Recipe:
    """Parse and check a multi-stage recipe (a YAML path or string): every document as a merge
    config (:func:`~mergeforge.config.load_config`), ``name:`` of each, the stage graph. Raises
    :class:`~mergeforge.errors.ConfigError` naming the document, stage and fix."""
    text, root, where = _read(source)
    docs = _documents(text, where)
    if len(docs) < 2:
        raise ConfigError(
            f"{where}: a multi-stage recipe has several YAML documents separated by '---'; this "
            "one has " + ("one (run it with `mergeforge merge`)" if docs else "none")
        )
    parsed: list[tuple[str | None, int, Mapping, str]] = []
    seen: dict[str | None, int] = {}
    for n, (data, doc_text) in enumerate(docs, start=1):
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where}, document {n}: expected a YAML mapping with 'merge_method:' (and "
                "'name:'), got " + type(data).__name__
            )
        data = dict(data)
        name = data.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"{where}, document {n}: name: expected a non-empty string, got "
                              f"{name!r}")  # fmt: skip
        if name is not None and (os.path.isabs(name) or ".." in Path(name).parts):
            raise ConfigError(
                f"{where}, document {n}: name {name!r} must be a relative name without '..' "
                "(it becomes a folder name under --intermediate-dir)"
            )
        if name in seen:
            if name is None:
                raise ConfigError(
                    f"{where}: documents {seen[None]} and {n} both have no 'name:'; only one "
                    "merge (the final one, written to the output) may be unnamed. Name the "
                    "others and use them by name."
                )
            raise ConfigError(
                f"{where}: documents {seen[name]} and {n} are both named {name!r}; give each "
                "merge its own name (a later merge uses an earlier one by its name)."
            )
        seen[name] = n
        parsed.append((name, n, data, doc_text))
    names = [p[0] for p in parsed if p[0] is not None]
    warnings: list[str] = []
    stages: dict[str | None, Stage] = {}
    for name, n, data, doc_text in parsed:
        label = f"stage {name!r}" if name is not None else "the unnamed final merge"
        try:
            cfg = load_config(data)
        except ConfigError as e:
            raise ConfigError(f"{where}, document {n} ({label}): {e}") from None
        cfg = dataclasses.replace(cfg, root=root, source_text=doc_text)
        tok = cfg.tokenizer_source, getattr(getattr(cfg, "tokenizer", None), "source", None)
        for ref in (t for t in tok if isinstance(t, str) and stage_ref(t, names) is not None):
            raise ConfigError(
                f"{where}, document {n} ({label}): the tokenizer source {ref!r} is a stage of "
                "this recipe; a stage's output as a tokenizer source is not supported yet. "
                "Name the model whose tokenizer that stage carries (its base, else its first "
                "model) instead."
            )
        uses: list[str] = []
        for spec in cfg.referenced_models():
            ref = stage_ref(spec, names)
            if ref is None:
                continue
            if ref[0] not in uses:
                uses.append(ref[0])
            if ref[1] is not None:
                warnings.append(f"{label}: {spec!r}: stage {ref[0]!r} is a merge of this "
                                "recipe, not a Hub repo; its revision is ignored")  # fmt: skip
            local = os.path.exists(ref[0]) or (root is not None and (root / ref[0]).exists())
            if local:
                warnings.append(
                    f"{label}: {ref[0]!r} names both a stage of this recipe and a local path; "
                    "the stage is used (as in mergekit-multi). Rename the stage to use the path."
                )
        stages[name] = Stage(name=name, number=n, config=cfg, uses=tuple(uses))
    cycle = _cycle(stages)
    if cycle is not None:
        raise ConfigError(
            f"{where}: the stages form a cycle: {' -> '.join(repr(c) for c in cycle)}; a merge "
            "can only use merges that do not use it, directly or through others."
        )
    return Recipe(stages=tuple(stages.values()), text=text, root=root, where=where,
                  warnings=tuple(dict.fromkeys(warnings)))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# stand-ins for a stage's output


class _Planned:
    """A stage output before it exists: the names, shapes and dtypes its plan will write
    (a :class:`~mergeforge.checkpoint.base.TensorSource` for checking the later stages' plans;
    ``get`` gives zeros, read only for a stochastic method's stream names at plan time)."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]], path: str) -> None:
        self.path = path
        self._infos = {n: TensorInfo(n, tuple(s), d, path) for n, s, d in specs}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}.") from None

    def get(self, name: str) -> torch.Tensor:
        i = self.info(name)
        return torch.zeros(i.shape, dtype=i.dtype)

    def close(self) -> None:
        pass


class _Files:
    """The carried files (config.json, tokenizer) of a stage kept in memory, in a folder: the
    writer's ``write_text`` / ``copy_file``, so the engine's own copying fills it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def write_text(self, relpath: str, text: str) -> None:
        p = self.folder / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")

    def copy_file(self, src: str | os.PathLike[str], relpath: str | None = None) -> None:
        p = self.folder / (relpath or Path(src).name)
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, p)


@dataclass
class _Output:
    """Where a stage's result is: planned (for the checks), in memory, or in a folder."""

    stand_in: str
    """The path named in messages before the result exists."""
    planned: tuple[list[tuple[str, tuple[int, ...], torch.dtype]], dict | None] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    files: Path | None = None
    """The carried files (config.json, tokenizer) of a result in memory."""
    folder: Path | None = None
    """The folder of a result on disk (a temporary folder, or DIR/NAME)."""
    plan_folder: Path | None = None
    """Before the result exists: a temporary folder holding the files the stage will carry
    (config.json, its tokenizer), so that a later stage's plan reads its vocabulary."""

    def checkpoint(self, name: str) -> Checkpoint:
        from mergeforge.checkpoint import open_checkpoint
        from mergeforge.checkpoint.memory import MemorySource

        if self.folder is not None:
            return open_checkpoint(self.folder)
        if self.tensors is not None:
            cfg = _read_json(self.files / "config.json") if self.files is not None else None
            return Checkpoint(
                source=MemorySource(self.tensors, path=f"stage {name!r} (in memory)"),
                folder=self.files, config=cfg,
            )  # fmt: skip
        assert self.planned is not None, name
        specs, config = self.planned
        return Checkpoint(source=_Planned(specs, self.stand_in), folder=self.plan_folder,
                          config=config)  # fmt: skip


def _read_json(p: Path) -> dict | None:
    import json

    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stage_models(stage: Stage, recipe: Recipe, outputs: dict[str, _Output]) -> dict[str, Any]:
    """The models of ``stage`` that are stages, as opened checkpoints keyed by the reference
    as the config spells it (``prepare``'s ``models``); a ``NAME+ADAPTER`` gets the adapter
    applied on the fly, as for a model on disk."""
    from mergeforge.checkpoint.loader import locate
    from mergeforge.checkpoint.lora import LoraSource

    given: dict[str, Any] = {}
    try:
        for spec in stage.config.referenced_models():
            ref = stage_ref(spec, recipe.names)
            if ref is None:
                continue
            ck = outputs[ref[0]].checkpoint(ref[0])
            if ref[2] is not None:
                adapter, extra = locate(ref[2], stage.config.root)
                if extra is not None:
                    ck.close()
                    raise ConfigError(f"{stage.label}: {spec!r}: the adapter {ref[2]!r} is "
                                      "itself BASE+ADAPTER; give one adapter")  # fmt: skip
                try:
                    ck = Checkpoint(LoraSource(ck, adapter), folder=ck.folder, config=ck.config)
                except BaseException:
                    ck.close()
                    raise
            given[spec] = ck
    except BaseException:
        for ck in given.values():
            ck.close()
        raise
    return given


def _stage_inputs(plan, recipe: Recipe) -> list[tuple[str, Path]]:
    """The paths a stage's plan reads (``engine/output.input_paths``) less those of the
    recipe's own stages (their folders are outputs of the run, checked as such); an adapter
    applied to a stage (``NAME+ADAPTER``) is an input."""
    from mergeforge.checkpoint.lora import LoraSource
    from mergeforge.engine.output import checkpoint_paths, input_paths

    ours: set[Path] = set()
    for name, ck in zip(plan.models, plan.checkpoints, strict=True):
        if stage_ref(name, recipe.names) is not None:
            inner = ck.source._base if isinstance(ck.source, LoraSource) else ck
            ours.update(checkpoint_paths(inner))
    return [(name, p) for name, p in input_paths(plan) if p not in ours]


@dataclass(frozen=True)
class StagePlan:
    """What planning one stage found (``mergeforge validate`` prints it)."""

    stage: Stage
    method: str
    models: int
    tensors: int
    merged: int
    """Output tensors a method merges (the others are copied)."""
    total_bytes: int
    warnings: tuple[str, ...]
    inputs: tuple[tuple[str, Path], ...]
    """The paths it reads, less the recipe's own stages (:func:`_stage_inputs`)."""
    vocabulary: tuple[str, ...] = ()
    """``mergeforge validate``'s vocabulary report of its inputs (``report=True``)."""


def _plan_stages(recipe: Recipe, order: list[Stage], outputs: dict[str, _Output],
                 skipped: set, plan_dir: Path, carries_tokenizer, *,
                 report: bool = False) -> list[StagePlan]:  # fmt: skip
    """A full plan of every stage of ``order`` (but the ``skipped``), in order, each stage it
    uses stood in for by what that stage's plan will produce: its tensors' names, shapes and
    dtypes, and its carried files (config.json, the tokenizer; with the tokenizer when
    ``carries_tokenizer(stage)``, as the run writes it) written to ``plan_dir/NN-NAME``, so a
    later stage's vocabulary is checked (and built) before any stage runs. Errors name the
    stage, never the planning folder."""
    from mergeforge.engine import _copy_carried_files, prepare
    from mergeforge.engine.plan import output_config

    folders: dict[str, str] = {}  # planning folder -> its stage
    plans = []
    for k, s in enumerate(order, start=1):
        if s.name in skipped:
            continue
        try:
            plan = prepare(s.config, models=_stage_models(s, recipe, outputs))
        except (ConfigError, CheckpointError, ValidationError) as e:
            raise _open_error(e, s, recipe, folders) from None
        try:
            lines: tuple[str, ...] = ()
            if report:
                from mergeforge.engine.vocab import report as vocabulary_report

                lines = tuple(_name_stages(x, folders)[0]
                              for x in vocabulary_report(plan.config, plan.models,
                                                         plan.checkpoints))  # fmt: skip
            plans.append(StagePlan(
                stage=s, method=plan.method.name, models=len(plan.models),
                tensors=len(plan.jobs), merged=sum(j.call is not None for j in plan.jobs),
                total_bytes=plan.total_bytes,
                warnings=tuple(_name_stages(w, folders)[0] for w in plan.warnings),
                inputs=tuple(_stage_inputs(plan, recipe)), vocabulary=lines,
            ))  # fmt: skip
            if s.name is not None:
                o = outputs[s.name]
                o.plan_folder = plan_dir / f"{k:02d}-{s.name}"
                _copy_carried_files(plan, _Files(o.plan_folder), carries_tokenizer(s))
                folders[str(o.plan_folder)] = s.name
                specs = [(j.out_name, j.shape, j.out_dtype) for j in plan.jobs]
                o.planned = (specs, output_config(plan))
        finally:
            plan.close()
    return plans


def _name_stages(text: str, folders: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with each planning folder of :func:`_plan_stages` named as its stage, and the
    stages named."""
    named = []
    for folder, name in folders.items():
        if folder not in text:
            continue
        named.append(name)
        for old, new in ((f"{folder}/tokenizer.json", f"the tokenizer.json of stage {name!r}"),
                         (f"its folder {folder}", f"stage {name!r} carries none"),
                         (f"in {folder}", f"in what stage {name!r} carries"),
                         (folder, f"stage {name!r}")):  # fmt: skip
            text = text.replace(old, new)
    return text, named


def plan_multimerge(source: str | os.PathLike[str] | Recipe, *, seed: int | None = None,
                    report: bool = False) -> tuple[Recipe, list[StagePlan]]:  # fmt: skip
    """Plan every stage of a recipe as :func:`run_multimerge` does before it runs one (the
    models opened for their headers, each stage's output stood in for): nothing is merged
    and nothing written but the planned stages' small files, in a temporary folder removed
    before it returns. ``mergeforge validate`` prints the result; errors name the stage."""
    recipe = source if isinstance(source, Recipe) else load_recipe(source)
    if seed is not None:
        recipe = dataclasses.replace(recipe, stages=tuple(
            dataclasses.replace(s, config=dataclasses.replace(s.config, seed=seed))
            for s in recipe.stages
        ))  # fmt: skip
    order = recipe.order(list(recipe.stages))
    outputs = {s.name: _Output(stand_in=f"stage {s.name!r}") for s in order if s.name is not None}
    with tempfile.TemporaryDirectory(prefix="mergeforge-recipe-plan-") as d:
        plans = _plan_stages(recipe, order, outputs, set(), Path(d), lambda s: True,
                             report=report)  # fmt: skip
    return recipe, plans


def _open_error(e: Exception, stage: Stage, recipe: Recipe,
                folders: Mapping[str, str] | None = None) -> Exception:  # fmt: skip
    """A model of a stage that does not open: say which stage, and that it is no stage name
    either (with the closest one); a planned stage's folder is named as that stage."""
    text, named = _name_stages(str(e), folders or {})
    if named:
        text += (
            f" (Stage {named[0]!r} carries the tokenizer of the model its output is modelled "
            "on, its base model or else its first one, or the tokenizer its own tokenizer "
            "option builds.)"
        )
    e = type(e)(text)
    names = recipe.names
    missing = [
        m for m in stage.config.referenced_models()
        if stage_ref(m, names) is None and m.split("+")[0].split("@")[0] in str(e)
    ]  # fmt: skip
    hint = ""
    if missing and isinstance(e, CheckpointError) and "no such file" in str(e):
        close = difflib.get_close_matches(missing[0], names, n=1)
        hint = (
            f" {missing[0]!r} is not a stage of this recipe either (its stages: "
            f"{', '.join(names) or 'none named'})."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )
    return type(e)(f"{recipe.where}, {stage.label}: {e}{hint}")


# ----------------------------------------------------------------------------------------------
# running a recipe


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lazy_done(folder: Path) -> bool:
    """mergekit-multi's ``--lazy`` test: the folder holds a model already."""
    return (folder / "config.json").is_file() and any((folder / f).exists() for f in MODEL_FILES)


def _remove_stale(out: Path) -> None:
    """Remove the stages folders of dead runs to the same output (a SIGKILL leaves one)."""
    import re

    from mergeforge.checkpoint._staging import _pid_alive

    parent = Path(os.path.abspath(out)).parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.mergeforge-stages-(\d+)")
    for entry in parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)


def run_multimerge(
    source: str | os.PathLike[str] | Recipe,
    out: str | os.PathLike[str] | None,
    *,
    intermediate_dir: str | os.PathLike[str] | None = None,
    lazy: bool = True,
    intermediates: str = "auto",
    seed: int | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    durable: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
):
    """Run a multi-stage recipe (see the module docstring); returns the final merge's
    :class:`~mergeforge.engine.MergeResult` (``seconds``: the whole run; ``warnings``: every
    stage's, each prefixed with its stage).

    ``out``: where the final merge is written, atomically. ``intermediate_dir``: keep every
    named stage in ``DIR/NAME`` (mergekit-multi's ``--intermediate-dir``; ``lazy``: reuse one
    already there); ``out`` is then the unnamed document's output, required only when there
    is one. ``intermediates``: ``auto`` (in memory when a stage's output takes at most half of
    the memory available, else a temporary folder beside ``out``), ``memory`` or ``disk``.
    ``seed``: overrides every stage's ``seed:`` (mergekit's ``--random-seed``). The other
    options are :func:`~mergeforge.engine.run_merge`'s, applied to the final merge (and to the
    stages kept in ``intermediate_dir``)."""
    from mergeforge.checkpoint._staging import probe_writable, take_committed
    from mergeforge.checkpoint.memory import MemorySink
    from mergeforge.device import resolve_device
    from mergeforge.engine import (
        MergeResult,
        _copy_carried_files,
        _run_plan,
        prepare,
        run_merge,
    )
    from mergeforge.engine.output import (
        check_not_among,
        check_output_location,
        check_replaceable,
    )

    t0 = time.perf_counter()
    if intermediates not in INTERMEDIATES:
        raise ConfigError(
            f"intermediates: {intermediates!r}; use one of {', '.join(INTERMEDIATES)}"
        )
    recipe = source if isinstance(source, Recipe) else load_recipe(source)
    if seed is not None:
        recipe = dataclasses.replace(recipe, stages=tuple(
            dataclasses.replace(s, config=dataclasses.replace(s.config, seed=seed))
            for s in recipe.stages
        ))  # fmt: skip
    keep = Path(intermediate_dir) if intermediate_dir is not None else None
    final = recipe.final()
    unnamed = next((s for s in recipe.stages if s.name is None), None)
    notes = list(recipe.warnings)

    # what runs, and where each result goes: targets are outputs of the run (`run_merge`)
    targets: dict[str | None, Path] = {}
    if keep is None:
        if out is None:
            raise ConfigError("run_multimerge: give the output folder (out)")
        if final is None:
            sinks = ", ".join(repr(s.name) for s in recipe.sinks())
            raise ConfigError(
                f"{recipe.where}: stages {sinks} are used by no other stage, so there is no one "
                "final merge to write to the output. Leave the final merge without 'name:', "
                "remove the stages it does not need, or keep every stage with `mergeforge multi "
                "CONFIG --intermediate-dir DIR` (as mergekit-multi)."
            )
        order = recipe.order([final])
        unused = [s.name for s in recipe.stages if s not in order]
        if unused:
            notes.append(
                f"stages {', '.join(map(repr, unused))} are not used by the final merge and are "
                "not run (`mergeforge multi --intermediate-dir DIR` runs and keeps every stage)"
            )
        targets[final.name] = Path(out)
    else:
        if unnamed is not None and out is None:
            raise ConfigError(
                f"{recipe.where}: document {unnamed.number} has no 'name:', so it is the final "
                "merge and needs an output folder (--out-path), as in mergekit-multi"
            )
        if unnamed is None and out is not None:
            notes.append(f"every document is named, so each is written to {keep}/NAME and the "
                         f"output {out} is not used (as in mergekit-multi)")  # fmt: skip
        order = recipe.order(list(recipe.stages))
        targets = {s.name: keep / s.name for s in recipe.stages if s.name is not None}
        if unnamed is not None:
            targets[None] = Path(out)  # type: ignore[arg-type]
    # kept stages (DIR/NAME) are written into like mergekit-multi does: a previous mergeforge
    # output there is replaced (--no-lazy); anything else is still refused
    replace = {n: overwrite or (keep is not None and n is not None) for n in targets}
    stages_dir = None
    if keep is None:
        stages_dir = Path(out).parent / f".{Path(out).name}.mergeforge-stages-{os.getpid()}"
    skipped = {s.name for s in order if s.name is not None and keep is not None and lazy
               and _lazy_done(targets[s.name])}  # fmt: skip
    outputs: dict[str, _Output] = {}
    for s in order:
        if s.name is not None:
            target = targets.get(s.name)
            outputs[s.name] = _Output(stand_in=str(target) if target else f"stage {s.name!r}")
            if s.name in skipped:
                outputs[s.name].folder = targets[s.name]

    # 1. every check before any stage runs: outputs, then a full plan of each stage
    for name, target in targets.items():
        if name not in skipped:
            check_output_location(target)
            check_replaceable(target, overwrite=replace[name])
    plan_tmp = None  # the planned stages' carried files, when there is no stages folder
    try:
        if stages_dir is not None:
            plan_dir = stages_dir / "plan"
        else:
            plan_tmp = plan_dir = Path(tempfile.mkdtemp(prefix="mergeforge-recipe-plan-"))
        plans = _plan_stages(recipe, order, outputs, skipped, plan_dir,
                             lambda s: copy_tokenizer if s.name in targets else True)  # fmt: skip
        sizes = {p.stage.name: p.total_bytes for p in plans if p.stage.name is not None}
        # every output of the run (kept stages, the final merge) against every stage's inputs
        for name, target in targets.items():
            if name in skipped:
                continue
            for p in plans:
                try:
                    check_not_among(target, p.inputs)
                except ConfigError as e:
                    raise ConfigError(f"{recipe.where}: an input of {p.stage.label}: {e}") from None
        for name, target in targets.items():
            if name not in skipped:
                probe_writable(target)

        for n in notes:  # the stages' own warnings are logged as each one runs
            log.warning(n)

        # 2. run, in dependency order
        uses_left = {n: sum(n in s.uses for s in order) for n in outputs}
        done: list[tuple[Stage, Any, list[str]]] = []  # (stage, MergeResult or None, warnings)
        if stages_dir is not None:
            _remove_stale(Path(out))  # type: ignore[arg-type]
        run_opts: dict[str, Any] = dict(device=device, progress=progress, workers=workers)
        for k, s in enumerate(order, start=1):
            head = f"[{k}/{len(order)}] {s.label}: {s.config.merge_method}"
            target = targets.get(s.name)
            if s.name in skipped:
                log.info(f"{head}: {target} is already there, reused (lazy; --no-lazy merges "
                         "it again)")  # fmt: skip
            elif target is not None:  # an output of the run, written as `mergeforge merge`
                log.info(f"{head} -> {target}")
                cfg = s.config
                if s is final:  # the output's mergeforge_config.yml: the whole recipe
                    cfg = dataclasses.replace(cfg, source_text=recipe.text)
                res = run_merge(
                    cfg, target, models=_stage_models(s, recipe, outputs), durable=durable,
                    overwrite=replace[s.name], shard_size=shard_size,
                    copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, **run_opts,
                )  # fmt: skip
                if s is not final:
                    take_committed()  # stopped later, the CLI must not call the run complete
                    outputs[s.name].folder = target  # type: ignore[index]
                done.append((s, res, list(res.warnings)))
            else:  # an intermediate: in memory, or in a temporary folder
                assert stages_dir is not None and s.name is not None
                o, where, need = outputs[s.name], stages_dir / f"{k:02d}-{s.name}", sizes[s.name]
                avail = _available_memory()
                # a stage that builds its own tokenizer goes through the files' writer
                tok = s.config.tokenizer_source not in (None, "base") or getattr(
                    s.config, "tokenizer", None
                )
                memory = not tok and (
                    intermediates == "memory"
                    or (intermediates == "auto" and (avail is None or 2 * need <= avail))
                )
                stages_dir.mkdir(exist_ok=True)
                if memory:
                    log.info(f"{head} -> memory ({need / 1e9:.3f} GB)")
                    plan = prepare(s.config, models=_stage_models(s, recipe, outputs))
                    try:
                        sink = MemorySink([(j.out_name, j.shape, j.out_dtype) for j in plan.jobs])
                        _run_plan(plan, resolve_device(device), lambda sink=sink: sink,
                                  workers=workers, progress=progress)  # fmt: skip
                        o.tensors = sink.result()
                        o.files = where.with_name(where.name + ".files")
                        _copy_carried_files(plan, _Files(o.files), True)
                        done.append((s, None, list(plan.warnings)))
                    finally:
                        plan.close()
                else:
                    log.info(f"{head} -> {where} (temporary, {need / 1e9:.3f} GB)")
                    res = run_merge(s.config, where, models=_stage_models(s, recipe, outputs),
                                    write_model_card=False, **run_opts)  # fmt: skip
                    take_committed()
                    o.folder = where
                    done.append((s, res, list(res.warnings)))
            for u in s.uses:  # free what no later stage reads
                uses_left[u] -= 1
                if uses_left[u] == 0:
                    outputs[u].tensors = None
    finally:
        if plan_tmp is not None:
            shutil.rmtree(plan_tmp, ignore_errors=True)
        if stages_dir is not None and stages_dir.exists():
            with deferred():  # a second stop signal must not leave it half removed
                shutil.rmtree(stages_dir, ignore_errors=True)

    warnings = [*notes, *(f"{s.label}: {w}" for s, _, ws in done for w in ws)]
    written = [(s, r) for s, r, _ in done if r is not None]
    res = next((r for s, r in written if s is final), written[-1][1] if written else None)
    if res is None:  # every stage was already there (lazy)
        last = final or order[-1]
        return MergeResult(out=targets.get(last.name) or Path(out),  # type: ignore[arg-type]
                           method=last.config.merge_method, tensors=0, bytes_written=0,
                           seconds=time.perf_counter() - t0, peak_rss_bytes=0,
                           warnings=tuple(warnings))  # fmt: skip
    return dataclasses.replace(res, seconds=time.perf_counter() - t0, warnings=tuple(warnings))
