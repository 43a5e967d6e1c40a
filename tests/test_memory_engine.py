"""The in-memory engine is the engine of ``mergeforge merge``, with another source and sink.

Oracles: the CLI's files. For every method of the registry, with gradients, filters, slices,
an exclusion and a seed (and statistics for the data-using methods), ``merge_state_dicts`` on
state dicts gives bit for bit the tensors ``mergeforge merge`` writes for the same models saved
as folders; ``prepare`` + ``run_jobs`` gives bit for bit what ``run_merge`` writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch
import yaml

import mergeforge
from mergeforge.checkpoint.memory import MemorySink, MemorySource
from mergeforge.checkpoint.sidecar import save_sidecar
from mergeforge.cli import main
from mergeforge.config import yaml_field_map
from mergeforge.engine import prepare, run_merge
from mergeforge.engine.execute import Loader, run_jobs, run_statistics
from mergeforge.errors import CheckpointError, ConfigError, ValidationError
from mergeforge.methods import Method, all_methods, get_method
from tests.helpers import load_dir, write_model

LAYERS = 3


def state_dict(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A 3-layer Llama-named model (float32, plus an int64 buffer that is copied, not merged);
    with ``base``: base + noise whose size grows with ``seed`` (a fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (10, 6), "model.norm.weight": (6,),
              "lm_head.weight": (10, 6)}  # fmt: skip
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (6, 6)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (8, 6)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (6,)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    if base is not None:
        sd = {k: base[k] + 0.05 * seed * v for k, v in sd.items()}
    sd["model.position_ids"] = torch.arange(5)
    return sd


BASE = state_dict(0)
MODELS = {"base": BASE, **{f"expert{i}": state_dict(i + 1, BASE) for i in range(3)}}

SETTINGS = {
    "weight": [{"filter": "mlp", "value": [1.0, 0.4]}, {"value": 0.7}],
    "density": [0.8, 0.4],
    "epsilon": 0.1,
    "gamma": 0.05,
    "lambda": [1.0, 0.8],
    "t": [{"filter": "self_attn", "value": 0.3}, {"value": [0.1, 0.9]}],
    "scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}],
}
"""A setting for each of these parameter names, where a method has it: gradients over depth and
filters, with values every method accepts (DELLA: density ± epsilon stays inside (0, 1))."""
WHOLE_MODEL = {"prune": {"density": 0.4}}
"""Settings of methods for which a parameter is one value for the whole model (prune's global
top-k density): no gradient there."""


def experts_for(method: Method) -> list[str]:
    n = max(method.min_models, min(3, method.max_models or 3))
    return [f"expert{i}" for i in range(n)]


def config_for(method: Method, slices: bool) -> dict:
    """A config over the names of :data:`MODELS`: the settings of :data:`SETTINGS` the method
    has, a seed, an exclusion; ``slices``: layers [0, 2) then [1, 3) of every input (4 layers)."""
    settings = SETTINGS | WHOLE_MODEL.get(method.name, {})
    shared = {k: v for k, v in settings.items() if k in yaml_field_map(method.params)}
    per_model = {k: v for k, v in settings.items() if k in yaml_field_map(method.model_params)}
    names = experts_for(method)
    base = "base" if method.base != "none" else None
    cfg: dict = {"merge_method": method.name, "parameters": shared, "seed": 7,
                 "exclude": ["input_layernorm"]}  # fmt: skip
    if base is not None:
        cfg["base_model"] = base
    if not slices:
        cfg["models"] = [{"model": n, "parameters": per_model} for n in names]
        return cfg
    sources = ([base] if base is not None else []) + names
    cfg["slices"] = [
        {"sources": [{"model": n, "layer_range": list(r),
                      "parameters": per_model if n != base else {}} for n in sources]}
        for r in ((0, 2), (1, 3))
    ]  # fmt: skip
    return cfg


def renamed(cfg, where: Mapping[str, str]):
    """``cfg`` with every model name replaced by ``where[name]`` (its folder)."""
    if isinstance(cfg, dict):
        return {k: (where[v] if k in ("model", "base_model") else renamed(v, where))
                for k, v in cfg.items()}  # fmt: skip
    if isinstance(cfg, list):
        return [renamed(v, where) for v in cfg]
    return cfg


def statistics(method: Method) -> dict[str, tuple[str, dict[str, torch.Tensor], dict]] | None:
    """Made-up statistics of the kind ``method`` reads, per expert: (kind, tensors, metadata).
    Several statistics per tensor (curvature) are stored as a sidecar names them, ``KEY:R`` …,
    the optional ones included (the recorded saliency ``:S``, Adam's ``:v``)."""
    req = None if method.sidecar_inputs is None else method.sidecar_inputs(method.params())
    if req is None:
        return None
    out = {}
    for i, name in enumerate(experts_for(method)):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for key, t in MODELS[name].items():
            shape = req.shape(key, tuple(t.shape)) if t.is_floating_point() else None
            if shape is None:
                continue
            if isinstance(shape, Mapping):
                tensors |= {key + s: torch.rand(sh, generator=g) + 0.01 for s, sh in shape.items()}
            elif req.kind == "regmean":
                a = torch.randn(shape[0], 2 * shape[0], generator=g)
                tensors[key] = a @ a.T / a.shape[1]
            else:
                tensors[key] = torch.rand(shape, generator=g) + 0.01
        norm = float(sum(v.double().square().sum() for v in tensors.values()) ** 0.5)
        out[name] = (req.kind, tensors, {"fisher_norm": repr(norm), "variant": "ema"})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("memory-vs-disk")
    return {name: str(write_model(root / name, sd)) for name, sd in MODELS.items()}


@pytest.mark.parametrize("slices", [False, True], ids=["models", "slices"])
@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.name)
def test_memory_and_cli_merges_are_bit_identical(method, slices, folders, tmp_path):
    cfg = config_for(method, slices)
    stats = statistics(method)
    memory_stats = None
    if stats is not None:
        for name, (kind, tensors, meta) in stats.items():
            # the sidecar records a fingerprint of the weights it is kept beside
            save_sidecar(folders[name], kind, tensors, num_examples=4, examples_used=4,
                       source="made up", extra=meta)  # fmt: skip
        memory_stats = {n: {k: MemorySource(t, metadata=m)} for n, (k, t, m) in stats.items()}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(renamed(cfg, folders)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    disk = load_dir(tmp_path / "out")

    memory = mergeforge.merge_state_dicts(cfg, MODELS, stats=memory_stats)
    assert memory.keys() == disk.keys()
    for key, tensor in disk.items():
        assert memory[key].dtype == tensor.dtype and torch.equal(memory[key], tensor), key
    # the settings took effect: not every merged tensor is any input's
    merged = [k for k in memory if "layernorm" not in k and memory[k].is_floating_point()]
    if slices:
        assert len([k for k in memory if k.endswith("up_proj.weight")]) == 4
    else:
        assert any(not any(torch.equal(memory[k], sd[k]) for sd in MODELS.values()) for k in merged)


@pytest.mark.parametrize("name", [m.name for m in all_methods() if m.stochastic])
def test_prepare_then_run_jobs_equals_run_merge(name, folders, tmp_path):
    """The plan is complete when prepared (random streams named, statistics opened), so
    running its jobs by hand draws the same masks as ``run_merge``."""
    cfg = renamed(config_for(get_method(name), slices=False), folders)
    run_merge(cfg, tmp_path / "out", progress=False)
    plan = prepare(cfg)
    try:
        assert plan.stream_names is not None and plan.stream_names[0] == ""  # the base draws none
        cpu = torch.device("cpu")
        loader = Loader(plan, cpu)
        sink = MemorySink((j.out_name, j.shape, j.out_dtype) for j in plan.jobs)
        run_jobs(plan, loader, run_statistics(plan, loader, print), cpu, sink, 2, lambda j: None)
        by_hand = sink.result()
    finally:
        plan.close()
    written = load_dir(tmp_path / "out")
    assert by_hand.keys() == written.keys()
    assert all(torch.equal(by_hand[k], written[k]) for k in written)


# ---- the contract of merge_state_dicts ------------------------------------------------------


TA = {"merge_method": "task_arithmetic", "base_model": "base",
      "models": [{"model": "expert0", "parameters": {"weight": 0.5}},
                 {"model": "expert1", "parameters": {"weight": 0.5}}]}  # fmt: skip


def test_hand_worked_task_arithmetic_in_memory():
    # θ = θ₀ + ½(θ₁ − θ₀) + ½(θ₂ − θ₀): base 1, experts 3 and −1 -> 1 + 1 − 1 = 1; 2 and 4 -> 3
    models = {"base": {"w": torch.ones(2)}, "expert0": {"w": torch.tensor([3.0, 2.0])},
              "expert1": {"w": torch.tensor([-1.0, 4.0])}}  # fmt: skip
    out = mergeforge.merge_state_dicts(TA, models)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))


