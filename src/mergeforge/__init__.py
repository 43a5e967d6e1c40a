"""mergeforge: merge, fuse and measure neural networks."""

from __future__ import annotations

import os as _os

# Large CPU tensors on transparent huge pages: fresh allocations then cost 2 MB page faults
# instead of 4 KB ones, which made every allocating op ~4x slower (measured: BENCHMARKS.md).
# Read by torch at its first allocation, so it only takes effect when set before that.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

from mergeforge.errors import CheckpointError, ConfigError, MergeforgeError, ValidationError

__all__ = [
    "__version__",
    "merge",
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
