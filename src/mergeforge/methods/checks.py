"""Checks for parameter records: each failure names the parameter and what it accepts."""

from __future__ import annotations

import math
from typing import Any

from mergeforge.errors import ConfigError


def fail(name: str, value: Any, valid: str) -> None:
    raise ConfigError(f"parameter {name!r} = {value!r} is invalid: expected {valid}")


def check_real(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> None:
    """A finite number in [lo, hi] (ints are accepted: YAML writes ``weight: 1``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        bounded = lo > -math.inf or hi < math.inf
        fail(name, value, f"a finite number in [{lo}, {hi}]" if bounded else "a finite number")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(name, value, "true or false")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(name, value, "one of " + ", ".join(choices))
