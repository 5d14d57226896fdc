"""Cells: the raw detector hits of one event (or a batch of events), as structure of arrays.

traccc's cell contract is kept: cells are grouped by module (ascending geometry_id) and sorted by
(channel1, channel0) inside a module, with duplicate cells (same module and channels) summed.
Clusterization relies on that order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Any

import numpy as np

from kernels.xp import Array, array_namespace, asarray, scatter_add, scatter_min

GEOMETRY_DTYPE = np.uint64
CHANNEL_DTYPE = np.int32
VALUE_DTYPE = np.float32
TRUTH_DTYPE = np.int64  # truth measurement id; -1 where unknown

_COLUMNS = ("geometry_id", "channel0", "channel1", "activation", "time")
_DTYPES = {
    "geometry_id": GEOMETRY_DTYPE,
    "channel0": CHANNEL_DTYPE,
    "channel1": CHANNEL_DTYPE,
    "activation": VALUE_DTYPE,
    "time": VALUE_DTYPE,
    "measurement_id": TRUTH_DTYPE,
}


def _check_columns(obj: Any, names: tuple[str, ...]) -> int:
    n = -1
    for name in names:
        col = getattr(obj, name)
        if col is None:
            continue
        if col.ndim != 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be 1-D, got shape {col.shape}")
        if col.dtype != _DTYPES[name]:
            raise TypeError(
                f"{type(obj).__name__}.{name} must have dtype {np.dtype(_DTYPES[name])}, got {col.dtype}"
            )
        if n < 0:
            n = col.shape[0]
        elif col.shape[0] != n:
            raise ValueError(f"{type(obj).__name__}: column {name} has {col.shape[0]} entries, expected {n}")
    return max(n, 0)


@dataclass(frozen=True)
class Cells:
    """Cells of one event.

    Attributes:
        geometry_id: ACTS geometry identifier of the cell's module (uint64).
        channel0: bin index along local u (int32, >= 0).
        channel1: bin index along local v (int32, >= 0; 0 on 1-D strip modules).
        activation: deposited charge / path length (float32, arbitrary units).
        time: timestamp [ns] (float32).
        measurement_id: truth cluster id written by ACTS digitization (int64), or None on real data.
        event_id: event number.
    """

    geometry_id: Array
    channel0: Array
    channel1: Array
    activation: Array
    time: Array
    measurement_id: Array | None = None
    event_id: int = 0

    def __post_init__(self) -> None:
        _check_columns(self, (*_COLUMNS, "measurement_id"))
        array_namespace(*(getattr(self, f.name) for f in fields(self) if f.name != "event_id"))

    @property
    def size(self) -> int:
        """Number of cells."""
        return int(self.geometry_id.shape[0])

    @property
    def has_truth(self) -> bool:
        return self.measurement_id is not None

    def to(self, xp: ModuleType) -> Cells:
        """The same cells in namespace ``xp`` (copies host<->device when needed)."""
        return replace(
            self,
            **{
                name: (None if getattr(self, name) is None else asarray(xp, getattr(self, name)))
                for name in (*_COLUMNS, "measurement_id")
            },
        )

    @staticmethod
    def empty(event_id: int = 0, with_truth: bool = False) -> Cells:
        return Cells(
            geometry_id=np.zeros(0, GEOMETRY_DTYPE),
            channel0=np.zeros(0, CHANNEL_DTYPE),
            channel1=np.zeros(0, CHANNEL_DTYPE),
            activation=np.zeros(0, VALUE_DTYPE),
            time=np.zeros(0, VALUE_DTYPE),
            measurement_id=np.zeros(0, TRUTH_DTYPE) if with_truth else None,
            event_id=event_id,
        )


@dataclass(frozen=True)
class CellsBatch:
    """Cells of several events, concatenated; event ``i`` owns rows
    ``event_offsets[i]:event_offsets[i+1]`` (each slice sorted as in :class:`Cells`).

    ``event_offsets`` always lives on the host (numpy int64) so that slicing never synchronizes.
    """

    geometry_id: Array
    channel0: Array
    channel1: Array
    activation: Array
    time: Array
    measurement_id: Array | None
    event_offsets: np.ndarray
    event_ids: np.ndarray

    def __post_init__(self) -> None:
        n = _check_columns(self, (*_COLUMNS, "measurement_id"))
        off = self.event_offsets
        if not isinstance(off, np.ndarray) or off.ndim != 1 or off.shape[0] < 1:
            raise ValueError("CellsBatch.event_offsets must be a 1-D host array with >= 1 entry")
        if off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
            raise ValueError("CellsBatch.event_offsets must rise from 0 to the number of cells")
        if self.event_ids.shape != (off.shape[0] - 1,):
            raise ValueError("CellsBatch.event_ids must hold one id per event")

    @property
    def n_events(self) -> int:
        return int(self.event_ids.shape[0])

    @property
    def size(self) -> int:
        return int(self.event_offsets[-1])

    @staticmethod
    def from_events(events: list[Cells]) -> CellsBatch:
        """Concatenate events (all in one namespace)."""
        if not events:
            raise ValueError("CellsBatch.from_events needs at least one event")
        xp = array_namespace(events[0].geometry_id)
        truth = all(e.has_truth for e in events)
        counts = np.array([e.size for e in events], dtype=np.int64)
        offsets = np.zeros(len(events) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        cols = {name: xp.concatenate([getattr(e, name) for e in events]) for name in _COLUMNS}
        mid = xp.concatenate([e.measurement_id for e in events]) if truth else None  # type: ignore[misc]
        return CellsBatch(
            **cols,
            measurement_id=mid,
            event_offsets=offsets,
            event_ids=np.array([e.event_id for e in events], np.int64),
        )

    def event(self, i: int) -> Cells:
        """View of event ``i`` (no copy)."""
        a, b = int(self.event_offsets[i]), int(self.event_offsets[i + 1])
        return Cells(
            **{name: getattr(self, name)[a:b] for name in _COLUMNS},
            measurement_id=None if self.measurement_id is None else self.measurement_id[a:b],
            event_id=int(self.event_ids[i]),
        )

    def events(self) -> list[Cells]:
        return [self.event(i) for i in range(self.n_events)]


def sort_cells(xp: ModuleType, geometry_id: Array, channel0: Array, channel1: Array) -> Array:
    """Permutation that sorts cells by (geometry_id, channel1, channel0); stable."""
    return _lexsort3(xp, geometry_id, channel1, channel0)


def _lexsort3(xp: ModuleType, primary: Array, secondary: Array, tertiary: Array) -> Array:
    # Stable sort by the least significant key first, then by each more significant key.
    order = xp.argsort(tertiary, kind="stable")
    order = order[xp.argsort(secondary[order], kind="stable")]
    return order[xp.argsort(primary[order], kind="stable")]


def merge_duplicate_cells(cells: Cells) -> tuple[Cells, int]:
    """Sort cells as traccc expects and sum duplicates (same module and channels).

    A merged cell keeps the earliest time and the truth id of its first occurrence in file order.

    Returns:
        The sorted, merged cells and the number of duplicate rows that were merged away.
    """
    xp = array_namespace(cells.geometry_id)
    n = cells.size
    if n == 0:
        return cells, 0
    order = _lexsort3(xp, cells.geometry_id, cells.channel1, cells.channel0)
    g = cells.geometry_id[order]
    c0 = cells.channel0[order]
    c1 = cells.channel1[order]
    new = xp.ones(n, dtype=bool)
    new[1:] = (g[1:] != g[:-1]) | (c1[1:] != c1[:-1]) | (c0[1:] != c0[:-1])
    n_unique = int(new.sum())
    if n_unique == n:
        return replace(
            cells,
            geometry_id=g,
            channel0=c0,
            channel1=c1,
            activation=cells.activation[order],
            time=cells.time[order],
            measurement_id=None if cells.measurement_id is None else cells.measurement_id[order],
        ), 0
    seg = xp.cumsum(new) - 1
    first = xp.nonzero(new)[0]
    activation = xp.zeros(n_unique, dtype=VALUE_DTYPE)
    scatter_add(xp, activation, seg, cells.activation[order])
    time = xp.full(n_unique, np.inf, dtype=VALUE_DTYPE)
    scatter_min(xp, time, seg, cells.time[order])
    return Cells(
        geometry_id=g[first],
        channel0=c0[first],
        channel1=c1[first],
        activation=activation,
        time=time,
        measurement_id=None if cells.measurement_id is None else cells.measurement_id[order][first],
        event_id=cells.event_id,
    ), n - n_unique
