"""Forgetting by negation on the text suite (issue 17): subtract one task's vector from a
multi-task model and measure the forgotten task and the kept ones.

The text suite's seven MiniLM experts (:class:`~mergeforge.evaluate.text.suite.TextSuite`, its
default recipe, reused from the cache) are merged in memory into the *multi-task model*
(:data:`DEFAULT_MULTITASK`: task arithmetic, λ 0.1 — the best task-arithmetic row of the suite's
sweep, BENCHMARKS.md §3; any data-free merge of the seven can be given instead). For a task t
and each λ of a sweep, θ_MT − λ·τ_t is merged by the engine
(:func:`~mergeforge.evaluate.editing.negation_config`) and every task is scored with its own
expert head — on a *validation* split first (:func:`validation_split`: texts of the task's
training pool that its expert never trained on, never a test text), which picks λ by the rule
of :func:`~mergeforge.evaluate.editing.select_forget_lambda`; then on the test split, at the
chosen λ (and at every λ with ``test_curve``: the whole curve on both splits).

The experts are those of the suite's default recipe trained with ``optimizer="adamw+recorder"``
(:data:`EXPERT_OPTIMIZER`): the recorder only reads gradients, so their weights are the AdamW
experts' (BENCHMARKS.md §8: same accuracies to the last digit), and they are the ones the cache
holds; ``optimizer="adamw"`` gives the plain AdamW experts (cached apart, trained if missing).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeforge.evaluate.editing import (
    FORGET_MARGIN,
    KEEP,
    chance_accuracy,
    kept_ratios,
    negation_config,
    select_forget_lambda,
)
from mergeforge.evaluate.text.tasks import held_out_split

DEFAULT_MULTITASK: Mapping[str, Any] = {
    "method": "task_arithmetic",
    "parameters": {"lambda": 0.1},
    "model_parameters": {"weight": 1.0},
}
DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
N_VALIDATION = 200
EXPERT_OPTIMIZER = "adamw+recorder"
VERSION = 1  # bump when what a result means changes (--resume then recomputes)


def validation_split(suite, task: str, n: int, seed: int = 0) -> tuple[list, str | None]:
    """``n`` seeded ``(text, label)`` examples of ``task`` with the class proportions of its test
    split, from training texts its expert did not train on (topped up per class with trained-on
    ones only when too few; never a test text): :func:`~mergeforge.evaluate.text.tasks.
    held_out_split`. Returns ``(examples, note or None)``."""
    return held_out_split(suite, task, n, seed)


@dataclass
class ForgetBench:
    """The suite's experts in memory, the multi-task model, and the two splits to score on.

    ``suite``: a :class:`~mergeforge.evaluate.text.suite.TextSuite` (prepared here if it is
    not yet). ``multitask``: ``{"method", "parameters", "model_parameters"}`` of the merge that
    makes the multi-task model from the base and every expert of the suite."""

    suite: Any
    multitask: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_MULTITASK))
    n_validation: int = N_VALIDATION
    seed: int = 0
    console: Any = None
    timings: dict = field(default_factory=dict)

    def prepare(self) -> None:
        from safetensors.torch import load_file

        from mergeforge import merge_state_dicts
        from mergeforge.config import merge_document
        from mergeforge.evaluate.text.cache import quiet_transformers
        from mergeforge.evaluate.text.eval import load_encoder

        if not hasattr(self.suite, "pool"):
            self.suite.prepare()
        s = self.suite
        self.tasks = tuple(s.tasks)
        self.validation, self.notes = {}, []
        for t in self.tasks:
            self.validation[t], note = validation_split(s, t, self.n_validation, self.seed)
            self.notes += [note] if note else []
        self.splits = {
            "validation": self.validation,
            "test": {t: s.data[t].test for t in self.tasks},
        }
        self.chance = {name: {t: chance_accuracy([y for _, y in split[t]]) for t in self.tasks}
                       for name, split in self.splits.items()}  # fmt: skip
        self.models = {"base": load_file(str(Path(s.base_dir) / "model.safetensors"))}
        for t in self.tasks:
            self.models[t] = load_file(str(Path(s.expert_dirs[t]) / "model.safetensors"))
        t0 = time.perf_counter()
        config = merge_document(
            self.multitask["method"], list(self.tasks), base_model="base",
            parameters=self.multitask.get("parameters"),
            model_parameters=self.multitask.get("model_parameters"), dtype="float32",
        )  # fmt: skip
        self.models["multitask"] = merge_state_dicts(config, self.models)
        self.timings["multitask_merge_s"] = time.perf_counter() - t0
        with quiet_transformers():
            self.encoder = load_encoder(s.base_dir)

    def negated(self, task: str, lam: float) -> dict:
        """θ_MT − λ·τ_task, merged by the engine."""
        from mergeforge import merge_state_dicts

        return merge_state_dicts(negation_config("base", "multitask", task, lam), self.models)

    def score(self, state: Mapping, split: str) -> dict[str, float]:
        """Accuracy per task of the encoder ``state`` with each task's own expert head."""
        from mergeforge.evaluate.text.eval import embed, head_accuracy

        s = self.suite
        self.encoder.load_state_dict(state, strict=True)
        out = {}
        for t in self.tasks:
            texts, labels = zip(*self.splits[split][t], strict=True)
            emb = embed(self.encoder, s.pool.tokenizer, texts, max_length=s.recipe.max_length)
            out[t] = head_accuracy(s.pool.heads[t], emb, labels)
        return out

    def settings(self) -> dict:
        s = self.suite.settings()
        s.pop("timings", None)
        return {"version": VERSION, "suite": s, "multitask": dict(self.multitask),
                "n_validation": self.n_validation, "validation_seed": self.seed,
                "validation_sizes": {t: len(v) for t, v in self.validation.items()},
                "validation_notes": self.notes}  # fmt: skip


