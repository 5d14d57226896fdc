"""Measurements (one per cluster) and spacepoints (2-D measurements in global coordinates)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

from kernels.xp import Array, asarray


def _check(obj: object, names: tuple[str, ...]) -> None:
    n = getattr(obj, names[0]).shape[0]
    for name in names[1:]:
        v = getattr(obj, name)
        if v is not None and v.shape[0] != n:
            raise ValueError(f"{type(obj).__name__}.{name} has {v.shape[0]} rows, expected {n}")


@dataclass(frozen=True)
class Measurements:
    """Measurements of one event or a batch, grouped by (event, module) in ascending order.

    Attributes:
        module: module index in the detector (int32).
        event: event index within the batch (int32; all 0 for one event).
        local0, local1: activation-weighted cluster position [mm] (float64); local1 is the module
            centre line on 1-D strip modules.
        var0, var1: weighted variance + pitch^2/12 [mm^2] (float64).
        dimension: measured local axes, 1 (strip) or 2 (pixel) (int8).
        n_cells: cluster size (int32).
        extent0, extent1: cluster length in channels along loc0 / loc1 (int32).
        truth_id: truth measurement id carried by the cluster's cells (majority by cell count;
            int64, -1 when the cells carry none).
    """

    module: Array
    event: Array
    local0: Array
    local1: Array
    var0: Array
    var1: Array
    dimension: Array
    n_cells: Array
    extent0: Array
    extent1: Array
    truth_id: Array

    def __post_init__(self) -> None:
        _check(
            self,
            (
                "module",
                "event",
                "local0",
                "local1",
                "var0",
                "var1",
                "dimension",
                "n_cells",
                "extent0",
                "extent1",
                "truth_id",
            ),
        )

    @property
    def size(self) -> int:
        return int(self.module.shape[0])

    def to(self, xp: ModuleType) -> Measurements:
        return replace(self, **{k: asarray(xp, v) for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class Spacepoints:
    """Global positions of 2-D measurements, in measurement order.

    Attributes:
        measurement: index into :class:`Measurements` (int32).
        module: module index (int32).
        event: event index within the batch (int32).
        x, y, z [mm], r [mm], phi [rad] (float64).
        var_r, var_z: position variances along r and z [mm^2] (float64).
    """

    measurement: Array
    module: Array
    event: Array
    x: Array
    y: Array
    z: Array
    r: Array
    phi: Array
    var_r: Array
    var_z: Array

    def __post_init__(self) -> None:
        _check(self, ("measurement", "module", "event", "x", "y", "z", "r", "phi", "var_r", "var_z"))

    @property
    def size(self) -> int:
        return int(self.x.shape[0])
