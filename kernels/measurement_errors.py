"""Measurement uncertainties used by track finding and fitting.

Measurement creation reports traccc's variance (activation-weighted spread of the cells plus
pitch^2/12). That spread measures the cluster's size, not how well its centre is known: with
charge sharing, a wide cluster locates the crossing better than one cell does. The fit therefore
uses ``pitch^2 / 12 * scale(extent)`` per axis, with the scale indexed by the cluster's extent in
channels along that axis. The default scales were measured on the simulated generic detector
(residuals of cluster centres against the simulated crossings, by extent); clusters of five or
more channels (delta rays, shallow crossings) get the full pitch^2/12. An unmeasured axis (1-D
strips) keeps its variance: the whole strip length^2/12.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from kernels.detector import Detector
from kernels.edm.measurements import Measurements
from kernels.errors import ConfigError
from kernels.xp import Array


@dataclass(frozen=True)
class MeasurementErrorConfig:
    """Attributes:
    model: "extent" (pitch^2/12 scaled by cluster extent, default) or "cluster" (the variance
        measurement creation reported).
    scale_by_extent0, scale_by_extent1: factors on pitch^2/12 along loc0 / loc1 for extents 1, 2, 3,
        4, >= 5 channels ((0.75, 0.3, 0.1, 0.1, 1.0) and (0.4, 0.25, 0.05, 0.05, 1.0)).
    """

    model: str = "extent"
    scale_by_extent0: tuple[float, ...] = (0.75, 0.3, 0.1, 0.1, 1.0)
    scale_by_extent1: tuple[float, ...] = (0.4, 0.25, 0.05, 0.05, 1.0)

    def __post_init__(self) -> None:
        if self.model not in ("extent", "cluster"):
            raise ConfigError(
                f"MeasurementErrorConfig.model must be 'extent' or 'cluster', not {self.model!r}"
            )
        for t in (self.scale_by_extent0, self.scale_by_extent1):
            if not t or min(t) <= 0:
                raise ConfigError("MeasurementErrorConfig.scale_by_extent0/1 need positive factors")


def measurement_variances(
    xp: ModuleType, det: Detector, meas: Measurements, cfg: MeasurementErrorConfig
) -> tuple[Array, Array]:
    """(var0, var1) [mm^2] per measurement for the Kalman filter."""
    if cfg.model == "cluster":
        return meas.var0, meas.var1
    pitch = (det.seg_max[meas.module] - det.seg_min[meas.module]) / det.seg_bins[meas.module]
    one_bin = det.seg_bins[meas.module] <= 1
    out = []
    for axis, (extent, factors) in enumerate(
        ((meas.extent0, cfg.scale_by_extent0), (meas.extent1, cfg.scale_by_extent1))
    ):
        table = xp.asarray(factors, dtype=xp.float64)
        scale = table[xp.clip(extent.astype(xp.int64) - 1, 0, table.shape[0] - 1)]
        var = pitch[:, axis] ** 2 / 12.0 * xp.where(one_bin[:, axis], 1.0, scale)
        out.append(var)
    return out[0], out[1]
