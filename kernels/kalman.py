"""Kalman filter pieces shared by track finding and fitting: the measurement update for 2-D pixel
and 1-D strip measurements, and the multiple-scattering process noise.

Measurements observe the first two bound parameters (loc0, loc1). A 1-D strip measurement observes
loc0 only: its loc1 row is masked out of the gain and the chi^2, so the same branch-free code serves
both kinds.

Material: each layer crossing adds the Highland scattering angle for ``x/X0 / |cos(incidence)|``
to the direction variances (phi: theta0^2 / sin^2(theta), theta: theta0^2). Energy loss is not
modelled: in the simulated detector it changes p by < 0.1% per layer, far below the momentum
resolution.
"""

from __future__ import annotations

from types import ModuleType

from kernels import fused
from kernels.xp import Array


def update(
    xp: ModuleType,
    params: Array,
    cov: Array,
    m0: Array,
    m1: Array,
    v0: Array,
    v1: Array,
    dim: Array,
) -> tuple[Array, Array, Array]:
    """Kalman update of (params, cov) with measurements; returns (params, cov, chi2).

    Args:
        params, cov: predicted states [n, 5], [n, 5, 5].
        m0, m1: measured loc0, loc1 [mm]; v0, v1: their variances [mm^2]; dim: 1 or 2 per row.
    """
    if fused.enabled(xp):
        return fused.kalman_update(xp, params, cov, m0, m1, v0, v1, dim)
    two = (dim == 2).astype(xp.float64)
    r0 = m0 - params[:, 0]
    r1 = (m1 - params[:, 1]) * two
    p00, p01, p11 = cov[:, 0, 0], cov[:, 0, 1] * two, cov[:, 1, 1]
    s00 = p00 + v0
    s11 = xp.where(two > 0, p11 + v1, 1.0)
    s01 = p01
    det = s00 * s11 - s01 * s01
    i00, i11, i01 = s11 / det, s00 / det, -s01 / det
    chi2 = r0 * (i00 * r0 + i01 * r1) + r1 * (i01 * r0 + i11 * r1)
    ph0 = cov[:, :, 0]
    ph1 = cov[:, :, 1] * two[:, None]
    k0 = ph0 * i00[:, None] + ph1 * i01[:, None]
    k1 = ph0 * i01[:, None] + ph1 * i11[:, None]
    new_params = params + k0 * r0[:, None] + k1 * r1[:, None]
    # P' = P - K H P, with H P = rows 0 and 1 of P (row 1 masked for strips)
    hp0 = cov[:, 0, :]
    hp1 = cov[:, 1, :] * two[:, None]
    new_cov = cov - k0[:, :, None] * hp0[:, None, :] - k1[:, :, None] * hp1[:, None, :]
    new_cov = 0.5 * (new_cov + xp.transpose(new_cov, (0, 2, 1)))
    return new_params, new_cov, chi2


def chi2_only(
    xp: ModuleType, params: Array, cov: Array, m0: Array, m1: Array, v0: Array, v1: Array, dim: Array
) -> Array:
    """Predicted chi^2 of measurements against states, without updating."""
    two = (dim == 2).astype(xp.float64)
    r0 = m0 - params[:, 0]
    r1 = (m1 - params[:, 1]) * two
    s00 = cov[:, 0, 0] + v0
    s11 = xp.where(two > 0, cov[:, 1, 1] + v1, 1.0)
    s01 = cov[:, 0, 1] * two
    det = s00 * s11 - s01 * s01
    return (r0 * r0 * s11 - 2.0 * r0 * r1 * s01 + r1 * r1 * s00) / det


def chi2_gather(
    xp: ModuleType,
    params: Array,
    cov: Array,
    row: Array,
    m0: Array,
    m1: Array,
    v0: Array,
    v1: Array,
    dim: Array,
    meas: Array,
) -> Array:
    """chi^2 of measurements ``meas`` (indices into the measurement columns) against the states
    ``params[row]``, ``cov[row]``, without materializing the gathered covariances on the GPU."""
    if fused.enabled(xp):
        return fused.chi2_gather(xp, params, cov, row, m0, m1, v0, v1, dim, meas)
    return chi2_only(xp, params[row], cov[row], m0[meas], m1[meas], v0[meas], v1[meas], dim[meas])


def highland(x_over_x0: Array, momentum_gev: Array, xp: ModuleType) -> Array:
    """Multiple-scattering angle theta0 [rad] (PDG Highland formula, beta = 1)."""
    x = xp.maximum(x_over_x0, 1e-8)
    return 0.0136 / momentum_gev * xp.sqrt(x) * (1.0 + 0.038 * xp.log(x))


def add_scattering(
    xp: ModuleType, params: Array, cov: Array, x_over_x0: Array, cos_incidence: Array
) -> Array:
    """Covariance after crossing material of thickness x/X0 at the given incidence."""
    p = 1.0 / xp.maximum(xp.abs(params[:, 4]), 1e-9)
    x_eff = x_over_x0 / xp.maximum(xp.abs(cos_incidence), 0.05)
    th0 = highland(x_eff, p, xp)
    sin_t = xp.maximum(xp.abs(xp.sin(params[:, 3])), 1e-6)
    out = cov.copy()
    out[:, 2, 2] += th0 * th0 / (sin_t * sin_t)
    out[:, 3, 3] += th0 * th0
    return out
