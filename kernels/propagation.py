"""Helix propagation in a constant solenoid field, between module planes and to the beam line.

A track with momentum direction (phi, theta) and charge over momentum q/p in a field B along z
turns in the transverse plane at the rate h = -(q/p) * B * c per unit path length s, with
c = 0.299792458e-3 GeV / (T mm); theta is constant (no energy loss, see :mod:`kernels.kalman`):

    x(s) = x0 + s sin(theta) cos(phi0 + h s / 2) sinc(h s / 2)
    y(s) = y0 + s sin(theta) sin(phi0 + h s / 2) sinc(h s / 2)
    z(s) = z0 + s cos(theta),      phi(s) = phi0 + h s

The sinc form is exact and stays well conditioned for straight tracks (h -> 0). Plane and line
intersections use a fixed number of Newton steps from the straight-line solution (no data-dependent
loops, so the same code runs batched on a GPU); covariances are transported with a Jacobian from
finite differences of the same propagation.
"""

from __future__ import annotations

from types import ModuleType

from kernels import fused
from kernels.detector import Detector
from kernels.xp import Array

C_LIGHT = 0.299792458e-3  # GeV / (T mm)
NEWTON_STEPS = 6


def sinc(xp: ModuleType, u: Array) -> Array:
    small = xp.abs(u) < 1e-4
    u_safe = xp.where(small, 1.0, u)
    return xp.where(small, 1.0 - u * u / 6.0, xp.sin(u_safe) / u_safe)


def helix_at(
    xp: ModuleType, x0: Array, y0: Array, z0: Array, phi0: Array, theta: Array, h: Array, s: Array
) -> tuple[Array, Array, Array, Array]:
    """Position and azimuth after path length ``s`` [mm]."""
    half = 0.5 * h * s
    st = xp.sin(theta)
    f = s * st * sinc(xp, half)
    a = phi0 + half
    return x0 + f * xp.cos(a), y0 + f * xp.sin(a), z0 + s * xp.cos(theta), phi0 + h * s


def turn_rate(qop: Array, bfield_t: float) -> Array:
    """h = d(phi)/ds [1/mm]."""
    return -qop * bfield_t * C_LIGHT


