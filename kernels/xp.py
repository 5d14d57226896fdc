"""Array-namespace helpers: pick numpy or CuPy once, at the pipeline boundary.

Kernels receive ``xp`` explicitly; only this module knows how to find CuPy, so that no stage
imports it (style guide patterns 4 and 6).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
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


def set_pool_limit(xp: ModuleType, limit_bytes: int) -> None:
    """Bound CuPy's memory pool on the current device to ``limit_bytes`` in use and cached [bytes]
    (0: no bound; numpy: nothing to do).

    The pool keeps every freed block for reuse, one per size it was asked for, so a process serving
    batches of varying sizes ends up holding far more than any batch uses. At the limit CuPy returns
    its cached blocks to the driver and tries again; an allocation that would pass the limit even
    then raises ``cupy.cuda.memory.OutOfMemoryError`` (a ``MemoryError``): run that work again inside
    :func:`pool_limit_lifted`.
    """
    if xp is not np:
        xp.get_default_memory_pool().set_limit(size=limit_bytes)


@contextlib.contextmanager
def pool_limit_lifted(xp: ModuleType) -> Iterator[dict[str, int]]:
    """CuPy's pool on the current device without its limit for the block (work that needs more than
    the limit still runs), its cache released before and after: the limit is back afterwards, and
    what the block left cached past it is handed back at once rather than at the next growth.

    Yields:
        A dict whose ``high_water`` is, after the block, the most the pool held during it [bytes]
        (without a limit the pool only grows within the block; 0 on numpy).
    """
    seen = {"high_water": 0}
    if xp is np:
        yield seen
        return
    pool = xp.get_default_memory_pool()
    limit = pool.get_limit()
    pool.free_all_blocks()  # CuPy versions that raise at the limit without releasing the cache
    pool.set_limit(size=0)
    try:
        yield seen
    finally:
        seen["high_water"] = int(pool.total_bytes())
        pool.set_limit(size=limit)
        pool.free_all_blocks()


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


# --- batched host<->device copies ---------------------------------------------------------------

#: bytes between the arrays packed into one transfer buffer: cudaMalloc's alignment, so that each view
#: is aligned like a fresh allocation (kernels and libraries may load 16-byte types or vectors)
_PACK_ALIGN = 256
#: smallest pinned block; pinned blocks come in powers of two from this up, because CuPy's pinned
#: memory pool reuses a freed block only for a request of the same size (rounded to 512 bytes):
#: exact sizes, different for every event, would each cost a fresh cudaHostAlloc and stay in the pool
_PINNED_MIN_BYTES = 1 << 16


def _pack_layout(arrays: Sequence[Any]) -> tuple[list[int], int]:
    """Byte offset of each array in one buffer holding them all, and the buffer's size."""
    offsets, end = [], 0
    for a in arrays:
        offsets.append(end)
        end += -(-a.nbytes // _PACK_ALIGN) * _PACK_ALIGN
    return offsets, end


def _pinned_bytes(nbytes: int) -> np.ndarray:
    """A uint8 numpy array of at least ``nbytes`` bytes in page-locked memory from CuPy's pinned pool
    (returned to the pool when the array and every view of it are gone)."""
    size = max(_PINNED_MIN_BYTES, 1 << (nbytes - 1).bit_length())
    return importlib.import_module("cupyx").empty_pinned(size, dtype=np.uint8)


class _Staging(threading.local):
    """Per thread: the pinned buffer that :func:`to_device_many` copies leave from, and the CUDA event
    recorded after the last copy out of it."""

    buffer: np.ndarray | None = None
    copied: Any = None


_STAGING = _Staging()


def to_device_many(xp: ModuleType, arrays: Sequence[Any]) -> list[Array]:
    """Move several host arrays to the namespace ``xp`` in one copy.

    On CuPy the arrays are packed into a pinned staging buffer (one per thread, reused), shipped in one
    asynchronous copy on the current stream, and returned as views of one device buffer: one transfer
    at pinned bandwidth instead of a pageable copy, each with its fixed host cost, per array. The host
    arrays are copied before this returns, so their memory may be reused at once. On numpy the arrays
    come back as they are (no copies).

    Args:
        arrays: host arrays (anything ``numpy.asarray`` takes), of any shape and numeric dtype.

    Returns:
        Arrays in ``xp`` with the shapes and dtypes (in native byte order) of ``arrays``.
    """
    if xp is np:
        return [asarray(np, a) for a in arrays]
    host = [np.asarray(a) for a in arrays]
    # CuPy holds native byte order only; the wire's little-endian dtypes are native on every CUDA host
    host = [a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("=")) for a in host]
    offsets, total = _pack_layout(host)
    if total == 0:
        return [xp.empty(a.shape, dtype=a.dtype) for a in host]
    staging = _STAGING
    if staging.copied is not None:
        # the previous copy may still be reading the buffer: let it finish before writing (or freeing) it
        staging.copied.synchronize()
    if staging.buffer is None or staging.buffer.nbytes < total:
        staging.buffer = _pinned_bytes(total)
    buffer = staging.buffer
    for a, off in zip(host, offsets, strict=True):
        if a.nbytes:
            np.copyto(buffer[off : off + a.nbytes].view(a.dtype).reshape(a.shape), a, casting="no")
    device = xp.empty(total, dtype=xp.uint8)
    stream = xp.cuda.get_current_stream()
    device.set(buffer[:total], stream=stream)
    # a fresh event each time: an event can only be recorded on a stream of the device it was made on
    staging.copied = xp.cuda.Event(disable_timing=True)
    staging.copied.record(stream)
    return [
        device[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
        for a, off in zip(host, offsets, strict=True)
    ]


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def to_host_many(arrays: Sequence[Array]) -> list[np.ndarray]:
    """Host copies of several arrays with one wait for the device.

    CuPy arrays are copied asynchronously on the current stream into one block of pinned memory
    (fresh from CuPy's pinned pool, so that the results never share memory with those of another call;
    the block goes back to the pool when the last of them is gone), then the stream is synchronized
    once; one copy per array at pinned bandwidth instead of a synchronous copy, and a wait, each.
    numpy arrays come back as they are.

    Returns:
        numpy arrays with the shapes and dtypes of ``arrays`` (C-contiguous for CuPy input).
    """
    # host input as it is; CuPy entries are replaced by their copies below
    out: list[Any] = [a if isinstance(a, np.ndarray) or _is_cupy(a) else np.asarray(a) for a in arrays]
    device = [i for i, a in enumerate(arrays) if _is_cupy(a)]
    if not device:
        return out
    cupy = importlib.import_module("cupy")
    # contiguous first (a copy on the device, in stream order before the transfer); the list keeps
    # those copies alive until the transfers are done
    sources = [a if a.flags.c_contiguous else cupy.ascontiguousarray(a) for a in (arrays[i] for i in device)]
    offsets, total = _pack_layout(sources)
    block = _pinned_bytes(total) if total else np.empty(0, dtype=np.uint8)
    stream = cupy.cuda.get_current_stream()
    for i, a, off in zip(device, sources, offsets, strict=True):
        host = block[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
        if a.nbytes:
            a.get(stream=stream, out=host, blocking=False)
        out[i] = host
    stream.synchronize()
    return out


class HostCopy:
    """A small array copied to the host without waiting: the copy is queued on the current stream now,
    and :meth:`value` waits for it alone (on a stream that has moved on, no wait at all). numpy arrays
    are copied at once."""

    def __init__(self, a: Array) -> None:
        self._event: Any = None
        if isinstance(a, np.ndarray):
            self._host = a.copy()
            return
        cupy = importlib.import_module("cupy")
        a = a if a.flags.c_contiguous else cupy.ascontiguousarray(a)
        self._host = _pinned_bytes(a.nbytes)[: a.nbytes].view(a.dtype).reshape(a.shape)
        stream = cupy.cuda.get_current_stream()
        a.get(stream=stream, out=self._host, blocking=False)
        self._event = cupy.cuda.Event(disable_timing=True)
        self._event.record(stream)

    def ready(self) -> bool:
        """Whether :meth:`value` would return without waiting."""
        return self._event is None or bool(self._event.done)

    def value(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


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
