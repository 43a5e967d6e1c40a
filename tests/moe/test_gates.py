"""Gate rows: each mode against an oracle that does not use gates.py.

* random / uniform_random: mergekit's draws (``torch.manual_seed(seed)``, then one (L, N, H)
  tensor from the global generator), without mergekit;
* cheap_embed: the token embeddings summed by hand from the tokenizer's ids;
* router_input / router_input_avg: on a base whose MLPs are zero, the residual leaving layer i
  is h_i + attention_i(h_i), so the MLP's input is ``post_attention_layernorm(hidden_states[i +
  1])``, read from transformers' own hidden states;
* router_fit: :func:`fit_router` against scipy's L-BFGS-B on the same objective, and the gates
  against that fit of the MLP inputs read from transformers' hidden states (as above);
* degenerate layers: equal rows are flagged, orthonormal rows are not;
* forward.py (a Llama base without transformers' modelling code): its gates and hidden states
  equal transformers' bit for bit (padded and unpadded batches, GQA / MHA / MQA, bfloat16 and
  float32); bases it does not cover run in transformers' model.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.moe._family import save, tiny_llama

from mergeforge.checkpoint import open_checkpoint
from mergeforge.moe import load_moe_config
from mergeforge.moe.gates import (
    ROUTER_FIT_L2,
    compute_gates,
    degenerate_layers,
    fit_router,
    load_gate_model,
    random_gates,
    unit,
)

CPU = torch.device("cpu")


def test_random_modes_are_mergekits_draws():
    torch.manual_seed(5)
    expect = torch.randn((2, 3, 32))
    assert torch.equal(random_gates("random", (2, 3, 32), seed=5), expect)
    torch.manual_seed(5)
    scale = math.sqrt(1 / 32)
    expect = torch.rand((2, 3, 32)) * 2 * scale - scale
    got = random_gates("uniform_random", (2, 3, 32), seed=5)
    assert torch.equal(got, expect) and got.abs().max() <= scale


def test_unit_clamps_zero_vectors():
    assert torch.equal(unit(torch.zeros(2, 3)), torch.zeros(2, 3))
    assert torch.allclose(unit(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))


def _gates(base, mode: str, experts: list[dict], **extra) -> torch.Tensor:
    cfg = load_moe_config({"base_model": str(base), "gate_mode": mode, "experts_per_token": 1,
                           "experts": experts, **extra}, allow_same_experts=True)  # fmt: skip
    ck = open_checkpoint(str(base))
    try:
        return compute_gates(cfg, ck, layers=2, hidden=32, device=CPU)
    finally:
        ck.close()


def test_cheap_embed_is_the_unit_sum_of_token_embeddings(fam):
    base = fam["base"]
    embed = open_checkpoint(str(base)).get("model.embed_tokens.weight").float()
    ids = lambda words: [1] + [int(w[1:]) + 3 for w in words.split()]  # noqa: E731  <s> + words
    pos = unit(embed[ids("w1 w2 w3") + ids("w4")].sum(0))
    neg = unit(embed[ids("w9")].sum(0))
    g = _gates(base, "cheap_embed", [
        {"source_model": "a", "positive_prompts": ["w1 w2 w3", "w4"], "negative_prompts": ["w9"]},
        {"source_model": "b", "positive_prompts": ["w4"]},
    ])  # fmt: skip
    assert g.shape == (2, 2, 32) and torch.equal(g[0], g[1])  # the same for every layer
    torch.testing.assert_close(g[0, 0], unit(pos - neg))
    torch.testing.assert_close(g[0, 1], unit(embed[ids("w4")].sum(0)))


@pytest.fixture(scope="module")
def no_mlp_base(tmp_path_factory):
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    return save(model, tmp_path_factory.mktemp("nomlp") / "base"), model


@pytest.mark.parametrize("mode", ["router_input", "router_input_avg"])
def test_router_input_is_the_normalised_input_of_the_mlp(no_mlp_base, mode):
    base, model = no_mlp_base
    prompts = ["w5 w6 w7", "w8 w9"]
    g = _gates(base, mode, [{"source_model": "a", "positive_prompts": prompts},
                            {"source_model": "b", "positive_prompts": ["w1"]}])  # fmt: skip
    model = model.to(torch.bfloat16)  # as gate_dtype: bfloat16
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([[1] + [int(w[1:]) + 3 for w in p.split()]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            per_layer = []
            for i, layer in enumerate(model.model.layers):
                x = layer.post_attention_layernorm(hs[i + 1])[0].float()  # (T, H)
                per_layer.append(x.mean(0) if mode == "router_input_avg" else x[-1])
            rows.append(torch.stack(per_layer))
    expect = unit(torch.stack(rows).mean(0))
    torch.testing.assert_close(g[:, 0], expect, atol=1e-6, rtol=1e-5)


def _objective(W: torch.Tensor, feats: list[torch.Tensor], l2: float) -> torch.Tensor:
    """router_fit's objective, written out: per class the mean cross-entropy, classes averaged."""
    total = torch.zeros((), dtype=torch.float64)
    for e, f in enumerate(feats):
        logp = torch.log_softmax(f.double() @ W.T, dim=1)[:, e]
        total = total - logp.mean() / len(feats)
    return total + 0.5 * l2 * (W * W).sum()


