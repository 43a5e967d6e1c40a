"""benchmarks/moe/bench_routing.py (issue 16's MoE routing benchmark) end to end on tiny models.

The script's ``--smoke`` inputs: a random 2-layer Llama saved as a ``LlamaModel`` folder (as the
SmolLM2 base is), three experts = base + noise, synthetic texts per domain, a word-level
tokenizer (``tests/helpers.tiny_tokenizer`` splits multi-letter words into ``[UNK]`` characters,
so it cannot score a language model). Seconds on one CPU thread.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe" / "bench_routing.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_routing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_pipeline_writes_a_routing_matrix_and_every_row(bench, tmp_path):
    domains = list(bench.DEFAULT_DOMAINS)
    inputs = bench.smoke_inputs(tmp_path / "in", domains)
    merges = bench.dense_merges(domains, ta_lambdas=(0.5,), ties_densities=(0.5,))
    payload = bench.run_routing(inputs, work=tmp_path / "work", out=tmp_path / "out", ks=(1, 2),
                                n_eval=5, n_prompts=3, max_length=24, merges=merges)  # fmt: skip
    paths = bench.write_routing_report(payload, tmp_path / "out", plots=False)
    assert payload["complete"] and not payload["not_run"]
    assert [m["k"] for m in payload["moe"]] == [1, 2]
    for moe in payload["moe"]:
        assert len(moe["top1"]) == len(domains) and len(moe["experts"]) == len(domains)
        for rows in (moe["top1"], moe["topk"], *moe["per_layer_top1"]):
            for row in rows:  # each domain's tokens go somewhere: its row sums to 1
                assert sum(row) == pytest.approx(1.0, abs=1e-5)
        assert len(moe["per_layer_top1"]) == 2  # the tiny model's two MoE layers
        assert all(moe["tokens"][d] > 0 for d in domains)
    names = [r["name"] for r in payload["rows"]]
    expected = ["moe k=1", "moe k=2", "base", *(f"expert {d}" for d in domains),
                *(name for name, _ in merges)]  # fmt: skip
    assert names == expected
    assert any(n.startswith("ace") for n in names) and any(n.startswith("ties") for n in names)
    for r in payload["rows"]:
        assert set(r["loss"]) == set(domains) and all(v > 0 for v in r["loss"].values())
    # verdicts for both MoEs on every domain, against the best dense merge
    for name in ("moe k=1", "moe k=2"):
        per = payload["verdicts"][name]["domains"]
        assert set(per) == set(domains)
        assert all(per[d]["best_dense"] in {n for n, _ in merges} for d in domains)
    # the files: results.json (same payload), results.md with every table row, the YAMLs
    out = tmp_path / "out"
    assert {p.name for p in paths} == {"results.json", "results.md"}
    assert json.loads((out / "results.json").read_text())["rows"] == payload["rows"]
    md = (out / "results.md").read_text()
    for n in names:
        assert f"| {n} |" in md
    for d in domains:
        assert f"| {d} | " in md  # its routing row
        assert f"| moe k=1 | {d} |" in md and f"| moe k=2 | {d} |" in md  # its verdict rows
    cfg = (out / "moe_k1.yml").read_text()
    assert "positive_prompts" in cfg and "experts_per_token: 1" in cfg


def test_moe_of_identical_experts_is_the_base(bench, tmp_path):
    """Experts equal to the base: whatever the router does, the MoE computes the base model
    (Mixtral's top-k weights sum to 1), so the LlamaModel -> causal-LM copies, the MoE build and
    the scoring agree to float rounding."""
    inputs = bench.smoke_inputs(tmp_path / "in", noise=0.0)
    payload = bench.run_routing(inputs, work=tmp_path / "work", ks=(1, 2), n_eval=4,
                                n_prompts=2, max_length=16, merges=[])  # fmt: skip
    rows = {r["name"]: r["loss"] for r in payload["rows"]}
    for name in ("moe k=1", "moe k=2", "expert news"):
        for d, v in rows["base"].items():
            assert rows[name][d] == pytest.approx(v, rel=1e-5)
    # no dense merge: the loss verdict is not met, and says so
    assert payload["verdicts"]["moe k=1"]["loss_met"] is False


def test_smoke_command_writes_the_report(bench, tmp_path):
    out = tmp_path / "out"
    payload = bench.main(["--smoke", "--out", str(out), "--experts-per-token", "1", "--no-ace",
                          "--ta-lambdas", "", "--ties-densities", "0.5"])  # fmt: skip
    assert payload["complete"] and payload["smoke"]
    assert payload["command"].startswith("python benchmarks/moe/bench_routing.py --smoke")
    assert {"cpus", "torch", "mergeforge"} <= set(payload["machine"])
    assert {n["name"] for n in payload["not_run"]} == {"ace"}
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.md", "moe_k1.yml"} <= names
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert "routing_matrix.png" in names


def test_best_dense_base_is_the_validation_choice_and_gives_the_shared_tensors(bench, tmp_path):
    """``moe_base="best-dense"``: the MoE's base is the dense merge with the lowest mean loss on
    the validation texts (recomputed here from the reported losses), and every tensor of the
    MoE that is not an expert MLP or a gate is that merge's, bit for bit."""
    from safetensors.torch import load_file

    from mergeforge import merge_state_dicts

    domains = list(bench.DEFAULT_DOMAINS)
    inputs = bench.smoke_inputs(tmp_path / "in", domains, noise=0.2)
    merges = bench.dense_merges(domains, ta_lambdas=(0.5, 1.0), ties_densities=(0.5,), ace=False)
    payload = bench.run_routing(inputs, work=tmp_path / "work", ks=(1,), n_eval=4, n_prompts=3,
                                max_length=16, merges=merges, moe_base="best-dense")  # fmt: skip
    chosen = payload["moe_base"]
    assert chosen["mode"] == "best-dense" and set(chosen["validation_loss"]) == {
        n for n, _ in merges
    }
    means = {n: v["mean"] for n, v in chosen["validation_loss"].items()}
    assert chosen["name"] == min(means, key=means.get)
    for v in chosen["validation_loss"].values():
        assert v["mean"] == pytest.approx(sum(v[d] for d in domains) / len(domains))
    states = {"base": bench._state(inputs.base),
              **{d: bench._state(p) for d, p in inputs.experts.items()}}  # fmt: skip
    want = merge_state_dicts(dict(merges)[chosen["name"]], states)
    moe = {}
    for f in sorted(Path(payload["moe"][0]["folder"]).glob("*.safetensors")):
        moe.update(load_file(str(f)))
    shared = {k: v for k, v in moe.items() if ".experts." not in k and ".gate." not in k}
    assert len(shared) > 4
    for k, v in shared.items():
        name = k.removeprefix("model.")
        if name == "lm_head.weight":
            name = "embed_tokens.weight"  # tied
        assert torch.equal(v, want[name]), k
    # the dense merges' test rows (scored while each merge was loaded for the choice) equal
    # those of a run over the pretrained base, which merges and scores them afterwards
    plain = bench.run_routing(inputs, work=tmp_path / "work2", ks=(1,), n_eval=4, n_prompts=3,
                              max_length=16, merges=merges)  # fmt: skip
    rows = {r["name"]: r["loss"] for r in payload["rows"] if r["kind"] == "merge"}
    assert rows == {r["name"]: r["loss"] for r in plain["rows"] if r["kind"] == "merge"}
    assert [r["name"] for r in payload["rows"]] == [r["name"] for r in plain["rows"]]
    # the base's row and the report say which merge it was
    md = bench.markdown(payload)
    assert f"**{chosen['name']}**" in md and "validation" in md


def test_best_dense_base_needs_validation_texts(bench, tmp_path):
    inputs = bench.smoke_inputs(tmp_path / "in")
    inputs = bench.Inputs(inputs.base, inputs.experts, inputs.train, inputs.test, None)
    merges = bench.dense_merges(list(inputs.experts), ta_lambdas=(0.5,), ties_densities=(),
                                ace=False)  # fmt: skip
    with pytest.raises(ValueError, match="validation texts"):
        bench.run_routing(inputs, work=tmp_path / "work", ks=(1,), n_eval=2, n_prompts=2,
                          max_length=8, merges=merges, moe_base="best-dense")  # fmt: skip
