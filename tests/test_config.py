"""config.py against hand-worked examples: gradients, non-numeric lists, filters, slices and the
precedence per-model > slice > global (mergekit's rules; tests/test_vs_mergekit.py checks the
same YAMLs against mergekit itself, these need no mergekit).

Settings are checked on ``evaluate_setting`` directly, then through the planner on a tiny
5-layer model whose tensors are constants that name themselves, so the plan (which input each
output reads, which parameter values it gets) and the merged tensors can both be worked out by
hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mergeforge.cli import main
from mergeforge.config import evaluate_setting
from mergeforge.engine import prepare
from tests.helpers import load_dir, write_model

MLP, ATTN = "model.layers.{}.mlp.weight", "model.layers.{}.self_attn.weight"
EMBED, NORM = "model.embed_tokens.weight", "model.norm.weight"

# ---- evaluate_setting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "t", "want"),
    [
        (0.3, 0.7, 0.3),  # a scalar is itself at every depth
        (True, 0.2, True),
        ("sum", 0.9, "sum"),
        (None, 0.5, None),
        ([], 0.5, None),
        ([0.7], 0.9, 0.7),  # one point: scaled = t·0 = 0 -> element 0
    ],
)
def test_scalars_and_degenerate_lists(setting, t, want):
    assert evaluate_setting(setting, "model.layers.0.mlp.weight", t) == want


@pytest.mark.parametrize(
    ("setting", "t", "want"),
    [
        # [0, 1]: one segment, value = t
        ([0, 1], 0.0, 0.0),
        ([0, 1], 0.25, 0.25),  # scaled 0.25 -> 0.75·0 + 0.25·1
        ([0, 1], 1.0, 1.0),
        # [0.2, 0.8, 0.2]: knots at t = 0, 0.5, 1
        ([0.2, 0.8, 0.2], 0.0, 0.2),
        ([0.2, 0.8, 0.2], 0.25, 0.5),  # scaled 0.5 -> 0.5·0.2 + 0.5·0.8
        ([0.2, 0.8, 0.2], 0.5, 0.8),  # scaled 1.0 -> knot 1
        ([0.2, 0.8, 0.2], 0.75, 0.5),  # scaled 1.5 -> 0.5·0.8 + 0.5·0.2
        ([0.2, 0.8, 0.2], 1.0, 0.2),  # scaled 2.0 -> knot 2 (i1 clamped to 2)
        # [0, 1, 3, 6]: knots at t = 0, 1/3, 2/3, 1
        ([0, 1, 3, 6], 0.1, 0.3),  # scaled 0.3 -> 0.7·0 + 0.3·1
        ([0, 1, 3, 6], 0.5, 2.0),  # scaled 1.5 -> 0.5·1 + 0.5·3
        ([0, 1, 3, 6], 0.9, 5.1),  # scaled 2.7 -> 0.3·3 + 0.7·6 = 0.9 + 4.2
        ([0, 1, 3, 6], 1.0, 6.0),
        # negative and decreasing: [1, -1] at 0.75 -> 0.25·1 + 0.75·(-1) = -0.5
        ([1, -1], 0.75, -0.5),
    ],
)
def test_gradients_interpolate_piecewise_linearly(setting, t, want):
    assert evaluate_setting(setting, "any", t) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    ("setting", "t", "want"),
    [
        # not all numbers: the element at int(t·(len-1)), no interpolation
        (["a", "b", "c"], 0.0, "a"),
        (["a", "b", "c"], 0.49, "a"),  # int(0.98) = 0
        (["a", "b", "c"], 0.5, "b"),  # int(1.0) = 1
        (["a", "b", "c"], 0.99, "b"),  # int(1.98) = 1
        (["a", "b", "c"], 1.0, "c"),
        ([True, False], 0.5, True),  # bools are not numbers here: int(0.5) = 0
        ([True, False], 1.0, False),
        ([0.5, "x"], 0.9, 0.5),  # one string makes the list non-numeric: int(0.9) = 0
    ],
)
def test_non_numeric_lists_pick_an_element(setting, t, want):
    assert evaluate_setting(setting, "any", t) == want


MLP0, ATTN0, UP = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q.weight", "x.up"


@pytest.mark.parametrize(
    ("setting", "name", "t", "want"),
    [
        # the first filter that is a substring of the name wins; no filter matches everything
        ([{"filter": "mlp", "value": 1}, {"value": 2}], MLP0, 0.0, 1),
        ([{"filter": "mlp", "value": 1}, {"value": 2}], ATTN0, 0.0, 2),
        ([{"filter": "mlp", "value": 1}, {"filter": "up_proj", "value": 2}], MLP0, 0.0, 1),
        ([{"filter": "up_proj", "value": 2}, {"filter": "mlp", "value": 1}], MLP0, 0.0, 2),
        # a substring, not a word or a regex: "layers.1" is in layers.1 and layers.10
        ([{"filter": "layers.1", "value": 1}, {"value": 0}], "m.layers.10.w", 0.0, 1),
        ([{"filter": "layers.1.", "value": 1}, {"value": 0}], "m.layers.10.w", 0.0, 0),
        ([{"filter": "mlp.*", "value": 1}, {"value": 0}], MLP0, 0.0, 0),  # no glob
        # "*" matches every name, and it is first here, so it wins over "mlp"
        ([{"filter": "*", "value": 5}, {"filter": "mlp", "value": 1}], MLP0, 0.0, 5),
        # no match -> None (the next scope is asked)
        ([{"filter": "mlp", "value": 1}], ATTN0, 0.0, None),
        ({"filter": "mlp", "value": 3}, MLP0, 0.0, 3),  # one mapping = a list of one
        ({"filter": "mlp", "value": 3}, ATTN0, 0.0, None),
        ([{"filter": "mlp", "value": 1}], "", 0.0, None),  # no name: only unfiltered match
        # nested gradients, at the tensor's t: mlp [0, 1] at 0.6 = 0.6; else [1, 0, 1] at 0.6:
        # scaled 1.2 -> 0.8·0 + 0.2·1 = 0.2
        ([{"filter": "mlp", "value": [0, 1]}, {"value": [1, 0, 1]}], MLP0, 0.6, 0.6),
        ([{"filter": "mlp", "value": [0, 1]}, {"value": [1, 0, 1]}], ATTN0, 0.6, 0.2),
        # filters inside a filter's value
        ([{"filter": "layers", "value": [{"filter": "mlp", "value": 1}, {"value": 2}]},
          {"value": 3}], MLP0, 0.0, 1),
        ([{"filter": "layers", "value": [{"filter": "mlp", "value": 1}, {"value": 2}]},
          {"value": 3}], ATTN0, 0.0, 2),
        ([{"filter": "layers", "value": [{"filter": "mlp", "value": 1}, {"value": 2}]},
          {"value": 3}], "model.embed_tokens.weight", 0.0, 3),
    ],
)  # fmt: skip
def test_filters(setting, name, t, want):
    got = evaluate_setting(setting, name, t)
    assert got == (pytest.approx(want) if isinstance(want, float) else want)


# ---- through the planner: depth, slices, precedence ------------------------------------------


def _model(folder: Path, tag: float, layers: int = 5) -> Path:
    """Tensors of shape (2,) filled with a value that names them: tag + 10·layer + 1 (mlp) or
    + 2 (attention); embeddings tag + 0.5, final norm tag + 0.25."""
    sd = {EMBED: torch.full((2,), tag + 0.5), NORM: torch.full((2,), tag + 0.25)}
    for i in range(layers):
        sd[MLP.format(i)] = torch.full((2,), tag + 10.0 * i + 1)
        sd[ATTN.format(i)] = torch.full((2,), tag + 10.0 * i + 2)
    return write_model(folder, sd)


@pytest.fixture
def ab(tmp_path) -> tuple[str, str]:
    """Two 5-layer models: A (tag 0) and B (tag 1000)."""
    return str(_model(tmp_path / "A", 0.0)), str(_model(tmp_path / "B", 1000.0))


def _plan(cfg: dict) -> dict[str, tuple[list[tuple[str, str]], list[float], object]]:
    """{output tensor: ([(input model, input tensor)], per-model weights, shared params)}."""
    plan = prepare(cfg)
    try:
        return {
            j.out_name: (
                [(Path(plan.models[r.model]).name, r.name) for r in j.inputs],
                [mp.weight for mp in j.call.model_params],
                j.call.params,
            )
            for j in plan.jobs
        }
    finally:
        for ck in plan.checkpoints:
            ck.close()


def _merge(cfg: dict, tmp: Path) -> dict[str, torch.Tensor]:
    """``mergeforge merge`` of ``cfg``: the output's tensors."""
    path = tmp / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), str(tmp / "out"), "--no-progress"]) == 0
    return load_dir(tmp / "out")


