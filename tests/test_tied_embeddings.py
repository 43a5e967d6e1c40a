"""Tied and untied embeddings together (issue 12, item 6), against mergekit 0.1.5.

A tied Llama stores no ``lm_head.weight`` (``tie_word_embeddings: true``); an untied one does.
mergekit's rule, which mergeforge follows: the output has ``lm_head.weight`` when any input of
that tensor stores one, and an input that stores none contributes its
``model.embed_tokens.weight`` in its place. The tensors (names and values) must equal
mergekit's (tests marked ``mergekit``), and the output must load with transformers and use the
merged head; the rule by hand and the errors need no mergekit.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import yaml

import mergeforge
from mergeforge.engine.layout import TIED_NAMES
from mergeforge.errors import ValidationError
from tests.helpers import load_dir, run_mergekit

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _llama(tied: bool, state: dict[str, torch.Tensor] | None = None):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model


def _noisy(sd: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale for k, v in sd.items()}


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory) -> dict[str, str]:
    """A tied base, its untied twin (own head), a tied expert and an untied expert."""
    root = tmp_path_factory.mktemp("tied")
    base = _llama(tied=True)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items() if k != HEAD}
    out = {}
    for name, tied, state in [
        ("base_tied", True, sd),
        ("base_untied", False, {**sd, HEAD: sd[EMBED] + 0.01}),
        ("expert_tied", True, _noisy(sd, 1, 0.02)),
        ("expert_untied", False, _noisy({**sd, HEAD: sd[EMBED] * 0.5}, 2, 0.03)),
    ]:
        d = root / name
        _llama(tied, state).save_pretrained(d, safe_serialization=True)
        has_head = HEAD in load_dir(d)
        assert has_head != tied, (name, has_head)  # the fixture is what it claims
        out[name] = str(d)
    return out


def _cases(f: dict[str, str]) -> dict[str, dict]:
    return {
        "linear_tied_first": {
            "merge_method": "linear",
            "models": [
                {"model": f["expert_tied"], "parameters": {"weight": 0.3}},
                {"model": f["expert_untied"], "parameters": {"weight": 0.7}},
            ],
        },
        "linear_untied_first": {
            "merge_method": "linear",
            "models": [
                {"model": f["expert_untied"], "parameters": {"weight": 0.6}},
                {"model": f["expert_tied"], "parameters": {"weight": 0.4}},
            ],
        },
        "task_arithmetic_tied_base": {
            "merge_method": "task_arithmetic",
            "base_model": f["base_tied"],
            "models": [
                {"model": f["expert_untied"], "parameters": {"weight": 0.8}},
                {"model": f["expert_tied"], "parameters": {"weight": 0.5}},
            ],
        },
        "task_arithmetic_untied_base": {
            "merge_method": "task_arithmetic",
            "base_model": f["base_untied"],
            "models": [{"model": f["expert_tied"], "parameters": {"weight": 0.7}}],
        },
        "task_arithmetic_all_tied": {
            "merge_method": "task_arithmetic",
            "base_model": f["base_tied"],
            "models": [{"model": f["expert_tied"], "parameters": {"weight": 0.7}}],
        },
        "passthrough_slices_tied_then_untied": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": f["expert_tied"], "layer_range": [0, 2]}]},
                {"sources": [{"model": f["expert_untied"], "layer_range": [1, 3]}]},
            ],
        },
    }


CASES = list(_cases({k: k for k in ("base_tied", "base_untied", "expert_tied", "expert_untied")}))


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_tied_and_untied_same_as_mergekit(tied_family, tmp_path, case):
    cfg = {**_cases(tied_family)[case], "dtype": "float32"}
    theirs = run_mergekit(cfg, tmp_path / "mk")
    mergeforge.merge(yaml.safe_load(yaml.safe_dump(cfg)), tmp_path / "mf", progress=False)
    ours = load_dir(tmp_path / "mf")
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("case", CASES)
def test_tied_and_untied_output_loads_and_uses_the_merged_head(tied_family, tmp_path, case):
    """mergeforge alone: the head is there unless every input is tied, config.json says so,
    and transformers loads the output with that head."""
    import transformers as tf

    cfg = {**_cases(tied_family)[case], "dtype": "float32"}
    result = mergeforge.merge(cfg, tmp_path / "mf", progress=False)
    ours = load_dir(tmp_path / "mf")
    assert (HEAD in ours) == (case != "task_arithmetic_all_tied")

    out_cfg = json.loads((tmp_path / "mf" / "config.json").read_text())
    assert out_cfg["tie_word_embeddings"] is (HEAD not in ours)
    if any(w.startswith(f"{HEAD!r}: ") for w in result.warnings):
        assert "tied embeddings" in " ".join(result.warnings)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "mf")
    if HEAD in ours:  # the merged head is the one the loaded model uses
        assert torch.equal(model.lm_head.weight.detach(), ours[HEAD])
    else:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


def test_tied_input_contributes_its_embedding(tied_family, tmp_path):
    """The rule by hand: 0.3 · embed(tied) + 0.7 · head(untied)."""
    cfg = {**_cases(tied_family)["linear_tied_first"], "dtype": "float32"}
    result = mergeforge.merge(cfg, tmp_path / "mf", progress=False)
    ours = load_dir(tmp_path / "mf")
    t, u = load_dir(Path(tied_family["expert_tied"])), load_dir(Path(tied_family["expert_untied"]))
    expected = 0.3 * t[EMBED] + 0.7 * u[HEAD]
    assert (ours[HEAD] - expected).abs().max().item() <= 1e-6
    assert sum(HEAD in w for w in result.warnings) == 2, result.warnings  # used + added


def test_explicitly_untied_without_head_is_an_error(tied_family, tmp_path):
    """A file without lm_head whose config says untied is incomplete, not tied."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tied_family["expert_tied"], broken)
    c = json.loads((broken / "config.json").read_text())
    c["tie_word_embeddings"] = False
    (broken / "config.json").write_text(json.dumps(c))
    cfg = {
        "merge_method": "linear",
        "models": [{"model": tied_family["expert_untied"]}, {"model": str(broken)}],
    }
    with pytest.raises(ValidationError, match="tie_word_embeddings: false") as e:
        mergeforge.merge(cfg, tmp_path / "out", progress=False)
    assert str(broken) in str(e.value) and HEAD in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.mergekit
def test_tied_names_match_mergekit_architectures():
    import mergekit

    root = Path(mergekit.__file__).parent / "_data" / "architectures"
    theirs: dict[str, set[str]] = {}

    def walk(x):
        if isinstance(x, dict):
            if x.get("tied_names"):
                theirs.setdefault(x["name"], set()).update(x["tied_names"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for f in sorted(glob.glob(str(root / "*.json"))):
        walk(json.loads(Path(f).read_text()))
    assert theirs, "mergekit's architecture tables moved"
    assert {k: set(v) for k, v in TIED_NAMES.items()} == theirs
