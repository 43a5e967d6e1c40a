"""Parameter records: bad values fail at construction, naming the parameter and the valid range;
the registry holds every method with its paper and mergekit's names."""

from __future__ import annotations

import math

import pytest

import mergeforge.methods as methods
from mergeforge.errors import ConfigError
from mergeforge.methods import get_method

BAD = [
    ("ties", "per_model", {"density": 1.5}, "'density' = 1.5 .*\\[0.0, 1.0\\]"),
    ("ties", "per_model", {"density": -0.1}, "'density'"),
    ("ties", "per_model", {"weight": math.nan}, "'weight' = nan .*finite"),
    ("ties", "per_model", {"weight": True}, "'weight'"),
    ("ties", "shared", {"lambda_": "big"}, "'lambda' = 'big'"),
    ("ties", "shared", {"topk_scope": "layer"}, "'topk_scope' = 'layer' .*tensor, model"),
    ("ties", "shared", {"consensus_method": "total"}, "'consensus_method' .*sum, count"),
    ("ties", "shared", {"normalize": "yes"}, "'normalize' = 'yes' .*true or false"),
    ("dare_ties", "shared", {"rescale_norm": "l3"}, "'rescale_norm' .*inverse_prob"),
    ("breadcrumbs", "per_model", {"gamma": 2.0}, "'gamma' = 2.0"),
    ("della", "per_model", {"density": 0.9, "epsilon": 0.15}, "'epsilon' = 0.15 .*density"),
    ("della", "per_model", {"density": 0.1, "epsilon": 0.1}, "'epsilon'"),
    ("emr", "shared", {"task": -1}, "'task' = -1"),
    ("emr", "shared", {"task": 1.5}, "'task'"),
    ("emr", "shared", {"scale_scope": "layer"}, "'scale_scope'"),
    ("slerp", "shared", {"t": math.inf}, "'t' = inf"),
    ("model_stock", "shared", {"filter_wise": 1}, "'filter_wise'"),
    ("passthrough", "per_model", {"scale": "x"}, "'scale'"),
    ("linear", "shared", {"normalize": None}, "'normalize'"),
    ("umtam", "shared", {"curvature": "hessian"}, "'curvature' .*recorded, fisher-sampled"),
    ("umtam", "shared", {"sign_weight": "magnitude"}, "'sign_weight' .*curvature, saliency"),
    ("umtam", "shared", {"normalize_saliency": True}, "'normalize_saliency' .*sign_weight"),
    ("umtam", "per_model", {"density": 1.2}, "'density' = 1.2"),
    ("ota", "shared", {"power": -0.5}, "'power' = -0.5"),
    ("ota", "shared", {"epsilon": 0.0}, "'epsilon' = 0.0 .*positive"),
    ("ota", "shared", {"normalization": "global"}, "'normalization' .*none, mean, sum"),
    ("ota", "shared", {"preconditioner": "adam"}, "'preconditioner' .*exp_avg_sq"),
    ("prune", "shared", {"score": "random"}, "'score' .*saliency, magnitude, fisher"),
    ("prune", "per_model", {"density": 0.0}, "'density' = 0.0 .*\\(0, 1\\]"),
]


@pytest.mark.parametrize(("name", "scope", "values", "message"), BAD)
def test_bad_values_name_the_parameter(name, scope, values, message):
    m = get_method(name)
    cls = m.params if scope == "shared" else m.model_params
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_good_edge_values():
    get_method("ties").model_params(density=0.0, weight=-2)  # YAML ints are fine
    get_method("della").model_params(density=1.0, epsilon=0.5)  # full density: no window
    get_method("della").model_params(density=0.5, epsilon=0.0)
    get_method("emr").params(task=0)


def test_slerp_needs_t():
    with pytest.raises(TypeError):
        get_method("slerp").params()


def test_registry():
    names = {m.name for m in methods.all_methods()}
    assert names == {
        "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "emr", "passthrough",
        # matrix-aware (issue 4)
        "tsv", "iso_c", "iso_cts", "wudi", "swudi", "swudi_a", "ace", "regmean", "fisher",
        # curvature recorded in training (issue 14)
        "umtam", "ota", "prune",
        # mergekit's remaining methods (issue 18)
        "multislerp", "nuslerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram",
        "ramplus_tl", "ranked_ties",
    }  # fmt: skip
    for m in methods.all_methods():
        assert m.reference.startswith("https://") and m.summary, m.name
    stochastic = {m.name for m in methods.all_methods() if m.stochastic}
    assert stochastic == {"dare_ties", "dare_linear", "della", "della_linear", "ranked_ties"}
    assert {m.name for m in methods.all_methods() if m.base == "none"} == {"linear", "passthrough"}
    assert get_method("slerp").max_models == 1 and get_method("model_stock").min_models == 2
    assert get_method("prune").max_models == 1 and get_method("prune").output_like == "first"
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        get_method("tie")


def test_linear_weights_summing_to_zero():
    import torch
    from tests.methods._engine import merge_tensor

    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensor("linear", None, [torch.ones(2)] * 2, {}, [{"weight": 1}, {"weight": -1}])


def test_every_parameter_says_what_it_means():
    # `mergeforge methods NAME` prints these; a new field without a docstring fails here
    missing = [
        f"{m.name}.{name}"
        for m in methods.all_methods()
        for scope in m.param_docs().values()
        for name, doc in scope.items()
        if not doc
    ]
    assert missing == []
    docs = get_method("ace").param_docs()["shared"]
    assert docs["eps"] == "Ridge ε added to each task covariance."  # the field's own
    assert docs["scaling"].startswith("θ = θ₀ + scaling")  # inherited from MatrixParams
    assert docs["side"].startswith("Which features") and "(out, out)" in docs["side"]
    # one line, first paragraph only (ace's module docstring is not a field's)
    assert all("\n" not in d for d in docs.values())


def test_methods_command_prints_one_method_with_its_parameters(capsys, monkeypatch):
    from mergeforge.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["methods", "ace"]) == 0
    out = capsys.readouterr().out
    assert "ace parameters" in out and "hetero_threshold" in out
    assert "Which features the task-vector Grams are over" in out


def test_readme_method_table_is_the_live_one(capsys):
    from pathlib import Path

    from mergeforge.cli import main

    readme = Path(__file__).resolve().parents[2] / "README.md"
    assert main(["methods", "--markdown"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| `")]
    assert len(rows) == len(list(methods.all_methods()))
    text = readme.read_text()
    stale = [r.split("|")[1].strip() for r in rows if r not in text]
    assert stale == [], (
        f"README's method table is stale for {stale}: paste `mergeforge methods --markdown`"
    )
