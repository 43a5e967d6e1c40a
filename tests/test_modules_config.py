"""mergekit's ``modules:`` (issue 18, item 5): one merge per module of the architecture.

Oracles against mergekit 0.1.5: a single-module model (tiny Llama, whose one module mergekit
names ``default``) with per-module slices and module parameters, and a hand-built tiny
Mistral3 checkpoint (mergekit's ``Mistral3ForConditionalGeneration`` table: a text decoder,
a vision tower and a projector under their own name prefixes) with slices that change the text
decoder's depth, gradients over the vision tower's own layers and per-module parameters. The
facts table (:data:`mergeforge.config.MERGEKIT_MODULES`) is checked against mergekit's
architecture files; bad ``modules:`` blocks are refused with the fix.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from mergeforge.config import MERGEKIT_MODULES, load_config
from mergeforge.engine import merge_state_dicts, run_merge
from mergeforge.errors import ConfigError, ValidationError
from tests.helpers import load_dir, run_mergekit, write_model


def _close(ours: dict, theirs: dict, tol: float = 1e-6) -> None:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    assert worst <= tol, worst


def mistral3(folder: Path, seed: int, text_layers: int = 4, vision_layers: int = 3) -> str:
    """A tiny Mistral3 (VLM) folder with the tensor names of mergekit 0.1.5's table and a
    config.json transformers reads (for mergekit): 16-wide, seeded."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    t = {
        "language_model.model.embed_tokens.weight": r(32, 8),
        "language_model.model.norm.weight": r(8),
        "language_model.lm_head.weight": r(32, 8),
    }
    for i in range(text_layers):
        p = f"language_model.model.layers.{i}."
        t |= {p + n + ".weight": r(8) for n in ("input_layernorm", "post_attention_layernorm")}
        t |= {
            p + n + ".weight": r(8, 8)
            for n in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.up_proj",
                "mlp.gate_proj",
                "mlp.down_proj",
            )
        }
    t |= {"vision_tower.patch_conv.weight": r(8, 3, 2, 2), "vision_tower.ln_pre.weight": r(8)}
    for i in range(vision_layers):
        p = f"vision_tower.transformer.layers.{i}."
        t |= {p + n + ".weight": r(8) for n in ("ffn_norm", "attention_norm")}
        t |= {
            p + n + ".weight": r(8, 8)
            for n in (
                "feed_forward.down_proj",
                "feed_forward.gate_proj",
                "feed_forward.up_proj",
                "attention.k_proj",
                "attention.o_proj",
                "attention.q_proj",
                "attention.v_proj",
            )
        }
    t |= {
        f"multi_modal_projector.{n}.weight": r(8, 8)
        for n in ("linear_1", "linear_2", "patch_merger.merging_layer")
    }
    t["multi_modal_projector.norm.weight"] = r(8)  # fmt: skip
    write_model(folder, t)
    cfg = {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "num_hidden_layers": text_layers,
                        "hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2,
                        "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 32},
        "vision_config": {"model_type": "pixtral", "num_hidden_layers": vision_layers,
                          "hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2,
                          "head_dim": 4, "patch_size": 2, "image_size": 8},
        "torch_dtype": "float32",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("mistral3")
    return [mistral3(root / n, s) for n, s in (("base", 0), ("e1", 1), ("e2", 2))]


def _vlm_config(b: str, e1: str, e2: str) -> dict:
    return {
        "merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
        "parameters": {"weight": 0.5},
        "modules": {
            "text_decoder": {"slices": [  # 4 layers -> 5: [0, 3) then [2, 4)
                {"sources": [{"model": b, "layer_range": [0, 3]},
                             {"model": e1, "layer_range": [0, 3]},
                             {"model": e2, "layer_range": [1, 4],
                              "parameters": {"weight": [0.1, 0.9]}}]},
                {"sources": [{"model": b, "layer_range": [2, 4]},
                             {"model": e1, "layer_range": [2, 4]},
                             {"model": e2, "layer_range": [0, 2]}],
                 "parameters": {"weight": 0.2}}]},
            # a gradient over the vision tower's own 3 layers; a filter with no fallback falls
            # through to the global weight, as mergekit's precedence chain does
            "vision_tower": {"models": [{"model": e1, "parameters": {"weight": [0.0, 1.0]}},
                                        {"model": e2}],
                             "parameters": {"weight": [{"filter": "attention", "value": 0.3}]}},
            "multi_modal_projector": {"models": [{"model": e2}], "parameters": {"weight": 0.8}},
        },
    }  # fmt: skip


# ---- oracles ---------------------------------------------------------------------------------


@pytest.mark.mergekit
def test_multi_module_vlm_equals_mergekit(vlm, tmp_path):
    cfg = _vlm_config(*vlm)
    theirs = run_mergekit(cfg, tmp_path / "mk")
    run_merge(cfg, tmp_path / "mf", progress=False)
    _close(load_dir(tmp_path / "mf"), theirs)
    ours_cfg = json.loads((tmp_path / "mf" / "config.json").read_text())
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert ours_cfg["text_config"]["num_hidden_layers"] == 5
    assert mk_cfg["text_config"]["num_hidden_layers"] == 5
    assert ours_cfg["vision_config"]["num_hidden_layers"] == 3
    assert "language_model.model.layers.4.mlp.up_proj.weight" in theirs


@pytest.mark.mergekit
def test_single_module_default_equals_mergekit(llama_family, tmp_path):
    """mergekit names the one module of a single-module architecture ``default``."""
    b, e = str(llama_family["base"]), [str(p) for p in llama_family["experts"]]
    cfg = {
        "merge_method": "ties", "base_model": b, "dtype": "float32",
        "parameters": {"weight": 1.0, "density": 0.8, "normalize": True},
        "modules": {"default": {
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, 2]},
                             {"model": e[0], "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                             {"model": e[1], "layer_range": [1, 3]}],
                 "parameters": {"density": [0.3, 0.9]}},
                {"sources": [{"model": b, "layer_range": [2, 3]},
                             {"model": e[0], "layer_range": [2, 3]},
                             {"model": e[1], "layer_range": [0, 1]}]}],
            "parameters": {"weight": [{"filter": "mlp", "value": 0.4}], "density": 0.5}}},
    }  # fmt: skip
    theirs = run_mergekit(cfg, tmp_path / "mk")
    run_merge(cfg, tmp_path / "mf", progress=False)
    _close(load_dir(tmp_path / "mf"), theirs)


