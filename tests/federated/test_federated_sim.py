"""End to end: ``run_federated`` through Flower's real ``run_simulation`` on Ray (two clients,
two rounds, a tiny MLP on UCI digits, TIES as the aggregator, one client crashing in round 2)
gives exactly the run of the same apps in this process, and writes results.json, the plot and
the model; ``mergeforge federated`` is the same function behind the command line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergeforge.cli import main as cli_main
from mergeforge.errors import ConfigError
from mergeforge.federated import load_federated_config, make_client_app, run_federated
from mergeforge.federated.config import with_overrides

CFG = {"dataset": "digits", "n_train": 200, "n_test": 100, "clients": 2, "rounds": 2,
       "partition": "iid", "lr": 0.1, "batch_size": 25, "seed": 0,
       "aggregator": {"method": "ties", "model_parameters": {"density": 0.5}}}  # fmt: skip


def crash_in_round_two(pid, rnd, sd, global_sd):
    if pid == 1 and rnd == 2:
        raise RuntimeError("client 1 lost power")
    return sd


@pytest.fixture
def one_thread():
    """Ray's 1-CPU actors train with one thread: so does the in-process run compared with."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow  # ~20 s on two busy cores, most of it Ray starting
def test_the_simulation_on_ray_is_the_run_in_process(tmp_path, one_thread):
    pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not installed
    app = make_client_app(crash_in_round_two)
    sim = run_federated(CFG, out=tmp_path / "ray", client_app=app, progress=False, num_cpus=2)
    local = run_federated(CFG, client_app=app, progress=False, in_process=True)

    assert [r["accuracy"] for r in sim.rows] == [r["accuracy"] for r in local.rows]
    assert all(torch.equal(sim.state_dict[k], local.state_dict[k]) for k in local.state_dict)
    assert sim.rows[1]["kept"] == ["client0", "client1"]
    assert sim.rows[2]["kept"] == ["client0"] and "client 1 lost power" in (
        sim.rows[2]["dropped"][0]["reason"])  # fmt: skip
    assert sim.final_accuracy > sim.initial_accuracy  # two rounds do learn something
    assert sim.rows[2]["train"]["train-loss"] > 0

    doc = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert doc["aggregator"] == "ties" and doc["final_accuracy"] == sim.final_accuracy
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2] and doc["dropped"] == 1
    assert doc["versions"]["flwr"].startswith("1.")
    assert (tmp_path / "ray" / "accuracy.png").stat().st_size > 1000
    saved = load_file(tmp_path / "ray" / "model.safetensors")
    assert all(torch.equal(saved[k], sim.state_dict[k]) for k in saved)


def test_the_command_runs_the_same_function(tmp_path, capsys):
    (tmp_path / "fed.yml").write_text(yaml.safe_dump({**CFG, "aggregator": "median"}))
    code = cli_main(["federated", str(tmp_path / "fed.yml"), "--out", str(tmp_path / "out"),
                     "--in-process", "--rounds", "1", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("median: final test accuracy ") and "results.json" in out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["rounds"] == 1 and len(doc["rounds"]) == 2


def test_regmean_clients_send_their_grams():
    cfg = {**CFG, "rounds": 1, "evaluate_clients": False, "aggregator": "regmean"}
    res = run_federated(cfg, progress=False, in_process=True)
    assert res.rows[1]["kept"] == ["client0", "client1"] and res.rows[1]["updated"]
    assert res.final_accuracy > res.initial_accuracy


def test_a_bad_config_fails_before_anything_starts(tmp_path, capsys):
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({**CFG, "aggregator": "model_stock",
                                                      "clients": 1}))  # fmt: skip
    assert cli_main(["federated", str(tmp_path / "bad.yml"), "--in-process"]) == 2
    assert "model_stock merges at least 2 clients a round" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--rounds: expected an integer >= 1"):
        with_overrides(load_federated_config(CFG), rounds=0)
