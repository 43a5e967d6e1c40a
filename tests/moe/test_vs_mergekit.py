"""mergeforge moe against mergekit-moe 0.1.5 itself (its ``build``, in-process, on CPU).

The same YAML over tiny Llama experts built in a temporary folder gives the same tensor names,
shapes and dtypes, the same ``config.json``, every non-gate tensor bit for bit (experts, shared
expert, attention, norms, embeddings, head, zero q/k/v biases) and the same gates: bit for bit for
``random``, ``uniform_random`` (same seed) and ``cheap_embed``; within bfloat16 rounding for
``hidden`` / ``hidden_avg``, whose states both compute in bfloat16 but which mergeforge then
reduces in float32 (mergekit: in bfloat16).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tests.helpers import load_dir
from tests.moe._family import moe_yaml

from mergeforge.moe import build_moe

pytestmark = pytest.mark.mergekit

BF16_ULP = 2.0**-8  # one bfloat16 step at |x| in [0.5, 1): gates are unit vectors


def run_mergekit_moe(cfg: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    opts = MergeOptions(random_seed=0, device="cpu", quiet=True)
    opts.apply_global_options()  # seeds torch's global generator with 0, as --random-seed 0
    logging.getLogger().setLevel(logging.ERROR)
    build(MoEMergeConfig.model_validate(cfg), str(out), opts, device="cpu")
    return load_dir(out)


def _compare(cfg: dict, tmp_path, *, exact_gates: bool) -> float:
    ours = build_moe(cfg, tmp_path / "ours")
    theirs = run_mergekit_moe(cfg, tmp_path / "mk")
    mine = load_dir(tmp_path / "ours")
    assert sorted(mine) == sorted(theirs)
    worst = 0.0
    for name, t in theirs.items():
        assert (mine[name].shape, mine[name].dtype) == (t.shape, t.dtype), name
        if "gate.weight" in name and not exact_gates:
            worst = max(worst, float((mine[name].float() - t.float()).abs().max()))
        else:
            assert torch.equal(mine[name], t), name
    cfg_mk = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == cfg_mk
    assert ours.tensors == len(theirs)
    return worst


@pytest.mark.parametrize("mode", ["random", "uniform_random", "cheap_embed"])
def test_mixtral_bit_for_bit(fam, tmp_path, mode):
    cfg = moe_yaml(fam, n=2, gate_mode=mode, dtype="bfloat16")
    assert _compare(cfg, tmp_path, exact_gates=True) == 0.0


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_mixtral_hidden_gates_to_bf16_rounding(fam, tmp_path, mode):
    # 3 experts, negative prompts, float32 output: the gates' float32 values are compared
    cfg = moe_yaml(fam, gate_mode=mode, dtype="float32")
    cfg["experts"][1]["residual_scale"] = 0.5
    assert _compare(cfg, tmp_path, exact_gates=False) <= BF16_ULP


def test_qwen2_moe_with_shared_expert_and_tied_base(tied_fam, tmp_path):
    # tied base: neither tool writes lm_head.weight; llama base: zero q/k/v biases for Qwen2-MoE
    cfg = moe_yaml(tied_fam, shared=True, gate_mode="cheap_embed", experts_per_token=1)
    assert _compare(cfg, tmp_path, exact_gates=True) == 0.0
    out = load_dir(tmp_path / "ours")
    assert "lm_head.weight" not in out
    assert torch.count_nonzero(out["model.layers.0.self_attn.q_proj.bias"]) == 0


def test_qwen2_moe_hidden_gates(tied_fam, tmp_path):
    cfg = moe_yaml(tied_fam, shared=True, architecture="qwen", dtype="bfloat16")
    assert _compare(cfg, tmp_path, exact_gates=False) <= BF16_ULP