def _value(out: dict[str, torch.Tensor], name: str) -> float:
    t = out[name]
    assert t.shape == (2,) and t[0] == t[1], name
    return t[0].item()


def test_gradient_depth_is_layer_over_last_layer(ab, tmp_path):
    """``models:``: t = layer / 4 for 5 layers; embeddings and norm at t = 0. Weights of A
    [0.2, 0.8, 0.2]: t 0 -> 0.2, 0.25 -> 0.5, 0.5 -> 0.8, 0.75 -> 0.5, 1 -> 0.2; B weight 1,
    ``normalize: false``, so out = w_A·A + 1·B."""
    a, b = ab
    cfg = {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": [0.2, 0.8, 0.2]}},
                   {"model": b, "parameters": {"weight": 1.0}}],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }  # fmt: skip
    want_w = {0: 0.2, 1: 0.5, 2: 0.8, 3: 0.5, 4: 0.2}
    plan = _plan(cfg)
    for layer, w in want_w.items():
        for name in (MLP.format(layer), ATTN.format(layer)):
            inputs, weights, _ = plan[name]
            assert inputs == [("A", name), ("B", name)]
            assert weights == pytest.approx([w, 1.0])
    for name in (EMBED, NORM):
        assert plan[name][1] == pytest.approx([0.2, 1.0])
    out = _merge(cfg, tmp_path)
    # mlp of layer 3: 0.5·(0 + 31) + (1000 + 31) = 15.5 + 1031 = 1046.5
    assert _value(out, MLP.format(3)) == pytest.approx(1046.5)
    # attention of layer 2: 0.8·22 + 1022 = 17.6 + 1022 = 1039.6
    assert _value(out, ATTN.format(2)) == pytest.approx(1039.6)
    # embeddings at t = 0: 0.2·0.5 + 1000.5 = 1000.6
    assert _value(out, EMBED) == pytest.approx(1000.6)


