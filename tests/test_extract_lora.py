"""``mergeforge extract-lora``: a PEFT LoRA adapter from FINETUNED - BASE.

Oracles: mergekit-extract-lora (its real click command, in process) on a tiny Llama pair, the
applied weights ``W_base + B·A`` compared module by module; PEFT itself
(``PeftModel.from_pretrained`` then ``merge_and_unload``); the closed form (a task vector of
exact rank r comes back to rounding at rank r, for every SVD method). Bad inputs fail before
anything is written, naming the tensor and the files; a failure or SIGTERM half-way leaves
nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from mergeforge.cli import main
from mergeforge.errors import ConfigError, ValidationError
from mergeforge.extract_lora import extract_lora, truncated_svd
from tests.helpers import finish, load_dir, sha_tree, start_blocked, write_model

PREFIX = "base_model.model."


def _extract(ft, base, out, rank=8, **kw):
    return extract_lora(ft, base, out, rank, progress=False, **kw)


def _config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def _applied(adapter: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base's tensors with the adapter applied as PEFT applies it (scaling alpha / r per
    module, ``fan_in_fan_out``, embedding LoRA transposed, ``lora_bias``, modules to save)."""
    cfg = _config(adapter)
    tensors = load_dir(adapter)
    out = {k: v.clone().float() for k, v in base.items()}

    def scale(module: str) -> float:
        r = cfg["rank_pattern"].get(module, cfg["r"])
        if r == 0:  # mergekit writes modules cut to rank 0 by --sv-epsilon (PEFT refuses them)
            return 0.0
        return cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) / r

    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            delta = tensors[f"{PREFIX}{module}.lora_B.weight"].float() @ t.float()
            if cfg["fan_in_fan_out"]:
                delta = delta.T
            target = f"{module}.weight"
            base_w = out.get(target, base.get(target))
            if base_w is None:  # a tied head: the base's embedding
                base_w = next(v for k, v in base.items() if k.endswith("wte.weight"))
            out[target] = base_w.float() + scale(module) * delta
        elif name.endswith(".lora_embedding_A"):
            module = name.removesuffix(".lora_embedding_A")
            delta = (tensors[f"{PREFIX}{module}.lora_embedding_B"].float() @ t.float()).T
            out[f"{module}.weight"] = out[f"{module}.weight"] + scale(module) * delta
        elif name.endswith(".lora_B.bias"):
            if cfg.get("lora_bias"):
                module = name.removesuffix(".lora_B.bias")
                out[f"{module}.bias"] = out[f"{module}.bias"] + scale(module) * t.float()
        elif ".lora_" not in name:
            out[name] = t.float()
    return out


def _lora_modules(adapter: Path) -> set[str]:
    """Modules with LoRA factors of rank > 0."""
    return {
        k.removeprefix(PREFIX).split(".lora_")[0]
        for k, v in load_dir(adapter).items()
        if ".lora_" in k and v.numel()
    }


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert hidden == [], hidden


@pytest.fixture(scope="module")
def pair(llama_family) -> tuple[Path, Path]:
    return llama_family["experts"][0], llama_family["base"]


# ---- mergekit, the reference ---------------------------------------------------------------


