"""What every evaluation domain's data loaders share.

Data are read from installed packages (PyPI, npm, Debian) and never downloaded at run time: a
missing one is :class:`DataPackageMissing`, whose message is the exact install command.
"""

from __future__ import annotations

from mergeforge.errors import MergeforgeError


class DataPackageMissing(MergeforgeError):
    """A data package is not installed; the message gives the exact install command."""
