"""Navigation through the sensitive layers: which layer a track reaches next, and which modules of
that layer it may cross.

Each layer is approximated for navigation by a cylinder (barrel: radius = mean module-centre
radius) or a disc (end cap: z = mean module-centre z). Which modules contain a point of the layer
is answered by a per-layer (phi, z) or (phi, r) grid whose bins list every module overlapping the
bin, widened by a tolerance, so that overlapping modules are all found; the exact crossing is then
computed on each module's plane (:func:`kernels.propagation.intersect_plane`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from types import ModuleType

import numpy as np

from kernels import fused
from kernels.detector import LAYER_DISC, Detector
from kernels.propagation import NEWTON_STEPS, helix_at
from kernels.segments import expand_ranges
from kernels.xp import Array, asarray

BIG = 1e30


@dataclass(frozen=True)
class NavigationConfig:
    """Attributes:
    bin_size_mm: target grid bin size along phi (at the layer's radius) and along z or r [mm] (20).
    tolerance_mm: how far outside its bounds a module is still registered in a bin [mm] (3).
    layer_extent_tolerance_mm: how far outside a layer's extent a crossing still counts [mm] (10).
    """

    bin_size_mm: float = 20.0
    tolerance_mm: float = 3.0
    layer_extent_tolerance_mm: float = 10.0


@dataclass(frozen=True)
class NavigationGrid:
    """Per layer: navigation surface, extent and module grid (all arrays in one namespace).

    Attributes:
        is_disc (bool [L]); position: cylinder radius or disc z [mm] (float64 [L]);
        lo, hi: extent along z (cylinders) or r (discs) [mm] (float64 [L]);
        n_phi, n_u: grid bins along phi and along z or r (int64 [L]); u_lo, u_hi: grid range [mm];
        bin_offset: first global bin of each layer (int64 [L]);
        bin_start, bin_count: CSR over ``bin_modules`` per global bin (int64 [B]);
        bin_modules: module indices (int32).
    """

    is_disc: Array
    position: Array
    lo: Array
    hi: Array
    n_phi: Array
    n_u: Array
    u_lo: Array
    u_hi: Array
    bin_offset: Array
    bin_start: Array
    bin_count: Array
    bin_modules: Array

    @property
    def n_layers(self) -> int:
        return int(self.position.shape[0])

    def to(self, xp: ModuleType) -> NavigationGrid:
        return replace(self, **{f.name: asarray(xp, getattr(self, f.name)) for f in fields(self)})


def _module_corners(det: Detector, module: np.ndarray) -> np.ndarray:
    """Global corners [n, 4, 3] of modules (host)."""
    b = np.asarray(det.bounds)[module]
    bt = np.asarray(det.bounds_type)[module]
    rect = bt == 6
    hx = np.where(rect, np.maximum(np.abs(b[:, 0]), np.abs(b[:, 2])), np.maximum(b[:, 0], b[:, 1]))
    hy = np.where(rect, np.maximum(np.abs(b[:, 1]), np.abs(b[:, 3])), b[:, 2])
    cu = np.stack([-hx, hx, hx, -hx], axis=1)
    cv = np.stack([-hy, -hy, hy, hy], axis=1)
    rot = np.asarray(det.rotation)[module]
    t = np.asarray(det.translation)[module]
    return rot[:, None, :, 0] * cu[..., None] + rot[:, None, :, 1] * cv[..., None] + t[:, None, :]


def build_navigation(det: Detector, cfg: NavigationConfig | None = None) -> NavigationGrid:
    """Build the grid on the host (numpy), once per detector."""
    cfg = cfg or NavigationConfig()
    lay = det.layers
    n_layers = lay.size
    is_disc = lay.kind == LAYER_DISC
    trans = np.asarray(det.translation)
    position, lo, hi = np.zeros(n_layers), np.zeros(n_layers), np.zeros(n_layers)
    n_phi, n_u = np.zeros(n_layers, np.int64), np.zeros(n_layers, np.int64)
    u_lo, u_hi = np.zeros(n_layers), np.zeros(n_layers)
    bins_per_layer: list[list[np.ndarray]] = []
    for i in range(n_layers):
        mods = np.arange(lay.module_begin[i], lay.module_end[i])
        c = _module_corners(det, mods)
        r = np.hypot(c[..., 0], c[..., 1])
        z = c[..., 2]
        centre_r = np.hypot(trans[mods, 0], trans[mods, 1])
        if is_disc[i]:
            position[i] = trans[mods, 2].mean()
            lo[i], hi[i] = min(r.min(), centre_r.min()), r.max()
            u_mod_lo, u_mod_hi = np.minimum(r.min(axis=1), centre_r), r.max(axis=1)
            radius = 0.5 * (lo[i] + hi[i])
        else:
            position[i] = centre_r.mean()
            lo[i], hi[i] = z.min(), z.max()
            u_mod_lo, u_mod_hi = z.min(axis=1), z.max(axis=1)
            radius = position[i]
        u_lo[i], u_hi[i] = lo[i] - cfg.tolerance_mm, hi[i] + cfg.tolerance_mm
        n_u[i] = max(1, math.ceil((u_hi[i] - u_lo[i]) / cfg.bin_size_mm))
        n_phi[i] = max(1, math.ceil(2 * math.pi * max(radius, 1.0) / cfg.bin_size_mm))
        # azimuth span of every module, unwrapped around its centre
        phi_c = np.arctan2(trans[mods, 1], trans[mods, 0])
        dphi = (
            np.remainder(np.arctan2(c[..., 1], c[..., 0]) - phi_c[:, None] + math.pi, 2 * math.pi) - math.pi
        )
        tol_phi = cfg.tolerance_mm / np.maximum(np.minimum(r.min(axis=1), centre_r), 1.0)
        p_lo = phi_c + dphi.min(axis=1) - tol_phi
        p_hi = phi_c + dphi.max(axis=1) + tol_phi
        w_phi = 2 * math.pi / n_phi[i]
        w_u = (u_hi[i] - u_lo[i]) / n_u[i]
        lists: list[list[int]] = [[] for _ in range(int(n_phi[i] * n_u[i]))]
        for k, m in enumerate(mods):
            b0 = math.floor((p_lo[k] + math.pi) / w_phi)
            b1 = math.floor((p_hi[k] + math.pi) / w_phi)
            if b1 - b0 + 1 >= n_phi[i]:
                b0, b1 = 0, int(n_phi[i]) - 1
            a0 = max(0, math.floor((u_mod_lo[k] - cfg.tolerance_mm - u_lo[i]) / w_u))
            a1 = min(int(n_u[i]) - 1, math.floor((u_mod_hi[k] + cfg.tolerance_mm - u_lo[i]) / w_u))
            for bp in range(b0, b1 + 1):
                for bu in range(a0, a1 + 1):
                    lists[(bp % int(n_phi[i])) * int(n_u[i]) + bu].append(int(m))
        bins_per_layer.append([np.array(sorted(set(x)), np.int32) for x in lists])
    counts = np.array([len(b) for layer in bins_per_layer for b in layer], np.int64)
    bin_start = np.zeros(counts.size, np.int64)
    np.cumsum(counts[:-1], out=bin_start[1:])
    bin_offset = np.zeros(n_layers, np.int64)
    np.cumsum((n_phi * n_u)[:-1], out=bin_offset[1:])
    modules = np.concatenate([b for layer in bins_per_layer for b in layer]).astype(np.int32)
    return NavigationGrid(
        is_disc=is_disc,
        position=position,
        lo=lo,
        hi=hi,
        n_phi=n_phi,
        n_u=n_u,
        u_lo=u_lo,
        u_hi=u_hi,
        bin_offset=bin_offset,
        bin_start=bin_start,
        bin_count=counts,
        bin_modules=modules,
    )


def next_layer(
    xp: ModuleType,
    nav: NavigationGrid,
    x: Array,
    y: Array,
    z: Array,
    phi: Array,
    theta: Array,
    h: Array,
    exclude: Array,
    s_min: Array,
    tolerance_mm: float,
) -> tuple[Array, Array]:
    """The nearest layer ahead of each track (not ``exclude``, further than ``s_min`` [mm]) and the
    path length to it.

    Returns:
        (layer index, -1 when the track leaves the detector (int64); path length s [mm]).
    """
    if fused.enabled(xp):
        return fused.next_layer(xp, nav, x, y, z, phi, theta, h, exclude, s_min, tolerance_mm, NEWTON_STEPS)
    n = x.shape[0]
    st, ct = xp.sin(theta)[:, None], xp.cos(theta)[:, None]
    x_, y_, z_, phi_, h_ = x[:, None], y[:, None], z[:, None], phi[:, None], h[:, None]
    pos = nav.position[None, :]
    # discs: exact
    s_disc = (pos - z_) / xp.where(xp.abs(ct) < 1e-12, 1e-12, ct)
    # cylinders: straight-line root, then Newton on x^2 + y^2 = R^2
    tx, ty = st * xp.cos(phi_), st * xp.sin(phi_)
    a = xp.maximum(tx * tx + ty * ty, 1e-18)
    b = x_ * tx + y_ * ty
    c = x_ * x_ + y_ * y_ - pos * pos
    disc = b * b - a * c
    s_cyl = (-b + xp.sqrt(xp.maximum(disc, 0.0))) / a
    reachable = disc >= 0
    for _ in range(NEWTON_STEPS):
        px, py, _, pphi = helix_at(xp, x_, y_, z_, phi_, theta[:, None], h_, s_cyl)
        g = px * px + py * py - pos * pos
        dg = 2.0 * st * (px * xp.cos(pphi) + py * xp.sin(pphi))
        s_cyl = s_cyl - g / xp.where(xp.abs(dg) < 1e-9, 1e-9, dg)
    s = xp.where(nav.is_disc[None, :], s_disc, s_cyl)
    px, py, pz, _ = helix_at(xp, x_, y_, z_, phi_, theta[:, None], h_, s)
    u = xp.where(nav.is_disc[None, :], xp.hypot(px, py), pz)
    on_layer = (u >= nav.lo[None, :] - tolerance_mm) & (u <= nav.hi[None, :] + tolerance_mm)
    r_check = xp.abs(xp.hypot(px, py) - pos) < 1.0  # Newton converged onto the cylinder
    ok = on_layer & (s > s_min[:, None] + 1e-3) & (nav.is_disc[None, :] | (reachable & r_check))
    # a curling track cannot go further than half a turn: beyond that it comes back inwards
    ok &= xp.abs(h_ * s) < math.pi
    layer_ids = xp.arange(nav.n_layers)[None, :]
    ok &= layer_ids != exclude[:, None]
    s_ok = xp.where(ok, s, BIG)
    best = xp.argmin(s_ok, axis=1)
    s_best = s_ok[xp.arange(n), best]
    return xp.where(s_best < BIG, best, -1), s_best


def modules_near(
    xp: ModuleType, nav: NavigationGrid, layer: Array, x: Array, y: Array, z: Array
) -> tuple[Array, Array]:
    """Candidate modules around points on layers.

    Returns:
        (owner row, module index) pairs.
    """
    phi = xp.arctan2(y, x)
    u = xp.where(nav.is_disc[layer], xp.hypot(x, y), z)
    n_phi, n_u = nav.n_phi[layer], nav.n_u[layer]
    bp = xp.floor((phi + math.pi) / (2 * math.pi) * n_phi).astype(xp.int64) % n_phi
    w_u = (nav.u_hi[layer] - nav.u_lo[layer]) / n_u
    bu = xp.clip(xp.floor((u - nav.u_lo[layer]) / w_u).astype(xp.int64), 0, n_u - 1)
    gbin = nav.bin_offset[layer] + bp * n_u + bu
    owner, item = expand_ranges(xp, nav.bin_start[gbin], nav.bin_count[gbin])
    return owner, nav.bin_modules[item]