def _mergekit(ft: Path, base: Path, out: Path, *flags: str) -> Path:
    from mergekit.scripts.extract_lora import main as mk_main

    mk_main(["--model", str(ft), "--base-model", str(base), "--out-path", str(out), "--quiet",
             *flags], standalone_mode=False)  # fmt: skip
    return out


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "flags, kwargs",
    [
        (["--max-rank", "8"], {"rank": 8}),
        (["--max-rank", "8", "--embed-lora"], {"rank": 8, "embed_lora": True}),
        (["--max-rank", "24"], {"rank": 24, "clamp_rank": True}),  # k/v are 16 wide: clamped
        (["--max-rank", "6", "--no-distribute-scale", "-e", "mlp"],
         {"rank": 6, "distribute_scale": False, "exclude": ["mlp"]}),
        # mergekit 0.1.5's --save-module crashes (a tuple .append) unless nothing else is
        # added to modules_to_save: hence --embed-lora --skip-undecomposable here
        (["--max-rank", "8", "--sv-epsilon", "0.2", "--save-module", "q_proj", "--embed-lora",
          "--skip-undecomposable"],
         {"rank": 8, "sv_epsilon": 0.2, "save_modules": ["q_proj"], "embed_lora": True,
          "skip_undecomposable": True}),
    ],
    ids=["rank8", "embed-lora", "clamped", "no-distribute-exclude", "sv-epsilon-save-module"],
)  # fmt: skip
def test_applied_weights_match_mergekit(pair, tmp_path, flags, kwargs):
    ft, base = pair
    mk = _mergekit(ft, base, tmp_path / "mk", *flags)
    rank = kwargs.pop("rank")
    res = _extract(ft, base, tmp_path / "mf", rank, **kwargs)
    base_sd = load_dir(base)
    ours, theirs = _applied(res.out, base_sd), _applied(mk, base_sd)
    assert set(ours) == set(theirs)
    assert _lora_modules(res.out) == _lora_modules(mk)
    mk_cfg, cfg = _config(mk), _config(res.out)
    assert cfg["r"] == mk_cfg["r"]
    assert cfg["rank_pattern"] == {m: r for m, r in mk_cfg["rank_pattern"].items() if r}
    assert sorted(cfg["modules_to_save"] or []) == sorted(
        m for m in {k.removeprefix(PREFIX).rpartition(".")[0] for k in load_dir(mk)
                    if ".lora_" not in k}
    )  # fmt: skip
    for name, want in theirs.items():
        delta = want - base_sd[name].float()
        diff = (ours[name] - want).norm() / max(delta.norm(), 1e-12)
        assert diff < 2e-5, (name, float(diff))


@pytest.mark.mergekit
def test_our_adapter_is_the_same_files_mergekit_writes(pair, tmp_path):
    """Same tensor names, shapes and dtypes as mergekit's adapter (not just the same product)."""
    ft, base = pair
    mk = load_dir(_mergekit(ft, base, tmp_path / "mk", "--max-rank", "8"))
    ours = load_dir(_extract(ft, base, tmp_path / "mf").out)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
        k: (v.shape, v.dtype) for k, v in mk.items()
    }


# ---- PEFT loads it ---------------------------------------------------------------------------


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().float() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("kwargs", [{}, {"embed_lora": True}, {"svd": "randomized"}],
                         ids=["default", "embed-lora", "randomized"])  # fmt: skip
