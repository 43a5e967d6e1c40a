"""open_checkpoint dispatch, Hugging Face folders, shard indexes, inspect, and path errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeforge.checkpoint import (
    CARRIED_FILES,
    ShardedWriter,
    inspect_checkpoint,
    open_checkpoint,
    summarize,
)
from mergeforge.errors import CheckpointError


def _sharded(folder: Path, max_shard_bytes: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.w": torch.randn(6, 5, generator=g) for i in range(5)}
    sd["bias"] = torch.randn(5, generator=g).bfloat16()
    with ShardedWriter(folder, [(k, v.shape, v.dtype) for k, v in sd.items()],
                       max_shard_bytes=max_shard_bytes) as w:  # fmt: skip
        for k, v in sd.items():
            w.write(k, v)
        w.write_text("config.json", json.dumps({"model_type": "toy", "hidden_size": 5}))
        w.write_text("tokenizer.json", "{}")
    return sd


def test_sharded_folder_and_index_file(tmp_path: Path) -> None:
    sd = _sharded(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink(missing_ok=True)
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) == 5
    for spec in (tmp_path / "m", tmp_path / "m" / "model.safetensors.index.json"):
        ckpt = open_checkpoint(spec)
        assert ckpt.keys() == list(sd)  # shard order, then on-disk order
        assert all(torch.equal(ckpt.get(k), v) for k, v in sd.items())
        ckpt.close()
    ckpt = open_checkpoint(str(tmp_path / "m"))
    assert ckpt.config == {"model_type": "toy", "hidden_size": 5}
    assert [p.name for p in ckpt.carried_files] == ["config.json", "tokenizer.json"]
    assert ckpt.info("bias").file.endswith("model-00005-of-00005.safetensors")


def test_missing_shard_names_index_entry_and_file(tmp_path: Path) -> None:
    _sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "m")
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and "'layers.2.w'" in msg
    assert "model-00003-of-00005.safetensors" in msg


def test_index_entry_absent_from_its_shard(tmp_path: Path) -> None:
    _sharded(tmp_path / "m")
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00005.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'ghost'.*model-00001-of-00005"):
        open_checkpoint(tmp_path / "m")


def test_folder_prefers_single_file_and_lists_carried_files(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"x": torch.ones(2)}, folder / "model.safetensors")
    torch.save({"y": torch.ones(2)}, folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer_config.json", "merges.txt", "chat_template.jinja"):
        (folder / name).write_text("{}")
    ckpt = open_checkpoint(folder)
    assert ckpt.keys() == ["x"] and ckpt.folder == folder and ckpt.config == {}
    assert [p.name for p in ckpt.carried_files] == [
        n for n in CARRIED_FILES if n in {"config.json", "tokenizer_config.json", "merges.txt",
                                       "chat_template.jinja"}
    ]  # fmt: skip


def test_bad_config_json(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path)


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file") as e:
        open_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "offline" not in str(e.value)
    with pytest.raises(CheckpointError, match="offline") as e:
        open_checkpoint("meta-llama/Llama-3.2-1B")
    assert "meta-llama/Llama-3.2-1B" in str(e.value)
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        open_checkpoint(tmp_path / "weights.npz")


def test_plus_in_an_existing_path_is_not_a_lora_spec(tmp_path: Path) -> None:
    folder = tmp_path / "model+v2"
    folder.mkdir()
    save_file({"x": torch.ones(2)}, folder / "model.safetensors")
    assert open_checkpoint(str(folder)).keys() == ["x"]
    with pytest.raises(CheckpointError, match="adapter .*does not exist"):
        open_checkpoint(f"{folder}+{tmp_path / 'no_adapter'}")
    with pytest.raises(CheckpointError, match="nor, read as BASE\\+ADAPTER"):
        open_checkpoint(f"{tmp_path / 'a'}+{tmp_path / 'b'}")


def test_inspect_and_summary(tmp_path: Path) -> None:
    sd = _sharded(tmp_path / "m")
    infos = inspect_checkpoint(tmp_path / "m")
    assert [i.name for i in infos] == list(sd)
    assert [i.shape for i in infos] == [tuple(v.shape) for v in sd.values()]
    s = summarize(infos)
    assert (s.num_tensors, s.total_params, s.total_bytes) == (6, 5 * 30 + 5, 5 * 120 + 10)
    assert s.params_by_dtype == {"float32": 150, "bfloat16": 5}
    assert "155 parameters" in str(s)
