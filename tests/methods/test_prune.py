"""Saliency pruning (issue 14 item 4): ``prune`` and ``mergeforge prune``.

Oracles: the kept set is exactly ``torch.topk`` of the scores concatenated over the model's
matrices (saliency computed or recorded, magnitude, Fisher), found by the streaming passes;
1-D tensors keep the expert's value; density 1 is the expert. End to end: a tiny BERT classifier
trained with AdamW beside the curvature recorder, pruned by the command line, loads with
``transformers`` and carries the expert's config. Bad inputs: ``--density`` outside (0, 1],
statistics missing or of another model; nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import load_dir, sha_tree
from tests.methods._engine import build, merge_model

from mergeforge.cli import main
from mergeforge.errors import ConfigError
from mergeforge.methods import get_method
from mergeforge.train import saliency

SHAPES = {"a": (6, 5), "conv": (4, 2, 3), "c": (8, 8), "bias": (5,)}


def make_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in SHAPES.items():
        base = torch.randn(shape, generator=g)
        model[key] = (base, [base + 0.1 * torch.randn(shape, generator=g)])
    return model


def statistics(model, score, seed=1):
    """Per key, the expert's statistics ``score`` reads (matrices only)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (base, _) in model.items():
        if base.dim() < 2:
            out[key] = (None,)
        elif score == "fisher":
            out[key] = (torch.rand(base.shape, generator=g),)
        else:
            s = {":R": torch.rand(base.shape[0], generator=g) + 0.05,
                 ":C": torch.rand(base[0].numel(), generator=g) + 0.05}  # fmt: skip
            if score == "recorded":
                s[":S"] = torch.rand(base.shape, generator=g)
            out[key] = (s,)
    return out


def scores(model, stats, score):
    """The score of every matrix entry, held whole (the passes never do)."""
    out = {}
    for key, (base, (x,)) in model.items():
        if base.dim() < 2:
            continue
        tau, (s,) = x - base, stats.get(key, (None,))
        if score == "magnitude":
            out[key] = tau.abs()
        elif score == "fisher":
            out[key] = s * tau.square()
        elif score == "recorded":
            out[key] = s[":S"]
        else:  # the one saliency formula (hand-worked in tests/train/test_recorder.py)
            out[key] = saliency(tau, s[":R"], s[":C"])
    return out


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("score", ["saliency", "recorded", "magnitude", "fisher"])
def test_kept_set_is_the_topk_of_the_concatenated_scores(score, density):
    model = make_model()
    stats = None if score == "magnitude" else statistics(model, score)
    params = {"score": "saliency" if score == "recorded" else score}
    out = merge_model("prune", model, params, [{"density": density}], sidecars=stats)
    s = scores(model, stats or {}, score)
    flat = torch.cat([v.reshape(-1) for v in s.values()])
    k = max(1, int(density * flat.numel()))
    top = torch.topk(flat, k)
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[top.indices] = True
    start = 0
    for key, (base, (x,)) in model.items():
        if key not in s:
            assert torch.equal(out[key], x), key  # 1-D: the expert's value
            continue
        mask = kept[start : start + base.numel()].view(base.shape)
        start += base.numel()
        assert torch.equal(out[key], torch.where(mask, x, base)), key
    # the streaming passes' threshold is topk's k-th value
    m = get_method("prune")
    p, mps = build(m, params, [{"density": density}])
    stat = m.statistic(p)
    for i in range(stat.passes):
        for key, (base, xs) in model.items():
            side = stats[key] if stats else ()
            stat.observe(i, key, base, xs, p, mps, sidecars=side)
        stat.end_pass(i)
    assert stat.result() == (top.values[-1].item(),)


def test_entries_scored_zero_return_to_the_base_even_at_a_zero_threshold():
    """Rows no gradient reached (R = 0) have zero saliency; at density 0.9 more than 10 % of
    the entries score 0, the threshold is 0, and those entries still return to the base
    (they moved only by weight decay), while every entry scored above 0 is kept."""
    model = make_model()
    stats = statistics(model, "saliency")
    for (st,) in stats.values():
        if st is not None:
            st[":R"][: st[":R"].numel() // 2] = 0.0  # half the rows never saw a gradient
    out = merge_model("prune", model, {"score": "saliency"}, [{"density": 0.9}], sidecars=stats)
    s = scores(model, stats, "saliency")
    for key, (base, (x,)) in model.items():
        if key in s:
            assert torch.equal(out[key], torch.where(s[key] > 0, x, base)), key
            assert bool((s[key] == 0).any()) and not torch.equal(out[key], x), key


def test_density_one_is_the_expert():
    model = make_model()
    out = merge_model("prune", model, {"score": "magnitude"}, [{"density": 1.0}])
    assert all(torch.equal(out[k], xs[0]) for k, (_, xs) in model.items())


def test_density_is_checked():
    model = make_model()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"'density' = .* is invalid"):
            merge_model("prune", model, {"score": "magnitude"}, [{"density": bad}])


