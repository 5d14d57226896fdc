"""Seeds (spacepoint triplets) and the track parameters estimated from them."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

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

    @classmethod
    def from_parts(cls, xp: ModuleType, event_of_spacepoint: Array, parts: list[tuple]) -> Seeds:
        """Seeds from chunks of (bottom, middle, top, weight, z_vertex) columns, in a deterministic
        order: by event, middle spacepoint, then decreasing weight."""
        if not parts:
            empty = xp.zeros(0, dtype=xp.int32)
            return cls(empty, empty, empty, xp.zeros(0), xp.zeros(0), empty)
        bottom, middle, top, weight, z0 = (xp.concatenate([p[i] for p in parts]) for i in range(5))
        event = event_of_spacepoint[middle]
        order = xp.lexsort(xp.stack([-weight, middle.astype(xp.float64), event.astype(xp.float64)]))
        return cls(
            bottom=bottom[order].astype(xp.int32),
            middle=middle[order].astype(xp.int32),
            top=top[order].astype(xp.int32),
            weight=weight[order],
            z_vertex=z0[order],
            event=event[order].astype(xp.int32),
        )


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
