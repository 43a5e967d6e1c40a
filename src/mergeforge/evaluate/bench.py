"""``mergeforge bench SUITE --methods FILE.yaml``: merge a suite's experts with each listed method
(sweeps expanded), score every merge on the suite's task pool, and write the results.

The methods file::

    methods:
      - name: pretrained              # reference row: the base model with each task's head
        method: pretrained
      - name: task_arithmetic
        method: task_arithmetic       # a registered method (``mergeforge methods``)
        parameters: {lambda: [0.1, 0.3, 0.5, 1.0]}   # a list is a sweep: one run per value
      - name: ties
        method: ties
        parameters: {lambda: [0.5, 1.0]}
        model_parameters: {density: [0.2, 0.5]}     # per-model (same for every expert)
      - name: ace_attention_ffn
        method: ace
        exclude: ["embeddings", "LayerNorm", "bias"]  # tensors kept at the base (regexes)

Lists in ``parameters``/``model_parameters`` expand to their Cartesian product. Each merge runs
in a fresh child process, so its peak RSS is that merge's own (not the evaluator's). A suite is
anything with the :class:`Suite` shape registered in :data:`SUITES` with :func:`register_suite`:
``text`` (seven text-classification experts fine-tuned from one encoder,
:mod:`~mergeforge.evaluate.text.suite`) and ``vision`` (one family of small image classifiers
trained from scratch, fused into one model, :mod:`~mergeforge.evaluate.vision.suite`; its
reference rows are ``ensemble``, ``ensemble_weighted`` and ``parent<k>``; only base-free methods
and two-model interpolations such as ``slerp`` run there, as the parents share no base).

A suite that fuses (``fuses = True``: vision) also takes rows whose ``method`` is a *fusion*
method (:data:`mergeforge.fusion.FUSION_METHODS`, e.g. ``kf``, ``ot_fusion``) with its
``parameters``: the parents are fused in memory on the suite's fusion set, written as a model
folder and scored like a merge (``merge_seconds`` is then the fusion time, measured in a fresh
process like a merge's, with its peak RSS). A merge method's name wins over a fusion method's.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.evaluate.pool import RunResult, TaskPool, evaluate_pool

REFERENCE_METHODS = ("pretrained",)  # rows that merge nothing (a suite may name its own)
EXPERTS_ROW = "experts (own task)"
_ENTRY_KEYS = {"name", "method", "parameters", "model_parameters", "exclude"}


@dataclass(frozen=True)
class BenchRun:
    """One merge to run: a methods-file entry with every sweep fixed to one value."""

    name: str
    family: str
    method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    model_parameters: Mapping[str, Any] = field(default_factory=dict)
    swept: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    """Regexes of tensors kept at the base (the merge config's ``exclude:``)."""
    kind: str = "merge"
    """``"merge"`` (a merge method, or a reference row) or ``"fusion"`` (a fusion method)."""

    @property
    def params(self) -> dict[str, Any]:
        return {**self.model_parameters, **self.parameters}


class Suite(Protocol):
    """A benchmark suite: builds (or reuses) its base and experts, then scores models."""

    name: str
    pool: TaskPool
    base_dir: Path
    expert_dirs: Mapping[str, Path]  # task -> the folder the merge reads for that expert

    def prepare(self) -> None:
        """Load data, build the base and the experts (cached; progress bars)."""

    def expert_accuracy(self) -> dict[str, float]:
        """Each expert on its own task: the normalized-accuracy denominators."""

    def settings(self) -> dict:
        """Everything the numbers depend on (written into results.json)."""

    def prepare_statistics(self, request) -> None:
        """Compute (or reuse) each expert's statistics for a data-using method (a
        :class:`~mergeforge.methods.base.SidecarInputs`: RegMean Grams, Fisher) before it merges.
        Optional: a suite without it cannot run such methods."""

    # Optional too (looked up with getattr; the defaults suit a base + fine-tuned experts):
    #   reference_methods: tuple[str, ...]  the rows that merge nothing which the suite knows
    #       (default REFERENCE_METHODS: "pretrained", scored by evaluating ``base_dir``).
    #   reference(method) -> dict[str, float]  the accuracy of such a row (default: evaluate
    #       ``base_dir`` on the pool).
    #   check_run(run) -> None  raise ConfigError for a run the suite cannot merge; called for
    #       every run before prepare(), so a bad methods file fails before any training.
    #   merge_inputs(run) -> (base_dir, [expert_dir, ...])  what one merge reads (default:
    #       ``base_dir`` and every folder of ``expert_dirs``).
    #   fuses: bool  the suite runs fusion rows (``kind == "fusion"``), through
    #   fusion_job(run, out) -> (fn, args, kwargs)  a picklable call that fuses the experts and
    #       writes the model folder ``out``, returning {"fusion_seconds": s, ...}; the bench
    #       runs it in a fresh process (:func:`call_isolated`).


SuiteFactory = Callable[..., Suite]  # (quick=, full=, cache_dir=, tasks=, console=) -> Suite
SUITES: dict[str, SuiteFactory] = {}


def register_suite(name: str, factory: SuiteFactory) -> None:
    SUITES[name] = factory


def _text_suite(**kwargs) -> Suite:
    from mergeforge.evaluate.text.suite import TextSuite

    return TextSuite(**kwargs)


def _text_smollm2_suite(**kwargs) -> Suite:
    from mergeforge.evaluate.text.suite import TextSuite

    return TextSuite(**kwargs, backbone="smollm2")


def _vision_suite(**kwargs) -> Suite:
    from mergeforge.evaluate.vision.suite import VisionSuite

    return VisionSuite(**kwargs)


register_suite("text", _text_suite)
register_suite("text-smollm2", _text_smollm2_suite)
register_suite("vision", _vision_suite)


def get_suite(name: str, *, options: Mapping[str, Any] | None = None, **kwargs) -> Suite:
    """The suite ``name`` built with the common ``kwargs`` and its own ``options`` (e.g. the
    text suites' ``optimizer``); a suite that takes no such option is a :class:`ConfigError`."""
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    if not options:
        return SUITES[name](**kwargs)
    try:
        return SUITES[name](**kwargs, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"suite {name!r} takes no option(s) {sorted(options)}: {exc}") from exc


# ---------------------------------------------------------------- the methods file and sweeps


def load_methods(
    source: str | Path | Mapping,
    *,
    quick: bool = False,
    references: Sequence[str] = REFERENCE_METHODS,
    fusion: bool = False,
) -> list[BenchRun]:
    """Parse a methods file (path, YAML text or dict) and expand its sweeps into runs.

    ``quick`` keeps only the middle value of each sweep (a smoke run, not a sweep).
    ``references``: the method names that are reference rows of the suite (merge nothing).
    ``fusion``: the suite also runs fusion methods (see the module docstring).
    """
    import yaml

    if isinstance(source, Mapping):
        doc, where = source, "methods"
    else:
        path = Path(source)
        where = str(source)
        try:
            doc = yaml.safe_load(path.read_text() if path.exists() else str(source))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("methods"), list):
        raise ConfigError(f"{where}: expected a mapping with a 'methods:' list")
    runs: list[BenchRun] = []
    for i, entry in enumerate(doc["methods"]):
        runs += expand_entry(entry, where=f"{where}: methods[{i}]", quick=quick,
                             references=references, fusion=fusion)  # fmt: skip
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: run names repeat: {dupes}; give the entries distinct 'name's")
    return runs


