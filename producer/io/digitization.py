"""Reader for ACTS digitization configurations (geometry-hierarchy-map JSON).

Each entry names a volume and optionally layer / sensitive (and boundary / approach / extra) and
holds ``value.geometric.segmentation.binningdata``: per local axis ("binX" = loc0, "binY" = loc1)
the number of bins and the range [min, max] in mm. A module takes the most specific entry that
matches its geometry id. An axis without binning data, or with one bin, is not segmented: the
module is 1-D (a strip) and its ``indices`` list only loc0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.io.errors import InputError
from producer.io.table import read_text

# key -> (shift, mask) in the ACTS geometry identifier
_FIELDS = {
    "volume": (56, 0xFF),
    "boundary": (48, 0xFF),
    "layer": (36, 0xFFF),
    "approach": (28, 0xFF),
    "sensitive": (8, 0xFFFFF),
    "extra": (0, 0xFF),
}


@dataclass(frozen=True)
class Segmentation:
    """Per-module segmentation; rows follow the geometry ids given to :func:`segmentation_for`.

    Attributes:
        bins (int32 [M, 2]); seg_min, seg_max (float64 [M, 2], mm; NaN where the axis is unsegmented);
        dimension (int8 [M]): number of measured axes; thickness (float64 [M], mm, NaN if not given).
    """

    bins: np.ndarray
    seg_min: np.ndarray
    seg_max: np.ndarray
    dimension: np.ndarray
    thickness: np.ndarray


@dataclass(frozen=True)
class _Entry:
    key: dict[str, int]
    bins: tuple[int, int]
    lo: tuple[float, float]
    hi: tuple[float, float]
    dimension: int
    thickness: float


def _parse_entry(path: str | Path, k: int, entry: Any) -> _Entry | None:
    if not isinstance(entry, dict) or "value" not in entry:
        raise InputError(path, f"entry {k} is not an object with a 'value'")
    key = {f: entry[f] for f in _FIELDS if f in entry}
    for f, v in key.items():
        if not isinstance(v, int) or v < 0 or v > _FIELDS[f][1]:
            raise InputError(path, f"entry {k}: {f}={v!r} is not a valid identifier part")
    geo = entry["value"].get("geometric") if isinstance(entry["value"], dict) else None
    if geo is None:
        return None  # smearing-only entry: no cells to describe
    seg = geo.get("segmentation", {}).get("binningdata")
    if not isinstance(seg, list) or not seg:
        raise InputError(path, f"entry {k}: geometric config without segmentation.binningdata")
    bins, lo, hi = [1, 1], [np.nan, np.nan], [np.nan, np.nan]
    for b in seg:
        try:
            axis = {"binX": 0, "binY": 1}[b["value"]]
            nb, mn, mx = int(b["bins"]), float(b["min"]), float(b["max"])
        except (KeyError, TypeError, ValueError):
            raise InputError(path, f"entry {k}: bad binningdata {b!r}") from None
        if nb < 1 or not mx > mn:
            raise InputError(path, f"entry {k}: binningdata needs bins >= 1 and max > min, got {b!r}")
        bins[axis], lo[axis], hi[axis] = nb, mn, mx
    indices = geo.get("indices")
    if isinstance(indices, list) and indices:
        dim = len(indices)
    else:
        dim = int(bins[0] > 1) + int(bins[1] > 1)
    dim = 1 if bins[1] <= 1 else dim
    return _Entry(
        key, (bins[0], bins[1]), (lo[0], lo[1]), (hi[0], hi[1]), dim, float(geo.get("thickness", np.nan))
    )


def read_digitization(path: str | Path) -> list[_Entry]:
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg})", line=exc.lineno) from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InputError(path, "no 'entries' list: not an ACTS geometry-hierarchy-map")
    parsed = [_parse_entry(path, k, e) for k, e in enumerate(entries)]
    return [e for e in parsed if e is not None]


def segmentation_for(path: str | Path, entries: list[_Entry], geometry_id: np.ndarray) -> Segmentation:
    """Segmentation of each module: the most specific matching entry wins.

    Raises:
        InputError: a module that no entry covers.
    """
    m = geometry_id.shape[0]
    best = np.full(m, -1, np.int64)
    best_rank = np.full(m, -1, np.int64)
    for k, e in enumerate(entries):
        match = np.ones(m, bool)
        for f, v in e.key.items():
            shift, mask = _FIELDS[f]
            match &= ((geometry_id >> np.uint64(shift)) & np.uint64(mask)) == np.uint64(v)
        rank = len(e.key)
        take = match & (rank >= best_rank)
        best[take], best_rank[take] = k, rank
    missing = np.flatnonzero(best < 0)
    if missing.size:
        raise InputError(
            path,
            f"no digitization entry for geometry_id {int(geometry_id[missing[0]])} ({missing.size} modules)",
        )
    e_bins = np.array([e.bins for e in entries], np.int32)
    e_lo = np.array([e.lo for e in entries])
    e_hi = np.array([e.hi for e in entries])
    e_dim = np.array([e.dimension for e in entries], np.int8)
    e_t = np.array([e.thickness for e in entries])
    return Segmentation(e_bins[best], e_lo[best], e_hi[best], e_dim[best], e_t[best])
