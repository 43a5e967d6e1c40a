"""The MoE config: mergekit-moe's YAML read unchanged, and every mistake a config can make by
itself refused before any model is opened (paths need not exist here)."""

from __future__ import annotations

import pytest
import yaml

from mergeforge.errors import ConfigError
from mergeforge.moe import MoEConfig, load_moe_config

# mergekit-moe's documented example (docs/moe.md of mergekit), keys as it writes them
MERGEKIT_EXAMPLE = """
base_model: mistralai/Mistral-7B-Instruct-v0.2
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
experts_per_token: 2
experts:
  - source_model: teknium/OpenHermes-2.5-Mistral-7B
    positive_prompts:
      - "instruction tuning"
      - "roleplay"
    negative_prompts:
      - "math"
    noise_scale: 0.01
  - source_model: WizardLM/WizardMath-7B-V1.1
    positive_prompts:
      - "math"
    residual_scale: 0.5
"""


def _cfg(**top) -> dict:
    cfg = {"base_model": "b", "experts": [
        {"source_model": "e0", "positive_prompts": ["w1 w2"]},
        {"source_model": "e1", "positive_prompts": ["w3"], "negative_prompts": ["w4"]},
    ]}  # fmt: skip
    cfg.update(top)
    return cfg


def test_reads_mergekit_yaml_unchanged(tmp_path):
    path = tmp_path / "moe.yml"
    path.write_text(MERGEKIT_EXAMPLE)
    cfg = load_moe_config(path)
    assert isinstance(cfg, MoEConfig) and cfg.root == tmp_path and cfg.text == MERGEKIT_EXAMPLE
    assert (cfg.base_model, cfg.gate_mode, cfg.dtype, cfg.experts_per_token) == (
        "mistralai/Mistral-7B-Instruct-v0.2", "hidden", "bfloat16", 2)  # fmt: skip
    e0, e1 = cfg.experts
    assert e0.positive_prompts == ("instruction tuning", "roleplay")
    assert e0.negative_prompts == ("math",) and e0.noise_scale == 0.01
    assert e1.residual_scale == 0.5 and e1.negative_prompts == ()
    assert cfg.shared_experts == () and cfg.architecture is None and cfg.seed == 0


def test_mergekit_model_reference_forms_and_aliases():
    cfg = load_moe_config(_cfg(base_model={"model": {"path": "org/b", "revision": "v1"}},
                               gate_mode="hidden_last", dtype="bf16"))  # fmt: skip
    assert cfg.base_model == "org/b@v1" and cfg.gate_mode == "hidden" and cfg.dtype == "bfloat16"


def test_mergeforge_extras():
    cfg = load_moe_config(
        _cfg(
            gate_mode="router_input_avg",
            seed=7,
            gate_dtype="float32",
            shared_experts=[{"source_model": "s", "positive_prompts": ["w"]}],
        )
    )
    assert (cfg.gate_mode, cfg.seed, cfg.gate_dtype) == ("router_input_avg", 7, "float32")
    assert cfg.shared_experts[0].source_model == "s"
    assert cfg.expert_name(2) == "shared_experts[0] (s)"


def _experts(*prompts):
    return [{"source_model": f"e{i}", "positive_prompts": p} for i, p in enumerate(prompts)]


# (config changes, message the ConfigError must contain): every row is a config mistake
BAD = [
    ({"experts_per_token": 3}, "experts_per_token: 3 with 2 expert(s)"),
    ({"experts_per_token": 0}, "must be between 1 and 2"),
    ({"experts_per_token": "2"}, "experts_per_token: expected an integer"),
    ({"experts": [{"source_model": "e0", "postive_prompts": ["a"]}]},
     "experts[0]: unknown key 'postive_prompts'. Did you mean 'positive_prompts'?"),
    ({"experts": [{"source_model": "e0", "positive_prompts": ["a"]}, {"source_model": "e1"}]},
     "experts[1] (e1) has no positive_prompts, but gate_mode 'hidden'"),
    ({"gate_mode": "cheap_embed", "experts": _experts(["a"], [])}, "experts[1] (e1) has no"),
    ({"experts": _experts(["a", "b"], ["a", "b"], ["a", "b"])},
     "every expert has the same positive and negative prompts"),
    ({"experts": [{"source_model": "e0", "positive_prompts": "a"}]},
     "experts[0].positive_prompts: expected a list of strings"),
    ({"gate_mode": "hidden_max"}, "gate_mode: 'hidden_max' is not a gate mode"),
    ({"dtype": "int8"}, "dtype: 'int8' is not a dtype"),
    ({"experts": []}, "'experts:' must be a non-empty list"),
    ({"shared_experts": [{"source_model": "s"}]}, "shared_experts[0] (s) has no positive_prompts"),
    ({"base_model": None}, "missing 'base_model:'"),
    ({"architecture": ""}, "architecture: expected a name"),
    ({"experts": [{"source_model": "e", "positive_prompts": ["a"]},
                  {"source_model": "e", "positive_prompts": ["b"]}]},
     "all 2 experts are the same model (e)"),
]  # fmt: skip


@pytest.mark.parametrize("changes, needle", BAD, ids=[b[1][:40] for b in BAD])
def test_config_mistakes_are_refused(changes, needle):
    cfg = {k: v for k, v in _cfg(**changes).items() if v is not None}  # None: key left out
    with pytest.raises(ConfigError) as e:
        load_moe_config(cfg)
    assert needle in str(e.value)


def test_random_modes_need_no_prompts():
    experts = [{"source_model": "e0"}, {"source_model": "e1"}]
    cfg = load_moe_config({"base_model": "b", "gate_mode": "random", "experts": experts})
    assert not cfg.uses_prompts and all(not e.positive_prompts for e in cfg.experts)


def test_same_model_allowed_when_asked():
    same = _cfg(experts=[{"source_model": "e", "positive_prompts": ["a"]},
                         {"source_model": "e", "positive_prompts": ["b"]}])  # fmt: skip
    assert len(load_moe_config(same, allow_same_experts=True).experts) == 2


def test_warnings_power_of_two_and_equal_prompts():
    three = load_moe_config(_cfg(experts=_experts(["a"], ["b"], ["a"])))
    assert any(
        "3 experts is not a power of two: llama.cpp cannot load" in w for w in three.warnings
    )
    assert any("experts[0] (e0) and experts[2] (e2) have the same prompts" in w
               for w in three.warnings)  # fmt: skip
    assert load_moe_config(_cfg(experts=_experts(["a"], ["b"], ["c"], ["d"]))).warnings == ()


def test_yaml_text_and_file_errors(tmp_path):
    assert load_moe_config(yaml.safe_dump(_cfg())).experts[1].negative_prompts == ("w4",)
    with pytest.raises(ConfigError, match="does not exist"):
        load_moe_config(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_moe_config(bad)
