"""Measurement uncertainties used by track finding and fitting.

Measurement creation reports traccc's variance (activation-weighted spread of the cells plus
pitch^2/12). That spread measures the cluster's size, not how well its centre is known: with
charge sharing, a wide cluster locates the crossing better than one cell does. The fit therefore
uses ``pitch^2 / 12 * scale`` per axis, the scale looked up by the module's volume, the axis and the
cluster's extent in channels along that axis (1, 2, ..., 7, >= 8).

The default table was measured on the simulated ACTS generic detector (geometric digitization,
no noise): the mean squared residual of cluster centres against the simulated crossings, divided by
pitch^2/12, per volume group, axis and extent, from 2 mu=50 events (~80k measurements), floored at
0.03 so that no measurement is trusted beyond what the simulation can show. The strips' loc0 factors
are then doubled (single-strip clusters 1.7 instead of the ~0.5 measured): the residuals were
measured with pile-up pions, whose crossing angles make clusters more informative than those of
high-pT tracks; fits of 1-100 GeV muons showed strip pulls of 1.2-1.5 and q/pT pulls of 1.14 with the
pion calibration, and q/pT, phi, theta pulls of 1.07, 0.94, 0.95 (muons), 1.03-1.04 (pions at
mu=50 and 200) with the doubled strip factors. An axis with one bin
(the long strips' loc1) keeps the full length^2/12.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from kernels import fused, fused_rows
from kernels.detector import Detector
from kernels.edm.measurements import Measurements
from kernels.errors import ConfigError
from kernels.xp import Array, device_constant

N_EXTENT = 8  # extents 1..7 and >= 8
_ONE = (1.0,) * N_EXTENT

_PIXEL_ENDCAP = ((0.88, 0.74, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0), (0.34, 0.29, 0.29, 0.5, 1.0, 1.0, 1.0, 1.0))
_PIXEL_BARREL = (
    (0.56, 0.19, 0.03, 0.5, 1.0, 1.0, 1.0, 1.0),
    (0.52, 0.11, 0.04, 0.05, 0.17, 0.22, 0.10, 0.57),
)
_SHORT_ENDCAP = ((1.70, 0.62, 0.06, 1.0, 2.0, 2.0, 2.0, 2.0), (0.91, 0.96, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))
_SHORT_BARREL = ((1.70, 0.22, 0.06, 0.20, 0.10, 0.06, 0.52, 0.28), (0.68, 0.38, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))
_LONG_ENDCAP = ((1.70, 0.24, 0.06, 1.16, 2.0, 2.0, 2.0, 2.0), _ONE)
_LONG_BARREL = ((1.70, 0.22, 0.06, 0.06, 1.38, 0.12, 0.06, 6.6), _ONE)

GENERIC_TABLE: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    7: _PIXEL_ENDCAP,
    9: _PIXEL_ENDCAP,
    8: _PIXEL_BARREL,
    12: _SHORT_ENDCAP,
    14: _SHORT_ENDCAP,
    13: _SHORT_BARREL,
    16: _LONG_ENDCAP,
    18: _LONG_ENDCAP,
    17: _LONG_BARREL,
}


@dataclass(frozen=True)
class MeasurementErrorConfig:
    """Attributes:
    model: "extent" (pitch^2/12 scaled by volume, axis and cluster extent; default) or "cluster" (the
        variance measurement creation reported).
    table: volume id -> (factors along loc0, factors along loc1) for extents 1..7, >= 8 (the generic
        detector's calibration).
    default: factors for volumes not in the table (0.75, 0.3, 0.1, 0.1, then 1.0).
    """

    model: str = "extent"
    table: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=lambda: dict(GENERIC_TABLE)
    )
    default: tuple[tuple[float, ...], tuple[float, ...]] = (
        (0.75, 0.3, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0),
        (0.75, 0.3, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0),
    )

    def __post_init__(self) -> None:
        if self.model not in ("extent", "cluster"):
            raise ConfigError(
                f"MeasurementErrorConfig.model must be 'extent' or 'cluster', not {self.model!r}"
            )
        for key, axes in [*self.table.items(), ("default", self.default)]:
            if len(axes) != 2 or any(len(a) != N_EXTENT or min(a) <= 0 for a in axes):
                raise ConfigError(
                    f"MeasurementErrorConfig: entry {key!r} needs two tuples of {N_EXTENT} positive factors"
                )

    def lookup(self) -> np.ndarray:
        """Factors indexed by [volume id, axis, extent - 1] (float64 [256, 2, N_EXTENT])."""
        out = np.empty((256, 2, N_EXTENT))
        out[:] = np.asarray(self.default)[None]
        for vol, axes in self.table.items():
            out[vol] = np.asarray(axes)
        return out


def measurement_variances(
    xp: ModuleType, det: Detector, meas: Measurements, cfg: MeasurementErrorConfig
) -> tuple[Array, Array]:
    """(var0, var1) [mm^2] per measurement for the Kalman filter."""
    if cfg.model == "cluster":
        return meas.var0, meas.var1
    host = cfg.lookup()
    table = device_constant(xp, ("measurement_errors", host.tobytes()), lambda: host)
    if fused.enabled(xp):
        return fused_rows.measurement_variances(xp, det, meas, table)
    vol = det.volume_id[meas.module].astype(xp.int64)
    pitch = (det.seg_max[meas.module] - det.seg_min[meas.module]) / det.seg_bins[meas.module]
    one_bin = det.seg_bins[meas.module] <= 1
    out = []
    for axis, extent in enumerate((meas.extent0, meas.extent1)):
        scale = table[vol, axis, xp.clip(extent.astype(xp.int64) - 1, 0, N_EXTENT - 1)]
        out.append(pitch[:, axis] ** 2 / 12.0 * xp.where(one_bin[:, axis], 1.0, scale))
    return out[0], out[1]
