"""Packed tracks: round trip (bit-identical, zero-copy), dtypes kept, and rejection of bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from kernels.edm.packed_tracks import pack_tracks, unpack_tracks
from kernels.edm.tracks import Tracks
from kernels.errors import EventFormatError


def random_tracks(rng: np.random.Generator, n: int = 40, event_id: int = 7) -> Tracks:
    counts = rng.integers(3, 15, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    m = int(offsets[-1])
    a = rng.normal(size=(n, 5, 5))
    return Tracks(
        params=rng.normal(size=(n, 5)),
        cov=a @ a.transpose(0, 2, 1),
        chi2=rng.random(n) * 20,
        ndf=rng.integers(1, 30, n).astype(np.int32),
        n_holes=rng.integers(0, 3, n).astype(np.int32),
        meas_offsets=offsets,
        meas_geometry_id=rng.integers(1, 2**62, m).astype(np.uint64),
        meas_local0=rng.normal(size=m),
        meas_local1=rng.normal(size=m),
        meas_dimension=rng.integers(1, 3, m).astype(np.int8),
        meas_truth_id=rng.integers(-1, 10**6, m),
        event_id=event_id,
    )


def assert_same_tracks(a: Tracks, b: Tracks) -> None:
    assert a.event_id == b.event_id
    for name in a.__dataclass_fields__:
        if name == "event_id":
            continue
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def to_frames(header: bytes, buffers: list[np.ndarray]) -> tuple[bytes, list[bytes]]:
    return header, [b.tobytes() for b in buffers]


def test_round_trip_is_bit_identical(rng):
    tracks = random_tracks(rng)
    header, buffers = pack_tracks(tracks)
    assert_same_tracks(tracks, unpack_tracks(*to_frames(header, buffers)))


def test_empty_tracks_round_trip():
    empty = Tracks.empty(event_id=3)
    assert_same_tracks(empty, unpack_tracks(*to_frames(*pack_tracks(empty))))


def test_float32_columns_are_kept(rng):
    t = random_tracks(rng, n=5)
    t32 = Tracks(**{**t.__dict__, "params": t.params.astype(np.float32), "chi2": t.chi2.astype(np.float32)})
    out = unpack_tracks(*to_frames(*pack_tracks(t32)))
    assert out.params.dtype == np.float32 and out.chi2.dtype == np.float32
    assert_same_tracks(t32, out)


def test_round_trip_from_device(xp, rng):
    tracks = random_tracks(rng).to(xp)
    header, buffers = pack_tracks(tracks)
    assert all(isinstance(b, np.ndarray) for b in buffers)
    assert_same_tracks(tracks.to_numpy(), unpack_tracks(header, buffers))


def test_unpack_does_not_copy(rng):
    header, buffers = pack_tracks(random_tracks(rng, n=3))
    raw = [bytearray(b.tobytes()) for b in buffers]
    out = unpack_tracks(header, raw)
    raw[2][:8] = np.float64(123.5).tobytes()  # chi2 of track 0
    assert out.chi2[0] == 123.5


def _header(**changes):
    def edit(header: bytes) -> bytes:
        h = msgpack.unpackb(header)
        h.update(changes)
        return msgpack.packb(h)

    return edit


@pytest.mark.parametrize(
    ("edit_header", "edit_buffers", "match"),
    [
        (lambda h: b"\xc1garbage", None, "msgpack"),
        (lambda h: msgpack.packb([1, 2]), None, "map"),
        (_header(format="trackfleet.event"), None, "not a trackfleet tracks"),
        (_header(version=99), None, "version 99"),
        (_header(n_tracks=-1), None, "n_tracks"),
        (_header(event_id="x"), None, "event_id"),
        (None, lambda b: b[:-1], "buffers arrived"),
        (None, lambda b: [b[0][:-8], *b[1:]], "truncated"),
        (_header(n_meas=10**12), None, "n_meas"),
    ],
)
def test_rejects_bad_input(rng, edit_header, edit_buffers, match):
    header, buffers = to_frames(*pack_tracks(random_tracks(rng, n=4)))
    if edit_header:
        header = edit_header(header)
    if edit_buffers:
        buffers = edit_buffers(buffers)
    with pytest.raises(EventFormatError, match=match):
        unpack_tracks(header, buffers)


def test_rejects_bad_dtype_and_offsets(rng):
    t = random_tracks(rng, n=4)
    header, buffers = to_frames(*pack_tracks(t))
    h = msgpack.unpackb(header)
    h["columns"][0][1] = "<i8"
    with pytest.raises(EventFormatError, match="dtype"):
        unpack_tracks(msgpack.packb(h), buffers)
    bad = Tracks(**{**t.__dict__, "meas_offsets": t.meas_offsets[::-1].copy()})
    with pytest.raises(EventFormatError, match="meas_offsets"):
        unpack_tracks(*to_frames(*pack_tracks(bad)))


def test_rejects_oversized_header():
    with pytest.raises(EventFormatError, match="exceeds"):
        unpack_tracks(b"\x00" * (65 * 1024), [])
