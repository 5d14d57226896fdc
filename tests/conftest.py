"""Shared fixtures: the array namespaces to test on, and the bundled data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels.xp import cupy_available, get_namespace

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "generic-mu20"

_BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=_BACKENDS)
def xp(request):
    """numpy always; CuPy where a CUDA device is present (skipped cleanly otherwise)."""
    if request.param == "cupy" and not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    return get_namespace(request.param)


@pytest.fixture(scope="session")
def bundled() -> Path:
    if not (BUNDLED / "detectors.csv.gz").exists() and not (BUNDLED / "detectors.csv").exists():
        pytest.fail(f"bundled data set missing at {BUNDLED}")
    return BUNDLED


@pytest.fixture(scope="session")
def detector(bundled, tmp_path_factory):
    from producer.io.detector import load_detector

    return load_detector(bundled, use_cache=False)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
