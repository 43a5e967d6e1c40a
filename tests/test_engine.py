"""End-to-end engine behaviour: loads with transformers, exclusions, EMR task models, dtypes,
carried files, layout inference, bounded prefetch, and a Fisher merge worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import mergeforge
from mergeforge.config import load_config
from mergeforge.engine import prepare
from mergeforge.engine.layout import infer_layout
from mergeforge.errors import ConfigError
from tests.helpers import load_dir, write_model


def test_output_loads_with_transformers_and_matches_hand_merge(llama_family, tmp_path):
    base, e = llama_family["base"], llama_family["experts"]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in e[:2]],
        "out_dtype": "bfloat16",
        "out_shard_size": "20KB",  # force several shards
    }
    res = mergeforge.merge(cfg, tmp_path / "out", progress=False)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    b = load_dir(Path(base))
    x = [load_dir(Path(m)) for m in e[:2]]
    k = "model.layers.1.self_attn.o_proj.weight"
    want = (b[k] + 0.5 * (x[0][k] - b[k]) + 0.5 * (x[1][k] - b[k])).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[k], want)
    assert res.tensors == len(b)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits.float()).all()


def test_exclude_keeps_base_and_tokenizer_carried_files(llama_family, tmp_path):
    base = llama_family["base"]
    (Path(base) / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"density": 0.5}}
                   for m in llama_family["experts"]],
        "exclude": ["embed_tokens", r"layers\.0\."],
        "tokenizer_source": "base",
    }  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    out, b = load_dir(tmp_path / "out"), load_dir(Path(base))
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    k0 = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out[k0], b[k0])
    assert not torch.equal(out["model.layers.1.mlp.up_proj.weight"],
                           b["model.layers.1.mlp.up_proj.weight"])  # fmt: skip
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    resolved = (tmp_path / "out" / "mergeforge_resolved.yml").read_text()
    assert "density: 0.5" in resolved and "lambda: 1.0" in resolved


def test_emr_writes_task_model(llama_family, tmp_path):
    """EMR with ``task: t`` writes θ0 + λ_t M_t ⊙ τ_uni (λ_t over the whole model)."""
    base, e = llama_family["base"], llama_family["experts"]
    cfg = {"merge_method": "emr", "base_model": str(base),
           "models": [{"model": str(m)} for m in e], "parameters": {"task": 1}}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    out, b = load_dir(tmp_path / "out"), load_dir(Path(base))
    taus = [{k: v - b[k] for k, v in load_dir(Path(m)).items()} for m in e]
    keys = sorted(b)
    uni, masks = {}, {}
    for k in keys:
        stack = torch.stack([t[k] for t in taus])
        sign = torch.where(stack.sum(0) > 0, 1.0, -1.0)
        agree = (stack * sign) > 0
        uni[k] = sign * torch.where(agree, stack.abs(), torch.zeros_like(stack)).amax(0)
        masks[k] = (taus[1][k] * uni[k]) > 0
    lam = sum(taus[1][k].abs().sum() for k in keys) / sum(
        (masks[k] * uni[k]).abs().sum() for k in keys
    )
    for k in keys:
        want = b[k] + lam * masks[k] * uni[k]
        assert torch.allclose(out[k], want, atol=1e-6), k


def test_two_phase_ties_model_scope(llama_family, tmp_path):
    """topk_scope: model keeps the top-density fraction of |τ| over the whole model."""
    base, e0 = llama_family["base"], llama_family["experts"][0]
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(e0), "parameters": {"density": 0.25}}],
           "parameters": {"topk_scope": "model"}}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    out, b, x = load_dir(tmp_path / "out"), load_dir(Path(base)), load_dir(Path(e0))
    tau = torch.cat([(x[k] - b[k]).flatten() for k in sorted(b)])
    kept = torch.cat([((out[k] - b[k]).abs() > 0).flatten() for k in sorted(b)])
    thr = tau.abs().kthvalue(tau.numel() - int(0.25 * tau.numel()) + 1).values
    assert kept.float().mean().item() == pytest.approx(0.25, abs=1e-3)
    assert bool((tau.abs()[kept] >= thr).all())


def test_validate_reports_plan_without_writing(llama_family, tmp_path):
    cfg = load_config({"merge_method": "model_stock", "base_model": str(llama_family["base"]),
                       "models": [{"model": str(m)} for m in llama_family["experts"]]})  # fmt: skip
    plan = prepare(cfg)
    assert len(plan.jobs) == len(load_file(Path(llama_family["base"]) / "model.safetensors"))
    assert all(j.call is not None for j in plan.jobs)
    for ck in plan.checkpoints:
        ck.close()


def test_method_arity_and_base_errors(llama_family):
    e = [str(m) for m in llama_family["experts"]]
    with pytest.raises(ConfigError, match="needs 'base_model:'"):
        prepare({"merge_method": "ties", "models": [{"model": m} for m in e]})
    with pytest.raises(ConfigError, match="exactly 1"):
        prepare({"merge_method": "slerp", "base_model": str(llama_family["base"]),
                 "models": [{"model": m} for m in e], "parameters": {"t": 0.5}})  # fmt: skip


def test_config_json_dtype_updated(llama_family, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(m)} for m in llama_family["experts"]],
           "out_dtype": "float16"}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c.get("dtype", c.get("torch_dtype")) == "float16"


@pytest.mark.parametrize(
    "names,prefix,n",
    [
        (["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.11.a.weight",
          "lm_head.weight"], "model.layers.", 12),
        (["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
          "transformer.h.1.mlp.c_fc.bias"], "transformer.h.", 2),
        (["embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight",
          "encoder.layer.5.output.dense.weight", "pooler.dense.weight"], "encoder.layer.", 6),
        (["fc.weight", "fc.bias"], None, 0),
    ],
)  # fmt: skip
def test_layout_inference(names, prefix, n):
    lay = infer_layout(names)
    assert (lay.prefix, lay.num_layers) == (prefix, n)
    if prefix:
        assert lay.t(names[1]) == 0.0 and lay.t(names[0]) == 0.0


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_chunked_elementwise_path_equals_whole_tensor_path(llama_family, tmp_path, monkeypatch,
                                                            method):  # fmt: skip
    """Element-wise methods run on cache-sized chunks; chunk edges must not change a bit."""
    import mergeforge.engine.execute as ex

    e = [str(m) for m in llama_family["experts"]]
    cfg = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": w}}
                                             for m, w in zip(e, (0.5, -0.3, 0.9), strict=True)],
           "out_dtype": "bfloat16"}  # fmt: skip
    if method == "task_arithmetic":
        cfg["base_model"] = str(llama_family["base"])
    monkeypatch.setattr(ex, "CHUNK", 100)  # many chunks, ragged last one
    mergeforge.merge(cfg, tmp_path / "chunked", progress=False)
    monkeypatch.setattr(ex, "CHUNK", 1 << 40)  # one chunk = the whole tensor
    mergeforge.merge(cfg, tmp_path / "whole", progress=False)
    a, b = load_dir(tmp_path / "chunked"), load_dir(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.bfloat16 for v in a.values())


def test_lora_adapter_input_relative_to_yaml(llama_family, tmp_path):
    """`base+adapter` inputs (paths relative to the YAML) merge as base + scale·B@A."""
    peft = pytest.importorskip("peft")
    import shutil

    shutil.copytree(llama_family["base"], tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(model, lcfg)
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # B is zero-initialised: make the adapter do something
    pm.save_pretrained(tmp_path / "adapter")
    want = pm.merge_and_unload().state_dict()
    (tmp_path / "m.yml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\n"
        "models:\n  - model: base+adapter\n    parameters: {weight: 1.0}\n"
    )
    mergeforge.merge(tmp_path / "m.yml", tmp_path / "out", progress=False)
    out = load_dir(tmp_path / "out")
    k = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(out[k], load_dir(tmp_path / "base")[k])
    assert max((out[n] - want[n]).abs().max().item() for n in out) < 1e-6


def test_mergekit_method_we_lack_is_named_as_not_implemented(monkeypatch):
    from mergeforge.methods import get_method
    from mergeforge.methods.base import MERGEKIT_ONLY_METHODS

    # every mergekit 0.1.5 method is implemented now (issue 18): a stand-in for the next one
    monkeypatch.setitem(MERGEKIT_ONLY_METHODS, "next_mergekit_method", "ties")
    with pytest.raises(ConfigError, match="not implemented in mergeforge yet; the closest"):
        get_method("next_mergekit_method")


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_streams_follow_the_models_not_their_paths(llama_family, tmp_path, method):
    """A seeded stochastic merge is the same when the model folders move (each model's
    stream is named by a fingerprint of its weights) and when the models are listed in
    another order (the masks move with the models)."""
    import shutil

    base, e = llama_family["base"], llama_family["experts"]
    moved = []
    for i, m in enumerate([base, *e]):
        dest = tmp_path / "elsewhere" / f"renamed{i}"
        shutil.copytree(m, dest)
        moved.append(dest)

    def cfg(b, experts):
        return {
            "merge_method": method,
            "base_model": str(b),
            "models": [
                {"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in experts
            ],  # fmt: skip
            "parameters": {"lambda": 1.0},
            "seed": 7,
        }

    mergeforge.merge(cfg(base, e), tmp_path / "a", progress=False)
    mergeforge.merge(cfg(moved[0], moved[1:]), tmp_path / "b", progress=False)
    mergeforge.merge(cfg(base, e[::-1]), tmp_path / "c", progress=False)
    mergeforge.merge({**cfg(base, e), "seed": 8}, tmp_path / "d", progress=False)
    a, b, c, d = (load_dir(tmp_path / x) for x in "abcd")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another order: the same masks, summed in another order (rounding only)
    assert all(torch.allclose(a[k], c[k], rtol=0, atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], d[k], rtol=0, atol=1e-3) for k in a)  # seed matters


def test_only_merged_inputs_are_fingerprinted(llama_family, tmp_path, monkeypatch):
    """The base of a DARE merge draws no random numbers: its weights are not read to name a
    stream (for a LoRA input that read would apply the adapter)."""
    import mergeforge.engine.plan as planner  # the planner names the streams

    seen = []
    fingerprint = planner.model_fingerprint

    def spy(ck, *a, **kw):
        seen.append(ck.path)
        return fingerprint(ck, *a, **kw)

    monkeypatch.setattr(planner, "model_fingerprint", spy)
    base, e = llama_family["base"], llama_family["experts"]
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in e],
        "seed": 3,
    }
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    assert sorted(Path(p).parent.name for p in seen) == sorted(Path(m).name for m in e)


# ---- Fisher merging end to end, by hand ------------------------------------------------------
# Two experts and a base, two tensors of two entries; diagonal Fishers written as statistics
# files beside the experts. ‖F1‖ = √(3² + 0² + 0² + 4²) = 5, ‖F2‖ = √(2² + 4² + 4² + 8²) = 10.
FA, FB = "model.layers.0.mlp.weight", "model.layers.1.mlp.weight"
FISHER_MODELS = {
    "base": {FA: [0.0, 0.0], FB: [1.0, 1.0]},
    "e1": {FA: [1.0, 2.0], FB: [2.0, 0.0]},
    "e2": {FA: [3.0, -2.0], FB: [0.0, 4.0]},
}
FISHERS = {"e1": ({FA: [3.0, 0.0], FB: [0.0, 4.0]}, 5.0),
           "e2": ({FA: [2.0, 4.0], FB: [4.0, 8.0]}, 10.0)}  # fmt: skip
FISHER_CASES = {
    # Σ c_i F_i θ_i / Σ c_i F_i with c = (1, 1):
    #   FA[0] (3·1 + 2·3)/(3 + 2) = 9/5    FA[1] (0·2 + 4·(-2))/(0 + 4) = -2
    #   FB[0] (0·2 + 4·0)/(0 + 4) = 0      FB[1] (4·0 + 8·4)/(4 + 8) = 8/3
    "plain": ({"normalize": False, "min_fisher": 0.0}, (1, 1), False,
              {FA: [9 / 5, -2.0], FB: [0.0, 8 / 3]}),
    # c = (2, 1): FA[0] (2·3·1 + 2·3)/(6 + 2) = 12/8   FA[1] (0 + 4·(-2))/4 = -2
    #             FB[0] (0 + 4·0)/4 = 0                 FB[1] (2·4·0 + 8·4)/(8 + 8) = 2
    "weights": ({"normalize": False, "min_fisher": 0.0}, (2, 1), False,
                {FA: [1.5, -2.0], FB: [0.0, 2.0]}),
    # normalize: c_i = w_i (1/‖F_i‖) / Σ_k 1/‖F_k‖ = (1/5, 1/10) / (3/10) = (2/3, 1/3), the
    # same shares as weights (2, 1)
    "normalize": ({"normalize": True, "min_fisher": 0.0}, (1, 1), False,
                  {FA: [1.5, -2.0], FB: [0.0, 2.0]}),
    # min_fisher 1 is added to every entry: F1 + 1 = (4, 1 | 1, 5), F2 + 1 = (3, 5 | 5, 9)
    #   FA[0] (4·1 + 3·3)/7 = 13/7        FA[1] (1·2 + 5·(-2))/6 = -4/3
    #   FB[0] (1·2 + 5·0)/6 = 1/3         FB[1] (5·0 + 9·4)/14 = 18/7
    "min_fisher": ({"normalize": False, "min_fisher": 1.0}, (1, 1), False,
                   {FA: [13 / 7, -4 / 3], FB: [1 / 3, 18 / 7]}),
    # with the base and scaling 0.5: θ0 + 0.5 (θ - θ0) on "plain"
    #   FA: 0 + 0.5·(9/5, -2) = (0.9, -1)   FB: 1 + 0.5·(0 - 1) = 0.5, 1 + 0.5·(8/3 - 1) = 11/6
    "scaling": ({"normalize": False, "min_fisher": 0.0, "scaling": 0.5}, (1, 1), True,
                {FA: [0.9, -1.0], FB: [0.5, 11 / 6]}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FISHER_CASES))
def test_fisher_merge_end_to_end_by_hand(tmp_path, case):
    """``mergeforge merge`` with ``merge_method: fisher`` reads each expert's statistics file
    and gives Σ c_i F_i θ_i / Σ c_i F_i (see FISHER_CASES for each value worked by hand)."""
    from mergeforge.checkpoint.sidecar import save_sidecar
    from mergeforge.cli import main

    params, weights, with_base, want = FISHER_CASES[case]
    dirs = {}
    for name, sd in FISHER_MODELS.items():
        dirs[name] = write_model(tmp_path / name, {k: torch.tensor(v) for k, v in sd.items()})
    for name, (f, norm) in FISHERS.items():
        save_sidecar(dirs[name], "fisher-sampled", {k: torch.tensor(v) for k, v in f.items()},
                   num_examples=4, examples_used=4, source="by hand",
                   extra={"fisher_norm": repr(norm)})  # fmt: skip
    cfg = {
        "merge_method": "fisher",
        "models": [{"model": str(dirs[e]), "parameters": {"weight": w}}
                   for e, w in zip(("e1", "e2"), weights, strict=True)],
        "parameters": params,
        "dtype": "float32",
    }  # fmt: skip
    if with_base:
        cfg["base_model"] = str(dirs["base"])
    path = tmp_path / "fisher.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    out = load_dir(tmp_path / "out")
    assert set(out) == {FA, FB}
    for k, v in want.items():
        torch.testing.assert_close(out[k], torch.tensor(v), rtol=1e-6, atol=1e-7)
