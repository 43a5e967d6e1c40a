"""Tiny models built from a config in a temporary folder: no downloads, CPU, milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_llama(tmp_path: Path):
    """Save a seeded tiny Llama to ``tmp_path/base``; return (folder, model)."""
    from transformers import LlamaForCausalLM

    def make(name: str = "base", **overrides):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
        folder = tmp_path / name
        model.save_pretrained(folder)
        return folder, model

    return make
