"""The search: CMA-ES over the genome, candidates merged in memory and scored on workers.

Settings as mergekit-evolve's (ALGORITHMS.md §6.2): σ₀ = 1/6, population 4 + ⌊3 ln N⌋ for N
genes, a budget of evaluations (default 100); the optimizer is the maintained ``cmaes`` package
(``cmaes.CMA``, Hansen's CMA-ES with box bounds; every gene spans [0, 1]). Unlike
mergekit-evolve, the search resumes: after every generation the optimizer (pickled: mean,
covariance, σ, evolution paths) and the history are saved atomically to
``OUT/evolve-state.pkl``. The optimizer's random generator is reseeded from (seed, generation)
before each generation's samples, so a search killed and restarted makes the same candidates,
and ends with the same result, as one never stopped (given a deterministic fitness).

A failed candidate (its merge or fitness raised, or its worker died) is recorded with its error
and told to CMA-ES as worse than the generation's worst; a generation where every candidate
fails stops the search (a systematic error), with nothing of it saved.

The search's best fitness is the maximum of hundreds of noisy scores on one validation split,
so it is biased upwards, and the candidate holding it is partly the split's luck. With
``search.reselect: K`` the K best distinct candidates are scored again, after the search, on a
*selection* split it never saw (:func:`reselect`), and the best there is the result
(``best.yaml``, the model, the test score); every re-scored row goes to ``selection.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pickle
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergeforge.checkpoint.atomic import atomic_file, write_text_atomic
from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.evolve.config import DataFlowSpec, EvolveConfig, load_evolve_config
from mergeforge.evolve.fitness import CallableFitness, build_fitness, local_path
from mergeforge.evolve.genome import DataFlowGenome, Genome, count_layers, layer_pattern
from mergeforge.evolve.report import (
    best_of,
    generation_rows,
    plot_fitness,
    write_best,
    write_history,
)
from mergeforge.evolve.workers import LocalPool, RayPool

log = logging.getLogger("mergeforge")

STATE_FILE, HISTORY_FILE, BEST_FILE = "evolve-state.pkl", "history.json", "best.yaml"
PLOT_FILE, MODEL_DIR, TEST_FILE = "fitness.png", "model", "test.json"
SELECTION_FILE = "selection.json"
OUR_FILES = (STATE_FILE, HISTORY_FILE, BEST_FILE, PLOT_FILE, MODEL_DIR, TEST_FILE, SELECTION_FILE)
STATE_VERSION = 1


@dataclass(frozen=True)
class EvolveResult:
    best_fitness: float
    """The search's fitness of the reported candidate (with ``reselect``: of the one chosen on
    the selection split, not necessarily the highest)."""
    best_config: dict
    """The best recipe as a plain mergekit-style mapping (``best.yaml``)."""
    best_metrics: Mapping[str, float]
    best_generation: int
    """0-based, as in ``history``; shown from 1."""
    generations: int
    evaluations: int
    failed: int
    history: list[dict]
    seconds: float
    """This run's time (a resumed run: since it resumed)."""
    resumed_from: int = 0
    """Generations already done when this run started (0: a fresh search)."""
    out: Path | None = None
    model: Path | None = None
    test: dict | None = None
    """The text suite's test split scored on the best merge (never used by the search)."""
    notes: tuple[str, ...] = ()
    workers: int = 0
    start_seconds: float = 0.0
    """Starting the workers (Ray, loading the models, the fitness's setup) in this run."""
    generation_seconds: float = 0.0
    """The generations of this run (what evaluations per hour divide by)."""
    selection: list[dict] | None = None
    """``search.reselect``: the re-scored candidates, best on the selection split first."""


def default_population(n_genes: int) -> int:
    """CMA-ES's default λ = 4 + ⌊3 ln N⌋ (Hansen 2016, arXiv 1604.00772; mergekit-evolve's)."""
    return 4 + int(3 * math.log(n_genes))


