"""Checks of network constructor options, shared by the backbones."""

from __future__ import annotations

import numbers

from ectune.errors import ConfigError


def check_counts(minimum: int = 1, **values: object) -> None:
    """Refuse any value that is not an int >= ``minimum`` (a list: every item), naming the option."""
    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in items):
            what = "a list of integers" if items is value else "an integer"
            raise ConfigError(f"network option {name}={value!r} must be {what} >= {minimum}")
