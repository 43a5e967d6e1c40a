"""BASE+ADAPTER equals peft's own merge_and_unload() on tiny models built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeforge.checkpoint import open_checkpoint
from mergeforge.errors import CheckpointError

peft = pytest.importorskip("peft")


def _adapter(model, folder: Path, **lora_kw) -> dict[str, torch.Tensor]:
    """Wrap ``model`` with a randomly initialised LoRA, save it, return the merged state dict."""
    torch.manual_seed(1)
    cfg = peft.LoraConfig(init_lora_weights=False, **lora_kw)
    wrapped = peft.get_peft_model(model, cfg)
    wrapped.save_pretrained(folder)
    return {k: v.clone() for k, v in wrapped.merge_and_unload().state_dict().items()}


def _assert_matches(spec: str, merged: dict[str, torch.Tensor], base_folder: Path) -> None:
    ckpt = open_checkpoint(spec)
    base = load_file(base_folder / "model.safetensors")
    assert sorted(ckpt.keys()) == sorted(base)
    changed = 0
    for k in ckpt.keys():
        got = ckpt.get(k)
        assert got.dtype == base[k].dtype and got.shape == base[k].shape
        torch.testing.assert_close(got, merged[k], atol=1e-6, rtol=0, msg=k)
        changed += not torch.equal(got, base[k])
    assert changed > 0
    assert ckpt.config["model_type"] == "llama" or ckpt.config["model_type"] == "gpt2"
    ckpt.close()


LLAMA_CASES = {
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.mlp\.up_proj": 32},
        modules_to_save=["lm_head"],
    ),
    "rslora": dict(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj"], use_rslora=True),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_lora_matches_peft(tiny_llama, tmp_path: Path, case: str) -> None:
    base_folder, model = tiny_llama()
    merged = _adapter(model, tmp_path / "adapter", **LLAMA_CASES[case])
    _assert_matches(f"{base_folder}+{tmp_path / 'adapter'}", merged, base_folder)


def test_gpt2_fan_in_fan_out_and_lora_bias_match_peft(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    merged = _adapter(model, tmp_path / "ad", r=2, lora_alpha=3, target_modules=["c_attn"],
                      fan_in_fan_out=True, lora_bias=True)  # fmt: skip
    _assert_matches(f"{tmp_path / 'base'}+{tmp_path / 'ad'}", merged, tmp_path / "base")


def test_named_adapter_keys_and_bin_adapter(tiny_llama, tmp_path: Path) -> None:
    """Keys with the adapter name (``lora_A.default.weight``) and adapter_model.bin also work."""
    base_folder, model = tiny_llama()
    ad = tmp_path / "adapter"
    merged = _adapter(model, ad, r=4, lora_alpha=8, target_modules=["q_proj"])
    sd = load_file(ad / "adapter_model.safetensors")
    (ad / "adapter_model.safetensors").unlink()
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
    torch.save(renamed, ad / "adapter_model.bin")
    _assert_matches(f"{base_folder}+{ad}", merged, base_folder)


def test_adapter_key_without_base_tensor_is_named(tiny_llama, tmp_path: Path) -> None:
    base_folder, model = tiny_llama()
    ad = tmp_path / "adapter"
    _adapter(model, ad, r=4, lora_alpha=8, target_modules=["q_proj"])
    sd = load_file(ad / "adapter_model.safetensors")
    bad = "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"
    sd[bad] = sd.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    sd[bad.replace("lora_A", "lora_B")] = sd.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    )
    save_file(sd, ad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="qq_proj.*matches no tensor of the base"):
        open_checkpoint(f"{base_folder}+{ad}")


def test_adapter_for_other_shapes_and_adapter_alone(tiny_llama, tmp_path: Path) -> None:
    _, model = tiny_llama("small")
    ad = tmp_path / "adapter"
    _adapter(model, ad, r=2, lora_alpha=2, target_modules=["q_proj"])
    other, _ = tiny_llama("wide", hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match="different base model"):
        open_checkpoint(f"{other}+{ad}")
    with pytest.raises(CheckpointError, match="PEFT adapter.*BASE\\+"):
        open_checkpoint(ad)