def run_forget(
    bench: ForgetBench,
    forget: Sequence[str] | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    test_curve: bool | Sequence[str] = False,
    keep: float = KEEP,
    previous: Mapping | None = None,
    on_update: Callable[[dict], None] | None = None,
    console=None,
) -> dict:
    """Sweep λ for each task of ``forget`` (default: every task of the suite) and return the
    results payload (see :func:`write_forget_report`). ``test_curve``: score the test split at
    every λ too (else at λ = 0 and at the chosen λ only): True for every forgotten task, or the
    tasks that get it. ``previous``: an earlier payload made with the same settings (the λ
    sweep aside): its points are reused, each λ it scored (with the test split, where a test
    curve is asked for), and only new λ are scored, so a finer sweep can be added later.
    ``on_update(payload)`` after every forgotten task (to write partial results)."""
    from rich.console import Console

    console = console or bench.console or Console()
    lambdas = sorted({0.0, *map(float, lambdas)})
    t_start = time.perf_counter()
    bench.prepare()
    tasks = tuple(forget or bench.tasks)
    unknown = [t for t in tasks if t not in bench.tasks]
    if unknown:
        raise ValueError(f"cannot forget {unknown}: not tasks of the suite {list(bench.tasks)}")
    curves = set(tasks if test_curve is True else test_curve or ())
    settings = {**bench.settings(), "lambdas": lambdas, "keep": keep}
    reuse: dict[str, list] = {}  # task -> the points scored before
    previous_tasks: dict[str, dict] = {}
    if previous and _key(_without_lambdas(previous.get("settings"))) == _key(
        _without_lambdas(settings)
    ):
        previous_tasks = dict(previous.get("forget", {}))
        reuse = {t: r["curve"] for t, r in previous_tasks.items()}
    payload: dict[str, Any] = {
        "settings": settings,
        "rule": (
            f"lambda: among the swept values where every kept task keeps >= {keep:.0%} of "
            "its validation accuracy before negation (lambda = 0), the one whose forgotten-"
            "task validation accuracy is closest to chance (ties: the smaller lambda); "
            "chance = share of the split's most frequent label"
        ),  # fmt: skip
        "target": {"forgotten_within_points_of_chance": 100 * FORGET_MARGIN, "kept": keep},
        "tasks": list(bench.tasks),
        "chance": bench.chance,
        "experts_test": bench.suite.expert_accuracy(),
        "forget": {},
        "complete": False,
    }
    if previous and reuse and "references" in previous:
        payload["references"] = previous["references"]
    else:
        console.print("scoring the pretrained base and the multi-task model (validation, test)")
        payload["references"] = {}
        for name, state in (("pretrained", bench.models["base"]),
                            ("multitask", bench.models["multitask"])):  # fmt: skip
            payload["references"][name] = {sp: _timed(bench, state, sp) for sp in bench.splits}
    before = {sp: payload["references"]["multitask"][sp]["accuracy"] for sp in bench.splits}
    for n, task in enumerate(tasks, 1):
        chance = 100 * bench.chance["validation"][task]
        console.print(f"[{n}/{len(tasks)}] [bold]forget {task}[/] (chance {chance:.1f} validation)")
        payload["forget"][task] = _forget_one(bench, task, lambdas, before, task in curves, keep,
                                              console, reuse.get(task, ()))  # fmt: skip
        payload["total_seconds"] = time.perf_counter() - t_start
        if on_update is not None:
            on_update(payload)
    for task in bench.tasks:  # tasks of the earlier results not asked for this time stay
        if task not in payload["forget"] and task in previous_tasks:
            payload["forget"][task] = previous_tasks[task]
    payload["complete"] = True
    payload["total_seconds"] = time.perf_counter() - t_start
    payload["summary"] = summarize(payload)
    return payload