# ---- the command, end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT classifier saved before (base) and after 6 AdamW steps (expert), its
    curvature recorded beside the optimizer (mergeforge.train)."""
    import transformers as tf

    from mergeforge.train import CurvatureRecorder

    root = tmp_path_factory.mktemp("prune")
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=100, num_labels=3)  # fmt: skip
    model = tf.BertForSequenceClassification(cfg)
    model.save_pretrained(root / "base")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with CurvatureRecorder(model, optimizer=opt) as recorder:
        for _ in range(6):
            ids = torch.randint(0, 100, (8, 12), generator=g)
            model(input_ids=ids, labels=torch.randint(0, 3, (8,), generator=g)).loss.backward()
            opt.step()
            opt.zero_grad()
    model.config.id2label = {0: "neg", 1: "neu", 2: "pos"}  # the expert's own config
    model.save_pretrained(root / "expert")
    recorder.save(root / "expert", examples=48)
    return root


def prune_argv(root, out, *flags):
    return ["prune", str(root / "expert"), str(out), "--base", str(root / "base"),
            "--no-progress", *flags]  # fmt: skip


@pytest.mark.parametrize("score", ["saliency", "magnitude"])
def test_prune_command_output_loads(trained, tmp_path, score):
    import transformers as tf

    out = tmp_path / f"pruned-{score}"
    assert main(prune_argv(trained, out, "--density", "0.2", "--score", score)) == 0
    pruned = tf.AutoModelForSequenceClassification.from_pretrained(out)
    assert pruned.config.id2label == {0: "neg", 1: "neu", 2: "pos"}  # the expert's config
    base, expert, got = load_dir(trained / "base"), load_dir(trained / "expert"), load_dir(out)
    assert got.keys() == expert.keys()
    changed = kept = total = 0
    for key, x in expert.items():
        if x.dim() < 2 or not x.is_floating_point():
            assert torch.equal(got[key], x), key
            continue
        moved = x != base[key]
        changed += int(moved.sum())
        kept += int((moved & (got[key] == x)).sum())
        assert torch.equal(got[key][~(got[key] == x)], base[key][~(got[key] == x)]), key
        total += x.numel()
    assert kept == max(1, int(0.2 * total)) and changed > kept  # no ties among random scores
    resolved = (out / "mergeforge_resolved.yml").read_text()
    assert "merge_method: prune" in resolved and f"score: {score}" in resolved
    labels = json.loads((out / "config.json").read_text())["id2label"]
    assert labels == {"0": "neg", "1": "neu", "2": "pos"}  # the base says LABEL_0 …


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1", "nan"])
def test_density_outside_0_1_exits_2(trained, tmp_path, capsys, density):
    out = tmp_path / "out"
    assert main(prune_argv(trained, out, f"--density={density}")) == 2
    assert "--density" in capsys.readouterr().err and not out.exists()


def test_missing_curvature_names_the_expert(trained, tmp_path, capsys):
    import shutil

    shutil.copytree(trained / "expert", tmp_path / "expert", ignore=shutil.ignore_patterns(
        "mergeforge-stats"))  # fmt: skip
    shutil.copytree(trained / "base", tmp_path / "base")
    before = sha_tree(tmp_path)
    assert main(prune_argv(tmp_path, tmp_path / "out", "--density", "0.1")) == 2
    err = capsys.readouterr().err
    assert "missing statistics" in err and str(tmp_path / "expert") in err
    assert "CurvatureRecorder" in err and not (tmp_path / "out").exists()
    assert sha_tree(tmp_path) == before


def test_statistics_of_another_model_are_refused(trained, tmp_path, capsys):
    import shutil

    shutil.copytree(trained / "expert", tmp_path / "expert")
    shutil.copytree(trained / "base", tmp_path / "base")
    # another model's statistics: the base's weights saved where the expert's were
    shutil.copy(trained / "base" / "model.safetensors", tmp_path / "expert" / "model.safetensors")
    assert main(prune_argv(tmp_path, tmp_path / "out", "--density", "0.1")) == 2
    err = capsys.readouterr().err
    assert "weights changed" in err and "CurvatureRecorder" in err
    assert not (tmp_path / "out").exists()
