"""Tiny model families with a word-level tokenizer, copied per test (statistics are written
beside the models, so the session-wide families stay untouched)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from stats_helpers import save_tokenizer


@pytest.fixture
def family(tiny_families, tmp_path):
    """``family(arch)`` -> {"base", "experts"} copied into this test's folder, with tokenizers."""

    def make(arch: str) -> dict:
        src = tiny_families[arch]
        out = {"base": tmp_path / Path(src["base"]).name, "experts": []}
        for s, d in [(src["base"], out["base"])] + [
            (e, tmp_path / Path(e).name) for e in src["experts"]
        ]:
            shutil.copytree(s, d)
            save_tokenizer(d, arch)
            if d != out["base"]:
                out["experts"].append(d)
        return out

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two threads contending
    for a busy machine's cores (measured: 14 s -> 1.7 s for a GPT-2 Fisher pass)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
