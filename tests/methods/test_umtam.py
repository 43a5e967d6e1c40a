"""UMTAM's curvature-aware merge (issue 14 item 5) against its definitions.

Oracles: with K ≡ 1 and S = τ² it is TIES' trim / elect (count) / disjoint mean with λ = 1, bit
for bit; a transcription of the paper's formulas (torch.topk trim, stacked vote and mean) for
recorded curvature and for a Fisher; hand-worked 2×2 examples of the sign vote, the weighted mean,
the trim's tie rule and the ablation options. Bad inputs: statistics of another model, missing
for one expert, a YAML without statistics, a model in memory without them, incomplete ones.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from tests.helpers import load_dir, sha_tree, write_model
from tests.methods._engine import merge_model
from tests.methods._engine import random_family as make_model
from torch.testing import assert_close

import mergeforge
from mergeforge.cli import main
from mergeforge.engine import run_merge
from mergeforge.errors import ValidationError
from mergeforge.train import Curvature, CurvatureMeta, save_curvature


def recorded(model, seed=1, saliency=False):
    """Made-up curvature per key and expert: {":R", ":C"} (":R" alone for 1-D), with ":S" = τ²
    when ``saliency``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (base, xs) in model.items():
        parts = [{":R": torch.rand(base.shape[0], generator=g) + 0.05} for _ in xs]
        for p, x in zip(parts, xs, strict=True):
            if base.dim() >= 2:
                p[":C"] = torch.rand(base[0].numel(), generator=g) + 0.05
            if saliency:
                p[":S"] = (x - base).square()
        out[key] = tuple(parts)
    return out


def curvature_of(stat, shape):
    """K = √(R ⊗ C), transcribed (the outer product of the moments, then the root)."""
    if ":C" not in stat:
        return stat[":R"].sqrt()
    return torch.outer(stat[":R"], stat[":C"]).sqrt().reshape(shape)


def reference(base, xs, Ks, Ss, densities, votes=None, lam=1.0):
    """The paper's merge of one tensor, transcribed on stacked tensors."""
    taus = [x - base for x in xs]
    Ks = [K.clamp_min(1e-8) for K in Ks]
    masks = []
    for S, d in zip(Ss, densities, strict=True):
        m = torch.zeros(S.numel(), dtype=torch.bool)
        m[torch.topk(S.reshape(-1), max(1, int(d * S.numel()))).indices] = True
        masks.append(m.view(S.shape))
    weights = Ks if votes is None else votes
    vote = sum(w * m * t.sign() for w, m, t in zip(weights, masks, taus, strict=True))
    sigma = torch.where(vote >= 0, 1.0, -1.0)
    agree = [m & (t.sign() == sigma) for m, t in zip(masks, taus, strict=True)]
    num = sum(a * K * t for a, K, t in zip(agree, Ks, taus, strict=True))
    den = sum(a * K for a, K in zip(agree, Ks, strict=True))
    return base + lam * torch.where(den > 1e-8, num / den, torch.zeros_like(num))


DENSITIES = (0.5, 0.3, 0.8)
MPS = [{"density": d} for d in DENSITIES]


def test_unit_curvature_and_tau_squared_saliency_is_ties_count():
    model = make_model()
    ones = recorded(model, saliency=True)  # S = τ², and R, C of ones: K = 1
    ones = {k: tuple({n: t if n == ":S" else torch.ones_like(t) for n, t in s.items()} for s in v)
            for k, v in ones.items()}  # fmt: skip
    ours = merge_model("umtam", model, {}, MPS, sidecars=ones)
    ties = merge_model("ties", model, {"consensus_method": "count"}, MPS)
    for key in model:
        assert torch.equal(ours[key], ties[key]), key


@pytest.mark.parametrize("saliency", [False, True], ids=["computed-S", "recorded-S"])
def test_recorded_curvature_against_the_formulas(saliency):
    model = make_model(seed=3)
    stats = recorded(model, saliency=saliency)
    ours = merge_model("umtam", model, {"lambda_": 0.7}, MPS, sidecars=stats)
    for key, (base, xs) in model.items():
        Ks = [curvature_of(s, base.shape) for s in stats[key]]
        Ss = [s[":S"] if saliency else (x - base).square() * K
              for s, x, K in zip(stats[key], xs, Ks, strict=True)]  # fmt: skip
        want = reference(base, xs, Ks, Ss, DENSITIES, lam=0.7)
        assert_close(ours[key], want, rtol=1e-6, atol=1e-6)