def expand_entry(
    entry: Mapping,
    *,
    where: str = "methods",
    quick: bool = False,
    references: Sequence[str] = REFERENCE_METHODS,
    fusion: bool = False,
) -> list[BenchRun]:
    """One methods-file entry -> one run per combination of its swept (list) values."""
    if not isinstance(entry, Mapping) or "method" not in entry:
        raise ConfigError(f"{where}: each entry needs 'method:' (and optionally name/parameters)")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
        )
    method = str(entry["method"])
    family = str(entry.get("name", method))
    groups = {"parameters": entry.get("parameters") or {}, "model_parameters": entry.get(
        "model_parameters") or {}}  # fmt: skip
    kind = _check_params(method, groups, where, references, fusion=fusion)
    exclude = _check_exclude(entry.get("exclude"), method, where, references)
    if exclude and kind == "fusion":
        raise ConfigError(f"{where}: the fusion method '{method}' takes no exclude")
    axes: list[tuple[str, str, list]] = []  # (group, key, values)
    for group, params in groups.items():
        for key, value in params.items():
            if isinstance(value, list):
                if not value:
                    raise ConfigError(f"{where}: {group}.{key} is an empty sweep")
                values = [value[len(value) // 2]] if quick else list(value)
                axes.append((group, key, values))
    swept = tuple(key for _, key, _ in axes)
    runs = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        fixed = {g: dict(p) for g, p in groups.items()}
        for (group, key, _), value in zip(axes, combo, strict=True):
            fixed[group][key] = value
        label = " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for (_, key, _), value in zip(axes, combo, strict=True))  # fmt: skip
        runs.append(
            BenchRun(
                name=f"{family} {label}" if label else family,
                family=family,
                method=method,
                parameters=fixed["parameters"],
                model_parameters=fixed["model_parameters"],
                swept=swept,
                exclude=exclude,
                kind=kind,
            )
        )
    if kind == "fusion":  # each run's values (sweeps fixed) checked now, before any training
        from mergeforge.fusion import get_method as get_fusion

        for run in runs:
            get_fusion(method).make_params(run.parameters)
    return runs


def _check_exclude(value, method: str, where: str, references: Sequence[str]) -> tuple[str, ...]:
    """An entry's ``exclude:`` (a regex or a list of them) as a tuple, checked now."""
    from mergeforge.config import parse_exclude

    exclude = parse_exclude(value, where)
    if exclude and method in references:
        raise ConfigError(f"{where}: '{method}' merges nothing and takes no exclude")
    return exclude


def _check_params(
    method: str,
    groups: Mapping[str, Mapping],
    where: str,
    references: Sequence[str] = REFERENCE_METHODS,
    *,
    fusion: bool = False,
) -> str:
    """Unknown methods and parameter names fail here, before anything is trained or loaded.
    Returns the run's kind: ``"merge"`` (merge methods and reference rows) or ``"fusion"``."""
    if method in references:
        if any(groups.values()):
            raise ConfigError(f"{where}: '{method}' merges nothing and takes no parameters")
        return "merge"
    from mergeforge.config import yaml_field_map
    from mergeforge.methods import get_method

    try:
        m = get_method(method)
    except (KeyError, MergeforgeError) as exc:
        if fusion:
            return _check_fusion_params(method, groups, where, references)
        raise ConfigError(
            f"{where}: unknown method {method!r} ({exc}); `mergeforge methods` lists them, "
            f"and {list(references)} are this suite's reference rows"
        ) from exc
    for group, cls in (("parameters", m.params), ("model_parameters", m.model_params)):
        if not isinstance(groups[group], Mapping):
            raise ConfigError(f"{where}: {group} must be a mapping")
        known = set(yaml_field_map(cls))
        bad = sorted(set(groups[group]) - known)
        if bad:
            raise ConfigError(
                f"{where}: {method} has no {group} {bad}; its {group}: {sorted(known) or 'none'}"
            )
    return "merge"


def _check_fusion_params(
    method: str, groups: Mapping[str, Mapping], where: str, references: Sequence[str]
) -> str:
    """A fusion row: a registered fusion method with known parameter names, no per-model ones."""
    import dataclasses

    from mergeforge.fusion import FUSION_METHODS

    if method not in FUSION_METHODS:
        from mergeforge.methods import all_methods

        raise ConfigError(
            f"{where}: unknown method {method!r}; fusion methods: {sorted(FUSION_METHODS)}; "
            f"merge methods: {sorted(m.name for m in all_methods())} (`mergeforge methods`); "
            f"reference rows: {list(references)}"
        )
    spec = FUSION_METHODS[method]
    if groups["model_parameters"]:
        raise ConfigError(f"{where}: the fusion method '{method}' takes no model_parameters")
    if not isinstance(groups["parameters"], Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping")
    known = [f.name for f in dataclasses.fields(spec.params)]
    if bad := sorted(set(groups["parameters"]) - set(known)):
        raise ConfigError(f"{where}: {method} has no parameters {bad}; its parameters: {known}")
    return "fusion"


# ---------------------------------------------------------------------------- merging


def merge_config(run: BenchRun, base_dir: Path, expert_dirs: Sequence[Path]) -> dict:
    """The mergekit-style config of one run (the base is left out for base-free methods), as
    ``config.merge_document`` spells it; the merge makes it with ``config.load_config``."""
    from mergeforge.config import merge_document
    from mergeforge.methods import get_method

    with_base = get_method(run.method).base != "none"
    return merge_document(
        run.method, list(expert_dirs), base_model=base_dir if with_base else None,
        parameters=run.parameters, model_parameters=run.model_parameters, exclude=run.exclude,
        dtype="float32",
    )  # fmt: skip


def _merge_child(config: dict, out: str, conn) -> None:
    try:
        from mergeforge.engine import run_merge

        res = run_merge(config, out, overwrite=True, progress=False)
        conn.send(("ok", res.seconds, _own_peak_rss() or res.peak_rss_bytes))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises
        conn.send(("error", f"{type(exc).__name__}: {exc}", 0))
    finally:
        conn.close()


def _own_peak_rss() -> int | None:
    """Peak RSS of this process's own address space (Linux ``VmHWM``), else None.

    Not ``ru_maxrss``: across fork + exec Linux carries over the forked copy's high-water mark,
    which is the *parent's* RSS, so a spawned child would report the benchmark process's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def merge_isolated(config: dict, out: Path) -> tuple[float, int]:
    """Run one merge in a fresh (spawned) process: returns (merge seconds, its peak RSS bytes).

    A fresh process because ``ru_maxrss`` is a per-process high-water mark: measured in the
    benchmark process it would report the evaluator's memory, and never go down.
    """
    status, value, peak = _spawned(
        _merge_child, (config, str(out)), died="the merge process died (out of memory?)"
    )
    if status != "ok":
        raise MergeforgeError(f"merge {config['merge_method']} failed: {value}")
    return value, peak


def _spawned(target, args: tuple, *, died: str) -> tuple[str, Any, int]:
    """``target(*args, conn)`` in a fresh (spawned) process: the ``(status, value, peak RSS)``
    it sends on ``conn``, or ``("error", died, 0)`` when it dies without sending. Stopped while
    it waits (any exception), it terminates and joins the child before re-raising: nothing runs
    on after the bench."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    try:
        try:
            status, value, peak = parent.recv()
        except EOFError:
            status, value, peak = "error", died, 0
    except BaseException:
        _end(proc)
        raise
    finally:
        parent.close()
    proc.join()
    return status, value, peak


def _end(proc, grace: float = 10.0) -> None:
    """Terminate (SIGTERM) a child and join it; SIGKILL if it is still there after ``grace``."""
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
    proc.join()


def _discard_partial(out: Path, existed: bool) -> None:
    """Remove what a stopped child left of ``out``: the writer's hidden staging folders beside
    it (``.<name>.mergeforge-*``; a terminated child cannot remove its own) and ``out`` itself
    when the call created it (an output that was there before is left alone)."""
    import shutil

    for p in out.parent.glob(f".{out.name}.mergeforge-*"):
        shutil.rmtree(p, ignore_errors=True)
    if not existed:
        shutil.rmtree(out, ignore_errors=True)


def _call_child(fn, args, kwargs, conn) -> None:
    try:
        result = fn(*args, **kwargs)
        conn.send(("ok", result, _own_peak_rss() or 0))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises
        conn.send(("error", f"{type(exc).__name__}: {exc}", 0))
    finally:
        conn.close()


def call_isolated(fn, *args, **kwargs) -> tuple[Any, int]:
    """``fn(*args, **kwargs)`` in a fresh (spawned) process, like :func:`merge_isolated`:
    returns (its result, its peak RSS bytes). ``fn`` and its arguments must be picklable; an
    exception there is raised here as a :class:`MergeforgeError` (the row fails, the rest run).
    Stopped while it waits (SIGINT/SIGTERM/SIGHUP as :class:`~mergeforge._signals.Interrupted`,
    or any other exception), it terminates and joins the child before re-raising: nothing runs
    on after the bench; the caller removes what the child left (:func:`_discard_partial`).
    """
    status, value, peak = _spawned(
        _call_child, (fn, args, kwargs), died="the process died (out of memory?)"
    )
    if status != "ok":
        raise MergeforgeError(f"{getattr(fn, '__name__', fn)} failed: {value}")
    return value, peak


# ---------------------------------------------------------------------------- the benchmark


def run_bench(
    suite: str,
    methods: str | Path | Mapping,
    out_dir: str | Path,
    *,
    quick: bool = False,
    full: bool = False,
    cache_dir: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    keep_merged: bool = False,
    plots: bool = True,
    resume: bool = False,
    suite_options: Mapping[str, Any] | None = None,
    console=None,
) -> dict:
    """Run every method of ``methods`` on ``suite``; write results.json, results.md and plots.

    Returns the results payload (as written to ``out_dir/results.json``, which is rewritten
    after every run). ``resume`` reuses the rows of an earlier ``results.json`` in ``out_dir``
    whose name, method and parameters match, if it was made with the same suite settings
    (experts, data sizes, recipe); everything else runs. ``suite_options``: options of this
    suite only (the text suites': ``{"optimizer": "umtam"}``), passed to its factory.
    """
    from rich.console import Console

    from mergeforge.evaluate import report

    console = console or Console()
    bench = get_suite(suite, quick=quick, full=full, cache_dir=cache_dir, tasks=tasks,
                      console=console, options=suite_options)  # fmt: skip
    # fail on a bad file before any training
    runs = load_methods(methods, quick=quick, references=_references(bench),
                        fusion=bool(getattr(bench, "fuses", False)))  # fmt: skip
    check = getattr(bench, "check_run", None)  # optional in the Suite protocol
    for run in runs if check is not None else ():
        check(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bench.prepare()
    expert_acc = bench.expert_accuracy()
    results = [
        RunResult(
            name=EXPERTS_ROW,
            method="experts",
            params={},
            accuracy=expert_acc,
            expert_accuracy=expert_acc,
            family="experts",
        )  # fmt: skip
    ]
    failed: dict[str, str] = {}
    done: dict[str, RunResult] = {}
    if resume:  # settings a suite added later are read with their implied value
        defaults = getattr(bench, "settings_defaults", {})
        done = _finished_rows(out_dir / "results.json", bench.settings(), defaults)
    merged_root = out_dir / "merged" if keep_merged else Path(tempfile.mkdtemp(prefix="mf-bench-"))

    def payload(complete: bool) -> dict:
        return {
            "suite": suite,
            "quick": quick,
            "full": full,
            "complete": complete,
            "methods_file": str(methods) if not isinstance(methods, Mapping) else None,
            "settings": bench.settings(),
            "tasks": list(bench.pool.tasks),
            "runs": [r.to_dict() for r in results],
            "failed": failed,
            "total_seconds": time.perf_counter() - t_start,
        }

    for i, run in enumerate(runs, 1):
        console.print(f"[{i}/{len(runs)}] [bold]{run.name}[/]")
        reused = done.get(_run_key(run.name, run.method, run.params, run.exclude))
        if reused is not None:
            console.print("  reused from the previous results.json (--resume)")
            results.append(reused)
            continue
        try:
            results.append(_one_run(run, bench, expert_acc, merged_root, keep_merged))
        except MergeforgeError as exc:  # one unsupported method should not sink the rest
            failed[run.name] = str(exc)
            console.print(f"[red]  failed:[/] {exc}")
        # after every run: an interrupted sweep keeps what it measured (and --resume reuses it)
        report.write_json(out_dir / "results.json", payload(complete=False))
    if not keep_merged:
        import shutil

        shutil.rmtree(merged_root, ignore_errors=True)

    payload = payload(complete=True)
    report.write_json(out_dir / "results.json", payload)
    norm_by = bench.settings().get("normalized_by", "own expert")
    (out_dir / "results.md").write_text(
        report.markdown_table(results, bench.pool.tasks)
        + f"\nAccuracy %; normalized = merged / {norm_by}, %.\n"
    )
    table = report.rich_table(results, bench.pool.tasks, title=f"mergeforge bench {suite}",
                              normalized_by=norm_by)  # fmt: skip
    console.print(table, width=None if console.is_terminal else 200)  # logs: do not wrap rows
    if plots:
        for path in report.plot_results(results, bench.pool.tasks, out_dir):
            console.print(f"plot: {path}")
    console.print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return payload


def _references(bench) -> tuple[str, ...]:
    """The reference rows (merging nothing) a suite knows: its own, else "pretrained"."""
    return tuple(getattr(bench, "reference_methods", REFERENCE_METHODS))


def _one_run(run, bench, expert_acc, merged_root: Path, keep: bool) -> RunResult:
    common = dict(name=run.name, method=run.method, expert_accuracy=expert_acc,
                  params=run.params, family=run.family, swept=run.swept,
                  exclude=run.exclude)  # fmt: skip
    if run.method in _references(bench):
        reference = getattr(bench, "reference", None)  # optional in the Suite protocol
        if reference is None:
            return evaluate_pool(bench.pool, bench.base_dir, **common)
        t0 = time.perf_counter()
        accuracy = reference(run.method)
        return RunResult(accuracy=accuracy, eval_seconds=time.perf_counter() - t0,
                         **{**common, "family": run.family or run.method})  # fmt: skip
    out = merged_root / run.name.replace(" ", "_").replace("/", "-")
    if run.kind == "fusion":
        fn, args, kwargs = bench.fusion_job(run, out)
        existed = out.exists()
        try:
            result, peak = call_isolated(fn, *args, **kwargs)
        except BaseException:  # stopped (Interrupted) or failed: no partial output stays
            _discard_partial(out, existed)
            raise
        try:
            return evaluate_pool(bench.pool, out, merge_seconds=result["fusion_seconds"],
                                 peak_rss_bytes=peak, **common)  # fmt: skip
        finally:
            if not keep:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    _statistics(run, bench)
    inputs = getattr(bench, "merge_inputs", None)  # optional in the Suite protocol
    if inputs is not None:
        base_dir, expert_dirs = inputs(run)
    else:
        base_dir, expert_dirs = bench.base_dir, bench.expert_dirs.values()
    config = merge_config(run, base_dir, list(expert_dirs))
    seconds, peak = merge_isolated(config, out)
    try:
        return evaluate_pool(bench.pool, out, merge_seconds=seconds, peak_rss_bytes=peak, **common)
    finally:
        if not keep:
            import shutil

            shutil.rmtree(out, ignore_errors=True)


def _statistics(run: BenchRun, bench) -> None:
    """Let the suite compute the statistics a data-using method reads (once per expert)."""
    from mergeforge.config import build_params
    from mergeforge.methods import get_method

    method = get_method(run.method)
    if method.sidecar_inputs is None:
        return
    request = method.sidecar_inputs(build_params(method.params, run.parameters, run.name))
    prepare = getattr(bench, "prepare_statistics", None)  # optional in the Suite protocol
    if prepare is None:
        raise MergeforgeError(f"suite {bench.name!r} cannot compute {request.kind} statistics")
    prepare(request)


def _run_key(name: str, method: str, params: Mapping[str, Any], exclude: Sequence[str] = ()) -> str:
    return json.dumps([name, method, dict(params), list(exclude)], sort_keys=True, default=str)


def _settings_key(settings: Mapping[str, Any]) -> str:
    """What a row's numbers depend on: the suite settings without timings."""
    return json.dumps({k: v for k, v in settings.items() if k != "timings"}, sort_keys=True,
                      default=str)  # fmt: skip


def _finished_rows(
    path: Path, settings: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, RunResult]:
    """Rows of an earlier results.json that --resume may reuse (none if settings differ).
    ``defaults``: settings a suite added after results were first written, with the value
    every older results.json implicitly had (a file without the key is read as having it)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    old = {**(defaults or {}), **data.get("settings", {})}
    if _settings_key(old) != _settings_key(settings):
        return {}
    rows = results_from_json(path)
    return {
        _run_key(r.name, r.method, r.params, r.exclude): r for r in rows if r.method != "experts"
    }


def results_from_json(path: str | Path) -> list[RunResult]:
    """Read the rows of a results.json back (for re-plotting or comparing runs)."""
    data = json.loads(Path(path).read_text())
    keep = set(RunResult.__dataclass_fields__)
    tuples = ("swept", "exclude")
    return [
        RunResult(**{k: (tuple(v) if k in tuples else v) for k, v in row.items() if k in keep})
        for row in data["runs"]
    ]