def _generation_seed(seed: int, generation: int) -> int:
    return (seed * 1_000_003 + generation) % 2**32


@dataclass
class _Setup:
    genome: Genome
    sources: dict[str, Any]
    fitness: Any
    suite: Any = None
    fingerprint: str = ""
    settings: dict = field(default_factory=dict)
    selection: Any = None
    """What ``search.reselect`` scores the top candidates with (``None``: reselect is off)."""


def _resolve_models(cfg: EvolveConfig, given: Mapping[str, Any], suite) -> tuple[list, Any]:
    """The genome's models and base as the candidates' configs name them: in-memory names as
    given, paths made absolute against the YAML's folder, Hub ids as written."""
    spec = cfg.genome
    models = list(spec.models) or list(suite.models if suite else [])
    base = getattr(spec, "base_model", None)  # the data-flow space has none
    if base is None and suite and not spec.models and not isinstance(spec, DataFlowSpec):
        base = suite.base_model

    def ref(m: str) -> str:
        return m if m in given else local_path(m, cfg.root)

    return [ref(m) for m in models], (ref(base) if base else None)


def _layers(ref: str, given: Mapping[str, Any]) -> int:
    from mergeforge.checkpoint import open_checkpoint

    if ref in given:
        return count_layers(given[ref])
    ck = open_checkpoint(ref)  # a missing path: CheckpointError naming it, before anything runs
    try:
        return count_layers(ck.keys(), ck.config)
    finally:
        ck.close()


def _shapes(ref: str, given: Mapping[str, Any]) -> dict[str, str]:
    """Tensor name pattern (the layer index as ``*``) -> its shape(s) over a model's layers."""
    from mergeforge.checkpoint import open_checkpoint

    out: dict[str, set] = {}
    if ref in given:
        for k, v in given[ref].items():
            out.setdefault(layer_pattern(k), set()).add(tuple(v.shape))
    else:
        ck = open_checkpoint(ref)
        try:
            for k in ck.keys():
                out.setdefault(layer_pattern(k), set()).add(tuple(ck.info(k).shape))
        finally:
            ck.close()
    return {k: " or ".join(str(s) for s in sorted(v)) for k, v in out.items()}


def _check_stackable(models: Sequence[str], given: Mapping[str, Any]) -> None:
    """The data-flow space stacks layers of different models: every model must have the same
    tensors (up to the layer count) with the same shapes."""
    first = _shapes(models[0], given)
    for m in models[1:]:
        other = _shapes(m, given)
        for name in sorted(set(first) | set(other)):
            a, b = first.get(name), other.get(name)
            if a != b:
                raise ConfigError(
                    f"genome (space: dataflow): {name!r} is {a or 'missing'} in {models[0]} but "
                    f"{b or 'missing'} in {m}; the data-flow space stacks layers of one "
                    "architecture (same tensors and shapes; the layer counts may differ)"
                )


