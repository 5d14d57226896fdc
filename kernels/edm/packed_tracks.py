"""Compact binary form of one event's tracks: a small msgpack header plus raw column buffers.

The reply counterpart of :mod:`kernels.edm.packed`: a worker packs the :class:`~kernels.edm.tracks.Tracks`
it reconstructed, the header and columns travel as separate ZeroMQ frames (sent without copying), and the
producer unpacks them into ``numpy.frombuffer`` views of the received frames. Columns keep the dtypes
the chain produced (from a small allowed set), so a track that crossed the fleet is bit-identical to one
reconstructed in-process.

Header (msgpack map)::

    {"format": "trackfleet.tracks", "version": 1, "event_id": int, "n_tracks": T, "n_meas": M,
     "columns": [[name, dtype, n_values], ...]}

with one buffer per listed column, in order; ``params`` holds ``T*5`` values (row-major [T, 5]), ``cov``
``T*25`` ([T, 5, 5]), ``meas_offsets`` ``T+1``, the ``meas_*`` columns ``M`` and the others ``T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from kernels.edm.packed import decode_columns, decode_header
from kernels.edm.tracks import Tracks
from kernels.errors import EventFormatError
from kernels.xp import to_numpy

FORMAT_NAME = "trackfleet.tracks"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_TRACKS = 10_000_000  # far above any real event (mu=200 has ~1e4 tracks); bounds memory on bad input
MAX_MEASUREMENTS = 500_000_000

# column -> (allowed little-endian wire dtypes, canonical dtype used when the chain's dtype is not allowed,
#            per-row shape, row count: "T" tracks, "T+1" or "M" measurements)
_COLUMNS: dict[str, tuple[frozenset[str], str, tuple[int, ...], str]] = {
    "params": (frozenset({"<f8", "<f4"}), "<f8", (5,), "T"),
    "cov": (frozenset({"<f8", "<f4"}), "<f8", (5, 5), "T"),
    "chi2": (frozenset({"<f8", "<f4"}), "<f8", (), "T"),
    "ndf": (frozenset({"<i4", "<i8"}), "<i4", (), "T"),
    "n_holes": (frozenset({"<i4", "<i8"}), "<i4", (), "T"),
    "meas_offsets": (frozenset({"<i8"}), "<i8", (), "T+1"),
    "meas_geometry_id": (frozenset({"<u8"}), "<u8", (), "M"),
    "meas_local0": (frozenset({"<f8", "<f4"}), "<f8", (), "M"),
    "meas_local1": (frozenset({"<f8", "<f4"}), "<f8", (), "M"),
    "meas_dimension": (frozenset({"|i1", "<i1"}), "|i1", (), "M"),
    "meas_truth_id": (frozenset({"<i8"}), "<i8", (), "M"),
}


def _wire(a: np.ndarray, name: str) -> np.ndarray:
    allowed, canonical, _, _ = _COLUMNS[name]
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dt.str not in allowed:
        dt = np.dtype(canonical)
    return np.ascontiguousarray(a, dtype=dt)


def pack_tracks(tracks: Tracks) -> tuple[bytes, list[np.ndarray]]:
    """Pack tracks into (header, column buffers); device arrays are copied to the host first.

    Returns:
        The msgpack header and one contiguous little-endian numpy array per column (send them with
        ``copy=False``; they stay valid as long as the caller keeps them).
    """
    t = tracks.to_numpy()
    cols = {name: _wire(to_numpy(getattr(t, name)), name) for name in _COLUMNS}
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "event_id": int(t.event_id),
        "n_tracks": int(t.size),
        "n_meas": int(cols["meas_geometry_id"].shape[0]),
        "columns": [[name, a.dtype.str, int(a.size)] for name, a in cols.items()],
    }
    return msgpack.packb(header), list(cols.values())


def _expected_rows(kind: str, n_tracks: int, n_meas: int) -> int:
    return {"T": n_tracks, "T+1": n_tracks + 1, "M": n_meas}[kind]


def unpack_tracks(header: bytes | memoryview, buffers: Sequence[Any]) -> Tracks:
    """Decode packed tracks without copying their columns.

    Raises:
        EventFormatError: naming what is wrong (format, version, column, length, offsets).
    """
    h = decode_header(header, FORMAT_NAME, FORMAT_VERSION, "tracks")
    event_id, n_tracks, n_meas, spec = h.get("event_id"), h.get("n_tracks"), h.get("n_meas"), h.get("columns")
    if isinstance(event_id, bool) or not isinstance(event_id, int) or event_id < 0:
        raise EventFormatError(f"event_id must be a non-negative integer, got {event_id!r}")
    if isinstance(n_tracks, bool) or not isinstance(n_tracks, int) or not 0 <= n_tracks <= MAX_TRACKS:
        raise EventFormatError(f"n_tracks must be an integer in [0, {MAX_TRACKS}], got {n_tracks!r}")
    if isinstance(n_meas, bool) or not isinstance(n_meas, int) or not 0 <= n_meas <= MAX_MEASUREMENTS:
        raise EventFormatError(f"n_meas must be an integer in [0, {MAX_MEASUREMENTS}], got {n_meas!r}")
    flat = decode_columns(spec, buffers, {name: c[0] for name, c in _COLUMNS.items()})
    cols: dict[str, np.ndarray] = {}
    for name, values in flat.items():
        _, _, row_shape, kind = _COLUMNS[name]
        rows = _expected_rows(kind, n_tracks, n_meas)
        per_row = int(np.prod(row_shape, dtype=np.int64)) if row_shape else 1
        if values.shape[0] != rows * per_row:
            raise EventFormatError(
                f"column {name!r} lists {values.shape[0]} values, expected {rows * per_row}"
            )
        cols[name] = values.reshape((rows, *row_shape))
    missing = [c for c in _COLUMNS if c not in cols]
    if missing:
        raise EventFormatError(f"packed tracks lack columns {missing}")
    off = cols["meas_offsets"]
    if off[0] != 0 or off[-1] != n_meas or (n_tracks and np.any(off[1:] < off[:-1])):
        raise EventFormatError("meas_offsets must rise from 0 to n_meas")
    try:
        return Tracks(**cols, event_id=event_id)
    except (ValueError, TypeError) as exc:  # pragma: no cover - shapes were checked above
        raise EventFormatError(f"packed tracks are inconsistent: {exc}") from exc
