"""The model card (README.md) written into every merge output: Hugging Face metadata front
matter that ``huggingface_hub`` reads back, naming Hub repos only as ``base_model``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

import mergeforge
from mergeforge.engine import _card_data, _hub_ids


def _ta(base, experts) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
    }


def test_card_of_a_local_merge_loads_with_huggingface_hub(llama_family, tmp_path):
    out = tmp_path / "out"
    mergeforge.merge(_ta(llama_family["base"], llama_family["experts"][:2]), out, progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergeforge"]
    # local folders are not Hub repos: listed in the text, not as base_model
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert str(llama_family["experts"][1]) in card.text
    assert "task_arithmetic" in card.text


@pytest.mark.parametrize(
    ("spec", "ids"),
    [
        ("meta-llama/Llama-3.2-1B", ["meta-llama/Llama-3.2-1B"]),
        ("org/name@v1.0", ["org/name"]),
        ("org/model+org/lora-adapter", ["org/model", "org/lora-adapter"]),
        ("org/model+./adapters/mine", ["org/model"]),
        ("./org/name", []),
        ("/models/llama", []),
        ("models/llama/expert", []),  # two slashes: a path
        ("gpt2", []),  # a bare word is as likely a local folder
        ("../up/name", []),
    ],
)
def test_hub_ids_are_org_slash_name_references(spec, ids):
    assert _hub_ids(spec, None) == ids


def test_a_local_folder_that_looks_like_an_id_is_not_one(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert _hub_ids("org/name", tmp_path) == []  # relative to the config's folder
    monkeypatch.chdir(tmp_path)
    assert _hub_ids("org/name", None) == []  # relative to the working directory


def test_hub_inputs_become_base_model_with_relation_merge(tmp_path):
    plan = SimpleNamespace(
        models=["org/base", "org/math@main", str(tmp_path), "org/math", "org/code+org/lora"],
        config=SimpleNamespace(root=None),
    )
    card = ModelCard(f"---\n{_card_data(plan).to_yaml()}\n---\n# x\n")
    loaded = ModelCard(str(card))  # a round trip through the text, as the Hub parses it
    assert loaded.data.base_model == ["org/base", "org/math", "org/code", "org/lora"]
    assert loaded.data.base_model_relation == "merge"
    assert loaded.data.tags == ["merge", "mergeforge"]
    single = SimpleNamespace(models=["org/base"], config=SimpleNamespace(root=None))
    data = _card_data(single)
    assert data.base_model == "org/base" and data.get("base_model_relation") is None
