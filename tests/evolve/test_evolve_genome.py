"""The genome: vector <-> recipe round trips, the YAML it writes (read by mergeforge's
load_config and by mergekit's own parser), and what the engine merges from it (hand-worked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from mergeforge.config import load_config
from mergeforge.engine import merge_state_dicts
from mergeforge.errors import ConfigError
from mergeforge.evolve.config import parse_genome
from mergeforge.evolve.genome import Genome, Recipe, count_layers, layer_groups


def genome(num_layers: int = 4, **keys) -> Genome:
    raw = {"models": ["a", "b"], "base_model": "base", "merge_method": "ties", **keys}
    return Genome(parse_genome(raw, suite_models=False), models=["a", "b"], base_model="base",
                  num_layers=num_layers)  # fmt: skip


CASES = {
    "one group": {},
    "slices": {"layer_groups": 2},
    "filters": {"layer_groups": 2, "filters": ["mlp", "attn"]},
    "smooth": {"layer_groups": 3, "smooth": True},
    "methods+shared": {"merge_method": ["ties", "dare_ties", "task_arithmetic"],
                       "shared": {"lambda": [0.5, 1.5]}, "layer_granularity": 2},
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_decode_encode_round_trip(case):
    g = genome(**CASES[case])
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.random(g.size)
        recipe = g.decode(x)
        assert g.decode(g.encode(recipe)) == recipe  # recipe -> vector -> the same recipe
        if len(g.methods) == 1:  # values are rounded to 1e-6 of their range
            np.testing.assert_allclose(g.encode(recipe), x, atol=1e-6)


def test_the_layout_is_mergekit_evolves():
    """(groups, models, filters + 1, params) flattened in C order, then shared, then method."""
    g = genome(layer_groups=2, filters=["mlp"], shared={"lambda": [0, 2]},
               merge_method=["ties", "task_arithmetic"])  # fmt: skip
    assert g.shape == (2, 2, 2, 2) and g.size == 16 + 1 + 1
    labels = g.labels()
    assert labels[:4] == ["g0/a/weight/mlp", "g0/a/density/mlp", "g0/a/weight", "g0/a/density"]
    assert labels[-2:] == ["lambda", "method"]
    x = np.zeros(g.size)
    x[labels.index("g1/b/density")] = 0.25
    x[-2], x[-1] = 0.75, 0.9  # lambda 1.5; method bin 2 of 2
    r = g.decode(x)
    assert r.per_model["density"][1][1] == (0.0, 0.25) and r.shared == {"lambda": 1.5}
    assert r.method == "task_arithmetic"


def test_initial_is_mergekit_evolves_start():
    g = genome(layer_groups=2, shared={"lambda": [0.5, 1.5]})
    r = g.decode(g.initial())
    assert {w for grp in r.per_model["weight"] for m in grp for w in m} == {0.5}  # 1 / M
    assert {d for grp in r.per_model["density"] for m in grp for d in m} == {1.0}
    assert r.shared == {"lambda": 1.0}  # the method's default, inside the range


@pytest.mark.parametrize("case", CASES)
def test_the_yaml_loads_with_load_config(case):
    g = genome(**CASES[case])
    for x in np.random.default_rng(1).random((3, g.size)):
        doc = g.document(g.decode(x))
        cfg = load_config(yaml.safe_dump(doc))  # the text written to best.yaml
        assert cfg.merge_method == g.decode(x).method
        assert bool(cfg.slices) == (len(g.groups) > 1 and not g.spec.smooth)


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_the_yaml_loads_with_mergekits_parser(case):
    from mergekit.config import MergeConfiguration

    g = genome(**CASES[case])
    doc = g.document(g.decode(np.random.default_rng(2).random(g.size)))
    MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(doc)))


def test_the_engine_merges_per_group_weights_as_written():
    """Hand-worked: task arithmetic with weights (0.3, 0.7) on layers 0-1 and (0.8, 0.2) on
    layers 2-3; the embedding takes the first group's (mergekit's slices rule)."""
    g = genome(merge_method="task_arithmetic", layer_groups=2)
    recipe = Recipe("task_arithmetic", {"weight": (((0.3,), (0.7,)), ((0.8,), (0.2,)))}, {})
    torch.manual_seed(0)
    models = {n: {"embed.weight": torch.randn(5, 3),
                  **{f"layers.{i}.w": torch.randn(3, 3) for i in range(4)}}
              for n in ("base", "a", "b")}  # fmt: skip
    out = merge_state_dicts(g.document(recipe), models, workers=1)
    for name, t in out.items():
        wa, wb = (0.3, 0.7) if name == "embed.weight" or int(name.split(".")[1]) < 2 else (0.8, 0.2)
        b = models["base"][name]
        expected = b + wa * (models["a"][name] - b) + wb * (models["b"][name] - b)
        torch.testing.assert_close(t, expected)


def test_layer_groups_and_counts():
    assert layer_groups(6, 3, None) == [(0, 2), (2, 4), (4, 6)]
    assert layer_groups(5, 2, None) == [(0, 2), (2, 5)]
    assert layer_groups(6, None, 3) == [(0, 3), (3, 6)]
    assert layer_groups(0, None, None) == [(0, 0)]
    with pytest.raises(ConfigError, match="does not divide"):
        layer_groups(6, None, 4)
    with pytest.raises(ConfigError, match="at most one group per layer"):
        layer_groups(2, 3, None)
    assert count_layers(["model.layers.0.a", "model.layers.7.a", "lm_head.weight"]) == 8
    assert count_layers(["x.y"], {"num_hidden_layers": 12}) == 12
    assert count_layers(["embed.weight"]) == 0