def test_inputs_are_untouched_and_outputs_are_their_own():
    models = {k: {n: t.clone() for n, t in MODELS[k].items()} for k in ("base", "expert0")}
    cfg = {"merge_method": "passthrough", "models": [{"model": "expert0"}]}
    out = mergeforge.merge_state_dicts(cfg, models)
    for key, t in out.items():
        assert torch.equal(t, MODELS["expert0"][key])
        t.add_(1)  # the caller owns the result: writing to it leaves the inputs alone
    assert all(torch.equal(models["expert0"][k], MODELS["expert0"][k]) for k in out)


def test_autograd_tensors_and_a_lazy_mapping():
    class Lazy(Mapping):
        """Makes each tensor when looked up (as a reader of a file would) and counts."""

        def __init__(self, sd):
            self.sd, self.looked_up = sd, 0

        def __getitem__(self, key):
            self.looked_up += 1
            return self.sd[key].clone().requires_grad_(self.sd[key].is_floating_point())

        def __iter__(self) -> Iterator[str]:
            return iter(self.sd)

        def __len__(self) -> int:
            return len(self.sd)

    lazy = {k: Lazy(MODELS[k]) for k in ("base", "expert0", "expert1")}
    out = mergeforge.merge_state_dicts(TA, lazy)
    plain = mergeforge.merge_state_dicts(TA, MODELS)
    assert all(torch.equal(out[k], plain[k]) and not out[k].requires_grad for k in plain)
    assert all(m.looked_up >= len(m.sd) for m in lazy.values())