def test_peft_merge_and_unload_is_base_plus_ba(pair, tmp_path, kwargs):
    ft, base = pair
    res = _extract(ft, base, tmp_path / "adapter", **kwargs)
    merged = _peft_merged(base, res.out)
    want = _applied(res.out, load_dir(base))
    assert set(merged) == set(want)
    for k, v in merged.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gpt2_conv1d_bias_and_tied_head_load_with_peft(tiny_families, tmp_path):
    """GPT-2's Conv1D weights (in x out) are LoRA'd with fan_in_fan_out (mergekit saves them
    whole), their bias changes go in as lora_bias, and the head tied to the changed token
    embedding is saved with it, so the merged head is the fine-tuned one."""
    fam = tiny_families["gpt2"]
    ft, base = fam["experts"][0], fam["base"]
    res = _extract(ft, base, tmp_path / "adapter")
    cfg = _config(res.out)
    assert cfg["fan_in_fan_out"] and cfg["lora_bias"]
    assert sorted(cfg["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    assert "lm_head" in cfg["modules_to_save"]
    merged = _peft_merged(base, res.out)
    want = _applied(res.out, load_dir(base))
    for k, v in merged.items():
        torch.testing.assert_close(v, want.get(k, v), rtol=1e-5, atol=1e-6, msg=k)
    ft_sd = load_dir(ft)
    torch.testing.assert_close(merged["lm_head.weight"], ft_sd["transformer.wte.weight"])
    torch.testing.assert_close(merged["transformer.h.1.attn.c_attn.bias"],
                               ft_sd["transformer.h.1.attn.c_attn.bias"])  # fmt: skip


# ---- the closed form ---------------------------------------------------------------------------


def _low_rank_pair(root: Path, rank: int = 5) -> tuple[Path, Path, dict]:
    g = torch.Generator().manual_seed(3)
    base = {
        "m.layers.0.proj.weight": torch.randn(48, 40, generator=g),
        "m.layers.1.proj.weight": torch.randn(40, 64, generator=g),  # wide
        "m.norm.weight": torch.ones(40),
    }
    ft = dict(base)
    for k in ("m.layers.0.proj.weight", "m.layers.1.proj.weight"):
        m, n = base[k].shape
        u, v = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
        ft[k] = base[k] + 0.01 * (u @ v)
    return write_model(root / "ft", ft), write_model(root / "base", base), ft


@pytest.mark.parametrize("svd", ["exact", "gram", "randomized"])
def test_exact_rank_r_delta_comes_back_at_rank_r(tmp_path, svd):
    ft, base, ft_sd = _low_rank_pair(tmp_path)
    res = _extract(ft, base, tmp_path / "adapter", 5, svd=svd)
    assert res.modules == 2 and res.saved == ()  # the unchanged norm is not saved
    assert res.max_error < 1e-5, res.tensors
    applied = _applied(res.out, load_dir(base))
    for k, v in ft_sd.items():
        delta = (v - load_dir(base)[k]).norm()
        assert (applied[k] - v).norm() <= 1e-5 * max(float(delta), 1e-12), k
    assert _config(res.out)["modules_to_save"] is None


def test_sv_epsilon_cuts_the_rank_to_the_true_one(tmp_path):
    ft, base, _ = _low_rank_pair(tmp_path)
    res = _extract(ft, base, tmp_path / "adapter", 12, sv_epsilon=1e-4)
    assert res.rank == 5 and all(t.rank == 5 for t in res.tensors if t.kind == "lora")
    assert {v.shape[0] for k, v in load_dir(res.out).items() if "lora_A" in k} == {5}


def test_truncated_svd_methods_agree_on_the_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 30, generator=g) @ torch.diag(torch.linspace(3, 0.1, 30))
    for m in (x, x.T.contiguous()):
        u, s, vh = truncated_svd(m, 6, "exact")
        ref = (u * s) @ vh
        for method in ("gram", "randomized"):
            gen = torch.Generator().manual_seed(1)
            u2, s2, vh2 = truncated_svd(m, 6, method, power_iters=6, generator=gen)
            assert ((u2 * s2) @ vh2 - ref).norm() / ref.norm() < 1e-4, method


def test_workers_do_not_change_the_bytes(pair, tmp_path):
    ft, base = pair
    for svd in ("exact", "randomized"):
        one = _extract(ft, base, tmp_path / f"{svd}1", svd=svd, workers=1).out
        two = _extract(ft, base, tmp_path / f"{svd}2", svd=svd, workers=2).out
        name = "adapter_model.safetensors"
        assert (one / name).read_bytes() == (two / name).read_bytes()


# ---- the report -----------------------------------------------------------------------------


def test_report_json_holds_every_tensor_error(pair, tmp_path):
    ft, base = pair
    res = _extract(ft, base, tmp_path / "adapter")
    report = json.loads((res.out / "mergeforge_extract_lora.json").read_text())
    assert report["svd"] == "gram" and report["rank"] == 8
    base_sd, ft_sd, ad = load_dir(base), load_dir(ft), load_dir(res.out)
    rows = {r["module"]: r for r in report["tensors"]}
    assert {m for m, r in rows.items() if r["kind"] == "lora"} == _lora_modules(res.out)
    for module, row in rows.items():
        if row["kind"] != "lora":
            continue
        delta = ft_sd[f"{module}.weight"] - base_sd[f"{module}.weight"]
        ba = ad[f"{PREFIX}{module}.lora_B.weight"] @ ad[f"{PREFIX}{module}.lora_A.weight"]
        assert row["rel_error"] == pytest.approx(float((delta - ba).norm() / delta.norm()),
                                                 rel=1e-4)  # fmt: skip
    assert sorted(os.listdir(res.out)) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors",
        "mergeforge_extract_lora.json",
    ])  # fmt: skip


