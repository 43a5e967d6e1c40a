"""mergeforge: merge, fuse and measure neural networks."""

from __future__ import annotations

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
