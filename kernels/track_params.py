"""Track parameter estimation from seeds (traccc's ``track_params_estimation``).

The circle through the three spacepoints in the transverse plane gives the radius R, hence
pT = 0.3 * B * R, the charge from the bending direction (positive charges turn clockwise seen from
+z when B points along +z), and the direction at the bottom spacepoint (the circle's tangent,
oriented towards the middle one). theta comes from the straight line of z against the transverse
arc length between bottom and top. Parameters are bound to the bottom spacepoint's module, with a
diagonal initial covariance. With CuPy, one kernel does it all (:mod:`kernels.fused_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

from kernels import fused, fused_rows
from kernels.edm.measurements import Measurements, Spacepoints
from kernels.edm.seeds import BoundParameters, Seeds
from kernels.seeding import PT_PER_TESLA_MM
from kernels.xp import Array


@dataclass(frozen=True)
class TrackParamsConfig:
    """Initial uncertainties of seed parameters (traccc's defaults).

    Attributes:
        sigma_loc_mm: loc0 and loc1 [mm] (1.0).
        sigma_phi_rad, sigma_theta_rad: direction [rad] (1 degree each).
        sigma_q_over_pt: q/pT [e/GeV] (0.1); q/p gets sigma_q_over_pt * sin(theta).
        bfield_t: solenoid field [T]; None takes the detector's.
    """

    sigma_loc_mm: float = 1.0
    sigma_phi_rad: float = math.radians(1.0)
    sigma_theta_rad: float = math.radians(1.0)
    sigma_q_over_pt: float = 0.1
    bfield_t: float | None = None


def circle_through(
    xp: ModuleType, x1: Array, y1: Array, x2: Array, y2: Array, x3: Array, y3: Array
) -> tuple[Array, Array, Array, Array]:
    """Centre, radius and signed turning (cross product z of (p2 - p1) x (p3 - p2)) of the circle
    through three points; collinear points get an effectively infinite radius."""
    ax, ay = x2 - x1, y2 - y1
    bx, by = x3 - x1, y3 - y1
    d = 2.0 * (ax * by - ay * bx)
    d_safe = xp.where(xp.abs(d) < 1e-12, 1e-12, d)
    a2, b2 = ax * ax + ay * ay, bx * bx + by * by
    ux = (by * a2 - ay * b2) / d_safe
    uy = (ax * b2 - bx * a2) / d_safe
    radius = xp.sqrt(ux * ux + uy * uy)
    turn = (x2 - x1) * (y3 - y2) - (y2 - y1) * (x3 - x2)
    return x1 + ux, y1 + uy, radius, turn


def estimate_parameters(
    xp: ModuleType,
    sp: Spacepoints,
    meas: Measurements,
    seeds: Seeds,
    cfg: TrackParamsConfig,
    bfield_t: float,
) -> BoundParameters:
    """Bound parameters of every seed on its bottom spacepoint's module."""
    bfield = cfg.bfield_t if cfg.bfield_t is not None else bfield_t
    if fused.enabled(xp):
        sigma2 = (cfg.sigma_loc_mm**2, cfg.sigma_loc_mm**2, cfg.sigma_phi_rad**2, cfg.sigma_theta_rad**2)
        params, cov, module = fused_rows.track_params(
            xp, sp, meas, seeds, bfield, PT_PER_TESLA_MM, sigma2, cfg.sigma_q_over_pt
        )
        return BoundParameters(module=module, params=params, cov=cov, event=seeds.event)
    b, m, t = seeds.bottom, seeds.middle, seeds.top
    xb, yb, zb = sp.x[b], sp.y[b], sp.z[b]
    cx, cy, radius, turn = circle_through(xp, xb, yb, sp.x[m], sp.y[m], sp.x[t], sp.y[t])
    # tangent at the bottom point: perpendicular to the radius, along the direction of travel
    rx, ry = xb - cx, yb - cy
    ccw = turn > 0
    tx = xp.where(ccw, -ry, ry)
    ty = xp.where(ccw, rx, -rx)
    phi = xp.arctan2(ty, tx)
    charge = xp.where(ccw, -1.0, 1.0) * (1.0 if bfield >= 0 else -1.0)
    pt = PT_PER_TESLA_MM * abs(bfield) * radius
    chord = xp.hypot(sp.x[t] - xb, sp.y[t] - yb)
    arc = 2.0 * radius * xp.arcsin(xp.minimum(chord / (2.0 * radius), 1.0))
    theta = xp.arctan2(arc, sp.z[t] - zb)
    sin_t = xp.sin(theta)
    qop = charge * sin_t / pt
    mb = sp.measurement[b]
    params = xp.stack([meas.local0[mb], meas.local1[mb], phi, theta, qop], axis=1)
    n = b.shape[0]
    cov = xp.zeros((n, 5, 5), dtype=xp.float64)
    cov[:, 0, 0] = cfg.sigma_loc_mm**2
    cov[:, 1, 1] = cfg.sigma_loc_mm**2
    cov[:, 2, 2] = cfg.sigma_phi_rad**2
    cov[:, 3, 3] = cfg.sigma_theta_rad**2
    cov[:, 4, 4] = (cfg.sigma_q_over_pt * sin_t) ** 2
    return BoundParameters(module=meas.module[mb], params=params, cov=cov, event=seeds.event)
