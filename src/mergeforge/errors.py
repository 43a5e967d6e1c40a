"""Errors a user can act on. Each message names the file and/or tensor and says how to fix it."""

from __future__ import annotations


class MergeforgeError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 2


class ConfigError(MergeforgeError):
    """The YAML/config is wrong: unknown method or parameter, bad value, bad structure."""


class CheckpointError(MergeforgeError):
    """A checkpoint cannot be read or is unsafe/corrupt (missing path, truncated file, pickle)."""


class ValidationError(MergeforgeError):
    """Inputs are readable but cannot be merged together (missing tensor, shape, vocab, NaN)."""


def not_implemented(what: str, closest: str, see: str = "`mergeforge methods`") -> ConfigError:
    """The one message for a mergekit feature mergeforge does not have yet: what it is, the
    closest thing that works, and where to read more. Returned, for the caller to raise."""
    return ConfigError(
        f"{what} (mergekit) is not implemented in mergeforge yet; the closest available: "
        f"{closest}. See {see}."
    )
