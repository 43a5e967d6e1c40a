"""Tiny Llama families for the MoE tests (tests/moe/_family.py builds them), once a session."""

from __future__ import annotations

import pytest
from tests.moe._family import family


@pytest.fixture(scope="session")
def fam(tmp_path_factory) -> dict:
    """An untied base (it stores lm_head.weight) and three experts."""
    return family(tmp_path_factory.mktemp("moe-untied"))


@pytest.fixture(scope="session")
def tied_fam(tmp_path_factory) -> dict:
    """A tied base (no lm_head.weight stored) and two experts."""
    return family(tmp_path_factory.mktemp("moe-tied"), tied=True, n_experts=2)
