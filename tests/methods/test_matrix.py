"""The shared frame of the matrix-aware methods (``methods/matrix.py``)."""

from __future__ import annotations

import pytest
import torch

from mergeforge.errors import ConfigError
from mergeforge.methods.base import TensorContext
from mergeforge.methods.matrix import MatrixParams, is_matrix, merge_matrices, stored_in_out

P = MatrixParams()


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("model.layers.0.mlp.up_proj.weight", (8, 4), True),
        ("encoder.layer.0.attention.self.query.weight", (4, 4), True),
        ("model.embed_tokens.weight", (10, 4), False),
        ("bert.embeddings.word_embeddings.weight", (10, 4), False),
        ("transformer.wte.weight", (10, 4), False),
        ("transformer.wpe.weight", (10, 4), False),
        ("lm_head.weight", (10, 4), False),
        ("model.norm.weight", (4,), False),
        ("h.0.attn.c_attn.bias", (1, 12), False),  # a row vector is no linear map
    ],
)
def test_what_counts_as_a_matrix(key, shape, expected):
    assert is_matrix(key, shape, P) is expected


def test_skip_presets_and_regexes():
    assert is_matrix("lm_head.weight", (10, 4), MatrixParams(skip=""))
    assert not is_matrix("model.layers.0.q_proj.weight", (4, 4), MatrixParams(skip=r"q_proj"))
    with pytest.raises(ConfigError, match="'skip'"):
        MatrixParams(skip="(")


def test_orientation():
    assert stored_in_out("transformer.h.0.attn.c_attn.weight", P)
    assert stored_in_out("h.3.mlp.c_fc.weight", P)
    assert not stored_in_out("model.layers.0.mlp.up_proj.weight", P)
    assert stored_in_out("x.weight", MatrixParams(orientation="in_out"))
    assert not stored_in_out("h.0.mlp.c_fc.weight", MatrixParams(orientation="out_in"))


def test_solver_sees_out_in_and_result_is_transposed_back():
    seen = []

    def solve(deltas):
        seen.append(deltas[0].shape)
        return deltas[0] * 2

    base = torch.zeros(3, 5)  # Conv1D: (in 3, out 5)
    x = torch.arange(15.0).reshape(3, 5)
    out = merge_matrices(base, [x], P, TensorContext("h.0.mlp.c_fc.weight"), solve)
    assert seen == [(5, 3)] and torch.equal(out, 2 * x)


def test_non_matrices_mean_or_base_and_scaling():
    base, xs = torch.ones(4), [torch.full((4,), 3.0), torch.full((4,), 5.0)]
    ctx = TensorContext("model.norm.weight")
    unused = []
    out = merge_matrices(base, xs, MatrixParams(scaling=0.5), ctx, unused.append)
    assert torch.equal(out, torch.full((4,), 1 + 0.5 * 3)) and not unused
    assert torch.equal(merge_matrices(base, xs, MatrixParams(non_matrix="base"), ctx, None), base)


def test_base_is_never_rounded_through_the_solve_dtype():
    base = torch.randn(6, 6, dtype=torch.float64)
    out = merge_matrices(base, [base.clone()], P, TensorContext("a.weight"), lambda d: d[0])
    assert out.dtype == torch.float64 and torch.equal(out, base)