def _setup(cfg: EvolveConfig, fitness, given: Mapping[str, Any], console,
           selection=None) -> _Setup:  # fmt: skip
    from mergeforge.engine import prepare

    suite, reselect = None, cfg.search.reselect > 0
    if fitness is None and cfg.fitness is None:
        raise ConfigError("no fitness: add 'fitness:' to the config (suite: text, tasks: or "
                          "texts:) or pass fitness= to evolve() in Python")  # fmt: skip
    if fitness is None and cfg.fitness.kind == "suite":
        from mergeforge.evolve.suite import text_suite_fitness

        suite = text_suite_fitness(cfg.fitness.options, console=console,
                                   with_selection=reselect and selection is None)  # fmt: skip
    if reselect and selection is None and suite is None:
        raise ConfigError(
            f"search.reselect: {cfg.search.reselect} re-scores the best candidates on a "
            "selection split; the text suite (fitness: suite: text) draws one itself, any other "
            "fitness needs it given: evolve(..., selection=f) with f(state_dict) -> score on "
            "data the search's fitness does not use"
        )
    if reselect and selection is None and suite.selection is None:
        raise ConfigError("search.reselect: no training text of these tasks is left for a "
                          "selection split (every unseen one is in the validation split); "
                          "lower fitness.validation or set search.reselect: 0")  # fmt: skip
    if selection is not None:
        selection = selection if hasattr(selection, "setup") else CallableFitness(selection)
    elif reselect:
        selection = suite.selection
    models, base = _resolve_models(cfg, given, suite)
    for m in [*models, *([base] if base else [])]:
        if m not in given:
            _layers(m, given)  # opens every path first: a missing model fails here, by name
    if isinstance(cfg.genome, DataFlowSpec):
        _check_stackable(models, given)
        genome = DataFlowGenome(cfg.genome, models=models,
                                num_layers=[_layers(m, given) for m in models])  # fmt: skip
    else:
        genome = Genome(cfg.genome, models=models, base_model=base,
                        num_layers=_layers(base or models[0], given))  # fmt: skip
    doc = genome.document(genome.decode(genome.initial()))
    prepare(doc, models=given).close()  # shapes, methods, parameter values: before Ray starts
    if fitness is not None:
        fit = fitness if hasattr(fitness, "setup") else CallableFitness(fitness)
        fit_key = getattr(fitness, "__qualname__", type(fitness).__qualname__)
    elif suite is not None:  # the selection split does not change the search
        from mergeforge.evolve.suite import SPLITS

        fit = suite.fitness
        fit_key = {**{k: v for k, v in cfg.fitness.options.items() if k != "selection"},
                   "splits": SPLITS}  # fmt: skip
    else:
        skeleton = models[0] if isinstance(cfg.genome, DataFlowSpec) else base  # no base there
        default = skeleton if skeleton and skeleton not in given else None
        fit = build_fitness(cfg.fitness, root=cfg.root, default_model=default)
        fit_key = cfg.fitness.options
    sources = {m: given.get(m, m) for m in [*models, *([base] if base else [])]}
    s = cfg.search
    settings = {
        "genome": {**dataclasses.asdict(cfg.genome), "models": models, "base_model": base},
        "genes": genome.labels(), "fitness": fit_key,
        "search": {"sigma0": s.sigma0, "seed": s.seed, "in_memory": s.in_memory,
                   "population": s.population or default_population(genome.size)},
    }  # fmt: skip
    text = json.dumps(settings, sort_keys=True, default=str)
    return _Setup(genome, sources, fit, suite, hashlib.sha256(text.encode()).hexdigest(),
                  settings, selection if reselect else None)  # fmt: skip


def _foreign(out: Path) -> list[str]:
    """The entries of ``out`` a search does not write (sorted): any name but :data:`OUR_FILES`,
    a symbolic link, and ``model/`` unless it is a previous mergeforge merge output
    (:func:`~mergeforge.engine.is_previous_output`: what ``run_merge`` may replace)."""
    from mergeforge.engine import is_previous_output

    if not out.is_dir():
        return []
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUR_FILES or p.is_symlink())
    model = out / MODEL_DIR
    if MODEL_DIR not in foreign and model.exists():
        if not model.is_dir() or not is_previous_output(model):
            foreign.append(f"{MODEL_DIR}/ (not a mergeforge merge output)")
    return foreign


def _refuse_foreign(out: Path, foreign: list[str], what: str) -> None:
    shown = ", ".join(foreign[:10]) + (
        f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
    )
    raise ConfigError(f"{out}: the output folder holds other files ({shown}) {what}; nothing in "
                      "it was touched: choose an empty or new --out")  # fmt: skip