def _timed(bench: ForgetBench, state, split: str) -> dict:
    t0 = time.perf_counter()
    acc = bench.score(state, split)
    return {"accuracy": acc, "seconds": time.perf_counter() - t0}


def _without_lambdas(settings) -> dict:
    return {k: v for k, v in (settings or {}).items() if k != "lambdas"}


def _forget_one(bench, task, lambdas, before, test_curve, keep, console, known=()) -> dict:
    curve: list[dict] = []
    known = {p["lambda"]: p for p in known}
    for lam in lambdas:
        old = known.get(lam)
        if old is not None and (not test_curve or old.get("test") is not None):
            curve.append(dict(old))
            line = _point_line(task, old, before["validation"], bench, "validation")
            console.print(f"  {line} (reused)")
            continue
        t0 = time.perf_counter()
        state = bench.models["multitask"] if lam == 0 else bench.negated(task, lam)
        merge_s = time.perf_counter() - t0
        point = {"lambda": lam, "merge_seconds": merge_s}
        for split in ("validation", "test") if test_curve else ("validation",):
            if lam == 0:  # the multi-task model: scored once, as the reference
                point[split] = before[split]
            else:
                point[split] = bench.score(state, split)
        if not test_curve:
            point["test"] = before["test"] if lam == 0 else None
        point["seconds"] = time.perf_counter() - t0
        curve.append(point)
        console.print("  " + _point_line(task, point, before["validation"], bench, "validation"))
    val = [(p["lambda"], p["validation"]) for p in curve]
    choice = select_forget_lambda(val, task, bench.chance["validation"][task],
                                  before=before["validation"], keep=keep)  # fmt: skip
    chosen = curve[choice.index]
    if chosen["test"] is None:
        chosen["test"] = bench.score(bench.negated(task, choice.lam), "test")
    test = chosen["test"]
    ratios = kept_ratios(test, before["test"], task)
    distance = abs(test[task] - bench.chance["test"][task])
    verdict = {
        "forgotten_test": test[task],
        "chance_test": bench.chance["test"][task],
        "distance_to_chance_points": 100 * distance,
        "forgotten_met": distance <= FORGET_MARGIN + 1e-12,
        "kept_ratio_min": min(ratios.values()),
        "kept_ratios": ratios,
        "kept_met": all(r >= keep - 1e-12 for r in ratios.values()),
    }
    verdict["met"] = verdict["forgotten_met"] and verdict["kept_met"]
    console.print(f"  chosen lambda {choice.lam:g}: test {task} {100 * test[task]:.1f} (chance "
                  f"{100 * verdict['chance_test']:.1f}), kept min "
                  f"{100 * verdict['kept_ratio_min']:.1f}% of before -> "
                  f"{'met' if verdict['met'] else 'not met'}")  # fmt: skip
    return {"curve": curve, "choice": choice.to_dict(), "test_at_choice": test, "verdict": verdict}


def _point_line(task, point, before, bench, split) -> str:
    acc = point[split]
    ratios = kept_ratios(acc, before, task)
    worst = min(ratios, key=ratios.get)
    return (f"lambda {point['lambda']:g}: {split} {task} {100 * acc[task]:.1f}, kept min "
            f"{100 * ratios[worst]:.1f}% ({worst}) [{point['seconds']:.0f} s]")  # fmt: skip


def _key(settings) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def summarize(payload: Mapping) -> dict:
    """Per forgotten task: chosen λ, its test numbers, and whether each target is met."""
    out = {}
    for task, r in payload["forget"].items():
        v = r["verdict"]
        out[task] = {"lambda": r["choice"]["lambda"], "forgotten_test": v["forgotten_test"],
                     "chance_test": v["chance_test"], "kept_ratio_min": v["kept_ratio_min"],
                     "met": v["met"]}  # fmt: skip
    out["_met"] = sum(1 for k, v in out.items() if v["met"])
    return out


# ------------------------------------------------------------------------------ the report


