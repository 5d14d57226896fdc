"""Seeds (spacepoint triplets) and the track parameters estimated from them."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.xp import Array


@dataclass(frozen=True)
class Seeds:
    """Triplets of spacepoint indices, bottom to top.

    Attributes:
        bottom, middle, top: indices into :class:`~kernels.edm.measurements.Spacepoints` (int32).
        weight: seed-filter quality, larger is better (float64).
        z_vertex: z of the seed's line at the beam line [mm] (float64).
        event: event index within the batch (int32).
    """

    bottom: Array
    middle: Array
    top: Array
    weight: Array
    z_vertex: Array
    event: Array

    @property
    def size(self) -> int:
        return int(self.bottom.shape[0])


@dataclass(frozen=True)
class BoundParameters:
    """Track parameters bound to a module surface (ACTS' bound parametrisation, without time).

    Attributes:
        module: module index of the surface (int32).
        params: (loc0 [mm], loc1 [mm], phi [rad], theta [rad], q/p [e/GeV]) (float64 [n, 5]).
        cov: covariance (float64 [n, 5, 5]).
        event: event index within the batch (int32).
    """

    module: Array
    params: Array
    cov: Array
    event: Array

    @property
    def size(self) -> int:
        return int(self.module.shape[0])