def _discard_search(out: Path) -> None:
    """``--restart``: delete a saved search's files in ``out``, and only those, only when
    ``out`` holds a saved search (:data:`STATE_FILE`) and nothing a search does not write
    (:func:`_foreign`; checked before anything is deleted). Without a saved search nothing is
    deleted (:func:`_load_state` then judges the folder as for a fresh search)."""
    if not (out / STATE_FILE).is_file():
        return
    if foreign := _foreign(out):
        _refuse_foreign(out, foreign, "beside the saved search; --restart would delete it")
    for name in OUR_FILES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _load_state(out: Path, fingerprint: str) -> dict | None:
    path = out / STATE_FILE
    if not path.exists():
        if foreign := _foreign(out):
            _refuse_foreign(out, foreign, "and no evolve state")
        return None
    try:
        with open(path, "rb") as f:  # our own file, written by _save_state below
            state = pickle.load(f)
    except Exception as e:
        raise ConfigError(f"{path}: cannot read the saved search ({e}); pass --restart to "
                          "start over") from None  # fmt: skip
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{path}: holds a different search (its genome, fitness or CMA-ES settings differ "
            "from this config's); pass --restart to discard it, or choose another --out"
        )
    return state


def _save_state(out: Path, state: dict) -> None:
    with atomic_file(out / STATE_FILE) as tmp, open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)


