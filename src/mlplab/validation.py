"""Small checks shared by config validation and the DataModules.

Every check raises :class:`~mlplab.errors.ConfigError` with ``key=value`` and what is allowed.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from mlplab.errors import ConfigError


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def positive_int(key: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{key}={_fmt(value)} is invalid; allowed: a positive integer")
    return int(value)


def int_in(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            allowed = f"an integer in {low}..{high}"
        elif high is not None:
            allowed = f"an integer <= {high}"
        else:
            allowed = "an integer" if low is None else f"an integer >= {low}"
        raise ConfigError(f"{key}={_fmt(value)} is invalid; allowed: {allowed}")
    return int(value)


def positive_number(key: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}={_fmt(value)} is invalid; allowed: a finite number > 0")
    return float(value)


def non_negative_number(key: str, value: Any, below: float | None = None) -> float:
    ok = _is_real(value) and math.isfinite(value) and value >= 0
    if ok and below is not None:
        ok = value < below
    if not ok:
        rng = f"in [0, {below})" if below is not None else ">= 0"
        raise ConfigError(f"{key}={_fmt(value)} is invalid; allowed: a finite number {rng}")
    return float(value)


def size_or_fraction(key: str, value: Any, *, optional: bool = False) -> int | float | None:
    """A split size: a positive count (int) or a fraction in (0, 1) (float)."""
    if value is None and optional:
        return None
    if _is_int(value) and value >= 1:
        return int(value)
    if _is_real(value) and not _is_int(value) and 0.0 < value < 1.0:
        return float(value)
    extra = ", or null for 'the rest'" if optional else ""
    raise ConfigError(
        f"{key}={_fmt(value)} is invalid; allowed: a count >= 1 (int) or a fraction in (0, 1) (float){extra}"
    )


def resolve_size(value: int | float, n: int) -> int:
    """A count stays a count; a fraction of ``n`` rounds to the nearest count (at least 1)."""
    if isinstance(value, float):
        return max(1, round(value * n))
    return value


def held_out_count(test_size: Any, n: int, unit: str) -> tuple[int | float, int]:
    """``data.test_size`` checked against ``n`` items: (the size as given, the test count).

    The test set must leave at least 2 of the ``n`` ``unit`` for train+val.
    """
    size = size_or_fraction("data.test_size", test_size)
    n_test = resolve_size(size, n)
    if n_test >= n - 1:
        raise ConfigError(
            f"data.test_size={test_size} leaves {n - n_test} of {n} {unit} for train+val; "
            f"allowed: a count <= {n - 2} or a fraction that leaves at least 2"
        )
    return size, n_test
