"""Writer and reader for seeds with their estimated track parameters (``event<N>-seeds.csv``).

Columns: seed_id; measurement_id_{bottom,middle,top} (truth ids carried by the cells, -1 if unknown);
{x,y,z}_{bottom,middle,top} [mm]; weight (seed-filter quality); z_vertex [mm] (z at the beam line);
geometry_id of the bottom spacepoint's module; the bound parameters on that module loc0, loc1 [mm],
phi, theta [rad], qop [e/GeV] and their variances var_<name>.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from producer.io.events import event_file_name
from producer.io.table import Column, read_table

SP = ("bottom", "middle", "top")
BOUND = ("loc0", "loc1", "phi", "theta", "qop")
HEADER = [
    "seed_id",
    *(f"measurement_id_{s}" for s in SP),
    *(f"{c}_{s}" for s in SP for c in "xyz"),
    "weight",
    "z_vertex",
    "geometry_id",
    *BOUND,
    *(f"var_{b}" for b in BOUND),
]
_INT = {"seed_id", "geometry_id", *(f"measurement_id_{s}" for s in SP)}
COLUMNS = tuple(Column(h, "u8" if h == "geometry_id" else "i8" if h in _INT else "f8") for h in HEADER)


def seeds_path(out_dir: str | Path, event_id: int) -> Path:
    return Path(out_dir) / event_file_name(event_id, "seeds")


def write_seeds(out_dir: str | Path, event_id: int, table: dict[str, np.ndarray]) -> Path:
    """Write columns (``HEADER`` names; seed_id may be omitted) as one CSV."""
    path = seeds_path(out_dir, event_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = next(iter(table.values())).shape[0] if table else 0
    cols = []
    for h in HEADER:
        v = np.arange(n) if h == "seed_id" and h not in table else np.asarray(table[h])
        cols.append(v)
    fmt = ["%d" if h in _INT else "%.9g" for h in HEADER]
    with path.open("w") as f:
        f.write(",".join(HEADER) + "\n")
        if n:
            data = np.empty((n, len(HEADER)), dtype=object)
            for k, c in enumerate(cols):
                data[:, k] = c
            np.savetxt(f, data, delimiter=",", fmt=fmt)
    return path


def read_seeds(out_dir: str | Path, event_id: int) -> dict[str, np.ndarray]:
    return read_table(seeds_path(out_dir, event_id), COLUMNS)
