"""write_fused: a fused model folder the vision suite loads, written atomically, never over an
input, replacing only an earlier fused output, nothing left on an error or a stop signal."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from mergeforge._signals import Interrupted, handle_signals
from mergeforge.checkpoint import ShardedWriter
from mergeforge.errors import CheckpointError, ConfigError, ValidationError
from mergeforge.evaluate.vision.models import build_model
from mergeforge.evaluate.vision.suite import read_state_dict
from mergeforge.evaluate.vision.train import load_into
from mergeforge.fusion import FusionData, fuse
from mergeforge.fusion.output import (
    FUSION_CONFIG,
    fusion_card,
    is_previous_fused_output,
    resolved_parameters,
    write_fused,
)
from mergeforge.version import __version__

ARCH_CONFIG = {"model_type": "mergeforge-vision-mlp", "arch": "mlp", "num_classes": 10}


def _parents(k: int = 2) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(build_model("mlp"))
    return out


def _config(parents: list[Path]) -> dict:
    return {"method": "average", "parameters": resolved_parameters("average", {}),
            "parents": [str(p) for p in parents], "architecture": "mlp",
            "data": {"dataset": "digits", "n": 8, "seed": 0}, "seed": 0}  # fmt: skip


def _fused() -> dict[str, torch.Tensor]:
    data = FusionData(inputs=torch.rand(8, 1, 28, 28))
    return fuse(_parents(), data, "average")


def _nothing_at(out: Path) -> bool:
    """No output and no hidden staging folder of it left beside it."""
    leftovers = [p.name for p in out.parent.iterdir() if f".{out.name}.mergeforge-" in p.name]
    return not out.exists() and not leftovers


def test_the_folder_loads_in_the_vision_suite_and_reproduces_the_state_dict(tmp_path):
    fused = _fused()
    out = write_fused(fused, tmp_path / "fused", config=_config([tmp_path / "a", tmp_path / "b"]),
                      model_config=ARCH_CONFIG)  # fmt: skip
    files = sorted(os.listdir(out))
    assert files == ["README.md", "config.json", FUSION_CONFIG, "model.safetensors",
                     "model.safetensors.index.json"]  # fmt: skip
    loaded = read_state_dict(out, "mlp")  # checks config.json's arch too
    assert loaded.keys() == fused.keys()
    assert all(torch.equal(loaded[k], fused[k]) for k in fused)
    model = load_into("mlp", loaded)
    x = torch.rand(4, 1, 28, 28)
    reference = load_into("mlp", fused)
    assert torch.equal(model(x), reference(x))
    assert json.loads((out / "config.json").read_text())["arch"] == "mlp"
    assert is_previous_fused_output(out)


def test_resolved_config_and_card(tmp_path):
    config = _config([tmp_path / "p0", tmp_path / "p1"])
    out = write_fused(_fused(), tmp_path / "fused", config=config)
    doc = yaml.safe_load((out / FUSION_CONFIG).read_text())
    assert doc["method"] == "average" and doc["parameters"] == {"weights": None}  # defaults
    assert doc["parents"] == [str(tmp_path / "p0"), str(tmp_path / "p1")]
    assert doc["data"] == {"dataset": "digits", "n": 8, "seed": 0}
    assert doc["mergeforge_version"] == __version__
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: pytorch")
    assert "**average**" in card and "1910.05653" in card  # method and paper
    assert f"`{tmp_path / 'p1'}`" in card and "dataset digits, n 8, seed 0" in card
    assert not (out / "config.json").exists()  # no model config given: none written
    assert "test accuracy, fused: 87.50 %" in fusion_card(config, accuracy={"fused": 0.875})
    assert resolved_parameters("average", {"weights": (1, 3)}) == {"weights": [1, 3]}


def test_bad_state_dicts_write_nothing(tmp_path):
    out = tmp_path / "fused"
    bad = _fused()
    bad["fc2.0.weight"] = bad["fc2.0.weight"].clone()
    bad["fc2.0.weight"][0, 0] = float("nan")
    with pytest.raises(ValidationError, match="'fc2.0.weight' contains NaN"):
        write_fused(bad, out, config=_config([]))
    with pytest.raises(ValidationError, match="empty"):
        write_fused({}, out, config=_config([]))
    with pytest.raises(ValidationError, match="'x' is a list"):
        write_fused({"x": [1.0]}, out, config=_config([]))
    with pytest.raises(ConfigError, match="unknown fusion method 'nope'"):
        write_fused(_fused(), out, config={**_config([]), "method": "nope"})
    assert _nothing_at(out)


def test_an_input_is_never_the_output(tmp_path):
    parent = tmp_path / "parent0"
    parent.mkdir()
    (parent / "model.safetensors").write_bytes(b"keep")
    data = tmp_path / "fusion.safetensors"
    data.write_bytes(b"keep")
    config = _config([parent])
    for out, how in ((parent, "is"), (parent / "fused", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(ConfigError, match=f"{how} the input .*a fusion never writes"):
            write_fused(_fused(), out, config=config, inputs=[parent, data], overwrite=True)
    with pytest.raises(ConfigError, match="is the input"):
        write_fused(_fused(), data, config=config, inputs=[parent, data])
    link = tmp_path / "link"
    link.symlink_to(parent)  # the same folder under another name
    with pytest.raises(ConfigError, match="is the input"):
        write_fused(_fused(), link, config=config, inputs=[parent], overwrite=True)
    assert (parent / "model.safetensors").read_bytes() == b"keep" and data.read_bytes() == b"keep"
    assert sorted(os.listdir(parent)) == ["model.safetensors"]


def test_overwrite_replaces_only_an_earlier_fused_output(tmp_path):
    out = tmp_path / "fused"
    write_fused(_fused(), out, config=_config([]))
    with pytest.raises(CheckpointError, match="not empty; pass --overwrite"):
        write_fused(_fused(), out, config=_config([]))
    again = {k: v + 1 for k, v in _fused().items()}
    write_fused(again, out, config=_config([]), overwrite=True)
    assert torch.equal(read_state_dict(out)["head.bias"], again["head.bias"])
    (out / "notes.txt").write_text("mine")  # a file fusion did not write: never deleted
    with pytest.raises(CheckpointError, match="holds files a fusion did not write: notes.txt"):
        write_fused(_fused(), out, config=_config([]), overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match="not a previous mergeforge output"):
        write_fused(_fused(), other, config=_config([]), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (other / "data.csv").exists()


def test_a_failure_or_a_stop_signal_mid_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "new" / "fused"
    real = ShardedWriter.write_text

    def fail(self, relpath, text):
        if relpath == FUSION_CONFIG:
            raise OSError(28, "No space left on device")
        return real(self, relpath, text)

    monkeypatch.setattr(ShardedWriter, "write_text", fail)
    with pytest.raises(OSError):
        write_fused(_fused(), out, config=_config([]), model_config=ARCH_CONFIG)
    assert not (tmp_path / "new").exists()  # the folders made for it are gone too

    def stop(self, relpath, text):  # a real SIGTERM, raised in the main thread mid-write
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, relpath, text)

    monkeypatch.setattr(ShardedWriter, "write_text", stop)
    with pytest.raises(Interrupted), handle_signals():
        write_fused(_fused(), out, config=_config([]), model_config=ARCH_CONFIG)
    assert not (tmp_path / "new").exists()


def test_overwrite_never_deletes_files_only_a_merge_carries(tmp_path):
    """A merge carries tokenizer / generation files and may replace them; fusion writes none of
    them, so in an earlier fused output they are someone else's: --overwrite refuses."""
    out = tmp_path / "fused"
    write_fused(_fused(), out, config=_config([]), model_config=ARCH_CONFIG)
    for name in ("tokenizer.json", "generation_config.json", "1_Pooling/config.json"):
        extra = out / name
        extra.parent.mkdir(exist_ok=True)
        extra.write_text("{}")
        assert not is_previous_fused_output(out)
        top = name.split("/")[0]  # a folder fusion never writes is named as a whole
        with pytest.raises(CheckpointError, match=f"a fusion did not write: {top};"):
            write_fused(_fused(), out, config=_config([]), overwrite=True)
        assert extra.read_text() == "{}"
        extra.unlink()
        if top != name:
            extra.parent.rmdir()
    write_fused(_fused(), out, config=_config([]), model_config=ARCH_CONFIG, overwrite=True)
    assert (out / "config.json").is_file()  # what fusion writes stays replaceable
