"""Statistics files: location, metadata round trip, and refusal of stale or foreign ones."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeforge.checkpoint.sidecar import (
    open_sidecar,
    save_sidecar,
    sidecar_path,
    weights_fingerprint,
)
from mergeforge.errors import ValidationError


def _save(model, kind="regmean", n=8):
    return save_sidecar(model, kind, {"a.weight": torch.eye(3)}, num_examples=n, examples_used=n,
                      source="test", extra={"max_length": "16"})  # fmt: skip


def test_round_trip_and_location(tiny_families):
    model = tiny_families["bert"]["experts"][0]
    path = _save(model)
    try:
        assert path == model / "mergeforge-stats" / "regmean.safetensors"
        f = open_sidecar(model, "regmean", command="CMD", num_examples=8)
        assert f.keys() == ["a.weight"] and torch.equal(f.get("a.weight"), torch.eye(3))
        meta = f.metadata
        assert meta["kind"] == "regmean" and meta["num_examples"] == "8"
        assert meta["weights_fingerprint"] == weights_fingerprint(model)
        assert meta["max_length"] == "16" and "mergeforge_version" in meta
        f.close()
    finally:
        path.unlink()


def test_single_file_checkpoints_keep_stats_in_a_sibling_folder(tmp_path):
    w = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.ones(3, 3)}, w)
    assert sidecar_path(w, "fisher-sampled") == (
        tmp_path / "model.safetensors.mergeforge-stats" / "fisher-sampled.safetensors"
    )
    _save(w, "fisher-sampled")
    open_sidecar(w, "fisher-sampled", command="CMD").close()


def test_missing_stale_and_mismatched_are_refused(tmp_path):
    w = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.ones(3, 3)}, w)
    with pytest.raises(ValidationError, match="missing statistics.*CMD"):
        open_sidecar(w, "regmean", command="CMD")
    _save(w)
    with pytest.raises(ValidationError, match="num_examples=8.*num_examples=9.*CMD"):
        open_sidecar(w, "regmean", command="CMD", num_examples=9)
    sd = load_file(w)
    sd["a.weight"] = sd["a.weight"] * 2  # same size and header, new weights
    save_file(sd, w)
    with pytest.raises(ValidationError, match="stale.*CMD"):
        open_sidecar(w, "regmean", command="CMD")


def test_open_sidecar_closes_the_file_when_the_fingerprint_fails(tmp_path, monkeypatch):
    """``weights_fingerprint`` reads the model and may raise: the sidecar opened before it is
    closed all the same (review item 5)."""
    import mergeforge.checkpoint.sidecar as sidecar
    from mergeforge.checkpoint.safetensors_file import SafetensorsFile

    w = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.ones(3, 3)}, w)
    _save(w)
    closed = []
    real_close = SafetensorsFile.close
    monkeypatch.setattr(SafetensorsFile, "close", lambda f: (closed.append(f), real_close(f)))

    def unreadable(model):
        raise OSError(5, "Input/output error", str(model))

    monkeypatch.setattr(sidecar, "weights_fingerprint", unreadable)
    with pytest.raises(OSError, match="Input/output error"):
        open_sidecar(w, "regmean", command="CMD")
    assert len(closed) == 1


def test_save_sidecar_reports_an_unwritable_place_as_a_checkpoint_error(tmp_path):
    """An OSError while writing a sidecar (a file where its folder goes, a folder where the file
    goes) is a CheckpointError naming the folder, not a traceback (review item 6)."""
    from mergeforge.errors import CheckpointError

    w = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.ones(3, 3)}, w)
    folder = tmp_path / "model.safetensors.mergeforge-stats"
    folder.write_text("in the way")
    with pytest.raises(CheckpointError, match=f"statistics of {w} into {folder} .*run again"):
        _save(w)
    folder.unlink()
    (folder / "regmean.safetensors").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="regmean statistics.*Is a directory"):
        _save(w)
    assert os.listdir(folder) == ["regmean.safetensors"]  # no temporary file left
