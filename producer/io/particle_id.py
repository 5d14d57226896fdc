"""ACTS particle identifiers: one packed 64-bit barcode from ACTS 48's split columns.

ACTS 48 writes a particle id as five columns (particle_id_pv, _sv, _part, _gen, _subpart); older
files have one ``particle_id``. We pack the five parts as vertex_primary (12 bits), vertex_secondary
(12), particle (16), generation (8), sub_particle (16), the classic ACTS barcode layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from producer.io.errors import InputError
from producer.io.table import Column

SPLIT = ("particle_id_pv", "particle_id_sv", "particle_id_part", "particle_id_gen", "particle_id_subpart")
_BITS = (12, 12, 16, 8, 16)
_SHIFTS = (52, 40, 24, 16, 0)

COLUMNS = (
    Column("particle_id", "u8", required=False),
    *(Column(name, "i8", required=False) for name in SPLIT),
)


def packed_particle_id(path: str | Path, t: dict[str, np.ndarray]) -> np.ndarray:
    """The packed barcode from whichever id columns the table holds."""
    if all(name in t for name in SPLIT):
        out = np.zeros(t[SPLIT[0]].shape[0], np.uint64)
        for name, bits, shift in zip(SPLIT, _BITS, _SHIFTS, strict=True):
            part = t[name]
            bad = np.flatnonzero((part < 0) | (part >= (1 << bits)))
            if bad.size:
                raise InputError(
                    path, f"value {part[bad[0]]} does not fit {bits} bits", line=int(bad[0]) + 2, column=name
                )
            out |= part.astype(np.uint64) << np.uint64(shift)
        return out
    if "particle_id" in t:
        return t["particle_id"]
    raise InputError(path, f"no particle id: need 'particle_id' or all of {list(SPLIT)}")


def vertex_primary(particle_id: np.ndarray) -> np.ndarray:
    return (particle_id >> np.uint64(52)).astype(np.int64)
