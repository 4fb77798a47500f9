"""Checks of option values, shared by the config dataclasses' __post_init__ and the commands.

Each raises OptionError (a ValueError; the CLI prints it on one line and exits 2) naming the
option (as `flagged` writes it where the command line has one), the value given and what is
allowed. Zero or a negative number never means "default": an unset option is None.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import OptionError

SEED_MAX = 2**64 - 1  # torch seeds are 64-bit
SELF_TOKENS = 8192  # positions a causal LM samples for the data-aware statistics (selfsample.py); 0: none


def flagged(name: str, flag: str | None = None) -> str:
    """How a message names a setting both ways it is given: the library's name and the command line's option,
    "metric_tokens (--metric-tokens)". `flag` where the option is not the name with dashes."""
    return f"{name} (--{flag or name.replace('_', '-')})"


def _number(name: str, value, integer: bool) -> None:
    kind = Integral if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise OptionError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number, got {value}")


def positive(name: str, value, *, integer: bool = False) -> None:
    """value > 0 (and finite)."""
    _number(name, value, integer)
    if not value > 0:
        raise OptionError(f"{name} must be positive, got {value}")


def non_negative(name: str, value, *, integer: bool = False) -> None:
    """value >= 0 (and finite)."""
    _number(name, value, integer)
    if not value >= 0:
        raise OptionError(f"{name} must be >= 0, got {value}")


def finite(name: str, value) -> None:
    _number(name, value, False)


def seed(name: str, value) -> None:
    """An integer torch accepts as a seed: 0 .. 2**64 - 1."""
    _number(name, value, True)
    if not 0 <= value <= SEED_MAX:
        raise OptionError(f"{name} must be between 0 and 2**64 - 1, got {value}")


def distinct(name: str, values) -> None:
    """A non-empty list without repeats."""
    if not values:
        raise OptionError(f"{name} is empty; give at least one value")
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise OptionError(f"{name} lists {', '.join(map(str, repeated))} more than once")