class _Bar:
    """Progress: a rich bar over the evaluations (``progress`` None: on a terminal), and one
    line per generation (on the bar's console, else the ``mergeforge`` logger)."""

    def __init__(self, progress: bool | None, console, total: int, done: int) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        show = progress if progress is not None else self.console.is_terminal
        self.bar = None
        if show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,  # fmt: skip
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console)  # fmt: skip
            self.task = self.bar.add_task("evolve", total=total, completed=done)
            self.bar.start()
        self.quiet = progress is False

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, _outcome=None) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)
        elif not self.quiet:
            log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def evolve(
    config: str | Path | Mapping[str, Any] | EvolveConfig,
    *,
    fitness: Callable | None = None,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | Path | None = None,
    restart: bool = False,
    write_model: bool = True,
    test: bool = True,
    progress: bool | None = None,
    console=None,
    on_generation: Callable[[int, dict], None] | None = None,
    selection: Callable | None = None,
    **search: Any,
) -> EvolveResult:
    """Search the merge recipe ``config`` describes; see the module docstring and the README's
    section "Evolutionary merge search".

    ``fitness``: a callable ``f(state_dict) -> float`` (or an object with ``setup()`` and
    ``__call__``, see ``fitness.py``) instead of the config's ``fitness:``. ``models``: name ->
    state dict, for models held in memory (the genome names them; the merged model is then not
    written). ``out``: the search's folder (state, history, best.yaml, fitness.png, model/;
    default the config's ``out``; ``None``: nothing written, no resume). An ``out`` holding a
    saved search of the same config resumes it; ``restart`` discards it. ``search``: overrides
    of the config's ``search:`` keys (``workers``, ``address``, ``evaluations``, ``seed``, ...).
    ``on_generation(g, summary)``: called after generation ``g`` is saved. ``test``: score
    the text suite's test split on the best merge at the end (``EvolveResult.test``).
    ``selection``: with ``search.reselect`` and a fitness other than the text suite's, what
    scores the top candidates again (a callable as ``fitness``, on data it does not use).
    """
    t0 = time.perf_counter()
    cfg = load_evolve_config(config)
    if search:
        unknown = set(search) - {f.name for f in dataclasses.fields(cfg.search)}
        if unknown:
            raise ConfigError(f"evolve(): unknown search setting(s) {sorted(unknown)}")
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(
            cfg.search, **{k: v for k, v in search.items() if v is not None}))  # fmt: skip
    if cfg.search.address is not None and cfg.search.workers == 0:
        raise ConfigError(
            f"--address {cfg.search.address}: workers: 0 runs in this process, "
            "without Ray; give --workers N (or leave it out) to use the cluster"
        )
    given = dict(models or {})
    setup = _setup(cfg, fitness, given, console, selection)
    genome, s = setup.genome, cfg.search
    if not s.in_memory and given:
        raise ConfigError("search.in_memory: false writes candidates through the files' writer; "
                          "it needs models on disk, not given in memory")  # fmt: skip
    out = Path(out) if out is not None else (Path(cfg.out) if cfg.out else None)
    if out is not None and restart:
        _discard_search(out)
    state = _load_state(out, setup.fingerprint) if out is not None else None
    pop = s.population or default_population(genome.size)
    if s.evaluations < pop:
        raise ConfigError(f"search.evaluations: {s.evaluations} is less than one generation of "
                          f"{pop} candidates ({genome.size} genes); raise it (--evaluations) or "
                          "set search.population")  # fmt: skip
    total_gens = s.evaluations // pop
    if state is None:
        import cmaes

        bounds = np.tile([0.0, 1.0], (genome.size, 1))
        opt = cmaes.CMA(mean=genome.initial(), sigma=s.sigma0, bounds=bounds, seed=s.seed,
                        population_size=pop)  # fmt: skip
        state = {"version": STATE_VERSION, "fingerprint": setup.fingerprint, "generation": 0,
                 "optimizer": pickle.dumps(opt), "history": [], "stopped": False}  # fmt: skip
    # the optimizer always continues from its pickle (cmaes stores the covariance as one
    # triangle): a resumed search then computes exactly what an uninterrupted one does
    opt = pickle.loads(state["optimizer"])
    history, resumed = state["history"], state["generation"]
    notes = list(setup.suite.notes) if setup.suite else []
    bar = _Bar(progress, console, total_gens * pop, min(len(history), total_gens * pop))
    pool, timings = None, {"start_seconds": 0.0, "generation_seconds": 0.0}
    try:
        if resumed:
            bar.say(f"resuming after generation {resumed} of {total_gens} ({len(history)} "
                    "evaluations done)")  # fmt: skip
        if resumed < total_gens and not state["stopped"]:
            kind = LocalPool if s.workers == 0 else RayPool
            tp = time.perf_counter()
            pool = kind(setup.sources, setup.fitness, workers=s.workers, population=pop,
                        cpus_per_worker=s.cpus_per_worker, address=s.address,
                        in_memory=s.in_memory, start_timeout=s.start_timeout)  # fmt: skip
            timings["start_seconds"] = time.perf_counter() - tp
        for g in range(resumed, total_gens if not state["stopped"] else resumed):
            bar.describe(f"generation {g + 1}/{total_gens}")
            tg = time.perf_counter()
            opt.reseed_rng(_generation_seed(s.seed, g))
            xs = [opt.ask() for _ in range(opt.population_size)]
            recipes = [genome.decode(x) for x in xs]
            outcomes = pool.run([genome.document(r) for r in recipes], bar.advance)
            ok = [-o.fitness for o in outcomes if o.fitness is not None]
            if not ok:
                raise MergeforgeError(
                    f"generation {g}: every candidate failed; the first: {outcomes[0].error}. "
                    "Nothing of this generation was saved: fix the cause and run the same "
                    "command again to resume."
                )
            penalty = max(ok) + max(1.0, max(ok) - min(ok))  # failed: worse than the worst
            opt.tell([(x, -o.fitness if o.fitness is not None else penalty)
                      for x, o in zip(xs, outcomes, strict=True)])  # fmt: skip
            history += [{"generation": g, "candidate": o.index, "fitness": o.fitness,
                         "method": r.method, "metrics": dict(o.metrics), "error": o.error,
                         "merge_s": round(o.merge_s, 4), "eval_s": round(o.eval_s, 4),
                         "genes": [float(v) for v in x]}
                        for x, r, o in zip(xs, recipes, outcomes, strict=True)]  # fmt: skip
            state.update(generation=g + 1, stopped=bool(opt.should_stop()),
                         optimizer=pickle.dumps(opt))  # fmt: skip
            opt = pickle.loads(state["optimizer"])
            row = generation_rows(history)[-1]
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                _save_state(out, state)
                _write_files(out, genome, history, setup.settings)
            bar.say(f"generation {g + 1}/{total_gens}: best {row['best_so_far']:.4f} (this "
                    f"generation {row['best']:.4f}, mean {row['mean']:.4f}"
                    + (f", {row['failed']} failed" if row["failed"] else "")
                    + f"), {time.perf_counter() - tg:.1f} s")  # fmt: skip
            timings["generation_seconds"] += time.perf_counter() - tg
            if on_generation is not None:
                on_generation(g, row)
            if state["stopped"]:
                notes.append(f"CMA-ES converged after generation {g + 1} (σ or the fitness "
                             "spread below its tolerance): stopped early")  # fmt: skip
                break
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    res = _finish(cfg, setup, out, history, state, resumed, notes, write_model, test, t0,
                  pool.workers if pool is not None else 0, progress, given, console)  # fmt: skip
    return dataclasses.replace(res, **timings)


