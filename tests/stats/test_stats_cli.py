"""`mergeforge stats` then `mergeforge merge` with regmean/fisher on tiny BERT and GPT-2
families (GPT-2: Conv1D weights stored (in, out)), and the planner's refusals."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from stats_helpers import texts_file

from mergeforge.checkpoint.sidecar import save_sidecar, sidecar_path
from mergeforge.cli import main
from mergeforge.methods.covariance import exact_solve
from mergeforge.methods.regmean import shrink


def _stats(model, method, texts, *extra) -> None:
    args = ["stats", method, str(model), "--texts", str(texts), "--num-examples", "8",
            "--max-length", "16", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 0


def _merge(tmp, cfg, capsys=None):
    p = tmp / "merge.yml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp / "out"
    code = main(["merge", str(p), str(out), "--no-progress", "--overwrite"])
    return code, out


def _cfg(fam, method, **params):
    return {"merge_method": method, "base_model": str(fam["base"]),
            "models": [{"model": str(e)} for e in fam["experts"]],
            "parameters": params}  # fmt: skip


@pytest.mark.parametrize("arch,key", [("bert", "encoder.layer.0.attention.self.query.weight"),
                                      ("gpt2", "transformer.h.0.attn.c_attn.weight")])  # fmt: skip
def test_stats_then_regmean_merge(family, tmp_path, arch, key):
    fam = family(arch)
    texts = texts_file(tmp_path)
    for e in fam["experts"]:
        _stats(e, "regmean", texts)
    grams = [load_file(sidecar_path(e, "regmean")) for e in fam["experts"]]
    n_in = 32
    assert grams[0][key].shape == (n_in, n_in)
    code, out = _merge(tmp_path, _cfg(fam, "regmean", alpha=0.5, num_examples=8))
    assert code == 0
    merged = load_file(out / "model.safetensors")
    ws = [load_file(e / "model.safetensors")[key] for e in fam["experts"]]
    g = [shrink(x[key].double(), 0.5) for x in grams]
    if arch == "gpt2":  # Conv1D: (in, out); the solve is on (out, in)
        want = exact_solve([w.double().T for w in ws], g).T
    else:
        want = exact_solve([w.double() for w in ws], g)
    torch.testing.assert_close(merged[key].double(), want, rtol=1e-4, atol=1e-5)
    bias = key.replace(".weight", ".bias")
    mean = torch.stack([load_file(e / "model.safetensors")[bias] for e in fam["experts"]]).mean(0)
    torch.testing.assert_close(merged[bias], mean, rtol=1e-5, atol=1e-6)


def test_stats_then_fisher_merge_on_a_causal_lm(family, tmp_path):
    fam = family("gpt2")
    texts = texts_file(tmp_path)
    for e in fam["experts"]:
        _stats(e, "fisher", texts, "--fisher", "sampled")
    f = load_file(sidecar_path(fam["experts"][0], "fisher-sampled"))
    w = load_file(fam["experts"][0] / "model.safetensors")
    assert set(f) == set(w) - {k for k, v in w.items() if not v.is_floating_point()}
    assert all(f[k].shape == w[k].shape and (f[k] >= 0).all() for k in f)
    code, out = _merge(tmp_path, _cfg(fam, "fisher", fisher="sampled"))
    assert code == 0 and (out / "model.safetensors").exists()


def test_planner_refuses_missing_stats_with_the_command(family, tmp_path, capsys):
    fam = family("bert")
    code, out = _merge(tmp_path, _cfg(fam, "regmean"))
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert "missing statistics" in err and f"mergeforge stats regmean {fam['experts'][0]}" in err


def _fake_stats(fam, edit):
    """Grams for every linear weight of the experts (identity), then ``edit`` each dict."""
    for e in fam["experts"]:
        w = load_file(e / "model.safetensors")
        grams = {k: torch.eye(v.shape[1]) for k, v in w.items()
                 if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k}  # fmt: skip
        edit(grams)
        save_sidecar(e, "regmean", grams, num_examples=8, examples_used=8, source="test")


def test_planner_refuses_a_missing_key_and_a_wrong_shape(family, tmp_path, capsys):
    fam = family("bert")
    key = "encoder.layer.1.output.dense.weight"
    _fake_stats(fam, lambda g: None)
    save_sidecar(fam["experts"][1], "regmean",
               {k: v for k, v in load_file(sidecar_path(fam["experts"][1], "regmean")).items()
                if k != key}, num_examples=8, examples_used=8, source="test")  # fmt: skip
    code, _ = _merge(tmp_path, _cfg(fam, "regmean"))
    err = capsys.readouterr().err
    assert code != 0 and "missing statistic" in err and key in err and "expert1" in err
    _fake_stats(fam, lambda g: g.update({key: torch.eye(5)}))
    code, _ = _merge(tmp_path, _cfg(fam, "regmean"))
    err = capsys.readouterr().err
    assert code != 0 and "shape mismatch" in err and key in err and "[64, 64]" in err
    _fake_stats(fam, lambda g: None)
    code, _ = _merge(tmp_path, _cfg(fam, "regmean", num_examples=16))
    err = capsys.readouterr().err
    assert code != 0 and "num_examples=16" in err and "--num-examples 16" in err


def test_fisher_needs_a_head(family, tmp_path, capsys):
    fam = family("bert")  # a bare BertModel: no output head to take a likelihood of
    args = ["stats", "fisher", str(fam["experts"][0]), "--texts", str(texts_file(tmp_path)),
            "--no-progress"]  # fmt: skip
    assert main(args) != 0
    assert "fisher needs a model with an output head" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stats_and_merge_on_cuda(family, tmp_path):
    fam = family("gpt2")
    texts = texts_file(tmp_path)
    for e in fam["experts"]:
        _stats(e, "regmean", texts, "--device", "cuda")
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(_cfg(fam, "regmean")))
    out = tmp_path / "out"
    assert main(["merge", str(p), str(out), "--no-progress", "--device", "cuda"]) == 0
    cpu = tmp_path / "cpu"
    assert main(["merge", str(p), str(cpu), "--no-progress"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(cpu / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
