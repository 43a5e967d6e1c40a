"""The ground floor: the version, device resolution and the cache root (one of each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergeforge
from mergeforge.cache import cache_folder, cache_home
from mergeforge.device import resolve_device
from mergeforge.errors import ConfigError
from mergeforge.version import __version__


def test_one_version():
    assert mergeforge.__version__ is __version__
    assert __version__.count(".") == 2


def test_devices():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unsupported device 'meta'; use cpu, cuda"):
        resolve_device("meta")
    # `--device auto` (advertised by merge, prune, moe, fuse): the GPU when torch sees one
    want = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == want and resolve_device("AUTO") == want
    for bad in ("tpu", "gpu", "cuda:x", ""):  # torch.device's own RuntimeError: a traceback
        with pytest.raises(ConfigError, match=r"unsupported device .*; use cpu, cuda .*auto"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda was requested but no CUDA GPU"):
            resolve_device("cuda")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEFORGE_CACHE", str(tmp_path))
    assert cache_home() == tmp_path
    assert cache_folder("vision") == tmp_path / "vision"
    assert cache_folder("vision", tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv("MERGEFORGE_CACHE", "")  # empty counts as unset
    assert cache_home() == Path.home() / ".cache" / "mergeforge"
    monkeypatch.delenv("MERGEFORGE_CACHE")
    assert cache_folder("text-suite") == Path.home() / ".cache" / "mergeforge" / "text-suite"