# ---- embeddings and modules to save ------------------------------------------------------------


def test_embeddings_saved_whole_by_default_and_as_lora_with_embed_lora(pair, tmp_path):
    ft, base = pair
    whole = _extract(ft, base, tmp_path / "whole")
    cfg = _config(whole.out)
    assert {"model.embed_tokens", "lm_head", "model.norm"} <= set(cfg["modules_to_save"])
    ad, ft_sd = load_dir(whole.out), load_dir(ft)
    assert torch.equal(ad[f"{PREFIX}model.embed_tokens.weight"], ft_sd["model.embed_tokens.weight"])
    lora = _extract(ft, base, tmp_path / "lora", embed_lora=True)
    cfg, ad = _config(lora.out), load_dir(lora.out)
    assert ad[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (8, 128)
    assert ad[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape == (32, 8)
    assert ad[f"{PREFIX}lm_head.lora_A.weight"].shape == (8, 32)
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"])
    assert not any("embed" in m or "lm_head" in m for m in cfg["modules_to_save"])


def _only_q_changed(tmp_path: Path, base: Path, layers=(0, 1, 2)) -> Path:
    sd = load_dir(base)
    g = torch.Generator().manual_seed(7)
    for i in layers:
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    out = write_model(tmp_path / "q-only", sd)
    shutil.copy(base / "config.json", out / "config.json")
    return out


def test_unchanged_modules_are_left_out_and_targets_stay_exact(pair, tmp_path):
    _, base = pair
    every = _extract(_only_q_changed(tmp_path, base), base, tmp_path / "every")
    cfg = _config(every.out)
    assert cfg["target_modules"] == ["q_proj"] and cfg["modules_to_save"] is None
    some = tmp_path / "some"
    one = _extract(_only_q_changed(some, base, layers=(1,)), base, tmp_path / "one")
    cfg = _config(one.out)
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]  # not every q_proj
    merged = _peft_merged(base, one.out)
    want = _applied(one.out, load_dir(base))
    for k, v in merged.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_save_module_saves_even_an_unchanged_module(pair, tmp_path):
    _, base = pair
    ft = _only_q_changed(tmp_path, base)
    res = _extract(ft, base, tmp_path / "adapter", save_modules=["embed_tokens"])
    assert _config(res.out)["modules_to_save"] == ["model.embed_tokens"]
    assert f"{PREFIX}model.embed_tokens.weight" in load_dir(res.out)


def test_skip_undecomposable_and_include_regex(pair, tmp_path):
    ft, base = pair
    res = _extract(ft, base, tmp_path / "a", skip_undecomposable=True, include=["self_attn"])
    assert res.saved == ()  # embeddings not included, norms skipped
    assert {m.rpartition(".")[2] for m in _lora_modules(res.out)} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}  # fmt: skip


# ---- bad inputs: nothing is written ------------------------------------------------------------


def test_different_shapes_name_the_tensor_and_both_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = write_model(tmp_path / "base", {"a.weight": torch.randn(8, 8, generator=g),
                                           "b.weight": torch.randn(8, 8, generator=g)})  # fmt: skip
    ft = write_model(tmp_path / "ft", {"a.weight": torch.randn(8, 8, generator=g),
                                       "b.weight": torch.randn(8, 12, generator=g)})  # fmt: skip
    out = tmp_path / "out" / "adapter"
    with pytest.raises(ValidationError) as e:
        _extract(ft, base, out, 2)
    msg = str(e.value)
    assert "b.weight" in msg and "a.weight" not in msg
    assert str(ft / "model.safetensors") in msg and str(base / "model.safetensors") in msg
    _nothing_at(out)
    assert not (tmp_path / "out").exists()  # missing parents are not left behind