def _write_files(out: Path, genome: Genome, history: list, settings: dict,
                 chosen: Mapping[str, Any] | None = None, note: str = "") -> None:  # fmt: skip
    write_history(out / HISTORY_FILE, history, settings)
    best = chosen or best_of(history)
    if best is not None:
        write_best(out / BEST_FILE, genome.document(genome.decode(best["genes"])), best,
                   len(history), note=note)  # fmt: skip


def top_candidates(history: list[Mapping[str, Any]], k: int) -> list[Mapping[str, Any]]:
    """The ``k`` best successful records by fitness, one per distinct genome (the earliest of
    equal ones first, as :func:`best_of` picks)."""
    ok = (r for r in history if r["fitness"] is not None)
    ranked = sorted(ok, key=lambda r: -r["fitness"])  # stable: the earliest of equals first
    out, seen = [], set()
    for r in ranked:
        key = tuple(r["genes"])
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) == k:
            break
    return out


def reselect(history: list[Mapping[str, Any]], genome: Genome, selection, k: int, *,
             models: Mapping[str, Any] | None = None, say=None) -> list[dict]:  # fmt: skip
    """Score the ``k`` best distinct candidates of ``history`` (:func:`top_candidates`) with
    ``selection`` (a fitness as the search's: ``setup()``, then ``f(state_dict)``), each merged
    in memory through the engine. Returns one row per candidate, best on the selection split
    first (a tie: the higher search fitness, then the earlier), with its ``generation``,
    ``candidate``, ``fitness`` (the search's), ``selection`` and ``selection_metrics``; a
    candidate whose merge or score fails is kept with ``selection: None`` and its error."""
    from mergeforge.engine import merge_state_dicts
    from mergeforge.evolve.fitness import as_score

    top = top_candidates(history, k)
    if not top:
        raise MergeforgeError("reselect: the search has no successful candidate")
    selection.setup()
    rows = []
    for i, r in enumerate(top):
        row = {"rank": i + 1, "generation": r["generation"], "candidate": r["candidate"],
               "fitness": r["fitness"], "selection": None, "selection_metrics": {},
               "error": None, "genes": list(r["genes"])}  # fmt: skip
        try:
            merged = merge_state_dicts(genome.document(genome.decode(r["genes"])), models or {})
            score = as_score(selection(merged))
            row["selection"], row["selection_metrics"] = score.value, dict(score.metrics)
        except Exception as e:  # noqa: BLE001 - reported per candidate, as in the search
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        if say is not None:
            shown = "failed" if row["selection"] is None else f"{row['selection']:.4f}"
            say(
                f"reselect {i + 1}/{len(top)}: generation {r['generation'] + 1} candidate "
                f"{r['candidate'] + 1}, search fitness {r['fitness']:.4f}, selection {shown}"
            )
    ok = [r for r in rows if r["selection"] is not None]
    if not ok:
        raise MergeforgeError(f"reselect: every candidate failed on the selection split; the "
                              f"first: {rows[0]['error']}")  # fmt: skip
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            rows[i]["selection"] is None,
            -(rows[i]["selection"] or 0.0),
            -rows[i]["fitness"],
            i,
        ),
    )
    return [rows[i] for i in order]