def test_precedence_per_model_over_global(ab, tmp_path):
    """A's own weight (a filter on mlp) beats the global weight where it matches; elsewhere the
    filter gives None and the global value is used. B has no weight of its own. The shared
    ``normalize`` comes from the global block."""
    a, b = ab
    cfg = {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": [{"filter": "mlp", "value": 0.75}]}},
                   {"model": b}],
        "parameters": {"weight": 0.25, "normalize": False},
        "dtype": "float32",
    }  # fmt: skip
    plan = _plan(cfg)
    assert plan[MLP.format(1)][1] == [0.75, 0.25]
    assert plan[ATTN.format(1)][1] == [0.25, 0.25]
    assert plan[EMBED][1] == [0.25, 0.25]
    assert all(p.normalize is False for _, _, p in plan.values())
    out = _merge(cfg, tmp_path)
    # mlp of layer 1: 0.75·11 + 0.25·1011 = 8.25 + 252.75 = 261
    assert _value(out, MLP.format(1)) == pytest.approx(261.0)
    # attention of layer 1: 0.25·12 + 0.25·1012 = 3 + 253 = 256
    assert _value(out, ATTN.format(1)) == pytest.approx(256.0)


SLICES = {
    "merge_method": "linear",
    "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 3], "parameters": {"weight": [0, 1]}},
                     {"model": "B", "layer_range": [2, 5]}],
         "parameters": {"weight": 0.5}},
        {"sources": [{"model": "A", "layer_range": [4, 5]},
                     {"model": "B", "layer_range": [0, 1]}],
         "parameters": {"weight": [{"filter": "mlp", "value": 0.25}], "normalize": False}},
    ],
    "parameters": {"weight": 0.125, "normalize": False},
    "dtype": "float32",
}  # fmt: skip
"""Two slices of linear: output layers 0-2 from A's 0-2 and B's 2-4 (t = 0, 0.5, 1 within the
slice), output layer 3 from A's 4 and B's 0 (a one-layer slice: t = 1)."""


