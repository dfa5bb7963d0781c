"""Shared pytest fixtures for the ectune tests."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

# The suite is made for CI's machines, which have no GPU. On a machine with one it would run there
# (--device auto), where the DDP tests' second process asks for a second GPU and values made on the
# CPU need not reproduce; so it hides the GPU unless ECTUNE_TEST_CUDA=1. GPU checks are scripts.
if not os.environ.get("ECTUNE_TEST_CUDA"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

#: Numbers produced by calling the official ECT / EDM / EDM2 code (see its "_about" entry).
OFFICIAL_VALUES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_values.json"


def skip_without_reference(path: Path, **kw) -> None:
    """Skip (or, under CI, where .ci/run sets ECTUNE_REQUIRE_REFERENCE=1, fail) when the official reference
    values at ``path`` are missing, so that CI cannot silently drop every official-value check."""
    if path.exists():
        return
    why = f"reference values not found at {path} (they live in the shared checkout beside the repository)"
    if os.environ.get("ECTUNE_REQUIRE_REFERENCE"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why, **kw)


@pytest.fixture(scope="session")
def official_values() -> dict:
    """The parsed reference/official_values.json; skips the test when the file is absent (fails under CI)."""
    skip_without_reference(OFFICIAL_VALUES)
    return json.loads(OFFICIAL_VALUES.read_text())


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, folder: Path = BENCHMARKS) -> ModuleType:
    """Import benchmarks/<name>.py (or ``folder``/<name>.py: a script folder, not a package), registered in
    sys.modules."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def benchmark_module():
    """The loader :func:`load_benchmark`, for tests of the scripts under benchmarks/."""
    return load_benchmark
