"""Batched host<->device copies (kernels.xp.to_device_many / to_host_many) and the packed event's move
to the device through them: as they are on numpy, exact round trips on CuPy."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_packed import assert_same, random_cells

from kernels.edm.packed import pack_event, unpack_event
from kernels.xp import (
    HostCopy,
    _pack_layout,
    cupy_available,
    get_namespace,
    to_device_many,
    to_host_many,
    to_numpy,
)


def host_arrays(rng: np.random.Generator) -> list[np.ndarray]:
    """Arrays of many dtypes, lengths (0 included) and byte sizes that are not multiples of 8."""
    return [
        rng.integers(0, 2**16, 5).astype("<u2"),
        np.zeros(0, np.float32),
        rng.integers(0, 255, 3).astype(np.uint8),
        rng.random(7) < 0.5,
        rng.integers(-(2**62), 2**62, 11).astype(np.int64),
        rng.integers(0, 2**63, 4, dtype=np.uint64),
        np.zeros(0, np.uint64),
        rng.random((9, 6)),  # 2-D float64
        rng.random(13).astype(np.float32),
        np.arange(3, dtype=np.int32)[::-1],  # not contiguous
        np.full((), 2.5),  # 0-d
        (rng.random(5) + 1j * rng.random(5)).astype(np.complex128),
        rng.integers(-(2**31), 2**31, 1).astype(np.int32),
    ]


# --- numpy: the helpers hand the arrays back --------------------------------------------------------


def test_numpy_to_device_many_returns_the_arrays(rng):
    arrays = host_arrays(rng)
    got = to_device_many(np, arrays)
    assert len(got) == len(arrays)
    assert all(g is a for g, a in zip(got, arrays, strict=True))
    assert to_device_many(np, []) == []


def test_numpy_to_host_many_returns_the_arrays(rng):
    arrays = host_arrays(rng)
    got = to_host_many(arrays)
    assert all(g is a for g, a in zip(got, arrays, strict=True))
    assert to_host_many([]) == []
    (lst,) = to_host_many([[1, 2, 3]])
    assert isinstance(lst, np.ndarray) and lst.tolist() == [1, 2, 3]


def test_pack_layout_aligns_and_separates(rng):
    arrays = host_arrays(rng)
    offsets, total = _pack_layout(arrays)
    assert all(off % 256 == 0 for off in offsets)
    ends = [off + a.nbytes for off, a in zip(offsets, arrays, strict=True)]
    assert all(end <= nxt for end, nxt in zip(ends, offsets[1:], strict=False))
    assert ends[-1] <= total and total % 256 == 0
    assert _pack_layout([]) == ([], 0)


@pytest.mark.parametrize("truth", [True, False])
def test_numpy_to_cells_views_the_wire_buffers(rng, truth):
    cells = random_cells(rng, truth=truth)
    ev = unpack_event(*pack_event(cells))
    got = ev.to_cells(np)
    assert_same(cells, got)
    # on numpy nothing is copied before the widening: float32 columns stay views of the wire buffers
    assert np.shares_memory(got.activation, ev.columns["activation"])
    assert np.shares_memory(got.time, ev.columns["time"])


# --- CuPy -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp():
    """CuPy where a CUDA device is present (the tests that take it are skipped cleanly otherwise)."""
    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    return get_namespace("cupy")


@pytest.mark.gpu
def test_to_device_many_round_trips(cp, rng):
    arrays = host_arrays(rng)
    got = to_device_many(cp, arrays)
    assert len(got) == len(arrays)
    for g, a in zip(got, arrays, strict=True):
        assert isinstance(g, cp.ndarray)
        assert g.dtype == a.dtype and g.shape == a.shape
        if g.size:
            assert g.data.ptr % 256 == 0  # aligned like a fresh allocation
        np.testing.assert_array_equal(g.get(), a)
    empty = to_device_many(cp, [np.zeros(0), np.zeros((0, 3), np.int32)])
    assert [(e.shape, e.dtype) for e in empty] == [((0,), np.float64), ((0, 3), np.int32)]


@pytest.mark.gpu
def test_to_device_many_reuses_staging_safely(cp, rng):
    # two events in a row through the one staging buffer, a larger one (the buffer grows) and a smaller
    # one after it; the host arrays are overwritten right after each call: the copies were taken by then
    sizes = [1000, 1000, 3_000_000, 10, 0, 200_000]
    shipped = []
    for n in sizes:
        host = [rng.integers(0, 2**16, n).astype("<u2"), rng.random(n).astype("<f4"), np.arange(n % 7 + 1)]
        expect = [a.copy() for a in host]
        dev = to_device_many(cp, host)
        for a in host:
            a[...] = 0
        shipped.append((dev, expect))
    cp.cuda.get_current_stream().synchronize()
    for dev, expect in shipped:
        for d, e in zip(dev, expect, strict=True):
            np.testing.assert_array_equal(d.get(), e)


@pytest.mark.gpu
def test_to_device_many_per_thread(cp, rng):
    arrays = [[rng.random(50_000 + 1000 * t)] for t in range(4)]
    got: dict[int, list] = {}

    def ship(t: int) -> None:
        for _ in range(5):
            got[t] = to_device_many(cp, arrays[t])
        cp.cuda.get_current_stream().synchronize()

    threads = [threading.Thread(target=ship, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        np.testing.assert_array_equal(got[t][0].get(), arrays[t][0])


@pytest.mark.gpu
@pytest.mark.parametrize("truth", [True, False])
def test_to_cells_on_cupy_equals_numpy(cp, rng, truth):
    events = [random_cells(rng, n=20_000 + 5000 * i, truth=truth, event_id=i) for i in range(3)]
    packed = [unpack_event(*pack_event(c)) for c in events]
    on_device = [p.to_cells(cp) for p in packed]  # back to back: the staging buffer is reused
    for p, dev in zip(packed, on_device, strict=True):
        host = p.to_cells(np)
        for name in ("geometry_id", "channel0", "channel1", "activation", "time", "measurement_id"):
            a, b = getattr(host, name), getattr(dev, name)
            if a is None:
                assert b is None
                continue
            assert isinstance(b, cp.ndarray) and b.dtype == a.dtype
            np.testing.assert_array_equal(b.get(), a)


@pytest.mark.gpu
def test_to_host_many_equals_to_numpy(cp, rng):
    table = cp.asarray(rng.random((300, 7)))
    arrays = [
        cp.arange(1001, dtype=cp.int64) * 3,
        table,
        table.T,  # not contiguous
        table[::3, 2],  # strided
        cp.zeros(0, cp.float32),
        cp.zeros((0, 6), cp.float64),
        cp.asarray(rng.random(17) < 0.5),
        cp.asarray(rng.integers(0, 2**16, 9).astype(np.uint16)),
        cp.asarray(rng.integers(0, 2**63, 5, dtype=np.uint64)),
        cp.asarray(np.float32(1.5)),  # 0-d
    ]
    expect = [to_numpy(a) for a in arrays]
    got = to_host_many(arrays)
    for g, e in zip(got, expect, strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g, e)
    # a second call with other values writes elsewhere: the first results stay as they were
    again = to_host_many([a + 1 if a.dtype != bool else ~a for a in arrays])
    for g, e in zip(got, expect, strict=True):
        np.testing.assert_array_equal(g, e)
    for g, a in zip(again, got, strict=True):
        assert not np.shares_memory(g, a)


@pytest.mark.gpu
def test_to_host_many_mixed_and_on_a_stream(cp, rng):
    host = rng.random(4)
    with cp.cuda.Stream(non_blocking=True):
        # computed and copied on a non-default stream: the copies wait for the kernel in stream order
        x = cp.arange(2_000_000, dtype=cp.float64)
        y = cp.sqrt(x) * 2
        got_host, got_y = to_host_many([host, y])
    assert got_host is host
    np.testing.assert_array_equal(got_y, np.sqrt(np.arange(2_000_000, dtype=np.float64)) * 2)


# --- copies to the host without waiting ------------------------------------------------------------


def test_host_copy_of_a_numpy_array_is_a_copy():
    a = np.arange(3, dtype=np.int64)
    copy = HostCopy(a)
    a[:] = 7  # the array moves on: the copy keeps the values it had
    assert copy.ready()
    np.testing.assert_array_equal(copy.value(), [0, 1, 2])


@pytest.mark.gpu
def test_host_copy_on_cupy_holds_the_values_of_its_time(cp):
    """The copy is queued when made: a later kernel writing the array does not change it."""
    a = cp.arange(3, dtype=cp.int64)
    copy = HostCopy(a)
    a += 10
    np.testing.assert_array_equal(copy.value(), [0, 1, 2])
    assert copy.ready()
    np.testing.assert_array_equal(HostCopy(a[::2]).value(), [10, 12])  # not contiguous