def test_modules_in_memory_equal_the_files(vlm):
    """``merge_state_dicts`` plans modules the same way (bit-identical)."""
    from mergeforge.checkpoint import open_checkpoint

    cfg = _vlm_config(*vlm)
    on_disk = merge_state_dicts(cfg, {})
    ck = open_checkpoint(vlm[2])
    try:
        sd = {k: ck.get(k).clone() for k in ck.keys()}
    finally:
        ck.close()
    # the second expert in memory: no config.json, so the reference (the base) decides modules
    mixed = merge_state_dicts(json.loads(json.dumps(cfg).replace(vlm[2], "e2")), {"e2": sd})
    assert all(torch.equal(on_disk[k], mixed[k]) for k in on_disk)


# ---- the facts, against mergekit's tables ---------------------------------------------------


@pytest.mark.mergekit
def test_module_table_matches_mergekit():
    """Every multi-module architecture file of mergekit 0.1.5 is in MERGEKIT_MODULES, each of its
    weights falls in its module by the longest-prefix rule, and the layer-count keys agree."""
    from mergeforge.engine.modules import module_owner

    seen = set()
    for f in resources.files("mergekit._data.architectures").iterdir():
        if not f.name.endswith(".json"):
            continue
        d = json.loads(f.read_text())
        if len(d.get("modules") or {}) < 2:
            continue
        for arch in d["architectures"]:
            seen.add(arch)
            assert arch in MERGEKIT_MODULES, arch
            owner = module_owner(arch)
            assert set(MERGEKIT_MODULES[arch]) == set(d["modules"]), arch
            for mod, m in d["modules"].items():
                a = m["architecture"]
                prefix = m.get("weight_prefix") or ""
                if prefix and not prefix.endswith("."):  # whisper.json's "model.decoder" typo
                    prefix += "."
                names = [w["name"] for w in a.get("pre_weights", []) + a.get("post_weights", [])]
                names += [w["name"].replace("${layer_index}", "1")
                          for w in a.get("layer_templates", {}).get("weights", [])]  # fmt: skip
                for n in names:
                    assert owner(prefix + n) == mod, (arch, mod, prefix + n)
                assert MERGEKIT_MODULES[arch][mod][1] == a.get("num_layers_config_key"), (arch, mod)
    assert seen == set(MERGEKIT_MODULES)