def test_memory_and_stored_models_mix(folders):
    cfg = {**TA, "base_model": folders["base"]}
    mixed = mergeforge.merge_state_dicts(cfg, {k: MODELS[k] for k in ("expert0", "expert1")})
    plain = mergeforge.merge_state_dicts(TA, MODELS)
    assert all(torch.equal(mixed[k], plain[k]) for k in plain)


def test_mistakes_are_named():
    with pytest.raises(CheckpointError, match=r"expert1: no such file.*not one of the models "
                       r"given in memory either: 'base', 'expert0'"):  # fmt: skip
        mergeforge.merge_state_dicts(TA, {k: MODELS[k] for k in ("base", "expert0")})
    broken = {**MODELS["expert0"], "model.norm.weight": [1.0]}
    with pytest.raises(CheckpointError, match=r"expert0 \(in memory\): 'model.norm.weight' is "
                       r"a list, not a torch.Tensor"):  # fmt: skip
        mergeforge.merge_state_dicts(TA, {**MODELS, "expert0": broken})


def test_statistics_in_memory_are_required_and_checked():
    regmean = {"merge_method": "regmean", "models": [{"model": "expert0"}, {"model": "expert1"}]}
    with pytest.raises(ValidationError, match=r"in-memory model 'expert0' has no regmean "
                       r"statistics.*stats=\{'expert0': \{'regmean'"):  # fmt: skip
        mergeforge.merge_state_dicts(regmean, MODELS)
    eye = {k: torch.eye(6) for k in MODELS["expert0"] if "q_proj" in k or "up_proj" in k}
    good = {"expert0": {"regmean": eye}, "expert1": {"regmean": eye}}
    out = mergeforge.merge_state_dicts(regmean, MODELS, stats=good)
    for k in eye:  # identical Grams: RegMean is the plain average
        mean = (MODELS["expert0"][k] + MODELS["expert1"][k]) / 2
        torch.testing.assert_close(out[k], mean)
    with pytest.raises(ConfigError, match=r"'fisher-sampled' of 'expert1' were given but this "
                       r"merge does not read them"):  # fmt: skip
        mergeforge.merge_state_dicts(
            regmean, MODELS, stats={**good, "expert1": {**good["expert1"], "fisher-sampled": {}}}
        )
    bad = {**good, "expert1": {"regmean": {k: torch.eye(5) for k in eye}}}
    shape = r"regmean statistics of expert1 \(in memory\) has \[5, 5\]"
    with pytest.raises(ValidationError, match=shape + ".*given in memory for expert1"):
        mergeforge.merge_state_dicts(regmean, MODELS, stats=bad)
    with pytest.raises(ConfigError, match="'ties' reads none; leave out stats="):
        mergeforge.merge_state_dicts({**TA, "merge_method": "ties"}, MODELS, stats=good)


def test_one_config_constructor_checks_names_before_any_model_is_opened(tmp_path):
    from mergeforge.config import load_config, merge_document

    doc = merge_document("ties", [tmp_path / "nowhere"], base_model="also-nowhere",
                         model_parameters={"densty": 0.5})  # fmt: skip
    assert doc == {"merge_method": "ties", "base_model": "also-nowhere",
                   "models": [{"model": str(tmp_path / "nowhere"),
                               "parameters": {"densty": 0.5}}]}  # fmt: skip
    with pytest.raises(ConfigError, match="unknown parameter 'densty'.*Did you mean 'density'"):
        prepare(doc)  # a ConfigError, not "no such file": the config is checked first
    with pytest.raises(ConfigError, match="'ties' needs 'base_model:'"):
        load_config({"merge_method": "ties", "models": [{"model": "a"}]})
    cfg = load_config({**doc, "models": [{"model": "a", "parameters": {"gamma": 0.1}}]})
    assert load_config(cfg) is cfg
    assert len(cfg.warnings) == 1 and "'gamma' is not a parameter of 'ties'" in cfg.warnings[0]
