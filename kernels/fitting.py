"""Kalman fit with a Rauch-Tung-Striebel smoother, batched over all tracks as padded arrays
(tracks x measurement position), then the smoothed state at the first measurement is expressed
as perigee parameters at the beam line (ACTS' convention, :func:`kernels.propagation.to_perigee`).

The forward filter starts from the seed's parameters on the first measurement's module with the
seed's (loose) covariance; each step adds the scattering of the module just left, transports to
the next measurement's module and updates. The smoother runs backwards over the stored filtered
and predicted states: A_k = P_k|k J_k+1^T P_k+1|k^-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from kernels import fused, fused_fit
from kernels.detector import Detector
from kernels.edm.measurements import Measurements
from kernels.kalman import add_scattering, highland, update
from kernels.propagation import NEWTON_STEPS, bound_to_global, to_perigee, transport
from kernels.xp import Array


@dataclass(frozen=True)
class FittingConfig:
    """Attributes:
    initial_cov_scale: factor on the seed covariance the filter starts from (100).
    beam_pipe_x0: material between the beam line and the first measurement, x/X0 (0.004, tuned
        on the simulated generic detector), added as scattering when the fit is extrapolated to the
        perigee.
    """

    initial_cov_scale: float = 100.0
    beam_pipe_x0: float = 0.004


@dataclass(frozen=True)
class FitResult:
    params: Array  # perigee (d0, z0, phi, theta, q/p) [T, 5]
    cov: Array  # [T, 5, 5]
    chi2: Array  # [T]
    ndf: Array  # [T]
    ok: Array  # [T] bool: every transport succeeded and the covariance is positive


def _wrap(xp: ModuleType, a: Array) -> Array:
    return xp.remainder(a + xp.pi, 2 * xp.pi) - xp.pi


def fit_tracks(
    xp: ModuleType,
    det: Detector,
    material: Array,
    meas: Measurements,
    offsets: Array,
    measurements: Array,
    start_params: Array,
    start_cov: Array,
    variances: tuple[Array, Array],
    cfg: FittingConfig,
) -> FitResult:
    """Fit tracks given as CSR measurement indices, inside out.

    Args:
        material: x/X0 per module crossing (from the finding geometry).
        start_params, start_cov: initial parameters on each track's first measurement module.
    """
    if fused.enabled(xp):
        return FitResult(
            *fused_fit.fit_tracks(
                xp,
                det,
                material,
                meas,
                offsets,
                measurements,
                start_params,
                start_cov,
                variances,
                cfg.initial_cov_scale,
                cfg.beam_pipe_x0,
                NEWTON_STEPS,
            )
        )
    bfield = det.bfield_t
    n = offsets.shape[0] - 1
    if n == 0:
        z = xp.zeros(0)
        return FitResult(xp.zeros((0, 5)), xp.zeros((0, 5, 5)), z, z.astype(xp.int32), z.astype(bool))
    length = offsets[1:] - offsets[:-1]
    n_max = int(length.max())
    mv0, mv1 = variances

    def mi_at(k: int) -> Array:
        return measurements[offsets[:-1] + xp.minimum(k, length - 1)]

    mi = mi_at(0)
    p = start_params
    c = start_cov * cfg.initial_cov_scale
    p, c, _ = update(
        xp,
        p,
        c,
        meas.local0[mi],
        meas.local1[mi],
        mv0[mi],
        mv1[mi],
        meas.dimension[mi],
    )
    module = meas.module[mi]
    filt_p, filt_c = [p], [c]
    pred_p, pred_c, jacs = [p], [c], [None]
    chi2 = xp.zeros(n)
    ndf = meas.dimension[mi].astype(xp.int64) - 5
    ok = xp.ones(n, dtype=bool)
    for k in range(1, n_max):
        active = k < length
        mi = mi_at(k)
        target = meas.module[mi]
        _, _, _, phi, theta, _ = bound_to_global(xp, det, module, p)
        rot = det.rotation[module]
        st = xp.sin(theta)
        cos_inc = (
            rot[:, 0, 2] * st * xp.cos(phi) + rot[:, 1, 2] * st * xp.sin(phi) + rot[:, 2, 2] * xp.cos(theta)
        )
        cq = add_scattering(xp, p, c, material[module], cos_inc)
        pp, pc, s, jac = transport(xp, det, module, target, p, cq, bfield)
        bad = xp.isnan(s) & active
        ok &= ~bad
        pp = xp.where(bad[:, None], p, pp)
        pc = xp.where(bad[:, None, None], cq, pc)
        up, uc, dchi2 = update(
            xp,
            pp,
            pc,
            meas.local0[mi],
            meas.local1[mi],
            mv0[mi],
            mv1[mi],
            meas.dimension[mi],
        )
        p = xp.where(active[:, None], up, p)
        c = xp.where(active[:, None, None], uc, c)
        module = xp.where(active, target, module)
        chi2 += xp.where(active, dchi2, 0.0)
        ndf += xp.where(active, meas.dimension[mi].astype(xp.int64), 0)
        filt_p.append(p)
        filt_c.append(c)
        pred_p.append(pp)
        pred_c.append(pc)
        jacs.append(jac)
    # smoother, from each track's last measurement back to its first
    sp_, sc_ = filt_p[-1], filt_c[-1]
    for k in range(n_max - 2, -1, -1):
        nxt = k + 1
        active = nxt < length  # the state at k+1 exists: smooth k from it
        fp, fc = filt_p[k], filt_c[k]
        jac = jacs[nxt]
        ppred, cpred = pred_p[nxt], pred_c[nxt]
        # A = P_f J^T P_pred^-1, solved in the basis that scales P_pred to unit diagonal: the bound
        # parameters' variances span ten orders of magnitude
        gain = xp.transpose(_spd_solve(xp, cpred, jac @ fc), (0, 2, 1))
        diff = sp_ - ppred
        diff[:, 2] = _wrap(xp, diff[:, 2])
        sm_p = fp + (gain @ diff[:, :, None])[:, :, 0]
        sm_c = fc + gain @ (sc_ - cpred) @ xp.transpose(gain, (0, 2, 1))
        # tracks that end at k: their smoothed state at k is the filtered one
        ends_here = length - 1 == k
        sp_ = xp.where(active[:, None], sm_p, xp.where(ends_here[:, None], fp, sp_))
        sc_ = xp.where(active[:, None, None], sm_c, xp.where(ends_here[:, None, None], fc, sc_))
    first_module = meas.module[measurements[offsets[:-1]]]
    # scattering between the beam line and the first measurement
    p0 = 1.0 / xp.maximum(xp.abs(sp_[:, 4]), 1e-9)
    th0 = highland(xp.full(n, cfg.beam_pipe_x0), p0, xp)
    sc_ = sc_.copy()
    sin_t = xp.maximum(xp.abs(xp.sin(sp_[:, 3])), 1e-6)
    sc_[:, 2, 2] += th0 * th0 / (sin_t * sin_t)
    sc_[:, 3, 3] += th0 * th0
    per_p, per_c = to_perigee(xp, det, first_module, sp_, sc_, bfield)
    diag = xp.stack([per_c[:, i, i] for i in range(5)], axis=1)
    ok &= xp.all(diag > 0, axis=1) & xp.all(xp.isfinite(per_p), axis=1)
    return FitResult(per_p, per_c, chi2, ndf.astype(xp.int32), ok)


def _spd_solve(xp: ModuleType, a: Array, b: Array) -> Array:
    """a^-1 b for symmetric positive matrices a [n, 5, 5], b [n, 5, k], with diagonal scaling."""
    d = xp.sqrt(xp.maximum(xp.abs(xp.diagonal(a, axis1=1, axis2=2)), 1e-300))
    a_n = a / (d[:, :, None] * d[:, None, :])
    return xp.linalg.solve(a_n, b / d[:, :, None]) / d[:, :, None]
