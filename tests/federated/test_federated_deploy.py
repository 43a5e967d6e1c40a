"""A real Flower deployment on loopback: ``flower-superlink``, two ``flower-supernode``
processes (``--node-config 'partition-id=K num-partitions=2'``) and ``flwr run`` of the App
folder ``mergeforge federated --flower-app`` writes. The ServerApp and ClientApps run in their
own processes (Flower's subprocess isolation) and the run gives what the same config gives in
this process. No dependency installation (``--disable-runtime-dependency-installation`` on the
SuperLink; SuperNodes install nothing unless asked), no telemetry, FLWR_HOME in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
import yaml

from mergeforge.cli import main as cli_main
from mergeforge.federated import run_federated

CFG = {"dataset": "digits", "n_train": 200, "n_test": 100, "clients": 2, "rounds": 1,
       "partition": "iid", "lr": 0.1, "batch_size": 25, "evaluate_clients": False,
       "aggregator": {"method": "ties", "model_parameters": {"density": 0.5}}}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, logs) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{tails}")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def stop(procs) -> None:
    """Every process started here and everything they started (SuperExec, app processes)."""
    psutil = pytest.importorskip("psutil")
    everyone = []
    for p in procs:
        try:
            everyone += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for q in everyone:
        try:
            q.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(everyone, timeout=10)
    for q in alive:
        q.kill()
    for p in procs:
        p.wait(timeout=10)


@pytest.mark.slow  # ~40 s: every ClientApp is a fresh Python process importing torch
def test_superlink_and_two_supernodes_on_loopback(tmp_path, capsys):
    if shutil.which("flower-superlink") is None or shutil.which("flwr") is None:
        pytest.skip("flwr's commands are not installed")
    (tmp_path / "fed.yml").write_text(yaml.safe_dump(CFG))
    assert cli_main(["federated", str(tmp_path / "fed.yml"), "--out", str(tmp_path / "out"),
                     "--flower-app", str(tmp_path / "app")]) == 0  # fmt: skip
    assert "flwr run" in capsys.readouterr().out
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    logs, procs = [], []

    def start(name, *args):
        logs.append(tmp_path / f"{name}.log")
        procs.append(subprocess.Popen(args, stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, env=env, cwd=tmp_path))  # fmt: skip

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
              str(port), "--disable-runtime-dependency-installation")  # fmt: skip
        wait_for("the SuperLink listening", lambda: listening(port), 60, logs)
        for k in range(2):
            start(f"supernode{k}", "flower-supernode", "--insecure", "--superlink",
                  f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config",
                  f"partition-id={k} num-partitions=2")  # fmt: skip
        run = subprocess.run(["flwr", "run", str(tmp_path / "app"), "loopback"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0 and "Successfully started run" in run.stdout, run
        results = tmp_path / "out" / "results.json"
        wait_for("results.json", results.exists, 240, logs)
    finally:
        stop(procs)
    doc = json.loads(results.read_text())
    assert doc["aggregator"] == "ties" and doc["dropped"] == 0
    assert doc["rounds"][1]["kept"] == ["client0", "client1"]
    # the same config in this process, one thread as the app processes: the same result
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = run_federated(CFG, progress=False, in_process=True)
    finally:
        torch.set_num_threads(n)
    assert [r["accuracy"] for r in doc["rounds"]] == [r["accuracy"] for r in here.rows]
