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
