"""Ray for real, as a cluster: a ``ray start --head`` process on loopback (its own temp folder,
so no other Ray user on the machine sees it), a search joins it with ``address=HOST:PORT`` and
gives the in-process result; the head is stopped afterwards (SIGINT to its ``--block``
process, which stops the processes it started). About 20 s on 2 busy cores: marked slow."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from mergeforge.evolve import evolve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    ray = pytest.importorskip("ray")
    pytest.importorskip("cmaes")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    exe = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="mfray", dir="/tmp")  # short: Ray's socket paths are long
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [exe, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"ray start --head did not listen on port {port}")
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started, nothing else
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_search_joins_a_ray_head_at_its_address(ray_head, tiny):
    import ray
    import ray.cloudpickle

    # the head's workers cannot import tests/: the fitness's module travels by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[type(tiny).__module__])
    cfg = tiny.config(evaluations=16)
    serial = evolve(cfg, fitness=tiny, models=tiny.models, progress=False)
    joined = evolve(cfg, fitness=tiny, models=tiny.models, progress=False, workers=1,
                    address=ray_head)  # fmt: skip
    assert not ray.is_initialized()  # joined for the search, left after it
    assert [r["fitness"] for r in joined.history] == [r["fitness"] for r in serial.history]
    assert joined.best_config == serial.best_config and joined.workers == 1
