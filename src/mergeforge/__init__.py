"""mergeforge: merge, fuse and measure neural networks."""

from __future__ import annotations

import os as _os

# Large CPU tensors on transparent huge pages: fresh allocations then cost 2 MB page faults
# instead of 4 KB ones, which made every allocating op ~4x slower (measured: BENCHMARKS.md).
# Read by torch at its first allocation, so it only takes effect when set before that.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mergeforge.errors import CheckpointError, ConfigError, MergeforgeError, ValidationError
from mergeforge.version import __version__

__all__ = [
    "__version__",
    "merge",
    "merge_state_dicts",
    "load_config",
    "MergeConfig",
    "MergeforgeError",
    "ConfigError",
    "CheckpointError",
    "ValidationError",
]


def merge(config, out, **options):
    """Merge the models described by ``config`` (path, YAML string or dict) into folder ``out``.

    Mirrors ``mergeforge merge CONFIG OUT``; see :func:`mergeforge.engine.run_merge` for options.
    """
    from mergeforge.engine import run_merge

    return run_merge(config, out, **options)


_LAZY = {
    "merge_state_dicts": "mergeforge.engine",
    "load_config": "mergeforge.config",
    "MergeConfig": "mergeforge.config",
}
"""Public names imported on first use, so ``import mergeforge`` stays light (no torch)."""


def __getattr__(name: str):
    """``mergeforge.merge_state_dicts`` (the in-memory merge), ``mergeforge.load_config`` (the
    one constructor of a merge config) and ``mergeforge.MergeConfig``, imported when used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergeforge' has no attribute {name!r}")
