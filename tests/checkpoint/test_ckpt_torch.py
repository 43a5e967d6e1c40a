"""PyTorch pickles: plain state dicts load; anything that needs code to unpickle is refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from mergeforge.checkpoint import open_checkpoint
from mergeforge.errors import CheckpointError


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(4, generator=g).half(),
        "idx": torch.arange(5),
    }


@pytest.mark.parametrize("zipfmt", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_torch_file_round_trip(tmp_path: Path, zipfmt: bool, suffix: str) -> None:
    sd = _state()
    path = tmp_path / f"model{suffix}"
    torch.save(sd, path, _use_new_zipfile_serialization=zipfmt)
    ckpt = open_checkpoint(path)
    assert ckpt.keys() == list(sd) and ckpt.folder is None
    for k, v in sd.items():
        assert torch.equal(ckpt.get(k), v) and ckpt.get(k).dtype == v.dtype
        assert ckpt.info(k).shape == tuple(v.shape)
    ckpt.close()
    assert torch.equal(ckpt.get("w"), sd["w"])  # reloads after close


def test_nested_state_dict_is_unwrapped(tmp_path: Path) -> None:
    torch.save({"state_dict": _state(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert open_checkpoint(tmp_path / "ckpt.pt").keys() == ["w", "b", "idx"]


@pytest.mark.parametrize("how", ["pickle2", "pickle4", "torch.save"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "PWNED"
    payload = {"w": torch.zeros(2), "x": _Evil(marker)}
    path = tmp_path / "pytorch_model.bin"
    if how.startswith("pickle"):
        path.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    for spec in (path, tmp_path):  # the file, and the folder that holds it
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(spec)
        msg = str(e.value)
        assert str(path) in msg and "not executed" in msg and "safetensors" in msg
    assert not marker.exists()


def test_garbage_bin_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError, match="x.bin"):
        open_checkpoint(tmp_path / "x.bin")


def test_sharded_pytorch_bin_folder(tmp_path: Path) -> None:
    a, b = _state(0), {"v": torch.randn(3, 3), "u": torch.ones(2, dtype=torch.bool)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in a}
    wm |= {k: "pytorch_model-00002-of-00002.bin" for k in b}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.keys() == [*a, *b]
    for k, v in (a | b).items():
        assert torch.equal(ckpt.get(k), v)
    assert ckpt.info("u").file == str(tmp_path / "pytorch_model-00002-of-00002.bin")
