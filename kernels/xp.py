"""Array-namespace helpers: pick numpy or CuPy once, at the pipeline boundary.

Kernels receive ``xp`` explicitly; only this module knows how to find CuPy, so that no stage
imports it (style guide patterns 4 and 6).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or cupy.ndarray; kernels are duck-typed over both

BACKENDS = ("numpy", "cupy")


def get_namespace(backend: str) -> ModuleType:
    """Return the array module for ``backend`` ("numpy" or "cupy").

    Raises:
        ValueError: unknown backend name.
        RuntimeError: CuPy requested but not importable or no CUDA device is visible.
    """
    if backend == "numpy":
        return np
    if backend == "cupy":
        try:
            cupy = importlib.import_module("cupy")
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "backend 'cupy' needs CuPy: install the 'gpu' extra (pip install -e '.[gpu]')"
            ) from exc
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(f"backend 'cupy': no usable CUDA device ({exc})") from exc
        if n < 1:  # pragma: no cover
            raise RuntimeError("backend 'cupy': no CUDA device visible")
        _configure_allocator(cupy, n)
        return cupy
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


#: environment variable choosing CuPy's device allocator: "pool" (CuPy's memory pool, the default) or
#: "async" (CUDA's stream-ordered allocator, which splits and merges its blocks: a worker keeps about
#: its peak in use instead of the pool's cached blocks of every size it ever asked for)
ALLOCATOR_ENV = "TRACKFLEET_CUDA_ALLOCATOR"
_ALLOCATOR_SET: list[str] = []


def _configure_allocator(cupy: ModuleType, n_devices: int) -> None:
    choice = os.environ.get(ALLOCATOR_ENV, "pool")
    if choice not in ("pool", "async"):
        raise ValueError(f"{ALLOCATOR_ENV} must be 'pool' or 'async', not {choice!r}")
    if choice == "pool" or _ALLOCATOR_SET:
        return
    rt = cupy.cuda.runtime
    release_threshold = getattr(rt, "cudaMemPoolAttrReleaseThreshold", 4)
    for device in range(n_devices):
        # keep freed memory in the pool between batches (the default threshold 0 returns it to the
        # driver at every synchronization, and the next batch maps it again)
        rt.memPoolSetAttribute(rt.deviceGetDefaultMemPool(device), release_threshold, 2**64 - 1)
    cupy.cuda.set_allocator(cupy.cuda.MemoryAsyncPool("default").malloc)
    _ALLOCATOR_SET.append(choice)


def cupy_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    try:
        get_namespace("cupy")
    except (RuntimeError, ValueError):
        return False
    return True


def backend_name(xp: ModuleType) -> str:
    """Name of an array namespace: "numpy" or "cupy"."""
    name = xp.__name__.split(".")[0]
    if name not in BACKENDS:
        raise TypeError(f"unsupported array namespace {xp.__name__!r}; expected numpy or cupy")
    return name


def array_namespace(*arrays: Array) -> ModuleType:
    """Namespace of the given arrays; refuses to mix numpy and CuPy arrays."""
    found: set[str] = set()
    for a in arrays:
        if a is None:
            continue
        mod = type(a).__module__.split(".")[0]
        found.add("cupy" if mod == "cupy" else "numpy")
    if len(found) > 1:
        raise TypeError("arrays from numpy and CuPy mixed in one call")
    if found == {"cupy"}:
        return importlib.import_module("cupy")
    return np


def to_numpy(a: Array) -> np.ndarray:
    """Host copy of an array (no copy for numpy input)."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    if get is None:
        return np.asarray(a)
    return get()


def asarray(xp: ModuleType, a: Any, dtype: Any = None) -> Array:
    """Move ``a`` to the namespace ``xp`` (host->device copy for CuPy)."""
    if xp is np:
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


# --- operations whose spelling differs between numpy and CuPy -----------------------------------


def scatter_add(xp: ModuleType, out: Array, index: Array, values: Any) -> None:
    """``out[index] += values`` with repeated indices accumulated (numpy ``add.at``)."""
    if hasattr(xp.add, "at"):  # numpy, CuPy >= 13
        xp.add.at(out, index, values)
    else:  # pragma: no cover - older CuPy
        importlib.import_module("cupyx").scatter_add(out, index, values)


def scatter_min(xp: ModuleType, out: Array, index: Array, values: Any) -> None:
    """``out[index] = min(out[index], values)`` with repeated indices (numpy ``minimum.at``)."""
    if hasattr(xp.minimum, "at"):  # numpy, CuPy >= 13
        xp.minimum.at(out, index, values)
    else:  # pragma: no cover - older CuPy
        importlib.import_module("cupyx").scatter_min(out, index, values)


def scatter_max(xp: ModuleType, out: Array, index: Array, values: Any) -> None:
    """``out[index] = max(out[index], values)`` with repeated indices (numpy ``maximum.at``)."""
    if hasattr(xp.maximum, "at"):  # numpy, CuPy >= 13
        xp.maximum.at(out, index, values)
    else:  # pragma: no cover - older CuPy
        importlib.import_module("cupyx").scatter_max(out, index, values)


def argsort_stable(xp: ModuleType, a: Array) -> Array:
    """Stable argsort of a 1-D array. On the GPU a radix sort: chaining these from the least to the
    most significant key gives ``lexsort``'s order, which CuPy computes with a comparison sort."""
    if xp is np:
        return np.argsort(a, kind="stable")
    return xp.argsort(a)


_DEVICE_CONSTANTS: dict[tuple, Any] = {}


def device_constant(xp: ModuleType, key: tuple, make: Callable[[], np.ndarray]) -> Array:
    """A constant array in ``xp`` (``make()`` on the host), copied once per namespace and ``key``: a copy
    from host memory waits for the device, so hot paths take their constants from here. Keys name values
    (never object ids); a handful per process, the cache is emptied past 64."""
    full = (xp.__name__, *key)
    hit = _DEVICE_CONSTANTS.get(full)
    if hit is None:
        if len(_DEVICE_CONSTANTS) >= 64:
            _DEVICE_CONSTANTS.clear()
        hit = _DEVICE_CONSTANTS[full] = xp.asarray(make())
    return hit


def repeat_index(xp: ModuleType, counts: Array, total: int | None = None) -> Array:
    """``repeat(arange(len(counts)), counts)`` (int64); CuPy's repeat takes no array of counts.

    Args:
        total: ``counts.sum()`` when the caller knows it (on the GPU this saves a wait for the device).
    """
    counts = counts.astype(xp.int64, copy=False)  # no launch for counts that are int64 already
    if xp is np:
        return np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    offsets = xp.cumsum(counts)
    if total is None:
        total = int(offsets[-1]) if counts.shape[0] else 0
    return xp.searchsorted(offsets, xp.arange(total, dtype=xp.int64), side="right").astype(
        xp.int64, copy=False
    )
