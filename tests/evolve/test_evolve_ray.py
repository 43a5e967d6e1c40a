"""Ray for real: searches through a local Ray instance (shared by this module's tests) give
exactly the result of the same search in one process, whatever the number of workers; a
failed merge on a worker is scored failed and the search goes on."""

from __future__ import annotations

import pytest

from mergeforge.evolve import evolve


def key(res) -> list:
    return [(r["generation"], r["candidate"], r["fitness"], r["genes"]) for r in res.history]


def test_a_search_on_ray_workers_equals_the_one_in_process(ray_local, tiny):
    cfg = tiny.config(evaluations=24)
    serial = evolve(cfg, fitness=tiny, models=tiny.models, progress=False)
    on_ray = evolve(cfg, fitness=tiny, models=tiny.models, progress=False, workers=2)
    assert on_ray.workers == 2 and ray_local.is_initialized()  # the module's instance, kept
    assert key(on_ray) == key(serial) and on_ray.best_config == serial.best_config
    assert all(r["merge_s"] > 0 for r in on_ray.history)  # merged on the workers


def test_a_failed_merge_on_a_worker_is_scored_failed(ray_local, tiny):
    cfg = tiny.config(evaluations=16)
    cfg["genome"].update(merge_method="della", layer_groups=1, model_parameters={"epsilon": 0.3},
                         init={"density": 0.5})  # fmt: skip
    res = evolve(cfg, fitness=tiny, models=tiny.models, progress=False, workers=2)
    errors = [r["error"] for r in res.history if r["fitness"] is None]
    assert errors and all(e.startswith("merge failed: ConfigError") for e in errors)
    assert res.evaluations == 16 and res.best_fitness is not None


@pytest.mark.parametrize("in_memory", [True, False])
def test_models_in_folders_in_memory_or_through_files(ray_local, tiny, tmp_path, in_memory):
    """Models given as folders: each worker maps them once and merges in memory, or, with
    ``in_memory: false`` (mergekit-evolve's way), writes every candidate and reads it back;
    the same fitness either way, and the best merge is written as a model folder."""
    from safetensors.torch import save_file

    for name, sd in tiny.models.items():
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    cfg = tiny.config(evaluations=16, in_memory=in_memory)
    cfg["genome"].update(models=[str(tmp_path / "a"), str(tmp_path / "b")],
                         base_model=str(tmp_path / "base"))  # fmt: skip
    res = evolve(cfg, fitness=tiny, progress=False, workers=2, out=tmp_path / "out")
    in_process = evolve(tiny.config(evaluations=16), fitness=tiny, models=tiny.models,
                        progress=False)  # fmt: skip
    assert [r["fitness"] for r in res.history] == [r["fitness"] for r in in_process.history]
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()  # the best, written
