"""Build a :class:`kernels.detector.Detector` from ``detectors.csv`` + a digitization config, with a
binary cache so that a worker loads the 18,728-module generic detector in milliseconds.

The cache lives in ``$TRACKFLEET_CACHE_DIR`` (default ``~/.cache/trackfleet``), keyed by a hash of
both input files and the field, so an edited input is never served stale.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from kernels.detector import LAYER_CYLINDER, LAYER_DISC, Detector, Layers
from producer.io.digitization import read_digitization, segmentation_for
from producer.io.errors import InputError
from producer.io.geometry_csv import read_geometry_csv

log = logging.getLogger(__name__)

BOUNDS_RECTANGLE = 6  # ACTS SurfaceBounds::eRectangle: minX, minY, maxX, maxY
BOUNDS_TRAPEZOID = 7  # ACTS SurfaceBounds::eTrapezoid: halfXnegY, halfXposY, halfY, rotation
CACHE_VERSION = 1
GEOMETRY_NAMES = ("detectors.csv", "detectors.csv.gz")
DIGI_NAMES = ("digitization-config.json", "digitization-config.json.gz")
DEFAULT_BFIELD_T = 2.0


def find_detector_files(directory: str | Path) -> tuple[Path, Path]:
    """The geometry and digitization files in ``directory`` (or its parent, for event sub-folders)."""
    d = Path(directory)
    for base in (d, d.parent):
        geo = next((base / n for n in GEOMETRY_NAMES if (base / n).is_file()), None)
        digi = next((base / n for n in DIGI_NAMES if (base / n).is_file()), None)
        if geo and digi:
            return geo, digi
    raise InputError(d, f"no detector description: need one of {GEOMETRY_NAMES} and one of {DIGI_NAMES}")


def module_extent(bounds_type: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local (min, max) corners [M, 2] of each module's bounds."""
    lo = np.zeros((bounds.shape[0], 2))
    hi = np.zeros((bounds.shape[0], 2))
    rect = bounds_type == BOUNDS_RECTANGLE
    lo[rect], hi[rect] = bounds[rect][:, [0, 1]], bounds[rect][:, [2, 3]]
    trap = bounds_type == BOUNDS_TRAPEZOID
    hx = np.maximum(bounds[trap][:, 0], bounds[trap][:, 1])
    hy = bounds[trap][:, 2]
    lo[trap] = np.stack([-hx, -hy], axis=1)
    hi[trap] = np.stack([hx, hy], axis=1)
    other = ~(rect | trap)
    if other.any():
        raise ValueError(f"unsupported bounds types {sorted(set(bounds_type[other].tolist()))}")
    return lo, hi


def build_layers(
    volume_id: np.ndarray,
    layer_id: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
) -> tuple[Layers, np.ndarray]:
    """Layer table from module placements; modules must be in geometry order."""
    key = volume_id.astype(np.int64) * 4096 + layer_id
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], key.size]
    # corners of every module in global coordinates: [M, 4, 3]
    cu = np.stack([lo[:, 0], hi[:, 0], hi[:, 0], lo[:, 0]], axis=1)
    cv = np.stack([lo[:, 1], lo[:, 1], hi[:, 1], hi[:, 1]], axis=1)
    corners = (
        rotation[:, None, :, 0] * cu[..., None]
        + rotation[:, None, :, 1] * cv[..., None]
        + translation[:, None, :]
    )
    r = np.hypot(corners[..., 0], corners[..., 1])
    z = corners[..., 2]
    r_c = np.hypot(translation[:, 0], translation[:, 1])
    normal_z = np.abs(rotation[:, 2, 2])
    n = starts.size
    kind = np.zeros(n, np.int8)
    r_min, r_max, z_min, z_max = (np.zeros(n) for _ in range(4))
    layer_index = np.zeros(key.size, np.int32)
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        kind[i] = LAYER_DISC if np.median(normal_z[a:b]) > 0.5 else LAYER_CYLINDER
        # a module's inner edge can be closer to the axis than its corners: use the centre too
        r_min[i] = min(r[a:b].min(), r_c[a:b].min())
        r_max[i], z_min[i], z_max[i] = r[a:b].max(), z[a:b].min(), z[a:b].max()
        layer_index[a:b] = i
    layers = Layers(
        volume_id=volume_id[starts].astype(np.int32),
        layer_id=layer_id[starts].astype(np.int32),
        kind=kind,
        r_min=r_min,
        r_max=r_max,
        z_min=z_min,
        z_max=z_max,
        module_begin=starts.astype(np.int32),
        module_end=ends.astype(np.int32),
    )
    return layers, layer_index