def test_fisher_curvature_against_the_formulas():
    model = make_model(seed=4)
    g = torch.Generator().manual_seed(5)
    fisher = {
        k: tuple(torch.rand(b.shape, generator=g) for _ in xs) for k, (b, xs) in model.items()
    }
    params = {"curvature": "fisher-sampled", "sign_weight": "saliency"}
    ours = merge_model("umtam", model, params, MPS, sidecars=fisher)
    for key, (base, xs) in model.items():
        Ss = [F * (x - base).square() for F, x in zip(fisher[key], xs, strict=True)]
        want = reference(base, xs, list(fisher[key]), Ss, DENSITIES, votes=Ss)
        assert_close(ours[key], want, rtol=1e-6, atol=1e-6)


# hand-worked: base 0, τ₁ = [[1, −2], [3, 1]], τ₂ = [[−1, 1], [1, −4]];
# K₁ = √([4, 1] ⊗ [1, 1]) = [[2, 2], [1, 1]], K₂ = √([1, 1] ⊗ [9, 1]) = [[3, 1], [3, 1]]
T1, T2 = torch.tensor([[1.0, -2.0], [3.0, 1.0]]), torch.tensor([[-1.0, 1.0], [1.0, -4.0]])
HAND = {"t": (torch.zeros(2, 2), [T1, T2])}
HAND_STATS = {"t": ({":R": torch.tensor([4.0, 1.0]), ":C": torch.tensor([1.0, 1.0])},
                    {":R": torch.tensor([1.0, 1.0]), ":C": torch.tensor([9.0, 1.0])})}  # fmt: skip


@pytest.mark.parametrize(
    ("params", "density", "want"),
    [
        # votes K₁ sign τ₁ + K₂ sign τ₂: [[2−3, −2+1], [1+3, 1−1]] -> σ [[−, −], [+, + (tie)]];
        # Δ: [[τ₂, τ₁], [(1·3 + 3·1)/(1 + 3), τ₁]] (TIES' sum vote would elect − at (1, 1))
        ({}, 1.0, [[-1.0, -2.0], [1.5, 1.0]]),
        ({"lambda_": 0.5}, 1.0, [[-0.5, -1.0], [0.75, 0.5]]),
        # by saliency S = τ² ⊙ K: S₁ [[2, 8], [9, 1]], S₂ [[3, 1], [3, 16]]: (1, 1) now votes −
        ({"sign_weight": "saliency"}, 1.0, [[-1.0, -2.0], [1.5, -4.0]]),
        # K / max K: K₁ [[1, 1], [.5, .5]], K₂ [[1, 1/3], [1, 1/3]]: (0, 0) ties and elects +
        ({"normalize_curvature": True}, 1.0, [[1.0, -2.0], [5 / 3, 1.0]]),
        # trim to 2 of 4 by S: task 1 keeps 8 and 9; task 2 keeps 16 and the first 3 (index
        # order), so each entry has one vote left
        ({}, 0.5, [[-1.0, -2.0], [3.0, -4.0]]),
    ],
)
def test_hand_worked_2x2(params, density, want):
    mps = [{"density": density}] * 2
    out = merge_model("umtam", HAND, params, mps, sidecars=HAND_STATS)["t"]
    assert_close(out, torch.tensor(want), rtol=1e-6, atol=1e-7)


def test_saliency_vote_normalised_by_its_mean():
    # S₁ [[2, 8], [9, 1]] / 5, S₂ [[3, 1], [3, 16]] / 5.75: (1, 1) 0.2 − 2.78 still votes −, but
    # scaling expert 2's curvature by 100 changes nothing once S is divided by its mean
    params = {"sign_weight": "saliency", "normalize_saliency": True, "normalize_curvature": True}
    scaled = {"t": (HAND_STATS["t"][0], {k: v * 100 for k, v in HAND_STATS["t"][1].items()})}
    a = merge_model("umtam", HAND, params, [{"density": 1.0}] * 2, sidecars=HAND_STATS)["t"]
    b = merge_model("umtam", HAND, params, [{"density": 1.0}] * 2, sidecars=scaled)["t"]
    assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(a[1, 1]) == -4.0


def test_tiny_denominator_merges_to_zero():
    # one task, K = √(1e-20) = 1e-10, floored to 1e-8: Σ a K = 1e-8 ≤ 1e-8, so Δ = 0
    model = {"b": (torch.zeros(1), [torch.tensor([5.0])])}
    out = merge_model("umtam", model, {}, [{"density": 1.0}],
                      sidecars={"b": ({":R": torch.tensor([1e-20])},)})["b"]  # fmt: skip
    assert torch.equal(out, torch.zeros(1))