def _finish(cfg, setup: _Setup, out, history, state, resumed, notes, write_model, score_test,
            t0, workers, progress, given, console) -> EvolveResult:  # fmt: skip
    from mergeforge.engine import merge_state_dicts, run_merge

    genome = setup.genome
    best = best_of(history)
    if best is None:
        raise MergeforgeError("the search has no successful candidate to report")
    rows, note, k = None, "", cfg.search.reselect
    if setup.selection is not None:
        saved = state.get("selection")
        size = cfg.fitness.options.get("selection") if cfg.fitness is not None else None
        same = saved is not None and saved.get("size") == size
        if same and saved["k"] == k and saved["evaluations"] == len(history):
            rows = saved["rows"]  # a finished search asked again: already re-scored
        else:
            bar = _Bar(progress, console, 0, 0)
            try:
                rows = reselect(history, genome, setup.selection, k, models=given, say=bar.say)
            finally:
                bar.close()
            state["selection"] = {"k": k, "evaluations": len(history), "rows": rows,
                                  "size": size}  # fmt: skip
            if out is not None:
                _save_state(out, state)
        chosen = rows[0]
        best = next(r for r in history if r["generation"] == chosen["generation"]
                    and r["candidate"] == chosen["candidate"])  # fmt: skip
        note = (f"# chosen among the {len(rows)} best by their score on the selection split "
                f"({chosen['selection']:.6g}), which the search never saw\n")  # fmt: skip
        notes.append(f"reselect: the {len(rows)} best candidates scored on the selection split; "
                     f"chosen: generation {best['generation'] + 1} candidate "
                     f"{best['candidate'] + 1} (search fitness {best['fitness']:.4f}, rank "
                     f"{chosen['rank']}; selection {chosen['selection']:.4f})")  # fmt: skip
    doc = genome.document(genome.decode(best["genes"]))
    model = test = None
    if out is not None:
        _write_files(out, genome, history, setup.settings, best if rows else None, note)
        if rows is not None:
            write_text_atomic(out / SELECTION_FILE, json.dumps(
                {"k": k, "chosen": rows[0], "rows": rows}, indent=1) + "\n")  # fmt: skip
        plot_fitness(out / PLOT_FILE, history,
                     title=f"mergeforge evolve: {', '.join(genome.methods)}")  # fmt: skip
        on_disk = all(isinstance(v, str) for v in setup.sources.values())
        written = out / MODEL_DIR / "mergeforge_config.yml"  # run_merge's copy of the config
        if write_model and on_disk:
            if written.is_file() and written.read_text() == yaml.safe_dump(doc, sort_keys=False):
                model = out / MODEL_DIR  # a finished search asked again: already written
            else:
                model = run_merge(doc, out / MODEL_DIR, overwrite=True, progress=progress).out
    if setup.suite is not None and score_test:  # once, on the best merge; never searched
        merged = merge_state_dicts(doc, {})
        setup.suite.test.setup()
        score = setup.suite.test(merged)
        tasks = {t.name: score.metrics[t.name] for t in setup.suite.test.tasks}
        test = {"tasks": tasks, "average": sum(tasks.values()) / len(tasks),
                "validation_fitness": best["fitness"]}  # fmt: skip
        if rows is not None:
            test["selection_fitness"] = rows[0]["selection"]
        if out is not None:
            write_text_atomic(out / TEST_FILE, json.dumps(test, indent=1) + "\n")
    return EvolveResult(
        best_fitness=best["fitness"], best_config=doc, best_metrics=best["metrics"],
        best_generation=best["generation"], generations=state["generation"],
        evaluations=len(history), failed=sum(r["fitness"] is None for r in history),
        history=history, seconds=time.perf_counter() - t0, resumed_from=resumed, out=out,
        model=model, test=test, notes=tuple(notes), workers=workers, selection=rows,
    )  # fmt: skip
