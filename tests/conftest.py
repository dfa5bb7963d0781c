"""Shared pytest fixtures for the ectune tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: Numbers produced by calling the official ECT / EDM / EDM2 code (see its "_about" entry).
OFFICIAL_VALUES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_values.json"


@pytest.fixture(scope="session")
def official_values() -> dict:
    """The parsed reference/official_values.json; skips the test when the file is absent."""
    if not OFFICIAL_VALUES.exists():
        pytest.skip(f"reference values not found at {OFFICIAL_VALUES} (they live in the shared checkout)")
    return json.loads(OFFICIAL_VALUES.read_text())