def _slices(a: str, b: str) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(SLICES))
    for sl in cfg["slices"]:
        for s in sl["sources"]:
            s["model"] = {"A": a, "B": b}[s["model"]]
    return cfg


def test_slices_number_layers_across_slices_and_run_t_within_each(ab, tmp_path):
    """Which input each output tensor reads, and the weights (per-model > slice > global):

    ====== ================ ====== ================================== =======================
    output reads (A, B)      t      w_A                                w_B
    ====== ================ ====== ================================== =======================
    L0     A L0, B L2       0      A's gradient [0, 1] at 0 = 0       slice 0.5
    L1     A L1, B L3       0.5    0.5                                0.5
    L2     A L2, B L4       1      1                                  0.5
    L3     A L4, B L0       1      mlp: slice filter 0.25; attention: the filter gives None,
                                   so the global 0.125 (both models)
    embed  first slice      0      0 (A's gradient at 0)              0.5
    norm   last slice       0      filter misses: global 0.125        0.125
    ====== ================ ====== ================================== =======================
    """
    a, b = ab
    cfg = _slices(a, b)
    plan = _plan(cfg)
    assert sorted(plan) == sorted([EMBED, NORM, *(f.format(i) for i in range(4)
                                                  for f in (MLP, ATTN))])  # fmt: skip
    reads = {0: (0, 2), 1: (1, 3), 2: (2, 4), 3: (4, 0)}
    for out_layer, (la, lb) in reads.items():
        for f in (MLP, ATTN):
            assert plan[f.format(out_layer)][0] == [("A", f.format(la)), ("B", f.format(lb))]
    weights = {
        MLP.format(0): [0.0, 0.5], ATTN.format(0): [0.0, 0.5],
        MLP.format(1): [0.5, 0.5], ATTN.format(1): [0.5, 0.5],
        MLP.format(2): [1.0, 0.5], ATTN.format(2): [1.0, 0.5],
        MLP.format(3): [0.25, 0.25], ATTN.format(3): [0.125, 0.125],
        EMBED: [0.0, 0.5], NORM: [0.125, 0.125],
    }  # fmt: skip
    for name, w in weights.items():
        assert plan[name][1] == pytest.approx(w), name
    for name in (EMBED, NORM):  # from the first / last slice's sources, under their own name
        assert plan[name][0] == [("A", name), ("B", name)]

    out = _merge(cfg, tmp_path)
    assert len(out) == 10  # 4 output layers x 2 + embeddings + norm
    # hand values: out = w_A·A[la] + w_B·B[lb]
    assert _value(out, MLP.format(0)) == pytest.approx(0.0 * 1 + 0.5 * 1021)  # 510.5
    assert _value(out, ATTN.format(1)) == pytest.approx(0.5 * 12 + 0.5 * 1032)  # 522
    assert _value(out, MLP.format(2)) == pytest.approx(1.0 * 21 + 0.5 * 1041)  # 541.5
    assert _value(out, MLP.format(3)) == pytest.approx(0.25 * 41 + 0.25 * 1001)  # 260.5
    assert _value(out, ATTN.format(3)) == pytest.approx(0.125 * 42 + 0.125 * 1002)  # 130.5
    assert _value(out, EMBED) == pytest.approx(0.0 * 0.5 + 0.5 * 1000.5)  # 500.25
    assert _value(out, NORM) == pytest.approx(0.125 * 0.25 + 0.125 * 1000.25)  # 125.0625


def test_slice_parameters_beat_global_for_shared_parameters(ab):
    """``normalize`` (shared by all models): the slice's value wins over the global one, and
    the global one applies where the slice gives none."""
    a, b = ab
    cfg = _slices(a, b)
    cfg["parameters"]["normalize"] = True
    del cfg["slices"][0]["parameters"]["weight"]
    plan = _plan(cfg)
    assert plan[MLP.format(0)][2].normalize is True  # slice 0: no normalize -> global
    assert plan[MLP.format(3)][2].normalize is False  # slice 1 says false
    assert plan[NORM][2].normalize is False  # post tensors: the last slice
    # slice 0 lost its weight: B falls through to the global 0.125; A keeps its gradient
    assert plan[MLP.format(1)][1] == pytest.approx([0.5, 0.125])
