"""Oracles of the strategy: with ``linear`` weighted by examples it is Flower's own FedAvg (and
with μ > 0 Flower's FedProx) round after round; every merge method run as an aggregator gives
what ``mergeforge merge`` gives on the same models saved to disk.

The rounds run in this process (``LocalGrid``: Flower's real ``Strategy.start`` loop and the
real ClientApp, no Ray); ``test_federated_sim.py`` runs the simulation runtime itself."""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx
from safetensors.torch import load_file, save_file

from mergeforge.cli import main as cli_main
from mergeforge.federated import Aggregator, AggregatorSpec, MergeStrategy, load_federated_config
from mergeforge.federated.client import TASK_KEY, ClientTask
from mergeforge.federated.client import app as client_app
from mergeforge.federated.local import LocalGrid
from mergeforge.federated.server import initial_model, make_strategy

CFG = {"dataset": "digits", "n_train": 240, "n_test": 120, "clients": 3, "rounds": 3,
       "partition": {"kind": "dirichlet", "alpha": 0.5}, "lr": 0.05, "batch_size": 32,
       "evaluate_clients": False, "seed": 1}  # fmt: skip


def run_rounds(strategy, cfg) -> list[dict[str, torch.Tensor]]:
    """The global model after each round of ``strategy`` on ``cfg``'s clients, in process."""
    seen: list[dict[str, torch.Tensor]] = []

    def keep(rnd, arrays):
        seen.append({k: t.clone() for k, t in arrays.to_torch_state_dict().items()})

    random.seed(cfg.seed)
    task = ConfigRecord({TASK_KEY: ClientTask.from_config(cfg).to_json()})
    strategy.start(grid=LocalGrid(client_app, cfg.clients), num_rounds=cfg.rounds,
                   initial_arrays=ArrayRecord(initial_model(cfg)), train_config=task,
                   evaluate_fn=keep)  # fmt: skip
    return seen[1:]


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_linear_weighted_by_examples_is_flowers_fedavg_round_after_round(mu):
    agg = {"name": "fedprox", "mu": mu} if mu else "fedavg"
    cfg = load_federated_config({**CFG, "aggregator": agg})
    ours = run_rounds(make_strategy(cfg), cfg)
    kw = {"fraction_evaluate": 0.0, "min_train_nodes": 3, "min_available_nodes": 3}
    theirs = run_rounds(FedProx(proximal_mu=mu, **kw) if mu else FedAvg(**kw), cfg)
    assert len(ours) == len(theirs) == 3
    diffs = [max_diff(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert max(diffs) < 1e-6, diffs
    moved = max_diff(ours[0], initial_model(cfg))
    assert moved > 1e-2  # the clients did train: the match is not 0 == 0
    # the clients' partitions differ in size, so the example weights matter
    cfg_u = load_federated_config(
        {**CFG, "aggregator": {"method": "linear", "weighting": "uniform"}}
    )
    assert max_diff(run_rounds(make_strategy(cfg_u), cfg_u)[0], ours[0]) > 1e-4


# ----------------------------------------------------------------- any method = mergeforge merge

SHAPES = {"fc1.weight": (24, 16), "fc1.bias": (24,), "head.weight": (10, 24), "head.bias": (10,)}
EXAMPLES = (30, 90, 60)
# (method, shared parameters, per-model parameters, has a per-model weight); the element-wise
# family is compared bit for bit. The matrix methods (SVD, solves) to 1e-6: LAPACK's result
# depends on where the inputs lie in memory (measured: swudi_a on the same values loaded
# twice differs by 6e-8), and tensors from Flower's byte buffers and from mmapped files differ.
METHODS = [
    ("linear", {}, {}, True),
    ("task_arithmetic", {"lambda": 0.8}, {}, True),
    ("ties", {"lambda": 1.0}, {"density": 0.5}, True),
    ("dare_ties", {}, {"density": 0.7}, True),
    ("dare_linear", {}, {"density": 0.6}, True),
    ("breadcrumbs_ties", {}, {"density": 0.8, "gamma": 0.05}, True),
    ("della", {}, {"density": 0.6, "epsilon": 0.1}, True),
    ("model_stock", {}, {}, False),
    ("tsv", {}, {}, False),
    ("iso_c", {}, {}, False),
    ("swudi", {}, {}, False),
    ("swudi_a", {}, {}, False),
    ("regmean", {}, {}, False),
]


def models():
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    clients = [{k: t + 0.1 * torch.randn(t.shape, generator=g) for k, t in base.items()}
               for _ in EXAMPLES]  # fmt: skip
    grams = []
    for _ in EXAMPLES:
        x1, x2 = torch.randn(50, 16, generator=g), torch.randn(50, 24, generator=g)
        grams.append({"fc1.weight": x1.T @ x1 / 50, "head.weight": x2.T @ x2 / 50})
    return base, clients, grams


def replies(strategy, base, clients, grams, stats: bool) -> list[Message]:
    grid = LocalGrid(client_app, len(clients))
    sent = list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord(), grid))
    out = []
    for i, (msg, sd, n) in enumerate(zip(sent, clients, EXAMPLES, strict=True)):
        content = RecordDict({"arrays": ArrayRecord(sd), "metrics": MetricRecord(
            {"num-examples": n}), "client": ConfigRecord({"partition-id": i})})  # fmt: skip
        if stats:
            content["stats.regmean"] = ArrayRecord(grams[i])
        out.append(Message(content=content, reply_to=msg))
    return out


@pytest.mark.parametrize("method, params, model_params, weighted", METHODS,
                         ids=[m[0] for m in METHODS])  # fmt: skip
def test_each_method_as_aggregator_is_mergeforge_merge_on_disk(tmp_path, method, params,
                                                               model_params, weighted):  # fmt: skip
    base, clients, grams = models()
    spec = AggregatorSpec(name="merge", method=method, parameters=params,
                          model_parameters=model_params)  # fmt: skip
    strategy = MergeStrategy(Aggregator(spec, seed=0), fraction_evaluate=0.0,
                             min_available_nodes=3, min_train_nodes=3)  # fmt: skip
    arrays, _ = strategy.aggregate_train(1, replies(strategy, base, clients, grams,
                                                    stats=method == "regmean"))  # fmt: skip
    got = arrays.to_torch_state_dict()

    # the same merge written by hand as a mergekit YAML over folders, run by `mergeforge merge`
    (tmp_path / "global").mkdir()
    save_file(base, tmp_path / "global" / "model.safetensors")
    entries, total = [], float(sum(EXAMPLES))
    for i, (sd, n) in enumerate(zip(clients, EXAMPLES, strict=True)):
        folder = tmp_path / f"client{i}"
        folder.mkdir()
        save_file(sd, folder / "model.safetensors")
        if method == "regmean":
            from mergeforge.checkpoint.sidecar import save_sidecar

            save_sidecar(folder, "regmean", grams[i], num_examples=50, examples_used=50,
                         source="test")  # fmt: skip
        entry = {"model": str(folder), "parameters": dict(model_params)}
        if weighted:
            entry["parameters"]["weight"] = n / total
        entries.append(entry)
    doc = {"merge_method": method, "models": entries, "seed": 1}  # round 1 of seed 0
    if method != "linear":
        doc["base_model"] = str(tmp_path / "global")
    if params:
        doc["parameters"] = params
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(doc))
    assert cli_main(["merge", str(tmp_path / "merge.yml"), str(tmp_path / "out"),
                     "--no-progress"]) == 0  # fmt: skip
    want = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(got) == sorted(want)
    exact = weighted or method == "model_stock"
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert strategy.rounds[0].kept == ["client0", "client1", "client2"]
