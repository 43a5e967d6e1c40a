"""`mergeforge bench text` with regmean/fisher: the suite computes each expert's statistics
once (through its encoder, + its head for Fisher), and the bench hook asks for them."""

from __future__ import annotations

import random

import torch
from safetensors.torch import load_file
from stats_helpers import WORDS
from torch import nn

from mergeforge.checkpoint.sidecar import sidecar_path
from mergeforge.evaluate.bench import BenchRun, _statistics
from mergeforge.evaluate.text.suite import TextPool, TextSuite
from mergeforge.evaluate.text.tasks import TextTask
from mergeforge.stats.grams import compute_grams


def _suite(family, tmp_path) -> TextSuite:
    """A text suite over the tiny BERT experts (no downloads): two fake tasks, fixed heads."""
    from transformers import AutoTokenizer

    fam = family("bert")
    rng = random.Random(0)
    suite = TextSuite(tasks=["polarity", "news_topic"], cache_dir=tmp_path)
    train = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))), i % 2)
             for i in range(10)]  # fmt: skip
    suite.data = {t: TextTask(t, ("a", "b"), train, train[:2]) for t in suite.tasks}
    suite.expert_dirs = dict(zip(suite.tasks, fam["experts"], strict=False))
    torch.manual_seed(0)
    heads = {t: nn.Linear(32, 2).eval() for t in suite.tasks}
    tok = AutoTokenizer.from_pretrained(str(fam["experts"][0]))
    suite.pool = TextPool(suite.data, heads, tok, max_length=16)
    return suite


def test_regmean_run_computes_grams_once_per_expert(family, tmp_path):
    suite = _suite(family, tmp_path)
    run = BenchRun("regmean", "regmean", "regmean", {"alpha": 0.5, "num_examples": 6})
    _statistics(run, suite)
    paths = [sidecar_path(d, "regmean") for d in suite.expert_dirs.values()]
    stamps = [p.stat().st_mtime_ns for p in paths]
    grams = load_file(paths[0])
    key = "encoder.layer.0.attention.self.query.weight"
    assert grams[key].shape == (32, 32)
    # the same Grams as hooking the encoder by hand on the first 6 training texts
    from mergeforge.evaluate.text.eval import load_encoder, tokenize

    enc = load_encoder(suite.expert_dirs["polarity"])
    texts = [x for x, _ in suite.data["polarity"].train[:6]]
    want = compute_grams(enc, [tokenize(suite.pool.tokenizer, texts, max_length=16)])
    torch.testing.assert_close(grams[key], want[key], rtol=1e-4, atol=1e-5)
    _statistics(run, suite)  # cached: not recomputed
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    _statistics(BenchRun("ta", "ta", "task_arithmetic"), suite)  # reads no sidecars: nothing


def test_fisher_run_goes_through_the_head(family, tmp_path):
    suite = _suite(family, tmp_path)
    _statistics(BenchRun("f", "f", "fisher", {"fisher": "empirical", "num_examples": 4}), suite)
    d = suite.expert_dirs["news_topic"]
    f = load_file(sidecar_path(d, "fisher-empirical"))
    w = load_file(d / "model.safetensors")
    assert set(f) == {k for k, v in w.items() if v.is_floating_point()}
    assert f["encoder.layer.2.output.dense.weight"].abs().sum() > 0
    assert float(f["pooler.dense.weight"].abs().sum()) == 0.0  # mean pooling skips the pooler
