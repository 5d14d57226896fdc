"""Reader for the module table written by ACTS' ``CsvTrackingGeometryWriter`` (``detectors.csv``).

Columns used (by name): geometry_id, volume_id, layer_id, cx, cy, cz, rot_xu ... rot_zw (row-major
3x3 whose columns are the local u, v, w axes), bounds_type, bound_param0-6, and module_t (thickness,
optional). ACTS writes pitch_u/pitch_v as -1: segmentation comes from the digitization config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.io.errors import InputError
from producer.io.table import Column, read_table

ROT_COLUMNS = ("rot_xu", "rot_xv", "rot_xw", "rot_yu", "rot_yv", "rot_yw", "rot_zu", "rot_zv", "rot_zw")
COLUMNS = (
    Column("geometry_id", "u8"),
    Column("volume_id", "i8"),
    Column("layer_id", "i8"),
    Column("cx", "f8"),
    Column("cy", "f8"),
    Column("cz", "f8"),
    *(Column(c, "f8") for c in ROT_COLUMNS),
    Column("bounds_type", "i8"),
    *(Column(f"bound_param{i}", "f8", required=False) for i in range(7)),
    Column("module_t", "f8", required=False),
)


@dataclass(frozen=True)
class ModuleTable:
    """Rows of detectors.csv, sorted by geometry_id."""

    geometry_id: np.ndarray
    volume_id: np.ndarray
    layer_id: np.ndarray
    rotation: np.ndarray  # [M, 3, 3]
    translation: np.ndarray  # [M, 3]
    bounds_type: np.ndarray
    bounds: np.ndarray  # [M, 7]
    thickness: np.ndarray


def read_geometry_csv(path: str | Path) -> ModuleTable:
    """Read detectors.csv; keeps sensitive modules only (non-zero sensitive field of geometry_id)."""
    t = read_table(path, COLUMNS)
    g = t["geometry_id"]
    if g.size == 0:
        raise InputError(path, "no modules in the geometry file")
    sensitive = (g >> np.uint64(8)) & np.uint64(0xFFFFF)
    keep = np.flatnonzero(sensitive > 0)
    if keep.size == 0:
        raise InputError(path, "no sensitive modules (all geometry ids have sensitive = 0)")
    order = keep[np.argsort(g[keep], kind="stable")]
    gs = g[order]
    dup = np.flatnonzero(gs[1:] == gs[:-1])
    if dup.size:
        raise InputError(path, f"geometry_id {int(gs[dup[0]])} appears twice", column="geometry_id")
    rot = np.stack([t[c] for c in ROT_COLUMNS], axis=1).reshape(-1, 3, 3)[order]
    det = np.linalg.det(rot)
    bad = np.flatnonzero(np.abs(det - 1.0) > 1e-3)
    if bad.size:
        raise InputError(
            path,
            f"rotation of geometry_id {int(gs[bad[0]])} is not a rotation (det={det[bad[0]]:.4f})",
            column="rot_xu",
        )
    bounds = np.stack([t.get(f"bound_param{i}", np.zeros(g.size)) for i in range(7)], axis=1)[order]
    return ModuleTable(
        geometry_id=gs,
        volume_id=t["volume_id"][order].astype(np.int32),
        layer_id=t["layer_id"][order].astype(np.int32),
        rotation=rot,
        translation=np.stack([t["cx"], t["cy"], t["cz"]], axis=1)[order],
        bounds_type=t["bounds_type"][order].astype(np.int32),
        bounds=bounds,
        thickness=t.get("module_t", np.zeros(g.size))[order],
    )
