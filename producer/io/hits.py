"""Reader for ACTS simulated-hit files (``event*-hits.csv[.gz]``); row index = hit_id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.io import particle_id
from producer.io.table import Column, read_table


@dataclass(frozen=True)
class Hits:
    """Simulated hits in file order.

    Attributes:
        particle_id: packed barcode (uint64); geometry_id (uint64);
        position [mm] (float64 [n, 3]); time [ns]; momentum [GeV] before the hit (float64 [n, 3]);
        index: hit number along the particle's path (int64).
    """

    particle_id: np.ndarray
    geometry_id: np.ndarray
    position: np.ndarray
    time: np.ndarray
    momentum: np.ndarray
    index: np.ndarray

    @property
    def size(self) -> int:
        return int(self.geometry_id.shape[0])


COLUMNS = (
    *particle_id.COLUMNS,
    Column("geometry_id", "u8"),
    *(Column(c, "f8") for c in ("tx", "ty", "tz", "tt", "tpx", "tpy", "tpz")),
    Column("index", "i8", required=False),
)


def read_hits(path: str | Path) -> Hits:
    t = read_table(path, COLUMNS)
    return Hits(
        particle_id=particle_id.packed_particle_id(path, t),
        geometry_id=t["geometry_id"],
        position=np.stack([t["tx"], t["ty"], t["tz"]], axis=1),
        time=t["tt"],
        momentum=np.stack([t["tpx"], t["tpy"], t["tpz"]], axis=1),
        index=t.get("index", np.zeros(t["tx"].shape[0], np.int64)),
    )
