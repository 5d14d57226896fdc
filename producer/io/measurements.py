"""Reader for ACTS measurement files (``event*-measurements.csv[.gz]``).

ACTS 48 writes ``local_key`` (the bit mask of measured parameters: 2 = loc0, 4 = loc1, 6 = both)
as a raw byte rather than as digits; both forms are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.io.errors import InputError
from producer.io.table import Column, read_table


def parse_local_key(text: str) -> int:
    """``"6"`` or the raw byte ``"\\x06"`` -> 6."""
    s = text.strip()
    if s.isdigit():
        return int(s)
    raw = text.strip(" ")
    if len(raw) == 1:
        return ord(raw)
    raise ValueError(f"local_key {text!r} is neither a number nor a single byte")


@dataclass(frozen=True)
class TruthMeasurements:
    """Measurements as ACTS digitization wrote them, in file order.

    Attributes:
        measurement_id (int64), geometry_id (uint64), local_key (int8: bit mask of measured axes),
        local0, local1 [mm], var_local0, var_local1 [mm^2], time [ns] (float64);
        global_xyz [mm] (float64 [n, 3]) when the file has ACTS 48's global columns, else None.
    """

    measurement_id: np.ndarray
    geometry_id: np.ndarray
    local_key: np.ndarray
    local0: np.ndarray
    local1: np.ndarray
    var_local0: np.ndarray
    var_local1: np.ndarray
    time: np.ndarray
    global_xyz: np.ndarray | None

    @property
    def size(self) -> int:
        return int(self.measurement_id.shape[0])

    @property
    def dimension(self) -> np.ndarray:
        """Number of measured local axes (1 or 2)."""
        return ((self.local_key & 2) > 0).astype(np.int8) + ((self.local_key & 4) > 0).astype(np.int8)


COLUMNS = (
    Column("measurement_id", "i8"),
    Column("geometry_id", "u8"),
    Column("local_key", "i8", converter=parse_local_key),
    Column("local0", "f8"),
    Column("local1", "f8"),
    Column("var_local0", "f8"),
    Column("var_local1", "f8"),
    Column("time", "f8", required=False),
    Column("global_x", "f8", required=False),
    Column("global_y", "f8", required=False),
    Column("global_z", "f8", required=False),
)


def read_measurements(path: str | Path) -> TruthMeasurements:
    t = read_table(path, COLUMNS)
    bad = np.flatnonzero((t["local_key"] < 0) | (t["local_key"] > 255))
    if bad.size:
        raise InputError(path, f"local_key {t['local_key'][bad[0]]} out of range", line=int(bad[0]) + 2)
    has_global = all(c in t for c in ("global_x", "global_y", "global_z"))
    return TruthMeasurements(
        measurement_id=t["measurement_id"],
        geometry_id=t["geometry_id"],
        local_key=t["local_key"].astype(np.int8),
        local0=t["local0"],
        local1=t["local1"],
        var_local0=t["var_local0"],
        var_local1=t["var_local1"],
        time=t.get("time", np.zeros_like(t["local0"])),
        global_xyz=np.stack([t["global_x"], t["global_y"], t["global_z"]], axis=1) if has_global else None,
    )
