"""Reader for traccc/ACTS cell files (``event*-cells.csv[.gz]``), one event or many (``event_id`` column).

Columns (matched by header name): geometry_id, channel0, channel1, value; optional measurement_id
(truth cluster id), timestamp, event_id. Cells come out sorted by (geometry_id, channel1, channel0)
with duplicate cells summed, as traccc's reader does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kernels.detector import Detector
from kernels.edm.cells import (
    CHANNEL_DTYPE,
    GEOMETRY_DTYPE,
    TRUTH_DTYPE,
    VALUE_DTYPE,
    Cells,
    merge_duplicate_cells,
)
from producer.io.errors import InputError
from producer.io.table import Column, read_table

log = logging.getLogger(__name__)

CELL_COLUMNS = (
    Column("geometry_id", "u8"),
    Column("channel0", "i8"),
    Column("channel1", "i8"),
    Column("value", "f4"),
    Column("timestamp", "f4", required=False),
    Column("measurement_id", "i8", required=False),
    Column("event_id", "i8", required=False),
)


def read_cells_table(path: str | Path, detector: Detector | None = None) -> dict[str, np.ndarray]:
    """Parse and validate a cells file; rows in file order.

    Raises:
        InputError: missing columns, unparsable or out-of-range values, unknown modules.
    """
    t = read_table(path, CELL_COLUMNS)
    for name in ("channel0", "channel1"):
        bad = np.flatnonzero(t[name] < 0)
        if bad.size:
            raise InputError(path, f"negative channel {t[name][bad[0]]}", line=int(bad[0]) + 2, column=name)
        big = np.flatnonzero(t[name] > np.iinfo(CHANNEL_DTYPE).max)
        if big.size:
            raise InputError(
                path, f"channel {t[name][big[0]]} out of range", line=int(big[0]) + 2, column=name
            )
    for name in ("value", "timestamp"):
        if name in t:
            bad = np.flatnonzero(~np.isfinite(t[name]))
            if bad.size:
                raise InputError(path, "value is not finite", line=int(bad[0]) + 2, column=name)
    if "event_id" in t and t["event_id"].size and t["event_id"].min() < 0:
        bad = int(np.flatnonzero(t["event_id"] < 0)[0])
        raise InputError(path, "negative event_id", line=bad + 2, column="event_id")
    if detector is not None:
        validate_against_detector(path, t, detector)
    return t


def validate_against_detector(path: str | Path, t: dict[str, np.ndarray], detector: Detector) -> None:
    """Unknown geometry ids and channels outside a module's segmentation are errors."""
    g = t["geometry_id"]
    if g.size == 0:
        return
    module = detector.module_index(np, g)
    unknown = np.flatnonzero(module < 0)
    if unknown.size:
        k = int(unknown[0])
        raise InputError(
            path,
            f"geometry_id {int(g[k])} is not a sensitive module of the detector ({unknown.size} such rows)",
            line=k + 2,
            column="geometry_id",
        )
    bins = np.asarray(detector.seg_bins)[module]
    for axis, name in enumerate(("channel0", "channel1")):
        out = np.flatnonzero(t[name] >= bins[:, axis])
        if out.size:
            k = int(out[0])
            raise InputError(
                path,
                f"channel {int(t[name][k])} outside the module's {int(bins[k, axis])} bins "
                f"(geometry_id {int(g[k])})",
                line=k + 2,
                column=name,
            )


def _to_cells(t: dict[str, np.ndarray], rows: np.ndarray | slice, event_id: int) -> Cells:
    n = t["geometry_id"][rows].shape[0]
    cells = Cells(
        geometry_id=t["geometry_id"][rows].astype(GEOMETRY_DTYPE),
        channel0=t["channel0"][rows].astype(CHANNEL_DTYPE),
        channel1=t["channel1"][rows].astype(CHANNEL_DTYPE),
        activation=t["value"][rows].astype(VALUE_DTYPE),
        time=(t["timestamp"][rows] if "timestamp" in t else np.zeros(n)).astype(VALUE_DTYPE),
        measurement_id=t["measurement_id"][rows].astype(TRUTH_DTYPE) if "measurement_id" in t else None,
        event_id=event_id,
    )
    merged, n_dup = merge_duplicate_cells(cells)
    if n_dup:
        log.info("event %d: summed %d duplicate cells", event_id, n_dup)
    return merged


def read_cells(path: str | Path, event_id: int = 0, detector: Detector | None = None) -> Cells:
    """Read one event's cells file (an ``event_id`` column, if present, must hold one value)."""
    t = read_cells_table(path, detector)
    if "event_id" in t and t["event_id"].size:
        ids = np.unique(t["event_id"])
        if ids.size > 1:
            raise InputError(
                path, f"holds {ids.size} events; read it with read_cells_multi", column="event_id"
            )
        event_id = int(ids[0])
    return _to_cells(t, slice(None), event_id)


def read_cells_multi(path: str | Path, detector: Detector | None = None) -> list[Cells]:
    """Read a CSV holding many events, told apart by its ``event_id`` column; ascending event id."""
    t = read_cells_table(path, detector)
    if "event_id" not in t:
        raise InputError(path, "no event_id column: not a multi-event cells file")
    ev = t["event_id"]
    order = np.argsort(ev, kind="stable")
    ids, starts = np.unique(ev[order], return_index=True)
    bounds = np.r_[starts, ev.size]
    return [_to_cells(t, order[bounds[i] : bounds[i + 1]], int(e)) for i, e in enumerate(ids)]