def build_detector(
    geometry_path: str | Path, digi_path: str | Path, bfield_t: float = DEFAULT_BFIELD_T
) -> Detector:
    """Parse both files into a Detector (slow path; see :func:`load_detector` for the cached one)."""
    mods = read_geometry_csv(geometry_path)
    seg = segmentation_for(digi_path, read_digitization(digi_path), mods.geometry_id)
    try:
        lo, hi = module_extent(mods.bounds_type, mods.bounds)
    except ValueError as exc:
        raise InputError(geometry_path, str(exc), column="bounds_type") from None
    # An unsegmented axis spans the whole module: one channel, centred on the module.
    seg_min = np.where(np.isnan(seg.seg_min), lo, seg.seg_min)
    seg_max = np.where(np.isnan(seg.seg_max), hi, seg.seg_max)
    thickness = np.where(np.isnan(seg.thickness), mods.thickness, seg.thickness)
    layers, layer_index = build_layers(mods.volume_id, mods.layer_id, mods.rotation, mods.translation, lo, hi)
    return Detector(
        geometry_id=mods.geometry_id,
        volume_id=mods.volume_id,
        layer_id=mods.layer_id,
        layer_index=layer_index,
        rotation=mods.rotation,
        translation=mods.translation,
        bounds_type=mods.bounds_type,
        bounds=mods.bounds,
        dimension=seg.dimension,
        seg_bins=seg.bins,
        seg_min=seg_min,
        seg_max=seg_max,
        thickness=thickness,
        layers=layers,
        bfield_t=float(bfield_t),
    )


_LAYER_FIELDS = (
    "volume_id",
    "layer_id",
    "kind",
    "r_min",
    "r_max",
    "z_min",
    "z_max",
    "module_begin",
    "module_end",
)
_MODULE_FIELDS = (
    "geometry_id",
    "volume_id",
    "layer_id",
    "layer_index",
    "rotation",
    "translation",
    "bounds_type",
    "bounds",
    "dimension",
    "seg_bins",
    "seg_min",
    "seg_max",
    "thickness",
)


def save_detector(det: Detector, path: str | Path) -> None:
    """Binary form of a detector (npz)."""
    arrays = {f"m_{k}": np.asarray(getattr(det, k)) for k in _MODULE_FIELDS}
    arrays.update({f"l_{k}": getattr(det.layers, k) for k in _LAYER_FIELDS})
    p = Path(path)
    tmp = p.with_suffix(".tmp.npz")
    np.savez(tmp, version=np.int64(CACHE_VERSION), bfield_t=np.float64(det.bfield_t), **arrays)
    os.replace(tmp, p)  # atomic: concurrent workers never read a half-written cache


def read_detector_npz(path: str | Path) -> Detector:
    with np.load(path) as z:
        if int(z["version"]) != CACHE_VERSION:
            raise InputError(path, f"detector cache version {int(z['version'])}, expected {CACHE_VERSION}")
        layers = Layers(**{k: z[f"l_{k}"] for k in _LAYER_FIELDS})
        return Detector(
            **{k: z[f"m_{k}"] for k in _MODULE_FIELDS}, layers=layers, bfield_t=float(z["bfield_t"])
        )


def cache_dir() -> Path:
    return Path(os.environ.get("TRACKFLEET_CACHE_DIR", Path.home() / ".cache" / "trackfleet"))


def load_detector(
    source: str | Path,
    digi_path: str | Path | None = None,
    bfield_t: float = DEFAULT_BFIELD_T,
    use_cache: bool = True,
) -> Detector:
    """Load a detector.

    Args:
        source: a directory holding detectors.csv[.gz] and digitization-config.json (or its parent does),
            a ``detectors.csv`` path (then ``digi_path`` is required), or a cached ``.npz``.
        digi_path: the digitization config when ``source`` is a geometry file.
        bfield_t: solenoid field [T] along z.
        use_cache: read/write the binary cache.
    """
    src = Path(source)
    if src.suffix == ".npz":
        return read_detector_npz(src)
    if src.is_dir():
        geo, digi = find_detector_files(src)
    else:
        if digi_path is None:
            raise InputError(src, "a geometry file needs a digitization config (digi_path)")
        geo, digi = src, Path(digi_path)
    h = hashlib.sha1()
    for p in (geo, digi):
        try:
            h.update(p.read_bytes())
        except OSError as exc:
            raise InputError(p, f"cannot read ({exc.strerror})") from None
    h.update(repr((round(bfield_t, 9), CACHE_VERSION)).encode())
    cached = cache_dir() / f"detector-{h.hexdigest()[:20]}.npz"
    if use_cache and cached.is_file():
        try:
            return read_detector_npz(cached)
        except Exception as exc:  # a broken cache is rebuilt, never fatal
            log.warning("ignoring unreadable detector cache %s: %s", cached, exc)
    det = build_detector(geo, digi, bfield_t)
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_detector(det, cached)
        except OSError as exc:
            log.warning("cannot write detector cache %s: %s", cached, exc)
    return det
