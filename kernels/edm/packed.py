"""Compact binary form of one event's cells: a small msgpack header plus raw column buffers.

Used on the wire (header and columns travel as separate ZeroMQ frames, sent without copying) and
as a file format for fast reloading (``.tfev``: magic, header length, header, 8-byte aligned
columns). Unpacking never copies: columns are ``numpy.frombuffer`` views of the received buffers;
widening to the in-memory dtypes happens in :meth:`PackedEvent.to_cells` on the target device.

Sizes: modules are run-length encoded (cells are grouped by module), channels travel as uint16
when they fit, the truth id as uint32 when it fits, and the time column only when some cell has a
non-zero time (the chain does not read it; simulated events carry zeros). A mu=200 event (~326k cells)
packs to ~4 MB, ~5.3 MB with times.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import msgpack
import numpy as np

from kernels.edm.cells import CHANNEL_DTYPE, GEOMETRY_DTYPE, TRUTH_DTYPE, VALUE_DTYPE, Cells
from kernels.errors import EventFormatError
from kernels.xp import repeat_index, to_device_many, to_numpy

FORMAT_NAME = "trackfleet.event"
FORMAT_VERSION = 1
FILE_MAGIC = b"TFEV"
MAX_HEADER_BYTES = 64 * 1024
MAX_CELLS = 50_000_000  # far above any real event (mu=200 is ~3e5); bounds memory on bad input

# column name -> allowed wire dtypes (little endian)
_ALLOWED = {
    "module_ids": {"<u8"},
    "module_counts": {"<u4"},
    "channel0": {"<u2", "<i4"},
    "channel1": {"<u2", "<i4"},
    "activation": {"<f4"},
    "time": {"<f4"},
    "measurement_id": {"<u4", "<i8"},
}
_REQUIRED = ("module_ids", "module_counts", "channel0", "channel1", "activation")  # time: zeros when absent
_TO_DEVICE = ("module_counts", "module_ids", "channel0", "channel1", "activation", "time", "measurement_id")


@dataclass(frozen=True)
class PackedEvent:
    """Zero-copy view of a packed event.

    Attributes:
        event_id: event number.
        detector: fingerprint of the detector the event was made for ("" if unknown).
        columns: column name -> numpy view of the wire buffer.
    """

    event_id: int
    detector: str
    columns: dict[str, np.ndarray]

    @property
    def n_cells(self) -> int:
        return int(self.columns["channel0"].shape[0])

    @property
    def n_modules(self) -> int:
        return int(self.columns["module_ids"].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.columns.values())

    def to_cells(self, xp: ModuleType = np) -> Cells:
        """Materialize as :class:`Cells` in namespace ``xp``; small buffers go to the device first."""
        names = [name for name in _TO_DEVICE if name in self.columns]
        # all columns in one host->device copy (on CuPy: one pinned transfer instead of one pageable
        # copy per column)
        c = dict(zip(names, to_device_many(xp, [self.columns[n] for n in names]), strict=True))
        # module id of every cell from the run lengths, on the device: CuPy's repeat with per-element
        # counts is not a single kernel
        # (the unpacking checked that the counts add up to n_cells)
        owner = repeat_index(xp, c["module_counts"], self.n_cells)
        geometry_id = c["module_ids"][owner]
        mid = c.get("measurement_id")
        time = (
            c["time"].astype(VALUE_DTYPE, copy=False) if "time" in c else xp.zeros(self.n_cells, VALUE_DTYPE)
        )
        return Cells(
            geometry_id=geometry_id.astype(GEOMETRY_DTYPE, copy=False),
            channel0=c["channel0"].astype(CHANNEL_DTYPE),
            channel1=c["channel1"].astype(CHANNEL_DTYPE),
            activation=c["activation"].astype(VALUE_DTYPE, copy=False),
            time=time,
            measurement_id=None if mid is None else mid.astype(TRUTH_DTYPE),
            event_id=self.event_id,
        )


def _narrow(a: np.ndarray, small: str, wide: str) -> np.ndarray:
    small_dt = np.dtype(small)
    if a.size == 0 or (a.min() >= np.iinfo(small_dt).min and a.max() <= np.iinfo(small_dt).max):
        return a.astype(small_dt)
    return a.astype(np.dtype(wide))


def pack_event(cells: Cells, detector: str = "") -> tuple[bytes, list[np.ndarray]]:
    """Pack sorted cells into (header, column buffers).

    Raises:
        ValueError: cells are not grouped by module (pack sorted cells, as the readers return them).
    """
    g = to_numpy(cells.geometry_id)
    n = g.shape[0]
    if n:
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        module_ids = g[starts]
        if np.any(module_ids[1:] <= module_ids[:-1]):
            raise ValueError("pack_event needs cells grouped by module in ascending geometry_id")
        counts = np.diff(np.r_[starts, n]).astype("<u4")
    else:
        module_ids = np.zeros(0, GEOMETRY_DTYPE)
        counts = np.zeros(0, "<u4")
    cols: dict[str, np.ndarray] = {
        "module_ids": module_ids.astype("<u8"),
        "module_counts": counts,
        "channel0": _narrow(to_numpy(cells.channel0), "<u2", "<i4"),
        "channel1": _narrow(to_numpy(cells.channel1), "<u2", "<i4"),
        "activation": to_numpy(cells.activation).astype("<f4", copy=False),
    }
    time = to_numpy(cells.time).astype("<f4", copy=False)
    if time.any():  # all zeros (simulation): not sent, the reader restores them
        cols["time"] = time
    if cells.measurement_id is not None:
        cols["measurement_id"] = _narrow(to_numpy(cells.measurement_id), "<u4", "<i8")
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "event_id": int(cells.event_id),
        "n_cells": int(n),
        "detector": detector,
        "columns": [[name, a.dtype.str, int(a.shape[0])] for name, a in cols.items()],
    }
    return msgpack.packb(header), [np.ascontiguousarray(a) for a in cols.values()]


def decode_header(header: bytes | memoryview, format_name: str, version: int, what: str) -> dict[str, Any]:
    """The msgpack header of a packed object, checked for size, type, format name and version.

    Raises:
        EventFormatError: naming what is wrong.
    """
    if len(header) > MAX_HEADER_BYTES:
        raise EventFormatError(f"{what} header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as exc:
        raise EventFormatError(f"{what} header is not valid msgpack: {exc}") from exc
    if not isinstance(h, dict):
        raise EventFormatError(f"{what} header must be a map")
    if h.get("format") != format_name:
        raise EventFormatError(f"not a trackfleet {what} (format={h.get('format')!r})")
    if h.get("version") != version:
        raise EventFormatError(
            f"{what} format version {h.get('version')!r} is not supported (this build reads {version})"
        )
    return h


def decode_columns(
    spec: Any, buffers: Sequence[Any], allowed: Mapping[str, Collection[str]]
) -> dict[str, np.ndarray]:
    """The columns a packed header lists (``[name, dtype, count]`` each), as 1-D views of their buffers.

    Raises:
        EventFormatError: a column entry malformed, unknown, repeated or of a dtype ``allowed`` does not
            list, a buffer without the buffer interface, or of the wrong size.
    """
    if not isinstance(spec, list) or len(spec) != len(buffers):
        raise EventFormatError(
            f"header lists {len(spec) if isinstance(spec, list) else 'no'} columns but "
            f"{len(buffers)} buffers arrived"
        )
    cols: dict[str, np.ndarray] = {}
    for entry, buf in zip(spec, buffers, strict=True):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise EventFormatError(f"bad column entry {entry!r}")
        name, dtype, count = entry
        if not isinstance(name, str) or name not in allowed or name in cols:
            raise EventFormatError(f"unknown or repeated column {name!r}")
        if dtype not in allowed[name]:
            raise EventFormatError(f"column {name!r} has dtype {dtype!r}; allowed {sorted(allowed[name])}")
        dt = np.dtype(dtype)
        try:
            mv = memoryview(buf)
        except TypeError as exc:
            raise EventFormatError(f"column {name!r}: buffer has no buffer interface") from exc
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or count < 0
            or mv.nbytes != count * dt.itemsize
        ):
            raise EventFormatError(
                f"column {name!r}: {mv.nbytes} bytes for {count!r} values of {dtype} (truncated?)"
            )
        cols[name] = np.frombuffer(mv, dtype=dt)
    return cols


def unpack_event(header: bytes | memoryview, buffers: Sequence[Any]) -> PackedEvent:
    """Decode a packed event without copying its columns.

    Raises:
        EventFormatError: naming what is wrong (format, version, column, length).
    """
    h = decode_header(header, FORMAT_NAME, FORMAT_VERSION, "event")
    event_id, n_cells, det, spec = (
        h.get("event_id"),
        h.get("n_cells"),
        h.get("detector", ""),
        h.get("columns"),
    )
    if not isinstance(event_id, int) or event_id < 0:
        raise EventFormatError(f"event_id must be a non-negative integer, got {event_id!r}")
    if not isinstance(n_cells, int) or not 0 <= n_cells <= MAX_CELLS:
        raise EventFormatError(f"n_cells must be an integer in [0, {MAX_CELLS}], got {n_cells!r}")
    if not isinstance(det, str):
        raise EventFormatError("detector fingerprint must be a string")
    cols = decode_columns(spec, buffers, _ALLOWED)
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise EventFormatError(f"packed event lacks columns {missing}")
    for name in ("channel0", "channel1", "activation", "time", "measurement_id"):
        if name in cols and cols[name].shape[0] != n_cells:
            raise EventFormatError(f"column {name!r} has {cols[name].shape[0]} values, n_cells={n_cells}")
    if cols["module_ids"].shape != cols["module_counts"].shape:
        raise EventFormatError("module_ids and module_counts differ in length")
    if int(cols["module_counts"].sum(dtype=np.int64)) != n_cells:
        raise EventFormatError("module_counts do not add up to n_cells")
    for name in ("channel0", "channel1"):
        if cols[name].dtype.kind == "i" and cols[name].size and cols[name].min() < 0:
            raise EventFormatError(f"column {name!r} holds negative channels")
    return PackedEvent(event_id=event_id, detector=det, columns=cols)


# --- file form ----------------------------------------------------------------------------------

_PREFIX = struct.Struct("<4sI")


def _pad(n: int) -> int:
    return (-n) % 8


def event_to_bytes(header: bytes, buffers: Sequence[np.ndarray]) -> bytes:
    """Single-blob form: magic, header length, header, then 8-byte aligned columns."""
    parts = [_PREFIX.pack(FILE_MAGIC, len(header)), header, b"\0" * _pad(_PREFIX.size + len(header))]
    for b in buffers:
        raw = memoryview(b).cast("B")
        parts.extend([raw, b"\0" * _pad(raw.nbytes)])
    return b"".join(parts)


def event_from_bytes(blob: bytes | memoryview) -> PackedEvent:
    """Inverse of :func:`event_to_bytes`, zero-copy over ``blob``."""
    mv = memoryview(blob).cast("B")
    if mv.nbytes < _PREFIX.size:
        raise EventFormatError(f"packed event of {mv.nbytes} bytes is truncated (no prefix)")
    magic, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != FILE_MAGIC:
        raise EventFormatError(f"bad magic {bytes(magic)!r}, expected {FILE_MAGIC!r}")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > mv.nbytes:
        raise EventFormatError(f"packed event truncated or corrupt: header length {hlen}")
    header = mv[_PREFIX.size : _PREFIX.size + hlen]
    try:
        spec = msgpack.unpackb(header, raw=False).get("columns", [])
    except Exception as exc:
        raise EventFormatError(f"event header is not valid msgpack: {exc}") from exc
    pos = _PREFIX.size + hlen
    pos += _pad(pos)
    buffers = []
    for entry in spec if isinstance(spec, list) else []:
        try:
            nbytes = int(entry[2]) * np.dtype(entry[1]).itemsize
        except Exception as exc:
            raise EventFormatError(f"bad column entry {entry!r}") from exc
        if pos + nbytes > mv.nbytes:
            raise EventFormatError(
                f"packed event truncated: column {entry[0]!r} needs {nbytes} bytes at offset {pos}, "
                f"blob has {mv.nbytes}"
            )
        buffers.append(mv[pos : pos + nbytes])
        pos += nbytes + _pad(nbytes)
    return unpack_event(header, buffers)