def test_fit_router_is_scipys_minimum_of_the_same_objective():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, generator=g)
    feats = [centres[e] + 0.8 * torch.randn(n, 6, generator=g) for e, n in enumerate((7, 20, 3))]
    got = fit_router(feats, l2=0.05)

    def fun(v):
        W = torch.tensor(v, dtype=torch.float64).reshape(3, 6).requires_grad_()
        loss = _objective(W, feats, 0.05)
        loss.backward()
        return float(loss.detach()), W.grad.numpy().ravel().copy()

    opts = {"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000}
    ref = scipy_optimize.minimize(fun, [0.0] * 18, jac=True, method="L-BFGS-B", options=opts)
    want = torch.tensor(ref.x, dtype=torch.float32).reshape(3, 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the class weighting: repeating one class's rows does not move the fit
    torch.testing.assert_close(fit_router([feats[0].repeat(3, 1), *feats[1:]], l2=0.05), got,
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="two or more classes"):
        fit_router([feats[0]])


def test_router_fit_gates_fit_the_mlp_inputs_of_the_prompt_tokens(no_mlp_base):
    """Each layer's routed rows are fit_router of the MLP inputs of every prompt token but BOS
    (read here from transformers' hidden states); a shared expert gets router_input_avg's
    row; the fitted router sends the prompts' own tokens to their expert."""
    base, model = no_mlp_base
    experts = [{"source_model": "a", "positive_prompts": ["w5 w6 w7", "w8 w9"]},
               {"source_model": "b", "positive_prompts": ["w1 w2", "w3"]},
               {"source_model": "c", "positive_prompts": ["w20 w21 w22"]}]  # fmt: skip
    shared = [{"source_model": "d", "positive_prompts": ["w10 w11"]}]
    g = _gates(base, "router_fit", experts, shared_experts=shared)
    assert g.shape == (2, 4, 32)
    model = model.to(torch.bfloat16)

    def inputs(prompt: str) -> list[torch.Tensor]:  # per layer (T, H), BOS first
        ids = torch.tensor([[1] + [int(w[1:]) + 3 for w in prompt.split()]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            return [layer.post_attention_layernorm(hs[i + 1])[0].float()
                    for i, layer in enumerate(model.model.layers)]  # fmt: skip

    for i in range(2):
        feats = [torch.cat([inputs(p)[i][1:] for p in e["positive_prompts"]]) for e in experts]
        want = fit_router(feats, l2=ROUTER_FIT_L2)
        # on separable tokens the objective is curved mostly by its small L2 term, so rounding
        # differences between the two forward paths move W by up to ~1e-3: compare the
        # objective's values, and W loosely
        at_g = float(_objective(g[i, :3].double(), feats, ROUTER_FIT_L2))
        at_want = float(_objective(want.double(), feats, ROUTER_FIT_L2))
        assert at_g <= at_want + 1e-6 and at_want <= at_g + 1e-6, (at_g, at_want)
        torch.testing.assert_close(g[i, :3], want, atol=5e-3, rtol=0)
        picked = [int(f.argmax()) for f in (torch.cat(feats) @ g[i, :3].T)]
        labels = [e for e, f in enumerate(feats) for _ in range(len(f))]
        assert sum(p == t for p, t in zip(picked, labels, strict=True)) >= 0.75 * len(labels)
        torch.testing.assert_close(g[i, 3], unit(inputs("w10 w11")[i].mean(0)),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
        # the fitted rows sum to zero (softmax's shift invariance + the L2 term): rank E - 1,
        # so mergekit's condition-number warning would fire on every layer; it is skipped
        torch.testing.assert_close(g[i, :3].sum(0), torch.zeros(32), atol=1e-4, rtol=0)
    assert degenerate_layers(g[:, :3]) == [0, 1]
    assert degenerate_layers(g, gate_mode="router_fit") == []


def test_router_fit_warns_that_negative_prompts_are_unused(no_mlp_base):
    base, _ = no_mlp_base
    experts = [{"source_model": "a", "positive_prompts": ["w1"], "negative_prompts": ["w2"]},
               {"source_model": "b", "positive_prompts": ["w3"]}]  # fmt: skip
    cfg = load_moe_config({"base_model": str(base), "gate_mode": "router_fit", "experts": experts})
    assert any("negative_prompts are not used" in w for w in cfg.warnings)


def test_hidden_gate_reads_the_residual_entering_each_layer(no_mlp_base):
    base, model = no_mlp_base
    g = _gates(base, "hidden", [{"source_model": "a", "positive_prompts": ["w5 w6"]},
                                {"source_model": "b", "positive_prompts": ["w1"]}])  # fmt: skip
    with torch.no_grad():
        hs = model.to(torch.bfloat16)(input_ids=torch.tensor([[1, 8, 9]]),
                                      output_hidden_states=True).hidden_states  # fmt: skip
    expect = unit(torch.stack([hs[i][0, -1].float() for i in range(2)]))
    torch.testing.assert_close(g[:, 0], expect)
    assert torch.equal(g[0, 0], unit(hs[0][0, -1].float()))  # layer 0: the embedding of w6


def test_degenerate_layers():
    same = torch.ones(1, 3, 8)
    eye = torch.eye(8)[:3].unsqueeze(0)
    assert degenerate_layers(torch.cat([eye, same, eye])) == [1]


# ---- forward.py: a Llama base's forward without transformers' modelling code ---------------

NATIVE_BASES = {
    "gqa": {},  # 4 heads, 2 key-value heads (tiny_llama's)
    "mha": {"num_key_value_heads": 4},
    "mqa-theta": {"num_key_value_heads": 1, "rope_theta": 500000.0},
    "one-layer": {"num_hidden_layers": 1},
}
NATIVE_EXPERTS = [  # padded batches, an unpadded one (sdpa's is_causal path), one-token prompts
    {"source_model": "a", "positive_prompts": ["w1 w2 w3", "w4 w5 w6"]},
    {"source_model": "b", "positive_prompts": ["w7"], "negative_prompts": ["w8 w9 w10 w11"]},
    {"source_model": "c", "positive_prompts": ["w12", "w13 w14 w15 w16 w17 w18"]},
]


@pytest.fixture(scope="module")
def native_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {k: (save(tiny_llama(seed=7, **kw), root / k), tiny_llama(seed=7, **kw).config)
            for k, kw in NATIVE_BASES.items()}  # fmt: skip


def _both_ways(base, cfg, layers: int, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    from mergeforge.moe import forward

    ck = open_checkpoint(str(base))
    try:
        assert isinstance(load_gate_model(cfg, ck, CPU), forward.LlamaForward)
        native = compute_gates(cfg, ck, layers=layers, hidden=32, device=CPU)
        with monkeypatch.context() as m:
            m.setattr(forward, "supported", lambda _cfg: False)
            assert not isinstance(load_gate_model(cfg, ck, CPU), forward.LlamaForward)
            reference = compute_gates(cfg, ck, layers=layers, hidden=32, device=CPU)
    finally:
        ck.close()
    return native, reference


@pytest.mark.parametrize("kind", list(NATIVE_BASES))
@pytest.mark.parametrize(
    "mode", ["hidden", "hidden_avg", "router_input", "router_input_avg", "router_fit"]
)
def test_native_forward_gates_are_transformers_bit_for_bit(native_bases, kind, mode, monkeypatch):
    base, config = native_bases[kind]
    cfg = load_moe_config({"base_model": str(base), "gate_mode": mode, "experts_per_token": 1,
                           "experts": NATIVE_EXPERTS}, allow_same_experts=True)  # fmt: skip
    native, reference = _both_ways(base, cfg, config.num_hidden_layers, monkeypatch)
    assert torch.equal(native, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_residuals_are_transformers_hidden_states(native_bases, dtype):
    from mergeforge.moe.forward import LlamaForward

    base, config = native_bases["gqa"]
    model = tiny_llama(seed=7).to(dtype).eval()
    ids = torch.tensor([[1, 1, 1, 8, 9], [1, 10, 11, 12, 13]])  # left-padded with BOS
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ck = open_checkpoint(str(base))
    try:
        got = LlamaForward(ck, dict(ck.config), dtype, CPU).residuals(ids, mask)
    finally:
        ck.close()
    assert len(got) == config.num_hidden_layers
    assert all(torch.equal(g, w) for g, w in zip(got, want[:-1], strict=True))  # pads too


def test_native_forward_covers_plain_llamas_only(native_bases):
    import json

    from mergeforge.moe.forward import supported

    base, _ = native_bases["gqa"]
    cfg = json.loads((base / "config.json").read_text())
    assert supported(cfg)
    for change in ({"model_type": "mistral"}, {"model_type": "qwen2"}, {"hidden_act": "gelu"},
                   {"attention_bias": True}, {"mlp_bias": True}, {"partial_rotary_factor": 0.5},
                   {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                   {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                   {"attn_implementation": "eager"}, {"num_key_value_heads": 3}):  # fmt: skip
        assert not supported({**cfg, **change}), change


def test_unsupported_base_runs_in_transformers(tmp_path):
    """A base with RoPE scaling is not covered by forward.py: transformers' model runs it, and
    the gates are those of transformers' hidden states."""
    scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = tiny_llama(seed=3, rope_parameters=scaling)
    base = save(model, tmp_path / "base")
    cfg = load_moe_config({"base_model": str(base), "gate_mode": "hidden", "experts_per_token": 1,
                           "experts": NATIVE_EXPERTS[:2]}, allow_same_experts=True)  # fmt: skip
    ck = open_checkpoint(str(base))
    try:
        from mergeforge.moe.forward import LlamaForward

        assert not isinstance(load_gate_model(cfg, ck, CPU), LlamaForward)
        g = compute_gates(cfg, ck, layers=2, hidden=32, device=CPU)
    finally:
        ck.close()
    with torch.no_grad():
        hs = model.to(torch.bfloat16)(input_ids=torch.tensor([[1, 10]]),
                                      output_hidden_states=True).hidden_states  # fmt: skip
    pos = torch.stack([hs[i][0, -1].float() for i in range(2)])
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([[1, 11, 12, 13, 14]]),
                   output_hidden_states=True).hidden_states  # fmt: skip
    neg = torch.stack([hs[i][0, -1].float() for i in range(2)])
    torch.testing.assert_close(g[:, 1], unit(pos - neg))