def bound_to_global(
    xp: ModuleType, det: Detector, module: Array, params: Array
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """(x, y, z, phi, theta, q/p) of bound parameters on module planes."""
    rot = det.rotation[module]
    t = det.translation[module]
    l0, l1 = params[:, 0], params[:, 1]
    x = rot[:, 0, 0] * l0 + rot[:, 0, 1] * l1 + t[:, 0]
    y = rot[:, 1, 0] * l0 + rot[:, 1, 1] * l1 + t[:, 1]
    z = rot[:, 2, 0] * l0 + rot[:, 2, 1] * l1 + t[:, 2]
    return x, y, z, params[:, 2], params[:, 3], params[:, 4]


def intersect_plane(
    xp: ModuleType,
    det: Detector,
    module: Array,
    x: Array,
    y: Array,
    z: Array,
    phi: Array,
    theta: Array,
    h: Array,
    s_start: Array | None = None,
    steps: int = NEWTON_STEPS,
) -> tuple[Array, Array, Array, Array, Array, Array, Array]:
    """Path length to each module's plane and the local coordinates there.

    Args:
        s_start: where the Newton iteration starts [mm] (NaN rows, or None: the straight-line estimate).
        steps: Newton steps.

    Returns:
        (s [mm], loc0, loc1 [mm], phi at the plane, x, y, z); s is NaN where the helix runs parallel.
    """
    if fused.enabled(xp) and s_start is None and steps == NEWTON_STEPS:
        return fused.intersect_plane(xp, det, module, x, y, z, phi, theta, h, NEWTON_STEPS)
    rot = det.rotation[module]
    t = det.translation[module]
    nx, ny, nz = rot[:, 0, 2], rot[:, 1, 2], rot[:, 2, 2]
    st, ct = xp.sin(theta), xp.cos(theta)
    dist0 = nx * (t[:, 0] - x) + ny * (t[:, 1] - y) + nz * (t[:, 2] - z)
    cos_inc = nx * st * xp.cos(phi) + ny * st * xp.sin(phi) + nz * ct
    s = dist0 / xp.where(xp.abs(cos_inc) < 1e-9, 1e-9, cos_inc)
    if s_start is not None:
        s = xp.where(xp.isnan(s_start), s, s_start)
    for _ in range(steps):
        px, py, pz, pphi = helix_at(xp, x, y, z, phi, theta, h, s)
        f = nx * (px - t[:, 0]) + ny * (py - t[:, 1]) + nz * (pz - t[:, 2])
        df = nx * st * xp.cos(pphi) + ny * st * xp.sin(pphi) + nz * ct
        s = s - f / xp.where(xp.abs(df) < 1e-9, 1e-9, df)
    px, py, pz, pphi = helix_at(xp, x, y, z, phi, theta, h, s)
    dx, dy, dz = px - t[:, 0], py - t[:, 1], pz - t[:, 2]
    l0 = rot[:, 0, 0] * dx + rot[:, 1, 0] * dy + rot[:, 2, 0] * dz
    l1 = rot[:, 0, 1] * dx + rot[:, 1, 1] * dy + rot[:, 2, 1] * dz
    resid = rot[:, 0, 2] * dx + rot[:, 1, 2] * dy + rot[:, 2, 2] * dz
    s = xp.where(xp.abs(resid) < 1e-3, s, xp.nan)
    return s, l0, l1, pphi, px, py, pz


def _wrap(xp: ModuleType, a: Array) -> Array:
    return xp.remainder(a + xp.pi, 2 * xp.pi) - xp.pi


def _plane_map(
    xp: ModuleType,
    det: Detector,
    src: Array,
    dst: Array,
    params: Array,
    bfield_t: float,
    s_start: Array | None = None,
    steps: int = NEWTON_STEPS,
) -> tuple[Array, Array]:
    """Bound parameters on ``dst`` of bound parameters on ``src`` (rows broadcast), and the path length
    (``s_start``, ``steps``: see :func:`intersect_plane`)."""
    x, y, z, phi, theta, qop = bound_to_global(xp, det, src, params)
    h = turn_rate(qop, bfield_t)
    s, l0, l1, pphi, _, _, _ = intersect_plane(xp, det, dst, x, y, z, phi, theta, h, s_start, steps)
    out = xp.stack([l0, l1, _wrap(xp, pphi), theta, qop], axis=1)
    return out, s


# finite-difference steps per bound parameter: loc [mm], phi, theta [rad], q/p relative
_FD_STEPS = (1e-4, 1e-4, 1e-7, 1e-7, 1e-6)
# Newton steps of a perturbed map, which starts at the unperturbed path length: the perturbations move
# the crossing by micrometres, and Newton's quadratic convergence closes that in two steps (the fused
# kernels' WARM_STEPS)
WARM_NEWTON_STEPS = 2


def transport(
    xp: ModuleType,
    det: Detector,
    src: Array,
    dst: Array,
    params: Array,
    cov: Array,
    bfield_t: float,
    s_start: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Parameters and covariance on ``dst`` planes, the path length [mm] (NaN: no intersection) and
    the Jacobian d(params on dst)/d(params on src) [n, 5, 5].

    The Jacobian comes from forward differences of the helix map: the five perturbed propagations in
    one batch, each starting its Newton iteration at the unperturbed path length.

    Args:
        s_start: the crossings' path lengths [mm] where the caller found them already (the same
            state and plane): the unperturbed map starts there too and takes WARM_NEWTON_STEPS.
    """
    if fused.enabled(xp) and s_start is None:
        return fused.transport(xp, det, src, dst, params, cov, bfield_t, NEWTON_STEPS)
    n = params.shape[0]
    steps = xp.zeros((5, n), dtype=xp.float64)
    for k, e in enumerate(_FD_STEPS):
        steps[k] = e * (xp.maximum(xp.abs(params[:, 4]), 1e-3) if k == 4 else 1.0)
    base_steps = NEWTON_STEPS if s_start is None else WARM_NEWTON_STEPS
    base, s = _plane_map(xp, det, src, dst, params, bfield_t, s_start, base_steps)
    batch = xp.repeat(params[None, :, :], 5, axis=0)
    for k in range(5):
        batch[k, :, k] += steps[k]
    flat = batch.reshape(5 * n, 5)
    mapped, _ = _plane_map(
        xp, det, xp.tile(src, 5), xp.tile(dst, 5), flat, bfield_t, xp.tile(s, 5), WARM_NEWTON_STEPS
    )
    diff = mapped.reshape(5, n, 5) - base[None]
    diff[:, :, 2] = _wrap(xp, diff[:, :, 2])
    jac = xp.transpose(diff / steps[:, :, None], (1, 2, 0))  # [n, 5 out, 5 in]
    new_cov = jac @ cov @ xp.transpose(jac, (0, 2, 1))
    return base, new_cov, s[:n], jac


def perigee_map(xp: ModuleType, det: Detector, module: Array, params: Array, bfield_t: float) -> Array:
    """Perigee parameters (d0, z0, phi, theta, q/p) w.r.t. the z axis of bound parameters on modules.

    ACTS' sign convention: the point of closest approach is (-d0 sin(phi), d0 cos(phi), z0).
    """
    x, y, z, phi, theta, qop = bound_to_global(xp, det, module, params)
    h = turn_rate(qop, bfield_t)
    st = xp.sin(theta)
    # straight-line estimate of the closest approach, then Newton on d/ds (x^2 + y^2) / 2 = x tx + y ty
    s = -(x * xp.cos(phi) + y * xp.sin(phi)) / xp.maximum(st, 1e-9)
    for _ in range(NEWTON_STEPS):
        px, py, _, pphi = helix_at(xp, x, y, z, phi, theta, h, s)
        tx, ty = st * xp.cos(pphi), st * xp.sin(pphi)
        g = px * tx + py * ty
        dg = (
            tx * tx
            + ty * ty
            + h * st * (px * -xp.sin(pphi) * st + py * xp.cos(pphi) * st) / xp.maximum(st, 1e-9)
        )
        s = s - g / xp.where(xp.abs(dg) < 1e-12, 1e-12, dg)
    px, py, pz, pphi = helix_at(xp, x, y, z, phi, theta, h, s)
    pphi = _wrap(xp, pphi)
    d0 = -px * xp.sin(pphi) + py * xp.cos(pphi)
    return xp.stack([d0, pz, pphi, theta, qop], axis=1)


def to_perigee(
    xp: ModuleType, det: Detector, module: Array, params: Array, cov: Array, bfield_t: float
) -> tuple[Array, Array]:
    """Perigee parameters and covariance (finite-difference Jacobian of :func:`perigee_map`)."""
    n = params.shape[0]
    steps = xp.zeros((5, n), dtype=xp.float64)
    for k, e in enumerate(_FD_STEPS):
        steps[k] = e * (xp.maximum(xp.abs(params[:, 4]), 1e-3) if k == 4 else 1.0)
    batch = xp.repeat(params[None, :, :], 6, axis=0)
    for k in range(5):
        batch[k + 1, :, k] += steps[k]
    out = perigee_map(xp, det, xp.tile(module, 6), batch.reshape(6 * n, 5), bfield_t).reshape(6, n, 5)
    base = out[0]
    diff = out[1:] - base[None]
    diff[:, :, 2] = _wrap(xp, diff[:, :, 2])
    jac = xp.transpose(diff / steps[:, :, None], (1, 2, 0))
    return base, jac @ cov @ xp.transpose(jac, (0, 2, 1))