def test_rank_larger_than_a_matrix_is_an_error_naming_it(pair, tmp_path):
    ft, base = pair
    out = tmp_path / "adapter"
    with pytest.raises(ValidationError, match=r"k_proj\.weight \[16, 32\] \(at most rank 16\)"):
        _extract(ft, base, out, 20)
    _nothing_at(out)
    res = _extract(ft, base, out, 20, clamp_rank=True)  # mergekit's --max-rank
    assert res.rank == 20
    assert _config(out)["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16


def test_output_never_inside_or_over_an_input(pair, tmp_path):
    ft, base = pair
    before = sha_tree(base)
    for out, how in ((base / "adapter", "lies inside"), (ft, "is"), (base.parent, "contains")):
        with pytest.raises(ConfigError, match=how):
            _extract(ft, base, out, overwrite=True)
    assert sha_tree(base) == before and not (base / "adapter").exists()


def test_base_equal_to_finetuned(pair, tmp_path):
    _, base = pair
    with pytest.raises(ConfigError, match="same model"):
        _extract(base, base, tmp_path / "a")
    copy = shutil.copytree(base, tmp_path / "copy")
    with pytest.raises(ValidationError, match="all zeros"):
        _extract(copy, base, tmp_path / "a")
    _nothing_at(tmp_path / "a")


def test_missing_tensor_in_base_is_named(tmp_path):
    base = write_model(tmp_path / "base", {"a.weight": torch.randn(8, 8)})
    ft = write_model(
        tmp_path / "ft", {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8)}
    )
    with pytest.raises(ValidationError, match=r"not in the base .*: b\.weight"):
        _extract(ft, base, tmp_path / "a", 2)
    _nothing_at(tmp_path / "a")


def test_overwrite_replaces_only_an_earlier_adapter(pair, tmp_path):
    ft, base = pair
    out = tmp_path / "adapter"
    _extract(ft, base, out, 4)
    with pytest.raises(Exception, match="not empty"):
        _extract(ft, base, out, 4)
    _extract(ft, base, out, 6, overwrite=True)
    assert _config(out)["r"] == 6
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="notes.txt"):
        _extract(ft, base, out, 4, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and _config(out)["r"] == 6


def test_a_failure_half_way_leaves_nothing(pair, tmp_path, monkeypatch):
    import mergeforge.extract_lora as xl

    ft, base = pair
    calls = {"n": 0}
    real = xl.truncated_svd

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(xl, "truncated_svd", failing)
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError, match="boom"):
        _extract(ft, base, out)
    _nothing_at(out)