def markdown(payload: Mapping) -> str:
    """Two tables: per forgotten task at the chosen λ (test split), and the validation curve."""
    tasks = payload["tasks"]
    refs = payload["references"]
    lines = [
        "Forgetting by negation: θ_MT − λ·τ_t, λ chosen on the validation split "
        f"({payload['rule']}). Test split at the chosen λ; accuracy %; kept ratios rounded "
        "down.",
        "",
        "| forgotten task | λ | forgotten: before → after | chance | within 5 pts | kept: min % "
        "of before (task) | kept ≥ 95 % | met |",
        "|---|---:|---|---:|---|---|---|---|",
    ]
    for task, r in payload["forget"].items():
        v = r["verdict"]
        worst = min(v["kept_ratios"], key=v["kept_ratios"].get)
        lines.append(
            f"| {task} | {r['choice']['lambda']:g} | "
            f"{100 * refs['multitask']['test']['accuracy'][task]:.1f} → "
            f"{100 * v['forgotten_test']:.1f} | {100 * v['chance_test']:.1f} | "
            f"{'✅' if v['forgotten_met'] else '❌'} ({v['distance_to_chance_points']:.1f}) | "
            f"{_floor_pct(v['kept_ratio_min'])} ({worst}) | {'✅' if v['kept_met'] else '❌'} | "
            f"{'✅' if v['met'] else '❌'} |"
        )
    lines += ["", "Reference rows (test, accuracy %):", "",
              "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]  # fmt: skip
    for name in ("pretrained", "multitask"):
        acc = refs[name]["test"]["accuracy"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) + " |")
    acc = payload["experts_test"]
    lines.append(
        "| experts (own task) | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) + " |"
    )
    lines.append("| chance | " + " | ".join(f"{100 * payload['chance']['test'][t]:.1f}"
                                            for t in tasks) + " |")  # fmt: skip
    lines += ["", "λ curves: forgotten task's accuracy % / lowest kept ratio % (validation; "
              "test in brackets where scored):", ""]  # fmt: skip
    lambdas = sorted({p["lambda"] for r in payload["forget"].values() for p in r["curve"]})
    lines += ["| forgotten task | " + " | ".join(f"λ {x:g}" for x in lambdas) + " |",
              "|---|" + "---|" * len(lambdas)]  # fmt: skip
    before = {sp: refs["multitask"][sp]["accuracy"] for sp in ("validation", "test")}
    for task, r in payload["forget"].items():
        cells = []
        points = {p["lambda"]: p for p in r["curve"]}
        for lam in lambdas:
            p = points.get(lam)
            if p is None:
                cells.append("")
                continue
            cell = _curve_cell(p["validation"], before["validation"], task)
            if p.get("test") is not None:
                cell += f" [{_curve_cell(p['test'], before['test'], task)}]"
            if p["lambda"] == r["choice"]["lambda"]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve_cell(acc, before, task) -> str:
    return f"{100 * acc[task]:.1f} / {_floor_pct(min(kept_ratios(acc, before, task).values()))}"


def _floor_pct(ratio: float) -> str:
    """A ratio in percent, one decimal, rounded *down*: 0.94966 shows as 94.9, not 95.0 (which
    would read as meeting the 95 % line it misses)."""
    return f"{math.floor(1000 * ratio + 1e-9) / 10:.1f}"


def plot(payload: Mapping, path: Path) -> Path:
    """One panel per forgotten task: its accuracy and the lowest kept ratio against λ
    (validation solid, test dashed), chance, the 95 % line and the chosen λ."""
    from mergeforge.evaluate.report import _pyplot

    plt = _pyplot()
    items = list(payload["forget"].items())
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    refs = payload["references"]["multitask"]
    for ax, (task, r) in zip(axes.flat, items, strict=False):
        for split, style in (("validation", "-"), ("test", "--")):
            pts = [p for p in r["curve"] if p.get(split) is not None]
            if len(pts) < 2:
                continue
            xs = [p["lambda"] for p in pts]
            before = refs[split]["accuracy"]
            ax.plot(xs, [100 * p[split][task] for p in pts], style, marker="o", color="C3",
                    label=f"{task} ({split})")  # fmt: skip
            kept = [100 * min(kept_ratios(p[split], before, task).values()) for p in pts]
            ax.plot(xs, kept, style, marker=".", color="C0",
                    label=f"kept: min % of before ({split})")  # fmt: skip
        chosen = r["curve"][r["choice"]["index"]]
        if chosen.get("test") is not None:  # the test split at the chosen λ (always scored)
            ax.scatter([chosen["lambda"]], [100 * chosen["test"][task]], marker="*", s=90,
                       color="C3", zorder=3, label=f"{task} (test, chosen λ)")  # fmt: skip
        ax.axhline(100 * payload["chance"]["test"][task], color="gray", ls=":", lw=1)
        ax.axhline(100 * payload["settings"]["keep"], color="C0", ls=":", lw=1)
        ax.axvline(r["choice"]["lambda"], color="k", lw=0.8, alpha=0.5)
        ax.set_title(f"forget {task}", fontsize=9)
        ax.set_xlabel("λ")
        ax.set_ylabel("%")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_forget_report(payload: Mapping, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """``results.json`` (every number), ``results.md`` (:func:`markdown`) and
    ``forget_curves.png`` (:func:`plot`) in ``out_dir``; returns the paths written."""
    from mergeforge.evaluate.report import write_report

    return write_report(payload, out_dir, complete=bool(payload.get("forget")), markdown=markdown,
                        plot=plot if plots else None, png="forget_curves.png")  # fmt: skip
