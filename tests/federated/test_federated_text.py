"""``dataset: text``: MiniLM clients, one text task each. The config (defaults, every bad key
named), and a short in-process run (Flower's real ``Strategy.start`` loop and ClientApp, no
Ray) against an oracle built outside Flower: the same local training by hand, then the merge
of the clients' models (FedAvg halves each client's move, its own head's included; task
arithmetic with λ 2 keeps it whole)."""

from __future__ import annotations

import json

import pytest
import torch

from mergeforge.errors import ConfigError
from mergeforge.federated import load_federated_config, run_federated
from mergeforge.federated import text as fedtext
from mergeforge.federated.client import ClientTask

TEXT = {"dataset": "text", "tasks": ["polarity", "news_topic"], "n_train": 20, "n_test": 20,
        "rounds": 1, "max_length": 24, "batch_size": 8, "evaluate_clients": False,
        "aggregator": "task_arithmetic"}  # fmt: skip


def test_a_text_config_takes_the_suites_recipe_and_one_client_per_task():
    cfg = load_federated_config({"dataset": "text", "aggregator": "fedavg"})
    assert cfg.tasks == fedtext.DEFAULT_TASKS and cfg.clients == len(fedtext.DEFAULT_TASKS)
    assert (cfg.lr, cfg.optimizer, cfg.weight_decay, cfg.head_lr, cfg.max_length) == (
        1e-4, "adam", 0.01, 3e-3, 64)  # fmt: skip
    cfg = load_federated_config({**TEXT, "lr": 5e-5, "clients": 2})
    assert (cfg.lr, cfg.clients, cfg.tasks) == (5e-5, 2, ("polarity", "news_topic"))
    assert json.loads(ClientTask.from_config(cfg).to_json())["tasks"] == ["polarity", "news_topic"]
    task = ClientTask.from_config(cfg)
    assert ClientTask.from_json(task.to_json()) == task


@pytest.mark.parametrize("change, message", [
    ({"arch": "mlp"}, "arch: only a vision run reads it"),
    ({"partition": "iid"}, "partition: only a vision run reads it"),
    ({"tasks": ["polarty"]}, "Did you mean 'polarity'?"),
    ({"tasks": ["polarity", "polarity"]}, "tasks: each task once"),
    ({"tasks": []}, "tasks: expected a list of text tasks"),
    ({"clients": 3}, "clients: a text run has one client per task (2: polarity, news_topic)"),
    ({"aggregator": "regmean"}, "regmean needs client statistics, which text clients do not"),
    ({"aggregator": "neuron_fusion"}, "a text run cannot use it yet"),
])  # fmt: skip
def test_bad_text_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_federated_config({**TEXT, **change})
    assert message in str(e.value)


def test_text_keys_in_a_vision_run_are_refused():
    with pytest.raises(ConfigError, match=r"head_lr: only a text run reads it \(dataset: text\)"):
        load_federated_config({"dataset": "digits", "head_lr": 0.01, "aggregator": "fedavg"})


def _by_hand(cfg):
    """Each client's trained state dict, trained outside Flower exactly as round 1 does."""
    task = ClientTask.from_config(cfg)
    start = fedtext.model_for(task).state_dict()
    out = []
    for pid in range(cfg.clients):
        model = fedtext.model_for(task)
        model.load_state_dict(start)
        data = fedtext.client_task(task, pid)
        fedtext.local_train(model, data, task, mu=0.0, seed=cfg.seed * 1_000_003 + 1009 + pid)
        out.append({k: t.detach().clone() for k, t in model.state_dict().items()})
    return start, out


@pytest.mark.parametrize("aggregator, scale", [
    # each client's weight is its share of the examples (20 texts each: 1/2), so FedAvg (and
    # task arithmetic at λ 1) moves by half the sum of the updates, λ 2 by the whole sum
    ("fedavg", 0.5),
    ({"method": "task_arithmetic", "parameters": {"lambda": 2.0}}, 1.0),
])  # fmt: skip
def test_a_text_round_is_the_merge_of_the_clients_trained_by_hand(aggregator, scale, tmp_path):
    cfg = load_federated_config({**TEXT, "aggregator": aggregator})
    res = run_federated(cfg, in_process=True, progress=False, out=tmp_path)
    start, clients = _by_hand(cfg)
    got = res.state_dict
    assert set(got) == set(start) and any(k.startswith("heads.news_topic.") for k in got)
    for k, s in start.items():
        want = s + scale * sum(c[k] - s for c in clients)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=2e-6, msg=k)
    for pid, task in enumerate(cfg.tasks):  # the other client leaves a head as it found it
        other = clients[1 - pid]
        assert torch.equal(other[f"heads.{task}.weight"], start[f"heads.{task}.weight"])
        assert not torch.equal(clients[pid][f"heads.{task}.weight"], start[f"heads.{task}.weight"])
    rows = res.rows
    assert [r["round"] for r in rows] == [0, 1] and set(rows[1]["tasks"]) == set(cfg.tasks)
    assert rows[1]["accuracy"] == pytest.approx(sum(rows[1]["tasks"].values()) / 2)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["tasks"] == ["polarity", "news_topic"] and doc["rounds"][1]["tasks"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