def test_sigterm_half_way_leaves_nothing(pair, tmp_path):
    ft, base = pair
    out = tmp_path / "adapter"
    argv = [sys.executable, "-m", "mergeforge.cli", "extract-lora", str(ft), "--base", str(base),
            "--rank", "8", str(out)]  # fmt: skip
    proc, r, filled = start_blocked(argv)  # blocked writing its first progress line
    assert any(p.name.startswith(".adapter.mergeforge-partial-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, r, filled)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err
    _nothing_at(out)


# ---- the command line ----------------------------------------------------------------------


def test_cli_options_between_the_paths_and_mergekit_spellings(pair, tmp_path, capsys):
    ft, base = pair
    out = tmp_path / "ours"
    assert main(["extract-lora", str(ft), "--base", str(base), "--rank", "4", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith(f"wrote {out} (LoRA rank 4, gram SVD): 21 modules")
    assert "‖ΔW−BA‖/‖ΔW‖" in cap.err and "model.layers.2.mlp.down_proj" in cap.err
    mk = tmp_path / "mk"
    assert main(["extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path",
                 str(mk), "--max-rank", "24", "-e", "mlp", "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""
    cfg = _config(mk)
    assert cfg["r"] == 24 and sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj",
                                                                "v_proj"]  # fmt: skip


def test_cli_errors_are_one_line_with_exit_code_2(pair, tmp_path, capsys):
    ft, base = pair
    out = tmp_path / "a"
    assert main(["extract-lora", str(ft), "--base", str(base), "--rank", "99", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rank 99 is larger than") and "Nothing was written" in err
    assert main(["extract-lora", str(ft), str(out), "--rank", "4"]) == 2
    assert "name the base model" in capsys.readouterr().err
    assert main(["extract-lora", str(ft), "--base", str(base), "--rank", "4", "--max-rank", "4",
                 str(out)]) == 2  # fmt: skip
    _nothing_at(out)


def test_a_resized_vocabulary_saves_the_embeddings_whole(pair, tmp_path):
    """As mergekit: a fine-tuned vocabulary of another size forces the embeddings (and the
    head) into modules_to_save, even with embed_lora; any other shape difference is refused."""
    ft, base = pair
    sd = load_dir(ft)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(2, sd[k].shape[1])])
    resized = write_model(tmp_path / "resized", sd)
    res = _extract(resized, base, tmp_path / "a", embed_lora=True)
    assert {"model.embed_tokens", "lm_head"} <= set(res.saved)
    assert any("vocabulary differs" in n for n in res.notes)
    assert load_dir(res.out)[f"{PREFIX}lm_head.weight"].shape == (130, 32)
    sd["model.norm.weight"] = torch.ones(31)
    with pytest.raises(ValidationError, match=r"model\.norm\.weight: \[31\]"):
        _extract(write_model(tmp_path / "bad", sd), base, tmp_path / "b")
    _nothing_at(tmp_path / "b")


# ---- biases and tied embeddings: what PEFT's merge_and_unload gives back -------------------------


def _gpt2_pair(root: Path, change) -> tuple[Path, Path]:
    """A tiny GPT-2 (every LoRA layer has a bias) and a copy whose parameters ``change(name)``
    says to change (a small random step), both saved with save_pretrained."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    m = tf.GPT2LMHeadModel(cfg)
    m.save_pretrained(root / "base")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if change(n):
                p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(root / "ft")
    return root / "ft", root / "base"


def _changed_modules_equal_ft(merged: dict, ft: Path, modules) -> None:
    ft_sd = load_dir(ft)
    for m in modules:
        for p in ("weight", "bias"):
            torch.testing.assert_close(merged[f"{m}.{p}"], ft_sd[f"{m}.{p}"].float(),
                                       rtol=0, atol=1e-6, msg=f"{m}.{p}")  # fmt: skip


def test_a_changed_bias_under_an_unchanged_weight_is_kept(tmp_path):
    """lora_bias on (every LoRA layer of a GPT-2 has a bias); one module's weight is unchanged
    but its bias changed: the bias is not dropped (a zero rank-1 LoRA carries it as
    lora_B.bias), and PEFT's merge_and_unload gives the fine-tuned module back."""
    still = "transformer.h.0.attn.c_proj"

    def change(n: str) -> bool:
        return any(k in n for k in ("attn.c_attn", "attn.c_proj", "mlp")) and n != f"{still}.weight"

    ft, base = _gpt2_pair(tmp_path, change)
    res = _extract(ft, base, tmp_path / "adapter", clamp_rank=True, rank=32)
    cfg, ad = _config(res.out), load_dir(res.out)
    assert cfg["lora_bias"] and cfg["rank_pattern"][still] == 1
    assert not ad[f"{PREFIX}{still}.lora_B.weight"].any()
    assert torch.equal(ad[f"{PREFIX}{still}.lora_B.bias"],
                       load_dir(ft)[f"{still}.bias"] - load_dir(base)[f"{still}.bias"])  # fmt: skip
    row = next(t for t in res.tensors if t.module == still)
    assert row.kind == "lora" and row.rank == 1 and row.bias
    assert any(still in n and "bias" in n for n in res.notes), res.notes
    merged = _peft_merged(base, res.out)
    _changed_modules_equal_ft(merged, ft, [still])
    # the LoRA'd modules at full rank come back too (their biases through lora_bias)
    _changed_modules_equal_ft(merged, ft, ["transformer.h.1.attn.c_proj",
                                           "transformer.h.0.mlp.c_fc"])  # fmt: skip


def test_a_bias_only_fine_tune_is_not_its_base(tmp_path):
    """A BitFit-style fine-tune (only biases changed) is no "equals its base": every module
    with a changed bias is saved whole and merge_and_unload gives the fine-tuned model."""

    def change(n: str) -> bool:
        return n.endswith(".bias") and (".attn." in n or ".mlp." in n)

    ft, base = _gpt2_pair(tmp_path, change)
    res = _extract(ft, base, tmp_path / "adapter")
    mods = sorted({n.removesuffix(".bias") for n in load_dir(ft) if change(n)})
    assert _config(res.out)["lora_bias"] and res.modules == len(mods) == 8
    merged = _peft_merged(base, res.out)
    _changed_modules_equal_ft(merged, ft, mods)


def test_a_changed_bias_without_lora_bias_saves_the_module_whole(tmp_path):
    """A Llama with attention biases: the MLP's LoRA layers have none, so PEFT's lora_bias
    cannot be on; a module whose bias alone changed is saved whole. And a fine-tune of the
    norms alone loads with PEFT (it needs one LoRA layer: a zero one)."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=64, attention_bias=True)  # fmt: skip
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n == "model.layers.0.self_attn.q_proj.bias" or ".mlp." in n:
                p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "ft")
    res = _extract(tmp_path / "ft", tmp_path / "base", tmp_path / "adapter")
    q = "model.layers.0.self_attn.q_proj"
    assert not _config(res.out)["lora_bias"] and q in res.saved
    merged = _peft_merged(tmp_path / "base", res.out)
    _changed_modules_equal_ft(merged, tmp_path / "ft", [q])
    # the norms alone
    m = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        m.model.norm.weight.add_(0.1)
    m.save_pretrained(tmp_path / "norms")
    res = _extract(tmp_path / "norms", tmp_path / "base", tmp_path / "norms-adapter")
    assert res.saved == ("model.norm",) and res.modules == 1
    assert any("zero rank-1" in n for n in res.notes), res.notes
    merged = _peft_merged(tmp_path / "base", res.out)
    want = load_dir(tmp_path / "norms")
    for k, v in merged.items():
        torch.testing.assert_close(v, want[k].float() if k in want else v, rtol=0, atol=1e-6)


def test_a_tied_head_gets_the_embedding_lora_once(tmp_path):
    """--embed-lora on a model with tied embeddings (no lm_head.weight): the embedding's LoRA
    is the one change of the shared matrix, so merge_and_unload gives base + ΔE (not 2ΔE)
    and the fine-tuned model's logits."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=64,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "ft")
    res = _extract(tmp_path / "ft", tmp_path / "base", tmp_path / "adapter", rank=32,
                   clamp_rank=True, embed_lora=True)  # fmt: skip
    assert "model.embed_tokens" in _lora_modules(res.out)
    assert "lm_head" not in _lora_modules(res.out) and "lm_head" not in res.saved
    assert any("lm_head is tied to model.embed_tokens" in n for n in res.notes), res.notes
    pytest.importorskip("peft")
    from peft import PeftModel

    base = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    ft = tf.LlamaForCausalLM.from_pretrained(tmp_path / "ft")
    e_base = base.model.embed_tokens.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, res.out).merge_and_unload()
    e_ft, e_m = ft.model.embed_tokens.weight.detach(), merged.model.embed_tokens.weight.detach()
    torch.testing.assert_close(e_m, e_ft, rtol=0, atol=1e-5)  # base + ΔE (ΔE at full rank)
    assert not torch.allclose(e_m, e_base + 2 * (e_ft - e_base), atol=1e-4)
    torch.testing.assert_close(merged.lm_head.weight.detach(), e_ft, rtol=0, atol=1e-5)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ft(x).logits, rtol=0, atol=1e-4)
