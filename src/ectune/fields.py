"""``opt(default, help)``: a dataclass field that carries its help text (shown by ``--help``)."""

from __future__ import annotations

import dataclasses
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A frozen-dataclass field with a default and help text. Mutable defaults (dict, list) are copied."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
