"""Shared pytest fixtures for the ectune tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

#: Numbers produced by calling the official ECT / EDM / EDM2 code (see its "_about" entry).
OFFICIAL_VALUES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_values.json"


@pytest.fixture(scope="session")
def official_values() -> dict:
    """The parsed reference/official_values.json; skips the test when the file is absent."""
    if not OFFICIAL_VALUES.exists():
        pytest.skip(f"reference values not found at {OFFICIAL_VALUES} (they live in the shared checkout)")
    return json.loads(OFFICIAL_VALUES.read_text())


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (a script folder, not a package), registered in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def benchmark_module():
    """The loader :func:`load_benchmark`, for tests of the scripts under benchmarks/."""
    return load_benchmark
