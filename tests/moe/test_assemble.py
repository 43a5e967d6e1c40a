"""Building the MoE folder: layout, loading and generating with transformers, functional
oracles (a MoE of copies of one dense model computes that model; several shared experts compute
their mean), tied embeddings, the routing report, and bad input refused with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from tests.helpers import load_dir, sha_tree
from tests.moe._family import DIMS, moe_yaml, save, set_config, tiny_llama

from mergeforge.cli import main
from mergeforge.errors import ConfigError, ValidationError
from mergeforge.moe import assemble as assemble_mod
from mergeforge.moe import build_moe, load_prompt_groups, prepare_moe, routing_report

H, INTER = DIMS["hidden_size"], DIMS["intermediate_size"]


def _load(out):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def test_mixtral_layout_loads_and_generates(fam, tmp_path):
    res = build_moe(moe_yaml(fam, n=2, gate_mode="cheap_embed"), tmp_path / "moe")
    out, e1 = load_dir(tmp_path / "moe"), load_dir(fam["experts"][1])
    gu = out["model.layers.1.mlp.experts.gate_up_proj"]
    assert gu.shape == (2, 2 * INTER, H) and out["model.layers.1.mlp.gate.weight"].shape == (2, H)
    assert torch.equal(gu[1, :INTER], e1["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(gu[1, INTER:], e1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.experts.down_proj"][1],
                       e1["model.layers.1.mlp.down_proj.weight"])  # fmt: skip
    base = load_dir(fam["base"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"],
                       base["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert res.architecture == "Mixtral" and res.gates.shape == (2, 2, H)
    model = _load(tmp_path / "moe")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    ids = torch.tensor([[1, 4, 5, 6]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
    files = {p.name for p in (tmp_path / "moe").iterdir()}
    assert {"tokenizer.json", "mergeforge_config.yml", "README.md"} <= files


def test_moe_of_copies_computes_the_dense_model(fam, tmp_path):
    # every expert is the base: whatever the router does, the weights sum to 1
    cfg = moe_yaml(fam, n=2, gate_mode="random")
    for e in cfg["experts"]:
        e["source_model"] = str(fam["base"])
    build_moe(cfg, tmp_path / "moe", allow_same_experts=True)
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        got = _load(tmp_path / "moe")(ids).logits
        want = _load(fam["base"])(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_qwen2_moe_with_two_shared_experts_is_their_mean(fam, tmp_path):
    cfg = moe_yaml(fam, n=2, gate_mode="random")
    cfg["shared_experts"] = [{"source_model": str(fam["experts"][2])},
                             {"source_model": str(fam["base"])}]  # fmt: skip
    res = build_moe(cfg, tmp_path / "moe")
    assert res.architecture == "Qwen MoE" and res.shared_experts == 2
    model = _load(tmp_path / "moe")
    assert model.config.shared_expert_intermediate_size == 2 * INTER
    dense = [_load(fam["experts"][2]), _load(fam["base"])]
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.model.layers[1].mlp.shared_expert(x)
        want = sum(m.model.layers[1].mlp(x) for m in dense) / 2
        gate = model.model.layers[1].mlp.shared_expert_gate.weight
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gate[0], res.gates[1, 2:].mean(0))
    assert model.generate(torch.tensor([[1, 4]]), max_new_tokens=3).shape == (1, 5)


def test_tied_base_stays_tied(tied_fam, tmp_path):
    build_moe(moe_yaml(tied_fam, gate_mode="cheap_embed"), tmp_path / "moe")
    assert "lm_head.weight" not in load_dir(tmp_path / "moe")
    model = _load(tmp_path / "moe")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_config_without_head_gets_the_embeddings(tied_fam, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tied_fam["base"], base)
    set_config(base, tie_word_embeddings=False)
    cfg = moe_yaml({**tied_fam, "base": base}, gate_mode="cheap_embed")
    res = build_moe(cfg, tmp_path / "moe")
    out = load_dir(tmp_path / "moe")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert any("lm_head.weight is the base's embeddings" in w for w in res.warnings)


def test_routing_report(fam, tmp_path):
    build_moe(moe_yaml(fam, n=2, experts_per_token=1), tmp_path / "moe")
    rep = routing_report(tmp_path / "moe", {"a": ["w1 w2 w3", "w5"], "b": ["w12 w13"]})
    assert rep.groups == ("a", "b") and rep.experts == ("0:e0", "1:e1")
    assert rep.tokens == (6, 3) and rep.per_layer_top1.shape == (2, 2, 2)
    torch.testing.assert_close(rep.top1.sum(1), torch.ones(2))
    torch.testing.assert_close(rep.topk, rep.top1)  # one expert per token: the same count
    assert rep.to_markdown().splitlines()[0] == "| group | tokens | 0:e0 | 1:e1 |"
    # oracle: each MoE block's input times its gate matrix, argmax, counted by hand
    model, seen = _load(tmp_path / "moe"), []
    for layer in model.model.layers:
        w = layer.mlp.gate.weight
        layer.mlp.register_forward_pre_hook(
            lambda _m, a, w=w: seen.append((a[0][0] @ w.T).argmax(-1))
        )
    with torch.no_grad():
        model(torch.tensor([[1, 4, 5, 6]]))
        model(torch.tensor([[1, 8]]))
    counts = torch.bincount(torch.cat(seen), minlength=2).float()
    torch.testing.assert_close(rep.top1[0], counts / counts.sum())
    assert json.loads(json.dumps(rep.to_dict()))["tokens"] == {"a": 6, "b": 3}


def test_prompt_group_files(tmp_path):
    (tmp_path / "g.yml").write_text(yaml.safe_dump({"news": ["w1 w2"], "tweets": ["w3"]}))
    assert load_prompt_groups(tmp_path / "g.yml") == {"news": ["w1 w2"], "tweets": ["w3"]}
    (tmp_path / "g.jsonl").write_text('{"text": "w1", "label": "x"}\n{"text": "w2", "label": 1}\n')
    assert load_prompt_groups(tmp_path / "g.jsonl") == {"x": ["w1"], "1": ["w2"]}
    (tmp_path / "held.txt").write_text("w1 w2\n\nw3\n")
    assert load_prompt_groups(tmp_path / "held.txt") == {"held": ["w1 w2", "w3"]}
    (tmp_path / "e.yml").write_text("a: []\n")
    with pytest.raises(ConfigError, match="group.s. a hold no text"):
        load_prompt_groups(tmp_path / "e.yml")


def test_cli_moe_with_report(fam, tmp_path, capsys):
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(moe_yaml(fam, n=2, gate_mode="cheap_embed")))
    assert main(["moe", str(cfg), str(tmp_path / "out"), "--report"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "(Mixtral, 2 experts)" in text and "| group | tokens |" in text
    assert (tmp_path / "out" / "mergeforge_config.yml").read_text() == cfg.read_text()
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 2  # not empty, no --overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["moe", str(cfg), str(tmp_path / "out"), "--overwrite", "--random-seed", "3"]) == 0


# ---- bad input: a clear error naming the expert / file, and nothing written ---------------


def _gpt2(root):
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return save(tf.GPT2LMHeadModel(cfg), root / "gpt2", tokenizer=False)


def _wide(root):
    return save(tiny_llama(hidden_size=64, intermediate_size=48), root / "wide", tokenizer=False)


def _no_mlp(root):
    d = root / "nomlp"
    shutil.copytree(root / "e1src", d)
    sd = {k: v for k, v in load_dir(d).items() if "layers.1.mlp.up_proj" not in k}
    from safetensors.torch import save_file

    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


BAD_EXPERTS = [
    (_gpt2, ValidationError, "experts[1] ({path}): model_type 'gpt2', but the base model is "
     "'llama'"),
    (_wide, ValidationError, "experts[1] ({path}): hidden_size = 64, but the base model's is 32"),
    (_no_mlp, ValidationError, "experts[1] ({path}): {path}/model.safetensors has no tensor "
     "'model.layers.1.mlp.up_proj.weight'"),
]  # fmt: skip


@pytest.mark.parametrize("make, error, message", BAD_EXPERTS, ids=["arch", "hidden", "tensor"])
def test_bad_expert_is_named_and_nothing_written(fam, tmp_path, make, error, message):
    shutil.copytree(fam["experts"][1], tmp_path / "e1src")
    bad = make(tmp_path)
    cfg = moe_yaml(fam, n=2)
    cfg["experts"][1]["source_model"] = str(bad)
    before = sha_tree(tmp_path)
    with pytest.raises(error) as e:
        build_moe(cfg, tmp_path / "out")
    assert message.format(path=bad) in str(e.value)
    assert not (tmp_path / "out").exists() and sha_tree(tmp_path) == before


def test_other_bad_inputs(fam, tmp_path):
    def refused(cfg, error, needle, out=tmp_path / "out", **kw):
        with pytest.raises(error) as e:
            build_moe(cfg, out, **kw)
        assert needle in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()

    refused(moe_yaml(fam, n=2, experts_per_token=3), ConfigError, "experts_per_token: 3 with 2")
    quiet = moe_yaml(fam, n=2)
    quiet["experts"][1].pop("positive_prompts")
    refused(quiet, ConfigError, f"experts[1] ({fam['experts'][1]}) has no positive_prompts")
    same = moe_yaml(fam, n=2)
    same["experts"][1]["positive_prompts"] = same["experts"][0]["positive_prompts"]
    same["experts"][1]["negative_prompts"] = same["experts"][0]["negative_prompts"]
    refused(same, ConfigError, "every expert has the same positive and negative prompts")
    refused(moe_yaml(fam, n=2, shared=True, architecture="mixtral"), ValidationError,
            "Mixtral: Mixtral has no shared expert")  # fmt: skip
    refused(moe_yaml(fam, n=2, architecture="deepseek"), ConfigError,
            "the DeepSeek MoE output architecture (mergekit) is not implemented")  # fmt: skip
    refused(moe_yaml(fam, n=2), ConfigError, "lies inside the input",
            out=fam["base"] / "moe")  # fmt: skip
    notok = tmp_path / "base"
    shutil.copytree(fam["base"], notok)
    (notok / "tokenizer.json").unlink()
    (notok / "tokenizer_config.json").unlink()
    refused(moe_yaml({**fam, "base": notok}, n=2), ValidationError, "base_model: no tokenizer in")
    assert prepare_moe(moe_yaml({**fam, "base": notok}, n=2, gate_mode="random")).jobs


def test_base_without_a_weight_the_gates_need_is_named_and_nothing_written(fam, tmp_path):
    """The base model for the gates is read on its own thread while the tensors are written:
    its error reaches the caller, the writers stop, and nothing is written."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(fam["base"], base)
    sd = {k: v for k, v in load_dir(base).items() if k != "model.layers.0.mlp.up_proj.weight"}
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValidationError, match="stores no 'model.layers.0.mlp.up_proj.weight'"):
        build_moe(moe_yaml({**fam, "base": base}, n=2), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_interrupted_build_leaves_nothing(fam, tmp_path, monkeypatch):
    calls = []

    def boom(self, job):
        calls.append(job.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, job)

    original = assemble_mod._Producer.__call__
    monkeypatch.setattr(assemble_mod._Producer, "__call__", boom)
    with pytest.raises(KeyboardInterrupt):
        build_moe(moe_yaml(fam, n=2, gate_mode="random"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_power_of_two_warning(fam, tmp_path, caplog):
    res = build_moe(moe_yaml(fam, n=3, gate_mode="random"), tmp_path / "out")
    assert any("3 experts is not a power of two" in w for w in res.warnings)
    assert "llama.cpp cannot load" in caplog.text


def test_noise_and_residual_scale_are_seeded(fam, tmp_path):
    cfg = moe_yaml(fam, n=2, gate_mode="random", seed=4)
    cfg["experts"][0]["noise_scale"] = 0.01
    cfg["experts"][1]["residual_scale"] = 0.5
    a, b = (load_dir(build_moe(cfg, tmp_path / x).out) for x in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same bytes
    e0, e1 = load_dir(fam["experts"][0]), load_dir(fam["experts"][1])
    noise = a["model.layers.0.mlp.experts.down_proj"][0] - e0["model.layers.0.mlp.down_proj.weight"]
    assert 0.008 < float(noise.std()) < 0.012
    torch.testing.assert_close(a["model.layers.0.mlp.experts.down_proj"][1],
                               e1["model.layers.0.mlp.down_proj.weight"] * 0.5)  # fmt: skip


def test_device_auto_and_bad_devices(fam, tmp_path, monkeypatch):
    """`--device auto` (advertised by `mergeforge moe --help`) resolves in build_moe and in the
    routing report; an unknown device is a ConfigError before any model is loaded."""
    with pytest.raises(ConfigError, match="unsupported device 'tpu'; use cpu, cuda"):
        build_moe(moe_yaml(fam, n=2, experts_per_token=1), tmp_path / "moe", device="tpu")
    assert not (tmp_path / "moe").exists()
    build_moe(moe_yaml(fam, n=2, experts_per_token=1), tmp_path / "moe", device="auto")
    import transformers as tf

    loaded = []
    real = tf.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(a) or real(*a, **k))  # fmt: skip
    with pytest.raises(ConfigError, match="unsupported device 'gpu'; use cpu, cuda"):
        routing_report(tmp_path / "moe", {"a": ["w1 w2"]}, device="gpu")
    assert loaded == []
    rep = routing_report(tmp_path / "moe", {"a": ["w1 w2"]}, device="auto")
    assert rep.tokens == (3,) and len(loaded) == 1


def test_an_older_transformers_is_refused_with_the_pin(fam, tmp_path, monkeypatch):
    """The output is transformers v5's layout (Mixtral's fused ``mlp.experts.gate_up_proj``),
    which transformers 4.x cannot load: refused before anything is read or written."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(name: str) -> str:
        return "4.46.3" if name == "transformers" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ConfigError, match=r"transformers 4.46.3 .*transformers>=5"):
        build_moe(moe_yaml(fam, n=2, gate_mode="cheap_embed"), tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    with pytest.raises(ConfigError, match=r"transformers>=5"):
        routing_report(tmp_path / "moe", {"a": ["w1"]})
