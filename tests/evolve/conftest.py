"""Fixtures of the evolve tests: a tiny merge problem whose optimum is known, and one local Ray
instance per module that asks for it (started with 2 CPUs, no dashboard; shut down after)."""

from __future__ import annotations

import sys

import pytest
import torch

# per group (layers 0-1 with the embedding, layers 2-3), the task-arithmetic weights of a, b
TARGET_WEIGHTS = ((0.3, 0.7), (0.8, 0.2))


class TinyProblem:
    """Three 4-layer state dicts (``base``, ``a``, ``b``) and the target: task arithmetic with
    :data:`TARGET_WEIGHTS` per layer group. ``fitness`` = −‖merged − target‖², 0 at the optimum.
    A class (not a closure) so that Ray pickles it by value from this conftest."""

    weights = TARGET_WEIGHTS

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)

        def sd():
            out = {f"layers.{i}.w": torch.randn(6, 6, generator=g) for i in range(4)}
            return {"embed.weight": torch.randn(8, 6, generator=g), **out}

        self.models = {"base": sd(), "a": sd(), "b": sd()}
        self.target = {}
        for k, base in self.models["base"].items():
            group = 0 if k == "embed.weight" or int(k.split(".")[1]) < 2 else 1
            wa, wb = TARGET_WEIGHTS[group]
            self.target[k] = (base + wa * (self.models["a"][k] - base)
                              + wb * (self.models["b"][k] - base))  # fmt: skip

    def __call__(self, merged) -> float:
        return -sum(float((merged[k] - t).pow(2).sum()) for k, t in self.target.items())

    def config(self, **search) -> dict:
        return {
            "genome": {"models": ["a", "b"], "base_model": "base",
                       "merge_method": "task_arithmetic", "layer_groups": 2},
            "search": {"workers": 0, "seed": 0, **search},
        }  # fmt: skip


@pytest.fixture
def tiny() -> TinyProblem:
    return TinyProblem()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module's tests (searches use it instead of starting
    their own)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("cmaes")
    from ray import cloudpickle

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the workers cannot import this file (tests/ is not installed): ship its classes by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()
