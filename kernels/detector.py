"""The detector as the reconstruction sees it: sensitive modules, their placement and segmentation,
the layer structure a track follower navigates, and the magnetic field.

All per-module arrays are indexed by *module index*: the position of the module in ascending
geometry_id order. ACTS packs the geometry identifier as volume (bits 56-63), boundary (48-55),
layer (36-47), approach (28-35), sensitive (8-27) and extra (0-7), so modules of one layer are
contiguous in that order.

Conventions (as ACTS): a module's rotation matrix has the local u, v, w axes as its columns, so
``global = R @ (l0, l1, 0) + centre``; lengths in mm, field in Tesla.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from types import ModuleType

import numpy as np

from kernels.xp import Array, asarray

VOLUME_SHIFT, LAYER_SHIFT, SENSITIVE_SHIFT = 56, 36, 8


def volume_of(geometry_id: Array) -> Array:
    return (geometry_id >> np.uint64(VOLUME_SHIFT)) & np.uint64(0xFF)


def layer_of(geometry_id: Array) -> Array:
    return (geometry_id >> np.uint64(LAYER_SHIFT)) & np.uint64(0xFFF)


def sensitive_of(geometry_id: Array) -> Array:
    return (geometry_id >> np.uint64(SENSITIVE_SHIFT)) & np.uint64(0xFFFFF)


def make_geometry_id(volume: int, layer: int = 0, sensitive: int = 0) -> int:
    return (volume << VOLUME_SHIFT) | (layer << LAYER_SHIFT) | (sensitive << SENSITIVE_SHIFT)


LAYER_CYLINDER = 0  # barrel layer: modules at roughly constant r
LAYER_DISC = 1  # end-cap layer: modules at roughly constant z


@dataclass(frozen=True)
class Layers:
    """Sensitive layers, one row per (volume, layer), in geometry order.

    Attributes:
        volume_id, layer_id: ACTS identifiers (int32).
        kind: LAYER_CYLINDER or LAYER_DISC (int8).
        r_min, r_max, z_min, z_max: extent of the layer's modules [mm] (float64).
        module_begin, module_end: the layer's modules are module indices [begin, end) (int32).
    """

    volume_id: np.ndarray
    layer_id: np.ndarray
    kind: np.ndarray
    r_min: np.ndarray
    r_max: np.ndarray
    z_min: np.ndarray
    z_max: np.ndarray
    module_begin: np.ndarray
    module_end: np.ndarray

    @property
    def size(self) -> int:
        return int(self.volume_id.shape[0])


@dataclass(frozen=True)
class Detector:
    """Sensitive modules of a tracking detector, structure of arrays over module index.

    Attributes:
        geometry_id: ACTS geometry identifier, ascending (uint64) [M].
        volume_id, layer_id: parts of the identifier (int32) [M].
        layer_index: row of the module's layer in :attr:`layers` (int32) [M].
        rotation: local axes u, v, w as columns (float64) [M, 3, 3].
        translation: module centre [mm] (float64) [M, 3].
        bounds_type: ACTS SurfaceBounds type (int32) [M].
        bounds: ACTS bound parameters [mm / rad] (float64) [M, 7]; unused ones are 0.
        dimension: 1 for strip modules (one measured axis, loc0), 2 for pixels (int8) [M].
        seg_bins: number of channels per local axis (int32) [M, 2].
        seg_min, seg_max: segmentation range per local axis [mm] (float64) [M, 2].
        thickness: sensor thickness [mm] (float64) [M].
        layers: the layer table.
        bfield_t: solenoid field along z [T].
    """

    geometry_id: Array
    volume_id: Array
    layer_id: Array
    layer_index: Array
    rotation: Array
    translation: Array
    bounds_type: Array
    bounds: Array
    dimension: Array
    seg_bins: Array
    seg_min: Array
    seg_max: Array
    thickness: Array
    layers: Layers
    bfield_t: float = 2.0

    def __post_init__(self) -> None:
        m = self.geometry_id.shape[0]
        for f in fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "shape") and v.shape[0] != m:
                raise ValueError(f"Detector.{f.name} has {v.shape[0]} rows, expected {m}")

    @property
    def n_modules(self) -> int:
        return int(self.geometry_id.shape[0])

    @property
    def pitch(self) -> Array:
        """Channel pitch per local axis [mm] [M, 2]."""
        return (self.seg_max - self.seg_min) / self.seg_bins

    def fingerprint(self) -> str:
        """Short hash of what the reconstruction depends on; equal detectors, equal fingerprints."""
        h = hashlib.sha256()
        for name in ("geometry_id", "rotation", "translation", "dimension", "seg_bins", "seg_min", "seg_max"):
            arr = np.ascontiguousarray(_host(getattr(self, name)))
            if arr.dtype.kind == "f":
                arr = np.round(arr, 6)  # immune to last-bit noise in the geometry file
            h.update(name.encode())
            h.update(arr.tobytes())
        h.update(np.float64(round(self.bfield_t, 9)).tobytes())
        return h.hexdigest()[:16]

    def to(self, xp: ModuleType) -> Detector:
        """Per-module arrays in namespace ``xp``; the layer table stays on the host."""
        return replace(
            self,
            **{
                f.name: asarray(xp, getattr(self, f.name))
                for f in fields(self)
                if hasattr(getattr(self, f.name), "shape")
            },
        )

    def module_index(self, xp: ModuleType, geometry_id: Array) -> Array:
        """Module index per geometry id (int32); -1 for ids that are not sensitive modules here."""
        ids = self.geometry_id
        pos = xp.searchsorted(ids, geometry_id)
        pos = xp.minimum(pos, ids.shape[0] - 1)
        found = ids[pos] == geometry_id
        return xp.where(found, pos, -1).astype(xp.int32)


def _host(a: Array) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


# --- coordinate conversions (vectorized, any namespace) ---------------------------------------


def cell_to_local(
    xp: ModuleType, det: Detector, module: Array, channel0: Array, channel1: Array
) -> tuple[Array, Array]:
    """Cell centre in local coordinates [mm]: ``min + (channel + 0.5) * pitch`` per axis."""
    lo = det.seg_min[module]
    pitch = (det.seg_max[module] - lo) / det.seg_bins[module]
    l0 = lo[:, 0] + (channel0 + 0.5) * pitch[:, 0]
    l1 = lo[:, 1] + (channel1 + 0.5) * pitch[:, 1]
    return l0, l1


def local_to_global(
    xp: ModuleType, det: Detector, module: Array, local0: Array, local1: Array
) -> tuple[Array, Array, Array]:
    """Global position [mm] of a point on the module surface."""
    rot = det.rotation[module]
    t = det.translation[module]
    x = rot[:, 0, 0] * local0 + rot[:, 0, 1] * local1 + t[:, 0]
    y = rot[:, 1, 0] * local0 + rot[:, 1, 1] * local1 + t[:, 1]
    z = rot[:, 2, 0] * local0 + rot[:, 2, 1] * local1 + t[:, 2]
    return x, y, z


def global_to_local(
    xp: ModuleType, det: Detector, module: Array, x: Array, y: Array, z: Array
) -> tuple[Array, Array, Array]:
    """Local (u, v, w) of global points [mm]; w is the distance from the module plane."""
    rot = det.rotation[module]
    t = det.translation[module]
    dx, dy, dz = x - t[:, 0], y - t[:, 1], z - t[:, 2]
    u = rot[:, 0, 0] * dx + rot[:, 1, 0] * dy + rot[:, 2, 0] * dz
    v = rot[:, 0, 1] * dx + rot[:, 1, 1] * dy + rot[:, 2, 1] * dz
    w = rot[:, 0, 2] * dx + rot[:, 1, 2] * dy + rot[:, 2, 2] * dz
    return u, v, w
