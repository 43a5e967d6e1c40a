"""`mergeforge fuse CONFIG OUT` and its Python twin: the three parent formats, the fusion set from
a file or a dataset, the resolved config, and every bad input refused before any heavy work with
an error naming the key or the file, nothing written.

Parents are freshly initialised vision MLPs (fusion does not care how well they were trained);
``average`` is the oracle: its output is the parents' mean, tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergeforge.cli import main
from mergeforge.errors import ConfigError, ValidationError
from mergeforge.evaluate.data import DataPackageMissing
from mergeforge.evaluate.vision.fuse import fuse_from_config
from mergeforge.evaluate.vision.fuse_config import load_fuse_config
from mergeforge.evaluate.vision.models import MLP, build_model
from mergeforge.evaluate.vision.suite import read_state_dict
from mergeforge.fusion.output import FUSION_CONFIG


def _state(arch: str = "mlp", seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLP(**kw) if kw else build_model(arch)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _folder(root: Path, name: str, sd: dict, arch: str | None = "mlp", **cfg) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    if arch is not None:
        (folder / "config.json").write_text(json.dumps({"arch": arch, **cfg}))
    return folder


def _data_file(path: Path, n: int = 16, **tensors) -> Path:
    tensors = tensors or {"inputs": torch.rand(n, 1, 28, 28), "labels": torch.arange(n) % 10}
    save_file(tensors, str(path))
    return path


@pytest.fixture
def parents(tmp_path) -> list[Path]:
    """Parent 0 as a model folder, parent 1 as a bare .safetensors file, parent 2 as a .pt."""
    p0 = _folder(tmp_path, "p0", _state(seed=0))
    p1 = tmp_path / "p1.safetensors"
    save_file(_state(seed=1), str(p1))
    p2 = tmp_path / "p2.pt"
    torch.save({"state_dict": _state(seed=2), "epoch": 3}, p2)  # a training checkpoint
    return [p0, p1, p2]


def _cfg(parents, data, **extra) -> dict:
    return {"method": "average", "parents": [str(p) for p in parents], "data": data, **extra}


def test_three_parent_formats_fuse_to_their_average_from_yaml(tmp_path, parents):
    data = _data_file(tmp_path / "fusion.safetensors")
    cfg = tmp_path / "fuse.yml"
    rel = [p.name for p in parents]  # relative to the YAML's folder
    cfg.write_text(yaml.safe_dump(_cfg(rel, {"file": "fusion.safetensors"}, seed=3)))
    out = fuse_from_config(cfg, tmp_path / "out")
    fused = read_state_dict(out, "mlp")
    states = [_state(seed=s) for s in range(3)]
    for key, t in fused.items():
        assert torch.allclose(t, sum(sd[key] for sd in states) / 3, atol=1e-6), key
    doc = yaml.safe_load((out / FUSION_CONFIG).read_text())
    assert doc["method"] == "average" and doc["parameters"] == {"weights": None}
    assert doc["parents"] == [str(p) for p in parents] and doc["architecture"] == "mlp"
    assert doc["levels"] == ["fc1", "fc2", "head"] and doc["seed"] == 3
    assert doc["data"] == {"file": str(data), "n": 16} and doc["class_fractions"] is None
    assert doc["result"]["fusion_seconds"] >= 0


def test_the_cli_fuses_and_reports_errors(tmp_path, parents, capsys):
    _data_file(tmp_path / "fusion.safetensors")
    cfg = tmp_path / "fuse.yml"
    cfg.write_text(yaml.safe_dump(_cfg(parents[:2], {"file": str(tmp_path / "fusion.safetensors")},
                                       parameters={"weights": [3, 1]})))  # fmt: skip
    assert main(["fuse", str(cfg), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    fused, a, b = (read_state_dict(tmp_path / "out"), _state(seed=0), _state(seed=1))
    assert torch.allclose(fused["head.weight"], 0.75 * a["head.weight"] + 0.25 * b["head.weight"])
    assert main(["fuse", str(cfg), str(tmp_path / "out")]) == 2  # exists: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err
    assert main(["fuse", str(cfg), str(tmp_path / "out"), "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    helped = capsys.readouterr().out
    assert "fusion methods:" in helped and "average" in helped and "--overwrite" in helped


def test_a_dataset_fusion_set_and_accuracy_in_the_card(tmp_path, parents):
    try:
        out = fuse_from_config(_cfg(parents[:2], {"dataset": "digits", "n": 30, "seed": 1}),
                               tmp_path / "out")  # fmt: skip
    except DataPackageMissing as exc:
        pytest.skip(str(exc))
    doc = yaml.safe_load((out / FUSION_CONFIG).read_text())
    assert doc["data"] == {"dataset": "digits", "n": 30, "seed": 1}
    assert 0 <= doc["result"]["test_accuracy"] <= 1
    assert len(doc["result"]["parents_test_accuracy"]) == 2
    assert "test accuracy, fused:" in (out / "README.md").read_text()


def test_levels_and_class_fractions_from_the_vision_cache(tmp_path):
    cache = tmp_path / "cache" / "0123456789abcdef"
    dirs = []
    for k in range(2):
        share = [1.0 if (c < 5) == (k == 0) else 0.0 for c in range(10)]
        (cache / f"parent{k}.json").parent.mkdir(parents=True, exist_ok=True)
        (cache / f"parent{k}.json").write_text(json.dumps({"class_share": share}))
        dirs.append(_folder(cache / "models", f"parent{k}", _state(seed=k), parent=k))
    data = {"file": str(_data_file(tmp_path / "d.safetensors"))}
    split = ["fc1.0", "fc1.1", "fc1.2", "fc2", "head"]  # finer levels than the class lists
    cfg = load_fuse_config(_cfg(dirs, data, levels=split))
    assert cfg.levels == tuple(split) and cfg.architecture == "mlp"
    assert cfg.class_fractions[0] == (1.0,) * 5 + (0.0,) * 5
    given = [[0.5] * 10, [0.5] * 10]
    assert load_fuse_config(_cfg(dirs, data, class_fractions=given)).class_fractions[1][0] == 0.5


def _refused(tmp_path, config, error, match) -> None:
    out = tmp_path / "refused"
    with pytest.raises(error, match=match):
        fuse_from_config(config, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".refused.mergeforge-" in p.name]


def test_bad_configs_name_the_key_and_the_fix(tmp_path, parents):
    data = {"file": str(_data_file(tmp_path / "fusion.safetensors"))}
    good = _cfg(parents[:2], data)
    cases = [
        ({**good, "method": "nope"}, "unknown fusion method 'nope'; available: .*'average'"),
        ({**good, "parameters": {"alpha": 1}}, r"unknown parameter\(s\) \['alpha'\]; valid"),
        ({**good, "parents": [*good["parents"], str(tmp_path / "gone.safetensors")]},
         r"parents\[2\]: .*gone.safetensors' does not exist"),
        ({**good, "parents": [str(tmp_path / "fusion.safetensors")] * 2}, "listed twice"),
        ({**good, "architecture": "lenet"}, "architecture 'lenet' is not one of"),
        ({**good, "levels": ["fc1", "fc9"]}, "'fc9' is not a module .*'fc2'.*default levels"),
        ({**good, "levels": ["fc1", "head"]}, "do not cover its forward pass"),
        ({**good, "method": "kf", "levels": ["fc1", "fc2", "head"],
          "parameters": {"levels": ["fc1", "head"]}}, "parameters.levels .* differ"),
        ({**good, "data": {"dataset": "cifar10"}}, "data.dataset 'cifar10' is not one of"),
        ({**good, "data": {"dataset": "digits", "n": 0}}, "data.n must be a positive.*empty"),
        ({**good, "data": {"file": "x", "dataset": "digits"}}, "data must be"),
        ({**good, "class_fractions": [[1.0] * 10]}, "class_fractions must be 2×10"),
        ({**good, "seed": "zero"}, "seed must be an integer"),
        ({**good, "colour": 1}, r"unknown key\(s\) \['colour'\]"),
        ({"method": "average", "data": data}, "'parents' is missing"),
    ]  # fmt: skip
    for config, match in cases:
        _refused(tmp_path, config, ConfigError, match)


def test_parents_of_different_architectures_or_widths(tmp_path, parents):
    data = {"file": str(_data_file(tmp_path / "fusion.safetensors"))}
    vgg = _folder(tmp_path, "vgg", _state("vgg"), arch="vgg")
    _refused(tmp_path, _cfg([parents[0], vgg], data), ConfigError,
             "parents of different architectures: .*vgg' is a 'vgg' model")  # fmt: skip
    _refused(tmp_path, _cfg([parents[1], vgg], data, architecture="mlp"), ConfigError,
             "vgg' is a 'vgg' model .*architecture is 'mlp'")  # fmt: skip
    wide = _folder(tmp_path, "wide", _state(hidden=(128, 128)), arch=None)
    wider = r"wide': tensor 'fc1.1.weight' \(level 'fc1'\) has shape \(128, 784\).*widths"
    _refused(tmp_path, _cfg([parents[1], wide], data, architecture="mlp"), ConfigError, wider)
    _refused(tmp_path, _cfg([parents[1], tmp_path / "vgg" / "model.safetensors"], data,
                            architecture="mlp"), ConfigError, "not a 'mlp' model")  # fmt: skip
    _refused(tmp_path, _cfg([parents[1], parents[2]], data), ConfigError, "no architecture")


def test_bad_fusion_data_files(tmp_path, parents):
    n = 8
    cases = {
        "no-inputs": ({"x": torch.rand(n, 1, 28, 28)}, r"no 'inputs' tensor \(it holds \['x'\]\)"),
        "uint8": ({"inputs": torch.zeros(n, 1, 28, 28, dtype=torch.uint8)}, "U8, not floating"),
        "flat": ({"inputs": torch.rand(n, 784)}, r"shaped \(8, 784\).*N×1×28×28"),
        "empty": ({"inputs": torch.rand(0, 1, 28, 28)}, "empty"),
        "labels": ({"inputs": torch.rand(n, 1, 28, 28), "labels": torch.zeros(n)},
                   r"labels is F32 \(8,\), not int64"),
    }  # fmt: skip
    for name, (tensors, match) in cases.items():
        path = _data_file(tmp_path / f"{name}.safetensors", **tensors)
        _refused(tmp_path, _cfg(parents[:2], {"file": str(path)}), ConfigError, match)
    text = tmp_path / "data.txt"
    text.write_text("1 2 3")
    _refused(tmp_path, _cfg(parents[:2], {"file": str(text)}), ConfigError, "not a .safetensors")


def test_nan_in_a_parent_names_it_and_its_level(tmp_path, parents):
    sd = _state(seed=5)
    sd["fc2.0.bias"][3] = float("nan")
    bad = _folder(tmp_path, "nan", sd)
    data = {"file": str(_data_file(tmp_path / "fusion.safetensors"))}
    _refused(tmp_path, _cfg([parents[0], bad], data), ValidationError,
             r"nan'? tensor 'fc2.0.bias' \(level 'fc2'\) contains NaN")  # fmt: skip


def test_the_output_may_not_be_an_input(tmp_path, parents):
    data = _data_file(tmp_path / "fusion.safetensors")
    cfg = _cfg(parents[:2], {"file": str(data)})
    for out in (parents[0], parents[0] / "fused", tmp_path):
        with pytest.raises(ConfigError, match="a fusion never writes into, over or around"):
            fuse_from_config(cfg, out, overwrite=True)
    with pytest.raises(ConfigError, match="is the input"):
        fuse_from_config(cfg, data, overwrite=True)
    assert sorted(p.name for p in parents[0].iterdir()) == ["config.json", "model.safetensors"]


def test_the_device_is_resolved_before_anything_is_loaded(tmp_path, parents, monkeypatch):
    import mergeforge.evaluate.vision.fuse as fuse_mod

    _data_file(tmp_path / "fusion.safetensors")
    cfg = _cfg(parents[:2], {"file": str(tmp_path / "fusion.safetensors")})
    read = []
    real = fuse_mod._read
    monkeypatch.setattr(fuse_mod, "_read", lambda p: read.append(p) or real(p))
    with pytest.raises(ConfigError, match="unsupported device 'tpu'; use cpu, cuda"):
        fuse_from_config(cfg, tmp_path / "out", device="tpu")
    assert read == [] and not (tmp_path / "out").exists()
    out = fuse_from_config(cfg, tmp_path / "out", device="auto")  # cuda if there is one, else cpu
    assert len(read) == 2 and (out / FUSION_CONFIG).is_file()


def test_the_cli_takes_device_auto(tmp_path, parents, capsys):
    _data_file(tmp_path / "fusion.safetensors")
    cfg = tmp_path / "fuse.yml"
    cfg.write_text(
        yaml.safe_dump(_cfg(parents[:2], {"file": str(tmp_path / "fusion.safetensors")}))
    )
    assert main(["fuse", str(cfg), str(tmp_path / "out"), "--device", "auto"]) == 0
    assert main(["fuse", str(cfg), str(tmp_path / "o2"), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "unsupported device 'gpu'" in err and "Traceback" not in err


def test_levels_given_only_as_a_parameter_are_checked_and_recorded(tmp_path, parents):
    data = {"file": str(_data_file(tmp_path / "fusion.safetensors"))}
    split = ["fc1.0", "fc1.1", "fc1.2", "fc2", "head"]
    cfg = load_fuse_config(_cfg(parents[:2], data, method="kf", parameters={"levels": split}))
    assert cfg.levels == tuple(split)  # what the card and mergeforge_fusion.yml record
    assert cfg.resolved()["levels"] == split and cfg.resolved()["parameters"]["levels"] == split
    bad = _cfg(parents[:2], data, method="kf", parameters={"levels": ["fc1", "head"]})
    _refused(tmp_path, bad, ConfigError, r"parameters.levels \['fc1', 'head'\] do not fit .*"
             "do not cover its forward pass")  # fmt: skip
    _refused(tmp_path, _cfg(parents[:2], data, method="kf", parameters={"levels": "fc1"}),
             ConfigError, "parameters.levels must be a non-empty list")  # fmt: skip
