"""Text-suite settings (no training here: the recipe itself is tested in test_text_experts)."""

from __future__ import annotations

import pytest

from mergeforge.errors import ConfigError
from mergeforge.evaluate.text.backbones import MINILM_RECIPE
from mergeforge.evaluate.text.suite import ALL_TASKS, QUICK_TASKS, TextSuite
from mergeforge.evaluate.text.tasks import TEXT_TASKS


def test_default_quick_and_full_settings(tmp_path):
    default = TextSuite(cache_dir=tmp_path)
    assert default.tasks == ALL_TASKS == tuple(TEXT_TASKS) and len(ALL_TASKS) == 7
    assert (default.n_train, default.n_test, default.recipe) == (2000, 500, MINILM_RECIPE)
    quick = TextSuite(quick=True, cache_dir=tmp_path)
    assert quick.tasks == QUICK_TASKS and quick.n_train < 200 and quick.recipe.steps < 10
    assert TextSuite(full=True, cache_dir=tmp_path).n_train is None
    assert TextSuite(tasks=["polarity"], cache_dir=tmp_path).tasks == ("polarity",)
    with pytest.raises(ConfigError, match="unknown text task"):
        TextSuite(tasks=["nope"], cache_dir=tmp_path)


def test_news_topic_is_capped_to_what_a_balanced_split_can_hold(tmp_path):
    suite = TextSuite(tasks=["news_topic"], cache_dir=tmp_path)
    task = suite._load("news_topic")
    assert (len(task.train), len(task.test)) == (1200, 500)
