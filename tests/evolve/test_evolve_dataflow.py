"""The data-flow genome (``genome.space: dataflow``, arXiv 2403.13187 §3.2): which layers of
which models, in which order, make the merged stack. Decoding by hand, the merge of a decoded
recipe tensor for tensor, a search that finds a known stack, fitness models of another depth
(BERT pool, Llama loss) built on the fly, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from tests.evolve.test_evolve_cli import texts, word_tokenizer
from tests.helpers import make_family

from mergeforge.config import load_config
from mergeforge.engine import merge_state_dicts
from mergeforge.errors import ConfigError
from mergeforge.evolve import evolve, load_evolve_config
from mergeforge.evolve.genome import DataFlowGenome, LayerRecipe

pytest.importorskip("cmaes")


def spec(**keys):
    return load_evolve_config({"genome": {"space": "dataflow", "models": ["a", "b"], **keys}}
                              ).genome  # fmt: skip


def stack_models(layers: int = 4, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def sd():
        out = {f"layers.{i}.w": torch.randn(5, 5, generator=g) for i in range(layers)}
        return {"embed.weight": torch.randn(7, 5, generator=g), **out,
                "norm.weight": torch.randn(5, generator=g)}  # fmt: skip

    return {"a": sd(), "b": sd()}


def test_decode_encode_and_the_document_by_hand():
    genome = DataFlowGenome(spec(repeats=2), models=["a", "b"], num_layers=[3, 3])
    assert genome.size == 12 and genome.methods == ("passthrough",)
    assert genome.labels()[:4] == ["r0/a/L0", "r0/a/L1", "r0/a/L2", "r0/b/L0"]
    assert genome.labels()[-1] == "r1/b/L2"
    #            a0   a1   a2   b0   b1   b2 | a0   a1   a2   b0   b1   b2
    x = np.array([0.9, 0.2, 0.6, 0.1, 0.7, 0.8, 0.51, 0.5, 0.0, 0.0, 0.0, 1.2])
    recipe = genome.decode(x)  # > 1/2 kept; 1.2 clipped to 1
    assert recipe.layers == ((0, 0), (0, 2), (1, 1), (1, 2), (0, 0), (1, 2))
    doc = genome.document(recipe)
    assert doc == {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 1]}]},
        {"sources": [{"model": "a", "layer_range": [2, 3]}]},
        {"sources": [{"model": "b", "layer_range": [1, 3]}]},  # b1, b2: one slice
        {"sources": [{"model": "a", "layer_range": [0, 1]}]},
        {"sources": [{"model": "b", "layer_range": [2, 3]}]},
    ]}  # fmt: skip
    assert load_config(yaml.safe_dump(doc)).merge_method == "passthrough"  # a valid config
    assert genome.decode(genome.encode(recipe)) == recipe
    # nothing above the threshold: the largest gene's layer, never an empty model
    assert genome.decode(np.full(12, 0.3) + np.eye(12)[4] * 0.1).layers == ((1, 1),)
    # the start: the start model's own stack in the first repeat
    assert genome.decode(genome.initial()).layers == ((0, 0), (0, 1), (0, 2))
    g_b = DataFlowGenome(spec(start_model="b"), models=["a", "b"], num_layers=[3, 2])
    assert g_b.size == 5 and g_b.decode(g_b.initial()).layers == ((1, 0), (1, 1))
    with pytest.raises(ConfigError, match="not a subsequence"):
        g_b.encode(LayerRecipe("passthrough", ((1, 0), (0, 0))))  # b before a: no repeat


def test_the_decoded_document_merges_to_the_stack():
    models = stack_models()
    genome = DataFlowGenome(spec(repeats=2), models=["a", "b"], num_layers=[4, 4])
    stack = ((1, 0), (0, 1), (0, 2), (1, 3), (0, 1))
    merged = merge_state_dicts(genome.document(LayerRecipe("passthrough", stack)), models)
    names = ["a", "b"]
    assert sorted(k for k in merged if k.startswith("layers.")) == [
        f"layers.{i}.w" for i in range(5)]  # fmt: skip
    for i, (m, layer) in enumerate(stack):
        assert torch.equal(merged[f"layers.{i}.w"], models[names[m]][f"layers.{layer}.w"])
    # outside the layers: before them the first slice's model, after them the last slice's
    assert torch.equal(merged["embed.weight"], models["b"]["embed.weight"])
    assert torch.equal(merged["norm.weight"], models["a"]["norm.weight"])


class StackTarget:
    """Fitness of a stack: minus the squared distance of each layer to the target stack's,
    minus 10 per layer too many or too few (0 only at the target)."""

    def __init__(self, models, target):
        self.target = [models[m][f"layers.{i}.w"] for m, i in target]

    def __call__(self, merged) -> float:
        layers = [merged[f"layers.{i}.w"] for i in range(len(merged) - 2)]
        close = sum(float((x - t).pow(2).sum()) for x, t in zip(layers, self.target, strict=False))
        return -close - 10.0 * abs(len(layers) - len(self.target))


def test_a_search_finds_a_known_stack(tmp_path):
    models = stack_models()
    fitness = StackTarget(models, [("a", 0), ("a", 1), ("b", 2), ("b", 3)])
    cfg = {"genome": {"space": "dataflow", "models": ["a", "b"]},
           "search": {"evaluations": 160, "population": 8, "workers": 0, "seed": 0}}  # fmt: skip
    res = evolve(cfg, fitness=fitness, models=models, out=tmp_path, progress=False)
    assert res.history[0]["fitness"] < -10  # the start, a's own stack, is far from it
    assert res.best_fitness == 0.0
    assert res.best_config == {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "b", "layer_range": [2, 4]}]},
    ]}  # fmt: skip
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == res.best_config
    assert {r["method"] for r in res.history} == {"passthrough"}


def test_a_pool_scores_stacks_of_every_depth_and_the_model_loads(tmp_path):
    """A BERT pool: candidates of other depths than the skeleton's are scored (a model of
    their depth built on the fly), and the best stack is written as a loadable model."""
    from torch import nn

    from mergeforge.evaluate.text.eval import load_encoder, save_head

    fam = make_family(tmp_path, "bert", n_experts=2)
    word_tokenizer(fam["experts"][0])
    torch.manual_seed(0)
    save_head(nn.Linear(32, 2), ["no", "yes"], tmp_path / "head")
    rows = [{"text": x, "label": ["no", "yes"][i % 2]} for i, x in enumerate(texts(12, 0))]
    cfg = {"genome": {"space": "dataflow", "models": [str(p) for p in fam["experts"]],
                      "repeats": 2},
           "fitness": {"tasks": [{"name": "t", "examples": rows, "head": str(tmp_path / "head")}],
                       "max_length": 8},
           "search": {"evaluations": 8, "population": 8, "workers": 0, "seed": 0,
                      "sigma0": 0.4}}  # fmt: skip
    res = evolve(cfg, out=tmp_path / "out", progress=False)
    assert res.failed == 0 and res.evaluations == 8
    depths = {max(1, sum(g > 0.5 for g in r["genes"])) for r in res.history}  # as decoded
    assert len(depths) > 1 and depths != {3}  # stacks of other depths were scored
    best = load_config(tmp_path / "out" / "best.yaml")
    encoder = load_encoder(tmp_path / "out" / "model")  # every weight from the files
    kept = sum(b - a for s in best.slices for a, b in [s.sources[0].layer_range])
    assert encoder.config.num_hidden_layers == kept


def test_a_language_model_of_another_depth(tmp_path):
    fam = make_family(tmp_path, "llama", n_experts=2)
    word_tokenizer(fam["experts"][0], inputs=("input_ids", "attention_mask"))
    cfg = {"genome": {"space": "dataflow", "models": [str(p) for p in fam["experts"]],
                      "repeats": 2},
           "fitness": {"texts": texts(4, 0), "max_length": 8},
           "search": {"evaluations": 6, "population": 6, "workers": 0, "sigma0": 0.4}}  # fmt: skip
    res = evolve(cfg, progress=False)
    assert res.failed == 0 and all(np.isfinite(r["fitness"]) for r in res.history)
    assert len({len(r["genes"]) for r in res.history}) == 1


@pytest.mark.parametrize(
    "keys, needle",
    [
        ({"merge_method": "ties"}, "stacks whole layers"),
        ({"layer_groups": 2}, "layer_groups"),
        ({"repeats": 0}, "genome.repeats"),
        ({"start_model": "c"}, "not one of genome.models"),
        ({"space": "layers"}, "genome.space"),
    ],
)
def test_bad_dataflow_genomes(keys, needle):
    with pytest.raises(ConfigError, match=needle):
        spec(**keys)


def test_models_of_different_shapes_are_refused_before_anything_runs():
    models = stack_models()
    models["b"]["layers.1.w"] = torch.zeros(5, 6)

    def never(_sd):
        raise AssertionError("no candidate may be scored")

    cfg = {"genome": {"space": "dataflow", "models": ["a", "b"]}, "search": {"workers": 0}}
    shapes = r"'layers\.\*\.w' is \(5, 5\) in a but \(5, 5\) or \(5, 6\) in b"
    with pytest.raises(ConfigError, match=shapes):
        evolve(cfg, fitness=never, models=models, progress=False)
