"""Fitted tracks: perigee parameters with covariance, fit quality, and the measurements on each track.

Parameters follow ACTS' bound perigee convention: (d0 [mm], z0 [mm], phi [rad], theta [rad],
q/p [e/GeV]) with respect to the z axis (the beam line at x = y = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

from kernels.xp import Array, asarray, to_numpy

PARAM_NAMES = ("d0", "z0", "phi", "theta", "qop")


@dataclass(frozen=True)
class Tracks:
    """Tracks of one event.

    Attributes:
        params: perigee parameters (float64 [T, 5]), order :data:`PARAM_NAMES`.
        cov: covariance of ``params`` (float64 [T, 5, 5]).
        chi2: fit chi^2 (float64 [T]); ndf: degrees of freedom (int32 [T]).
        n_holes: sensitive surfaces crossed without a compatible measurement (int32 [T]).
        meas_offsets: track ``t`` owns measurement rows ``meas_offsets[t]:meas_offsets[t+1]`` (int64 [T+1]).
        meas_geometry_id (uint64), meas_local0 / meas_local1 [mm] (float64), meas_dimension (int8),
        meas_truth_id (int64; the input cells' truth id, -1 when unknown): one row per track measurement,
        ordered along the track from the inside out.
        event_id: event number.
    """

    params: Array
    cov: Array
    chi2: Array
    ndf: Array
    n_holes: Array
    meas_offsets: Array
    meas_geometry_id: Array
    meas_local0: Array
    meas_local1: Array
    meas_dimension: Array
    meas_truth_id: Array
    event_id: int = 0

    def __post_init__(self) -> None:
        t = self.params.shape[0]
        if self.params.shape != (t, 5) or self.cov.shape != (t, 5, 5):
            raise ValueError(f"Tracks: params {self.params.shape} / cov {self.cov.shape} do not match")
        for name in ("chi2", "ndf", "n_holes"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"Tracks.{name} must have {t} entries")
        if self.meas_offsets.shape != (t + 1,):
            raise ValueError("Tracks.meas_offsets must have one entry per track plus one")
        m = self.meas_geometry_id.shape[0]
        for name in ("meas_local0", "meas_local1", "meas_dimension", "meas_truth_id"):
            if getattr(self, name).shape != (m,):
                raise ValueError(f"Tracks.{name} must have {m} entries")

    @property
    def size(self) -> int:
        return int(self.params.shape[0])

    @property
    def n_measurements(self) -> Array:
        return self.meas_offsets[1:] - self.meas_offsets[:-1]

    def to(self, xp: ModuleType) -> Tracks:
        arrays = {k: asarray(xp, v) for k, v in self.__dict__.items() if k != "event_id"}
        return replace(self, **arrays)

    def to_numpy(self) -> Tracks:
        return replace(self, **{k: to_numpy(v) for k, v in self.__dict__.items() if k != "event_id"})

    @staticmethod
    def empty(event_id: int = 0) -> Tracks:
        return Tracks(
            params=np.zeros((0, 5)),
            cov=np.zeros((0, 5, 5)),
            chi2=np.zeros(0),
            ndf=np.zeros(0, np.int32),
            n_holes=np.zeros(0, np.int32),
            meas_offsets=np.zeros(1, np.int64),
            meas_geometry_id=np.zeros(0, np.uint64),
            meas_local0=np.zeros(0),
            meas_local1=np.zeros(0),
            meas_dimension=np.zeros(0, np.int8),
            meas_truth_id=np.zeros(0, np.int64),
            event_id=event_id,
        )
