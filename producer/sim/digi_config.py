"""Geometric digitization configuration for the ACTS generic detector, written by us.

ACTS' geometric digitization turns each simulated hit into real cells: the hit's path through the
sensor is projected onto a Cartesian readout grid and every crossed cell gets the path length as its
activation. The grid per module comes from a geometry-hierarchy-map JSON file. ACTS ships such a file
for the generic detector, but we derive ours from the tracking geometry itself so that the cell
pitches are the ones our reconstruction assumes (domain.md section 2) and nothing is vendored.

Segmentation rule, per sensitive module:

* The grid spans the module's bounding box in local coordinates: ``[-hx, hx] x [-hy, hy]`` for a
  rectangle and ``[-max(hx_neg, hx_pos), max(...)] x [-hy, hy]`` for a trapezoid (cells outside a
  trapezoid are never hit because ACTS masks the path with the surface bounds first).
* Bins per axis = ``round(2 * half_length / pitch)``; the edges are the exact bounds, so the pitch is
  the nominal one whenever the length is a multiple of it (true for every module of this detector).
* Pixels (volumes 7, 8, 9): 50 um x 50 um, measurement indices ``[0, 1]`` (2-D, local_key 6).
* Short strips (12, 13, 14): 80 um x 1.2 mm, indices ``[0, 1]`` (2-D with a coarse loc1).
* Long strips (16, 17, 18): 120 um along loc0 and a single bin spanning the module along loc1,
  indices ``[0]`` only, so these are genuine 1-D strip measurements (local_key 2). This differs from
  ACTS' own file, whose long strips are 2-D with 10.4 mm cells.
* thickness 0.15 / 0.25 / 0.35 mm (ACTS' values), threshold 0, analogue (``digital`` false), and no
  charge smearing, so a cell's activation is the deposited path length.

Entries are grouped per (volume, layer) when every module of the layer has the same bounds (all
barrels and pixel endcaps), otherwise one entry per sensitive module (strip endcaps, which mix
trapezoid rings).

The pure functions (:func:`build_digi_config`) take plain :class:`ModuleShape` records so they can be
tested without ``acts``; :func:`module_shapes` is the only part that reads an ACTS tracking geometry.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

#: Relative mismatch between nominal and realised pitch above which we warn (the module length is
#: not a multiple of the pitch, so the cells are slightly narrower than nominal).
PITCH_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ReadoutSpec:
    """Readout technology of one detector region.

    Attributes:
        name: human-readable technology name (for logs and README tables).
        pitch0_mm: cell size along local 0 [mm].
        pitch1_mm: cell size along local 1 [mm], or ``None`` for one bin spanning the module.
        thickness_mm: sensor thickness used for the path through the sensor [mm].
        indices: measured local parameters (0 = loc0, 1 = loc1); ``(0,)`` makes a 1-D strip.
    """

    name: str
    pitch0_mm: float
    pitch1_mm: float | None
    thickness_mm: float
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.pitch0_mm <= 0 or (self.pitch1_mm is not None and self.pitch1_mm <= 0):
            raise ValueError(f"{self.name}: pitches must be positive")
        if self.thickness_mm <= 0:
            raise ValueError(f"{self.name}: thickness must be positive")
        if not self.indices or any(i not in (0, 1) for i in self.indices):
            raise ValueError(f"{self.name}: indices must be a non-empty subset of (0, 1)")


PIXEL = ReadoutSpec("pixel", pitch0_mm=0.050, pitch1_mm=0.050, thickness_mm=0.15, indices=(0, 1))
SHORT_STRIP = ReadoutSpec("short strip", pitch0_mm=0.080, pitch1_mm=1.2, thickness_mm=0.25, indices=(0, 1))
LONG_STRIP = ReadoutSpec("long strip", pitch0_mm=0.120, pitch1_mm=None, thickness_mm=0.35, indices=(0,))

#: Readout per volume id of the ACTS generic detector (TrackML-like layout).
GENERIC_READOUT: dict[int, ReadoutSpec] = {
    7: PIXEL,
    8: PIXEL,
    9: PIXEL,
    12: SHORT_STRIP,
    13: SHORT_STRIP,
    14: SHORT_STRIP,
    16: LONG_STRIP,
    17: LONG_STRIP,
    18: LONG_STRIP,
}

BoundsKind = Literal["rectangle", "trapezoid"]


@dataclass(frozen=True)
class ModuleShape:
    """Identity and bounding box of one sensitive module, as read from the tracking geometry.

    Attributes:
        volume, layer, sensitive: the module's ACTS geometry-identifier fields.
        kind: bounds type of the planar surface.
        half_x_mm: half length of the bounding box along local 0 [mm] (max of the two trapezoid
            half lengths).
        half_y_mm: half length along local 1 [mm].
    """

    volume: int
    layer: int
    sensitive: int
    kind: BoundsKind
    half_x_mm: float
    half_y_mm: float


def _axis(bins: int, half: float, value: str) -> dict[str, Any]:
    """One equidistant ``binningdata`` entry spanning ``[-half, half]``."""
    return {"bins": bins, "min": -half, "max": half, "option": "open", "type": "equidistant", "value": value}


def _bins(length: float, pitch: float, what: str) -> int:
    """Number of cells of ``pitch`` across ``length``; warns when the length is not a multiple."""
    bins = max(1, round(length / pitch))
    realised = length / bins
    if abs(realised - pitch) > PITCH_TOLERANCE * pitch:
        logger.warning(
            "%s: length %.6g mm is not a multiple of pitch %.6g mm; using %d cells of %.6g mm",
            what,
            length,
            pitch,
            bins,
            realised,
        )
    return bins


def geometric_value(shape: ModuleShape, spec: ReadoutSpec) -> dict[str, Any]:
    """The ``{"geometric": {...}}`` value of one hierarchy-map entry for a module of ``shape``.

    Parameters:
        shape: the module's bounding box.
        spec: readout technology of the module's volume.

    Returns:
        A JSON-ready dict in ACTS' digitization-configuration format.
    """
    where = f"volume {shape.volume} layer {shape.layer}"
    bins0 = _bins(2.0 * shape.half_x_mm, spec.pitch0_mm, where + " loc0")
    bins1 = 1 if spec.pitch1_mm is None else _bins(2.0 * shape.half_y_mm, spec.pitch1_mm, where + " loc1")
    return {
        "geometric": {
            "digital": False,
            "indices": list(spec.indices),
            "segmentation": {
                "binningdata": [
                    _axis(bins0, shape.half_x_mm, "binX"),
                    _axis(bins1, shape.half_y_mm, "binY"),
                ]
            },
            "thickness": spec.thickness_mm,
            "threshold": 0.0,
        }
    }


def build_digi_config(
    shapes: Iterable[ModuleShape], readout: dict[int, ReadoutSpec] | None = None
) -> dict[str, Any]:
    """Build the hierarchy-map document for all sensitive modules in ``shapes``.

    Parameters:
        shapes: every sensitive module of the geometry.
        readout: technology per volume id; defaults to :data:`GENERIC_READOUT`.

    Raises:
        ValueError: a module sits in a volume without a readout spec (the digitizer would silently
            produce no measurements there).

    Returns:
        ``{"acts-geometry-hierarchy-map": {...}, "entries": [...]}`` with entries sorted by
        (volume, layer, sensitive).
    """
    readout = GENERIC_READOUT if readout is None else readout
    by_layer: dict[tuple[int, int], list[ModuleShape]] = defaultdict(list)
    for shape in shapes:
        by_layer[(shape.volume, shape.layer)].append(shape)

    entries: list[dict[str, Any]] = []
    for (volume, layer), modules in sorted(by_layer.items()):
        spec = readout.get(volume)
        if spec is None:
            raise ValueError(f"no readout specification for volume {volume} (layer {layer})")
        boxes = {(m.kind, m.half_x_mm, m.half_y_mm) for m in modules}
        if len(boxes) == 1:
            entries.append({"volume": volume, "layer": layer, "value": geometric_value(modules[0], spec)})
            continue
        for m in sorted(modules, key=lambda m: m.sensitive):
            entries.append(
                {
                    "volume": volume,
                    "layer": layer,
                    "sensitive": m.sensitive,
                    "value": geometric_value(m, spec),
                }
            )
    return {
        "acts-geometry-hierarchy-map": {
            "format-version": 0,
            "value-identifier": "digitization-configuration",
        },
        "entries": entries,
    }


def module_shapes(tracking_geometry: Any) -> list[ModuleShape]:
    """Read the bounding box of every sensitive surface of an ACTS tracking geometry.

    Parameters:
        tracking_geometry: an ``acts.TrackingGeometry``.

    Raises:
        ValueError: a sensitive surface has bounds other than rectangle or trapezoid.

    Returns:
        One :class:`ModuleShape` per sensitive surface, in visiting order.
    """
    import acts  # deferred: the pure builders above must work without the sim extra

    shapes: list[ModuleShape] = []

    def visit(surface: Any) -> None:
        gid = surface.geometryId
        if gid.sensitive == 0:
            return
        bounds = surface.bounds
        btype = bounds.type() if callable(bounds.type) else bounds.type
        values = list(bounds.values())
        if btype == acts.SurfaceBoundsType.Rectangle:
            # RectangleBounds values: (min_x, min_y, max_x, max_y); symmetric for all our modules
            # but take the larger half so the grid always covers the surface.
            kind: BoundsKind = "rectangle"
            half_x = max(-values[0], values[2])
            half_y = max(-values[1], values[3])
        elif btype == acts.SurfaceBoundsType.Trapezoid:
            # TrapezoidBounds values: (half_x at -y, half_x at +y, half_y, rotation angle)
            if values[3] != 0.0:
                raise ValueError(f"rotated trapezoid at {gid}: not supported by a Cartesian grid")
            kind = "trapezoid"
            half_x = max(values[0], values[1])
            half_y = values[2]
        else:
            raise ValueError(f"unsupported bounds {btype} on sensitive surface {gid}")
        shapes.append(ModuleShape(gid.volume, gid.layer, gid.sensitive, kind, half_x, half_y))

    tracking_geometry.visitSurfaces(visit)
    return shapes


def write_digi_config(config: dict[str, Any], path: Path) -> None:
    """Write ``config`` as JSON, one hierarchy entry per line.

    One entry per line keeps the file diff-able and reasonably small (it has a few thousand
    per-module strip-endcap entries) while staying valid for ACTS' JSON reader.
    """
    head = json.dumps(config["acts-geometry-hierarchy-map"], sort_keys=True)
    lines = [json.dumps(e, separators=(",", ":")) for e in config["entries"]]
    body = ",\n  ".join(lines)
    text = f'{{"acts-geometry-hierarchy-map": {head},\n "entries": [\n  {body}\n ]}}\n'
    path.write_text(text)
