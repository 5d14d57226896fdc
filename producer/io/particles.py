"""Reader for ACTS particle files (``event*-particles.csv[.gz]``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.io import particle_id
from producer.io.table import Column, read_table


@dataclass(frozen=True)
class Particles:
    """Truth particles.

    Attributes:
        particle_id: packed barcode (uint64); particle_type: PDG code (int64); process (int64);
        vertex [mm] (float64 [n, 3]); time [ns]; momentum [GeV] (float64 [n, 3]);
        mass [GeV]; charge [e].
    """

    particle_id: np.ndarray
    particle_type: np.ndarray
    process: np.ndarray
    vertex: np.ndarray
    time: np.ndarray
    momentum: np.ndarray
    mass: np.ndarray
    charge: np.ndarray

    @property
    def size(self) -> int:
        return int(self.particle_id.shape[0])

    @property
    def pt(self) -> np.ndarray:
        return np.hypot(self.momentum[:, 0], self.momentum[:, 1])

    @property
    def eta(self) -> np.ndarray:
        p = np.linalg.norm(self.momentum, axis=1)
        pz = self.momentum[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            return 0.5 * np.log((p + pz) / (p - pz))

    @property
    def phi(self) -> np.ndarray:
        return np.arctan2(self.momentum[:, 1], self.momentum[:, 0])

    @property
    def theta(self) -> np.ndarray:
        return np.arctan2(self.pt, self.momentum[:, 2])


COLUMNS = (
    *particle_id.COLUMNS,
    Column("particle_type", "i8"),
    Column("process", "i8", required=False),
    *(Column(c, "f8") for c in ("vx", "vy", "vz", "vt", "px", "py", "pz", "m", "q")),
)


def read_particles(path: str | Path) -> Particles:
    t = read_table(path, COLUMNS)
    return Particles(
        particle_id=particle_id.packed_particle_id(path, t),
        particle_type=t["particle_type"],
        process=t.get("process", np.zeros(t["vx"].shape[0], np.int64)),
        vertex=np.stack([t["vx"], t["vy"], t["vz"]], axis=1),
        time=t["vt"],
        momentum=np.stack([t["px"], t["py"], t["pz"]], axis=1),
        mass=t["m"],
        charge=t["q"],
    )
