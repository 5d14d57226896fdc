"""The packed binary event: round trip, zero-copy unpacking, size, and rejection of bad blobs."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from kernels.edm.cells import Cells, CellsBatch, merge_duplicate_cells
from kernels.edm.packed import event_from_bytes, event_to_bytes, pack_event, unpack_event
from kernels.errors import EventFormatError


def random_cells(rng, n=5000, n_modules=300, truth=True, event_id=11):
    g = (rng.integers(1, 10, n).astype(np.uint64) << np.uint64(56)) | rng.integers(1, n_modules, n).astype(
        np.uint64
    ) << np.uint64(8)
    cells = Cells(
        geometry_id=g,
        channel0=rng.integers(0, 1400, n).astype(np.int32),
        channel1=rng.integers(0, 300, n).astype(np.int32),
        activation=rng.random(n).astype(np.float32),
        time=rng.random(n).astype(np.float32),
        measurement_id=rng.integers(0, 10**6, n) if truth else None,
        event_id=event_id,
    )
    return merge_duplicate_cells(cells)[0]


def assert_same(a: Cells, b: Cells) -> None:
    assert a.event_id == b.event_id
    for name in ("geometry_id", "channel0", "channel1", "activation", "time"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    if a.measurement_id is None:
        assert b.measurement_id is None
    else:
        np.testing.assert_array_equal(np.asarray(a.measurement_id), np.asarray(b.measurement_id))


@pytest.mark.parametrize("truth", [True, False])
def test_round_trip_frames_and_file(rng, truth):
    cells = random_cells(rng, truth=truth)
    header, buffers = pack_event(cells, detector="abc123")
    ev = unpack_event(header, [memoryview(b) for b in buffers])
    assert ev.detector == "abc123" and ev.n_cells == cells.size
    assert_same(cells, ev.to_cells())
    assert_same(cells, event_from_bytes(event_to_bytes(header, buffers)).to_cells())


def test_round_trip_on_device(xp, rng):
    cells = random_cells(rng)
    header, buffers = pack_event(cells)
    assert_same(cells, unpack_event(header, buffers).to_cells(xp).to(np))


def test_unpack_does_not_copy(rng):
    cells = random_cells(rng)
    blob = bytearray(event_to_bytes(*pack_event(cells)))
    ev = event_from_bytes(blob)
    # the columns are views of the blob: writing into the blob shows through
    off = bytes(blob).find(ev.columns["activation"].tobytes())
    blob[off : off + 4] = np.float32(42.0).tobytes()
    assert ev.columns["activation"][0] == np.float32(42.0)


def test_compact_size(rng):
    cells = random_cells(rng, n=100_000, n_modules=500)
    _, buffers = pack_event(cells)
    per_cell = sum(b.nbytes for b in buffers) / cells.size
    assert per_cell <= 17  # u16 channels + f32 activation/time + u32 truth + run-length modules
    zero_time = Cells(**{**{f: getattr(cells, f) for f in ("geometry_id", "channel0", "channel1", "activation",
                                                           "measurement_id", "event_id")},
                         "time": np.zeros(cells.size, np.float32)})  # fmt: skip
    _, buffers = pack_event(zero_time)
    assert sum(b.nbytes for b in buffers) / cells.size <= 13  # no time column


@pytest.mark.parametrize("truth", [True, False])
def test_zero_times_are_not_sent(xp, rng, truth):
    """All-zero times (simulated events) travel as no column at all and come back as zeros; one
    non-zero time sends the whole column."""
    from dataclasses import replace

    cells = random_cells(rng, truth=truth)
    cells = replace(cells, time=np.zeros(cells.size, np.float32))
    header, buffers = pack_event(cells)
    assert "time" not in [c[0] for c in msgpack.unpackb(header)["columns"]]
    assert_same(cells, unpack_event(header, buffers).to_cells(xp).to(np))
    times = np.zeros(cells.size, np.float32)
    times[-1] = 1.5
    cells = replace(cells, time=times)
    header, buffers = pack_event(cells)
    assert "time" in [c[0] for c in msgpack.unpackb(header)["columns"]]
    assert_same(cells, unpack_event(header, buffers).to_cells(xp).to(np))


def test_empty_event_round_trip():
    cells = Cells.empty(event_id=4, with_truth=True)
    assert_same(cells, unpack_event(*pack_event(cells)).to_cells())


def test_batch_offsets(rng):
    events = [random_cells(rng, n=100 * (i + 1), event_id=i) for i in range(3)]
    batch = CellsBatch.from_events(events)
    assert batch.event_offsets.tolist()[-1] == sum(e.size for e in events)
    for i, e in enumerate(events):
        assert_same(e, batch.event(i))


def _header(**over):
    h = {
        "format": "trackfleet.event",
        "version": 1,
        "event_id": 1,
        "n_cells": 0,
        "detector": "",
        "columns": [],
    }
    h.update(over)
    return msgpack.packb(h)


@pytest.mark.parametrize(
    ("header", "buffers", "fragment"),
    [
        (b"\xc1garbage", [], "not valid msgpack"),
        (_header(version=99), [], "version 99"),
        (_header(format="other"), [], "not a trackfleet event"),
        (_header(n_cells=-1), [], "n_cells"),
        (_header(columns=[["channel0", "<u2", 4]]), [], "buffers arrived"),
        (_header(columns=[["evil", "<u2", 0]]), [b""], "unknown or repeated column"),
        (_header(columns=[["channel0", "<f8", 0]]), [b""], "dtype"),
        (_header(n_cells=4, columns=[["channel0", "<u2", 4]]), [b"\0" * 7], "truncated"),
        (_header(), [], "lacks columns"),
    ],
)
def test_bad_packed_events(header, buffers, fragment):
    with pytest.raises(EventFormatError, match=fragment):
        unpack_event(header, buffers)


def test_truncated_blob(rng):
    blob = event_to_bytes(*pack_event(random_cells(rng)))
    for cut in (3, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(EventFormatError):
            event_from_bytes(blob[:cut])
    with pytest.raises(EventFormatError, match="magic"):
        event_from_bytes(b"XXXX" + blob[4:])