# ---- refused, with the fix -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modules", "needle"),
    [
        ({"default": {"models": [{"model": "a"}], "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]}]}},
         "modules.default: give exactly one of 'models:'"),
        ({"default": {"parameters": {"weight": 1}}}, "not neither"),
        ({"default": {"modles": []}}, "unknown key 'modles'. Did you mean 'models'?"),
        ({"default": [{"model": "a"}]}, "modules.default: expected a mapping"),
        ([{"default": {}}], "'modules:' must be a mapping of module name"),
        ({"default": {"models": [{"model": "a", "parameters": {"wieght": 1}}]}},
         "modules.default.models[0].parameters: unknown parameter 'wieght'"),
        ({"default": {"models": [{"model": "a"}, {"model": "a"}]}},
         "modules.default.models[1]: 'a' is already listed"),
    ],
)  # fmt: skip
def test_bad_modules_block(modules, needle):
    with pytest.raises(ConfigError) as e:
        load_config({"merge_method": "linear", "modules": modules})
    assert needle in str(e.value)


def test_modules_and_models_together():
    with pytest.raises(ConfigError, match="give only one of 'modules:' and 'models:'"):
        load_config({"merge_method": "linear", "models": [{"model": "a"}],
                     "modules": {"default": {"models": [{"model": "a"}]}}})  # fmt: skip


def test_module_parameters_follow_the_precedence():
    cfg = load_config({"merge_method": "slerp", "base_model": "a", "modules": {"default": {
        "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 2.0}}}})  # fmt: skip
    assert any("modules.default.parameters.t" in w for w in cfg.warnings)  # slerp t > 1
    assert cfg.referenced_models() == ["a", "b"]


def test_unknown_module_name_lists_the_modules(vlm, llama_family):
    b, e1, e2 = vlm
    with pytest.raises(ConfigError) as e:
        merge_state_dicts({"merge_method": "linear",
                           "modules": {"text": {"models": [{"model": e1}]}}}, {})  # fmt: skip
    msg = str(e.value)
    assert "has no module 'text'" in msg
    assert "text_decoder, multi_modal_projector, vision_tower" in msg
    with pytest.raises(ConfigError, match="has no module 'vision_tower'.*'default'"):
        merge_state_dicts(
            {
                "merge_method": "linear",
                "modules": {"vision_tower": {"models": [{"model": str(llama_family["base"])}]}},
            },
            {},
        )


def test_a_module_left_out_is_refused(vlm):
    b, e1, _ = vlm
    with pytest.raises(ConfigError) as e:
        merge_state_dicts({"merge_method": "linear", "modules": {
            "text_decoder": {"models": [{"model": e1}]},
            "vision_tower": {"models": [{"model": e1}]}}}, {})  # fmt: skip
    assert "multi_modal_projector" in str(e.value)
    assert "mergekit would write a model without its tensors" in str(e.value)


def test_a_tensor_in_no_module_is_refused(vlm, tmp_path):
    extra = load_dir(Path(vlm[1]))
    extra["image_newline"] = torch.zeros(8)
    odd = write_model(tmp_path / "odd", extra)
    (odd / "config.json").write_text((Path(vlm[1]) / "config.json").read_text())
    mods = {m: {"models": [{"model": str(odd)}]} for m in MERGEKIT_MODULES[
        "Mistral3ForConditionalGeneration"]}  # fmt: skip
    with pytest.raises(ValidationError, match="'image_newline'.*top-level 'models:'"):
        merge_state_dicts({"merge_method": "linear", "modules": mods}, {})
