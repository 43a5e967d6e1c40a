"""Vision training, the parent cache, the output ensemble and plain weight averaging."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergeforge.evaluate.metrics import accuracy
from mergeforge.evaluate.vision import train as vt
from mergeforge.evaluate.vision.data import ImageSplit


def _synthetic(n: int = 64, seed: int = 0) -> ImageSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % 10
    return ImageSplit(x, y, x[:20], y[:20])


@pytest.mark.parametrize("arch", sorted(vt.ARCHS))
def test_two_steps_change_weights_and_are_seeded(arch):
    data = _synthetic()

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = vt.new_parent(arch, seed)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        losses = vt.train_model(
            model, data.train_x, data.train_y, epochs=1, batch_size=16, lr=1e-3, seed=seed,
            max_steps=2,
        )  # fmt: skip
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in after)
        return after

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: bit-identical
    assert any(not torch.equal(a[k], c[k]) for k in a)  # other seed: another parent


def test_ensemble_matches_a_hand_computed_example():
    # 2 parents, 3 examples, 2 classes; probabilities chosen so the ensemble differs from both
    p_a = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.25, 0.75]])
    p_b = torch.tensor([[0.4, 0.6], [0.1, 0.9], [0.9, 0.1]])
    y = torch.tensor([0, 1, 1])
    probs = vt.ensemble_probs([p_a.log() + 3.0, p_b.log()])  # logits up to a constant
    torch.testing.assert_close(probs, torch.tensor([[0.575, 0.425], [0.35, 0.65], [0.575, 0.425]]))
    assert accuracy(p_a, y) == pytest.approx(2 / 3)
    assert accuracy(p_b, y) == pytest.approx(1 / 3)
    assert accuracy(probs, y) == pytest.approx(2 / 3)
    # class-wise weights: parent a owns class 0, parent b class 1 -> scores (p_a[:, 0], p_b[:, 1])
    weighted = vt.ensemble_probs([p_a.log(), p_b.log()], class_weights=[[3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(weighted, torch.tensor([[0.75, 0.6], [0.6, 0.9], [0.25, 0.1]]))
    # equal class weights give the plain mean
    torch.testing.assert_close(
        vt.ensemble_probs([p_a.log(), p_b.log()], class_weights=[[1.0, 1.0], [1.0, 1.0]]), probs
    )


def test_average_state_dicts_by_hand_and_without_mutation():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    copies = [{k: v.clone() for k, v in sd.items()} for sd in (a, b)]
    out = vt.average_state_dicts([a, b])
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(out["b"], torch.tensor([2.0]))
    weighted = vt.average_state_dicts([a, b], weights=[3.0, 1.0])
    torch.testing.assert_close(weighted["w"], torch.tensor([1.5, 3.0]))
    assert all(torch.equal(a[k], copies[0][k]) and torch.equal(b[k], copies[1][k]) for k in a)
    with pytest.raises(ValueError, match="different keys"):
        vt.average_state_dicts([a, {"w": a["w"]}])


def test_parents_are_cached_and_reloaded(tmp_path, monkeypatch):
    data = _synthetic(n=40)
    recipe = vt.VisionRecipe(
        dataset="synthetic", arch="mlp", regime="halves2", steps=3, batch_size=16
    )
    parents, split, _ = vt.get_parents(recipe, data=data, cache_dir=tmp_path)
    folder = tmp_path / recipe.key()
    assert sorted(p.name for p in folder.iterdir()) == [
        "parent0.json", "parent0.safetensors", "parent1.json", "parent1.safetensors", "recipe.json",
    ]  # fmt: skip
    meta = json.loads((folder / "parent1.json").read_text())
    assert meta["arch"] == "mlp" and meta["regime"] == "halves2" and meta["parent"] == 1
    assert meta["steps"] == 3  # steps, not epochs, when the recipe sets them (2 batches/epoch)
    assert meta["class_share"] == [0.0] * 5 + [1.0] * 5 and 0.0 <= meta["test_accuracy"] <= 1.0

    def no_training(*args, **kwargs):
        raise AssertionError("cached parents must not be retrained")

    monkeypatch.setattr(vt, "train_model", no_training)
    again, _, _ = vt.get_parents(recipe, data=data, cache_dir=tmp_path)
    for p, q in zip(parents, again, strict=True):
        assert all(torch.equal(p.state_dict[k], q.state_dict[k]) for k in p.state_dict)
    result = vt.evaluate_family(recipe, again, split, data)
    assert len(result["parents"]) == 2 and result["n_train_per_parent"] == [20, 20]
    assert {"ensemble", "ensemble_weighted", "weight_average"} <= set(result)


def test_recipe_validation_and_key():
    assert vt.VisionRecipe().key() == vt.VisionRecipe().key()
    assert vt.VisionRecipe(seed=1).key() != vt.VisionRecipe().key()
    with pytest.raises(ValueError, match="VisionRecipe.arch"):
        vt.VisionRecipe(arch="alexnet")
    with pytest.raises(ValueError, match="VisionRecipe.epochs"):
        vt.VisionRecipe(epochs=0)
    with pytest.raises(ValueError, match="VisionRecipe.steps"):
        vt.VisionRecipe(steps=0)


def test_cosine_schedule_follows_its_closed_form():
    # oracle: a hand-written loop with lr_t = lr·½(1 + cos(π t / T)) at step t of T (SGD, so the
    # update is exactly -lr_t·grad); the last step moves the weights by a tiny amount
    data = _synthetic(n=48)
    model = vt.new_parent("mlp", 0)
    manual = vt.new_parent("mlp", 0)
    vt.train_model(model, data.train_x, data.train_y, epochs=2, batch_size=16, lr=0.1,
                   optimizer="sgd", seed=3, schedule="cosine")  # fmt: skip
    opt = torch.optim.SGD(manual.parameters(), lr=0.1, momentum=0.9)
    gen, total, t = torch.Generator().manual_seed(3), 6, 0
    for _ in range(2):
        for idx in torch.randperm(48, generator=gen).split(16):
            for group in opt.param_groups:
                group["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * t / total))
            loss = torch.nn.functional.cross_entropy(manual(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            t += 1
    got, want = model.state_dict(), manual.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    with pytest.raises(ValueError, match="VisionRecipe.schedule"):
        vt.VisionRecipe(schedule="step")
    # recipes from before the field existed keep their cache key
    assert vt.VisionRecipe(schedule="constant").key() == vt.VisionRecipe().key()
    assert vt.VisionRecipe(schedule="cosine").key() != vt.VisionRecipe().key()
