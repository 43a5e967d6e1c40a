"""``dataset: text``: MiniLM clients, one text task each. The config (defaults, every bad key
named), and a short in-process run (Flower's real ``Strategy.start`` loop and ClientApp, no
Ray) against an oracle built outside Flower: the same local training by hand, then the merge
of the clients' models (FedAvg halves each client's move, its own head's included; task
arithmetic with λ 2 keeps it whole; RegMean is the closed form over Grams recorded by hand)."""

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


def _grams_by_hand(model, texts, max_length):
    """XᵀX / n of every linear layer's input in ``model.encoder``, padding rows left out,
    recorded with plain forward hooks (not mergeforge's GramRecorder)."""
    from mergeforge.evaluate.text.eval import tokenize

    sums, counts, mask = {}, {}, {}

    def hook(name):
        def f(_module, inputs, _output):
            x = inputs[0].detach().float()
            x = x[mask["m"].bool()] if x.dim() == 3 else x
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in model.encoder.named_modules()
               if isinstance(m, torch.nn.Linear)]  # fmt: skip
    model.eval()
    with torch.no_grad():
        for s in range(0, len(texts), 32):
            batch = tokenize(fedtext.tokenizer(), texts[s : s + 32], max_length=max_length)
            mask["m"] = batch["attention_mask"]
            model.encoder(**batch)
    for h in handles:
        h.remove()
    return {f"encoder.{n}.weight": (sums[n] / counts[n]).float() for n in sums}


def test_a_text_regmean_round_solves_each_linear_layer_on_the_clients_grams(tmp_path):
    """Each text client sends its encoder's input Grams; the round's linear weights are
    (Σ W_i G̃_i)(Σ G̃_i)⁻¹ (G̃ = α G + (1 − α) diag G, α 0.1), everything else is averaged."""
    cfg = load_federated_config({**TEXT, "aggregator": "regmean", "stats_examples": 12})
    res = run_federated(cfg, in_process=True, progress=False, out=tmp_path)
    start, clients = _by_hand(cfg)
    task = ClientTask.from_config(cfg)
    grams = []
    for pid, sd in enumerate(clients):
        model = fedtext.model_for(task)
        model.load_state_dict(sd)
        texts = [t for t, _ in fedtext.client_task(task, pid).train[:12]]
        grams.append(_grams_by_hand(model, texts, cfg.max_length))
    assert set(grams[0]) and all(k in start for k in grams[0])
    got, solved = res.state_dict, 0
    for k, s in start.items():
        if k in grams[0]:
            g = [0.1 * gr[k] + 0.9 * torch.diag(torch.diagonal(gr[k])) for gr in grams]
            num = sum(c[k].double() @ gi.double() for c, gi in zip(clients, g, strict=True))
            want = torch.linalg.solve(sum(g).double(), num, left=False).float()
            solved += 1
        else:
            want = s + sum(c[k] - s for c in clients) / 2
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=2e-5, msg=k)
    assert solved == len(grams[0]) >= 36  # 6 layers x (q, k, v, out, up, down), the pooler
    assert res.rows[1]["kept"] == ["client0", "client1"]
