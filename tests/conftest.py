"""Shared fixtures: tiny real-architecture checkpoints built from `transformers` configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings as _hyp_settings

# CI: the same examples every run (a red CI must be reproducible, not a lottery)
_hyp_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def _tiny_model(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
            tie_word_embeddings=False,
        )  # fmt: skip
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            vocab_size=128, max_position_embeddings=64,
        )  # fmt: skip
        return tf.BertModel(cfg)
    raise ValueError(arch)


def make_family(root: Path, arch: str, n_experts: int = 3, scale: float = 0.02) -> dict:
    """Save a base model and ``n_experts`` fine-tune-like variants (base + seeded noise whose
    size differs per expert) as Hugging Face folders. Returns {"base": path, "experts": [...]}."""
    model = _tiny_model(arch)
    base_dir = root / f"{arch}-base"
    model.save_pretrained(base_dir, safe_serialization=True)
    experts = []
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for e in range(n_experts):
        g = torch.Generator().manual_seed(100 + e)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    noise = torch.randn(p.shape, generator=g) * scale * (1 + e)
                    p.copy_(base_sd[k] + noise)
        d = root / f"{arch}-expert{e}"
        model.save_pretrained(d, safe_serialization=True)
        experts.append(d)
    return {"base": base_dir, "experts": experts}


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {arch: make_family(root, arch) for arch in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="session")
def llama_family(tiny_families) -> dict:
    return tiny_families["llama"]
