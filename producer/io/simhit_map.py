"""Reader for ACTS measurement -> simulated-hit maps (``event*-measurement-simhit-map.csv[.gz]``).

hit_id is the row index of the hit in the event's hits file. Order is kept as written: ACTS' own
reader re-sorts measurements but not this map, which breaks truth association silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.io.errors import InputError
from producer.io.table import Column, read_table


@dataclass(frozen=True)
class SimHitMap:
    """measurement_id -> hit_id pairs (int64); a measurement may come from several hits."""

    measurement_id: np.ndarray
    hit_id: np.ndarray

    @property
    def size(self) -> int:
        return int(self.measurement_id.shape[0])


COLUMNS = (Column("measurement_id", "i8"), Column("hit_id", "i8"))


def read_simhit_map(path: str | Path, n_hits: int | None = None) -> SimHitMap:
    """Read the map; with ``n_hits`` given, hit ids outside the hits file are errors."""
    t = read_table(path, COLUMNS)
    for name in ("measurement_id", "hit_id"):
        bad = np.flatnonzero(t[name] < 0)
        if bad.size:
            raise InputError(path, "negative id", line=int(bad[0]) + 2, column=name)
    if n_hits is not None:
        bad = np.flatnonzero(t["hit_id"] >= n_hits)
        if bad.size:
            raise InputError(
                path,
                f"hit_id {t['hit_id'][bad[0]]} beyond the {n_hits} hits",
                line=int(bad[0]) + 2,
                column="hit_id",
            )
    return SimHitMap(measurement_id=t["measurement_id"], hit_id=t["hit_id"])
