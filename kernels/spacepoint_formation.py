"""Spacepoint formation: 2-D measurements to global coordinates with the module transform
(traccc's ``spacepoint_formation``); 1-D strip measurements make no spacepoints. With CuPy, one
kernel after the selection (:mod:`kernels.fused_rows`)."""

from __future__ import annotations

from types import ModuleType

from kernels import fused, fused_rows
from kernels.detector import Detector, local_to_global
from kernels.edm.measurements import Measurements, Spacepoints


def form_spacepoints(xp: ModuleType, det: Detector, meas: Measurements) -> Spacepoints:
    """Spacepoints of all 2-D measurements, with variances along r and z from the local ones."""
    if fused.enabled(xp):
        return Spacepoints(**fused_rows.spacepoints(xp, det, meas))
    sel = xp.nonzero(meas.dimension == 2)[0]
    mod = meas.module[sel]
    x, y, z = local_to_global(xp, det, mod, meas.local0[sel], meas.local1[sel])
    r = xp.hypot(x, y)
    phi = xp.arctan2(y, x)
    # project the local covariance (diagonal in u, v) onto the global r and z directions
    rot = det.rotation[mod]
    rx = xp.where(r > 0, x / xp.where(r > 0, r, 1.0), 1.0)
    ry = xp.where(r > 0, y / xp.where(r > 0, r, 1.0), 0.0)
    ur = rot[:, 0, 0] * rx + rot[:, 1, 0] * ry
    vr = rot[:, 0, 1] * rx + rot[:, 1, 1] * ry
    var_r = ur * ur * meas.var0[sel] + vr * vr * meas.var1[sel]
    var_z = rot[:, 2, 0] ** 2 * meas.var0[sel] + rot[:, 2, 1] ** 2 * meas.var1[sel]
    return Spacepoints(
        measurement=sel.astype(xp.int32),
        module=mod.astype(xp.int32),
        event=meas.event[sel],
        x=x,
        y=y,
        z=z,
        r=r,
        phi=phi,
        var_r=var_r,
        var_z=var_z,
    )
