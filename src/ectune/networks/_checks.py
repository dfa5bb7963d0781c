"""Checks of network constructor options, shared by the backbones."""

from __future__ import annotations

import numbers

from ectune.errors import ConfigError


def _is_count(v: object, minimum: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum


def check_counts(minimum: int = 1, **values: object) -> None:
    """Refuse any value that is not an int >= ``minimum``, naming the option."""
    for name, value in values.items():
        if not _is_count(value, minimum):
            raise ConfigError(f"network option {name}={value!r} must be an integer >= {minimum}")


def check_count_lists(minimum: int = 1, **values: object) -> None:
    """Refuse any value that is not a list (or tuple) of ints >= ``minimum``, naming the option."""
    for name, value in values.items():
        if not (isinstance(value, (list, tuple)) and all(_is_count(v, minimum) for v in value)):
            raise ConfigError(f"network option {name}={value!r} must be a list of integers >= {minimum} "
                              f"(on the command line, e.g. --network.kwargs.{name} [1,2])")