# ---- bad inputs: each refused before anything is written -------------------------------------


def folders(tmp_path, model, names=("e0", "e1")):
    paths = {"base": write_model(tmp_path / "base", {k: b for k, (b, _) in model.items()})}
    for i, name in enumerate(names):
        paths[name] = write_model(tmp_path / name, {k: v[1][i] for k, v in model.items()})
    return paths


def record(folder, stats_per_key, i, variant="ema"):
    stats = {k: Curvature(R=v[i][":R"], C=v[i].get(":C")) for k, v in stats_per_key.items()}
    beta2 = None if variant == "sum" else 0.999
    save_curvature(folder, stats, CurvatureMeta(variant=variant, steps=10, source="test",
                                                beta2=beta2))  # fmt: skip


def config(paths, names=("e0", "e1")):
    return {
        "merge_method": "umtam",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[n]), "parameters": {"density": 0.5}} for n in names],
    }


def test_on_disk_equals_in_memory(tmp_path):
    model = make_model(n=2)
    stats = recorded(model)
    paths = folders(tmp_path, model)
    for i, name in enumerate(("e0", "e1")):
        record(paths[name], stats, i)
    run_merge(config(paths), tmp_path / "out", progress=False)
    disk = load_dir(tmp_path / "out")
    memory = merge_model("umtam", model, {}, [{"density": 0.5}] * 2, sidecars=stats)
    assert all(torch.equal(disk[k], memory[k]) for k in model)


def test_missing_statistics_name_the_expert_and_how_to_record_them(tmp_path):
    model = make_model(n=2)
    paths = folders(tmp_path, model)
    record(paths["e0"], recorded(model), 0)  # e1 has none
    before = sha_tree(tmp_path)
    with pytest.raises(ValidationError) as e:
        run_merge(config(paths), tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "missing statistics" in msg and str(paths["e1"]) in msg and str(paths["e0"]) not in msg
    assert "CurvatureRecorder" in msg and "CurvatureCallback" in msg
    assert not (tmp_path / "out").exists() and sha_tree(tmp_path) == before


def test_statistics_of_another_model_are_refused(tmp_path):
    model = make_model(n=2)
    paths = folders(tmp_path, model)
    for i, name in enumerate(("e0", "e1")):
        record(paths[name], recorded(model), i)
    # e1's weights change after its curvature was recorded (another model's statistics)
    write_model(paths["e1"], {k: v[1][1] + 1 for k, v in model.items()})
    with pytest.raises(ValidationError, match="weights changed") as e:
        run_merge(config(paths), tmp_path / "out", progress=False)
    assert str(paths["e1"]) in str(e.value) and "CurvatureRecorder" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_yaml_without_statistics_exits_2(tmp_path, capsys):
    paths = folders(tmp_path, make_model(n=2))
    cfg = tmp_path / "umtam.yml"
    cfg.write_text(yaml.safe_dump(config(paths)))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing statistics" in err and "curvature" in err and str(paths["e0"]) in err
    assert not (tmp_path / "out").exists()


def test_in_memory_models_need_statistics():
    model = make_model(n=2)
    sds = {"base": {k: b for k, (b, _) in model.items()},
           **{f"e{i}": {k: v[1][i] for k, v in model.items()} for i in range(2)}}  # fmt: skip
    cfg = {"merge_method": "umtam", "base_model": "base",
           "models": [{"model": "e0"}, {"model": "e1"}]}  # fmt: skip
    with pytest.raises(ValidationError, match="in-memory model 'e0' has no curvature statistics"):
        mergeforge.merge_state_dicts(cfg, sds)


def test_incomplete_statistics_are_refused():
    model = make_model(n=2)
    stats = recorded(model)
    stats["w"] = ({":R": stats["w"][0][":R"]}, stats["w"][1])  # e0's w has R but no C
    with pytest.raises(ValidationError, match=r"has 'w:R' but no 'w:C'"):
        merge_model("umtam", model, {}, MPS[:2], sidecars=stats)


def test_curvature_of_different_scales_is_refused_unless_normalised(tmp_path):
    model = make_model(n=2)
    stats = recorded(model)
    paths = folders(tmp_path, model)
    record(paths["e0"], stats, 0, variant="ema")
    record(paths["e1"], stats, 1, variant="notebook")  # row / column means: another scale
    with pytest.raises(ValidationError, match="variants of different scales"):
        run_merge(config(paths), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    cfg = config(paths) | {"parameters": {"normalize_curvature": True}}
    run_merge(cfg, tmp_path / "out", progress=False)
