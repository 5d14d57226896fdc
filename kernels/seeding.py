"""Triplet seeding on pixel spacepoints, after ACTS' ``SeedFinder`` / traccc's ``seeding_algorithm``.

1. Spacepoints inside the seeding region are sorted by (event, phi bin, z).
2. For every middle spacepoint, bottom and top candidates are the spacepoints of the phi bins that
   a track of pT >= min_pt with |d0| <= impact_max can reach, restricted to the z window that lines
   from the collision region through the middle allow; each (phi bin, z window) is one contiguous
   range of the sorted array, so candidates are expanded without any search.
3. Doublet cuts: delta-r window, |cot(theta)| <= cot_theta_max, z at the beam line inside the
   collision region, and the azimuth difference a helix of pT >= min_pt with |d0| <= impact_max allows.
4. Doublets are mapped to the middle spacepoint's conformal frame (ACTS' LinCircle: u, v, cot(theta),
   z origin, error). Tops are sorted by cot(theta) per middle, so each bottom meets only the tops in
   a cot(theta) band as wide as measurement errors plus multiple scattering at min_pt allow.
5. Triplet cuts as ACTS: cot(theta) compatibility with pT-dependent scattering, helix diameter
   (pT >= min_pt), transverse impact parameter <= impact_max.
6. Seed filter: weight = compat_seed_weight * (number of other tops on other layers with a
   compatible curvature, at most compat_seed_limit) - impact_weight_factor * |d0|; the best
   max_seeds_per_middle seeds of every middle spacepoint are kept.

Middles are processed in chunks whose candidate count is bounded, so memory stays bounded at any pile-up.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import ModuleType

from kernels import fused, fused_seeding
from kernels.detector import LAYER_DISC, Detector
from kernels.edm.measurements import Spacepoints
from kernels.edm.seeds import Seeds
from kernels.errors import ConfigError
from kernels.profiling import section
from kernels.segments import expand_ranges, rank_in_segment
from kernels.xp import Array, asarray, scatter_add

# pT [GeV] = PT_PER_TESLA_MM * B [T] * R [mm]
PT_PER_TESLA_MM = 0.299792458e-3
_Z_OFFSET = 10_000.0  # shifts z [mm] to positive values for the packed sort key
_Z_SPAN = 20_000.0


@dataclass(frozen=True)
class SeedingConfig:
    """Seeding configuration; defaults tuned for the ACTS generic detector in a 2 T field.

    Attributes:
        min_pt_gev: smallest transverse momentum a seed may have [GeV] (0.5).
        r_min_mm, r_max_mm: radial range of spacepoints used for seeding [mm] (0, 200: the pixels).
        z_max_mm: |z| limit of spacepoints used [mm] (2000).
        delta_r_min_mm, delta_r_max_mm: radial distance between consecutive seed spacepoints [mm] (5, 90:
            neighbouring pixel layers of the generic detector, and the innermost layer skipped; 270 let
            every pixel layer pair with every other and doubled the doublets for no efficiency).
        collision_z_min_mm, collision_z_max_mm: the luminous region's z range [mm] (-200, 200: 4 sigma of
            a 50 mm beam spot; particles from vertices outside cannot be seeded).
        cot_theta_max: largest |cot(theta)| of a seed (10, i.e. |eta| < 3).
        impact_max_mm: largest transverse impact parameter [mm] (3, as ACTS; prompt tracks).
        sigma_scattering: number of sigmas of multiple scattering allowed between doublets (5).
        rad_length_per_seed: material crossed by a seed, in radiation lengths (0.05).
        phi_bin_width_rad: width of the azimuthal grid bins [rad] (0.05).
        max_seeds_per_middle: seeds kept per middle spacepoint, best weight first (2).
        max_aligned_seeds_per_middle: further seeds kept per middle, best r-z alignment and smallest
            impact parameter first, whatever their weight (1).
        delta_inv_helix_diameter_per_mm: curvature tolerance for compatible tops [1/mm] (3e-5).
        compat_seed_weight: weight per compatible top (200); compat_seed_limit: at most (2).
        impact_weight_factor: weight lost per mm of impact parameter (1).
        max_candidates_per_chunk: bound on (middle, candidate) pairs held at once (4e6).
        bfield_t: solenoid field [T]; None takes the detector's.
    """

    min_pt_gev: float = 0.5
    r_min_mm: float = 0.0
    r_max_mm: float = 200.0
    z_max_mm: float = 2000.0
    delta_r_min_mm: float = 5.0
    delta_r_max_mm: float = 90.0
    collision_z_min_mm: float = -200.0
    collision_z_max_mm: float = 200.0
    cot_theta_max: float = 10.0
    impact_max_mm: float = 3.0
    sigma_scattering: float = 5.0
    rad_length_per_seed: float = 0.05
    phi_bin_width_rad: float = 0.05
    max_seeds_per_middle: int = 2
    max_aligned_seeds_per_middle: int = 1
    delta_inv_helix_diameter_per_mm: float = 3e-5
    compat_seed_weight: float = 200.0
    compat_seed_limit: int = 2
    impact_weight_factor: float = 1.0
    max_candidates_per_chunk: int = 4_000_000
    bfield_t: float | None = None

    def __post_init__(self) -> None:
        if self.min_pt_gev <= 0:
            raise ConfigError("SeedingConfig.min_pt_gev must be > 0")
        if not 0 <= self.delta_r_min_mm < self.delta_r_max_mm:
            raise ConfigError("SeedingConfig needs 0 <= delta_r_min_mm < delta_r_max_mm")
        if self.collision_z_min_mm > self.collision_z_max_mm:
            raise ConfigError("SeedingConfig collision region is empty")
        if self.max_seeds_per_middle < 1 or self.max_candidates_per_chunk < 1000:
            raise ConfigError("SeedingConfig.max_seeds_per_middle >= 1 and max_candidates_per_chunk >= 1000")
        if not 0 < self.phi_bin_width_rad <= math.pi:
            raise ConfigError("SeedingConfig.phi_bin_width_rad must be in (0, pi]")

    def scattering_k_gev(self) -> float:
        """Highland's constant for the seed's material: theta0 = k / p [rad, GeV]."""
        x = self.rad_length_per_seed
        return 0.0136 * math.sqrt(x) * (1.0 + 0.038 * math.log(x))


@dataclass(frozen=True)
class SeedingGeometry:
    """Layer table the seeding grid is built on (prepared once per detector).

    Attributes:
        module_layer: layer index per module (int32 [M]).
        is_disc: per layer, True for end-cap discs (bool [L]).
        r_lo, r_hi, z_lo, z_hi: extent of each layer's modules [mm] (float64 [L]).
    """

    module_layer: Array
    is_disc: Array
    r_lo: Array
    r_hi: Array
    z_lo: Array
    z_hi: Array

    @property
    def n_layers(self) -> int:
        return int(self.r_lo.shape[0])


def seeding_geometry(xp: ModuleType, det: Detector) -> SeedingGeometry:
    lay = det.layers
    return SeedingGeometry(
        module_layer=asarray(xp, det.layer_index).astype(xp.int32),
        is_disc=asarray(xp, lay.kind == LAYER_DISC),
        r_lo=asarray(xp, lay.r_min),
        r_hi=asarray(xp, lay.r_max),
        z_lo=asarray(xp, lay.z_min),
        z_hi=asarray(xp, lay.z_max),
    )


@dataclass(frozen=True)
class _Grid:
    order: Array  # spacepoint index per sorted position
    key: Array  # packed (event, layer, phi bin, coordinate) key per sorted position (float64)
    n_phi: int
    n_layers: int


def _grid(xp: ModuleType, sp: Spacepoints, geo: SeedingGeometry, sel: Array, n_phi: int) -> _Grid:
    """Spacepoints sorted by (event, layer, phi bin, z on barrel layers / r on discs)."""
    if fused.enabled(xp):
        key = fused_seeding.grid_keys(xp, sp, geo.module_layer, geo.is_disc, sel, n_phi, _Z_SPAN, _Z_OFFSET)
    else:
        layer = geo.module_layer[sp.module[sel]].astype(xp.int64)
        phi_bin = xp.floor((sp.phi[sel] + math.pi) / (2 * math.pi) * n_phi).astype(xp.int64) % n_phi
        seg = (sp.event[sel].astype(xp.int64) * geo.n_layers + layer) * n_phi + phi_bin
        coord = xp.where(geo.is_disc[layer], sp.r[sel], sp.z[sel])
        key = seg.astype(xp.float64) * _Z_SPAN + (coord + _Z_OFFSET)
    order = xp.argsort(key)
    return _Grid(order=sel[order], key=key[order], n_phi=n_phi, n_layers=geo.n_layers)


def _phi_reach(r_inner: Array, r_outer: Array, two_r_min: float, impact: float, xp: ModuleType) -> Array:
    """Largest azimuth difference between points at r_inner < r_outer on a helix with pT >= min_pt
    and |d0| <= impact (bending term + impact term), with a 5% margin."""
    bend = xp.arcsin(xp.minimum(r_outer / two_r_min, 1.0)) - xp.arcsin(xp.minimum(r_inner / two_r_min, 1.0))
    imp = xp.arcsin(xp.minimum(impact / xp.maximum(r_inner, 1e-3), 1.0)) - xp.arcsin(
        xp.minimum(impact / xp.maximum(r_outer, 1e-3), 1.0)
    )
    return 1.05 * (xp.abs(bend) + xp.abs(imp)) + 1e-3


def _hull(xp: ModuleType, values: list[Array]) -> tuple[Array, Array]:
    lo, hi = values[0], values[0]
    for v in values[1:]:
        lo, hi = xp.minimum(lo, v), xp.maximum(hi, v)
    return lo, hi


def _candidate_ranges(
    xp: ModuleType,
    sp: Spacepoints,
    geo: SeedingGeometry,
    grid: _Grid,
    mid: Array,
    top: bool,
    cfg: SeedingConfig,
    two_r_min: float,
) -> tuple[Array, Array, Array]:
    """Per (middle, layer, phi bin) the [lo, hi) range of candidate positions in the grid.

    On a barrel layer the window is in z: lines from the collision region through the middle, at
    the layer's radii, cut by |cot(theta)|. On a disc it is in r: the same lines at the disc's z.

    Returns:
        (middle row in ``mid`` per range, lo, hi).
    """
    rm, zm = sp.r[mid][:, None], sp.z[mid][:, None]
    c0, c1 = cfg.collision_z_min_mm, cfg.collision_z_max_mm
    if top:
        dr_lo, dr_hi = rm + cfg.delta_r_min_mm, rm + cfg.delta_r_max_mm
    else:
        dr_lo, dr_hi = rm - cfg.delta_r_max_mm, rm - cfg.delta_r_min_mm
    r_lo, r_hi = geo.r_lo[None, :] - 1.0, geo.r_hi[None, :] + 1.0
    z_lo, z_hi = geo.z_lo[None, :] - 1.0, geo.z_hi[None, :] + 1.0
    # barrel: radius range, then z window
    ra, rb = xp.maximum(r_lo, dr_lo), xp.minimum(r_hi, dr_hi)
    zw = [z0 + (zm - z0) * r / rm for r in (ra, rb) for z0 in (c0, c1)]
    bz_lo, bz_hi = _hull(xp, zw)
    d_far = xp.maximum(xp.abs(ra - rm), xp.abs(rb - rm)) * cfg.cot_theta_max
    bz_lo = xp.maximum(bz_lo, zm - d_far)
    bz_hi = xp.minimum(bz_hi, zm + d_far)
    margin_b = 2.0 + 0.005 * xp.maximum(xp.abs(bz_lo), xp.abs(bz_hi))
    barrel_ok = (ra <= rb) & (bz_lo <= bz_hi)
    # disc: the lines' radius at the disc's z range
    ratios = [(zd - z0) / xp.where(zm == z0, 1e-9, zm - z0) for zd in (z_lo, z_hi) for z0 in (c0, c1)]
    q_lo, q_hi = _hull(xp, ratios)
    dr_lo_, dr_hi_ = (
        xp.maximum(rm * q_lo, xp.maximum(r_lo, dr_lo)),
        xp.minimum(rm * q_hi, xp.minimum(r_hi, dr_hi)),
    )
    dz_min = xp.maximum(xp.maximum(z_lo - zm, zm - z_hi), 0.0) / cfg.cot_theta_max
    if top:
        dr_lo_ = xp.maximum(dr_lo_, rm + dz_min)
    else:
        dr_hi_ = xp.minimum(dr_hi_, rm - dz_min)
    margin_d = 1.0 + 0.005 * xp.abs(dr_hi_)
    disc_ok = (q_lo > 0) & (dr_lo_ <= dr_hi_)
    disc = geo.is_disc[None, :]
    c_lo = xp.where(disc, dr_lo_ - margin_d, bz_lo - margin_b)
    c_hi = xp.where(disc, dr_hi_ + margin_d, bz_hi + margin_b)
    ok = xp.where(disc, disc_ok, barrel_ok)
    r_other = xp.where(disc, dr_hi_ if top else dr_lo_, rb if top else ra)
    m_row, layer = xp.nonzero(ok)
    r_o = xp.maximum(r_other[m_row, layer], 1.0)
    rmv = rm[m_row, 0]
    reach = (
        _phi_reach(rmv, r_o, two_r_min, cfg.impact_max_mm, xp)
        if top
        else _phi_reach(r_o, rmv, two_r_min, cfg.impact_max_mm, xp)
    )
    n_phi = grid.n_phi
    width = 2 * math.pi / n_phi
    phim = sp.phi[mid][m_row]
    b_lo = xp.floor((phim - reach + math.pi) / width).astype(xp.int64)
    b_hi = xp.floor((phim + reach + math.pi) / width).astype(xp.int64)
    n_bins = xp.minimum(b_hi - b_lo + 1, n_phi)
    owner, k = expand_ranges(xp, xp.zeros_like(n_bins), n_bins)
    b = (b_lo[owner] + k) % n_phi
    seg = (sp.event[mid][m_row[owner]].astype(xp.int64) * grid.n_layers + layer[owner]) * n_phi + b
    base = seg.astype(xp.float64) * _Z_SPAN + _Z_OFFSET
    lo = xp.searchsorted(grid.key, base + c_lo[m_row[owner], layer[owner]], side="left")
    hi = xp.searchsorted(grid.key, base + c_hi[m_row[owner], layer[owner]], side="right")
    return m_row[owner], lo, hi


@dataclass(frozen=True)
class _Doublets:
    middle: Array  # row in the chunk's middle list
    other: Array  # spacepoint index
    cot: Array
    z0: Array
    u: Array
    v: Array
    er: Array  # squared error of cot(theta)
    inv_dr: Array  # 1 / transverse distance


def _doublets(
    xp: ModuleType,
    sp: Spacepoints,
    geo: SeedingGeometry,
    grid: _Grid,
    mid: Array,
    top: bool,
    cfg: SeedingConfig,
    two_r_min: float,
) -> _Doublets:
    owner, lo, hi = _candidate_ranges(xp, sp, geo, grid, mid, top, cfg, two_r_min)
    rng_owner, pos = expand_ranges(xp, lo, hi - lo)
    m_row = owner[rng_owner]
    o = grid.order[pos]
    m = mid[m_row]
    dr = sp.r[o] - sp.r[m] if top else sp.r[m] - sp.r[o]
    dz = sp.z[o] - sp.z[m] if top else sp.z[m] - sp.z[o]
    ok = (dr >= cfg.delta_r_min_mm) & (dr <= cfg.delta_r_max_mm)
    cot = dz / xp.where(ok, dr, 1.0)
    z0 = sp.z[m] - sp.r[m] * cot
    ok &= (xp.abs(cot) <= cfg.cot_theta_max) & (z0 >= cfg.collision_z_min_mm) & (z0 <= cfg.collision_z_max_mm)
    r_in = xp.minimum(sp.r[o], sp.r[m])
    r_out = xp.maximum(sp.r[o], sp.r[m])
    dphi = xp.abs(xp.remainder(sp.phi[o] - sp.phi[m] + math.pi, 2 * math.pi) - math.pi)
    ok &= dphi <= _phi_reach(r_in, r_out, two_r_min, cfg.impact_max_mm, xp)
    keep = xp.nonzero(ok)[0]
    m_row, o, m, cot, z0 = m_row[keep], o[keep], m[keep], cot[keep], z0[keep]
    # conformal frame of the middle spacepoint (ACTS LinCircle)
    cos_m = sp.x[m] / sp.r[m]
    sin_m = sp.y[m] / sp.r[m]
    dx = sp.x[o] - sp.x[m]
    dy = sp.y[o] - sp.y[m]
    xr = dx * cos_m + dy * sin_m
    yr = dy * cos_m - dx * sin_m
    inv_dr2 = 1.0 / (xr * xr + yr * yr)
    inv_dr = xp.sqrt(inv_dr2)
    # cot(theta) from the 3-D-consistent transverse distance, as ACTS
    cot = (sp.z[o] - sp.z[m]) * inv_dr * (1.0 if top else -1.0)
    er = ((sp.var_z[m] + sp.var_z[o]) + cot * cot * (sp.var_r[m] + sp.var_r[o])) * inv_dr2
    return _Doublets(m_row, o, cot, z0, xr * inv_dr2, yr * inv_dr2, er, inv_dr)


def _triplets(
    xp: ModuleType,
    sp: Spacepoints,
    mid: Array,
    bot: _Doublets,
    top: _Doublets,
    cfg: SeedingConfig,
    bfield: float,
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """Triplets (middle row, bottom doublet, top doublet) passing ACTS' triplet cuts.

    Returns:
        (bottom doublet index, top doublet index, curvature 1/(2R) signed [1/mm], |d0| [mm], cot, middle row)
    """
    k_scat = cfg.scattering_k_gev()
    scat_min2 = (cfg.sigma_scattering * k_scat / cfg.min_pt_gev) ** 2  # at min pT, per (1 + cot^2)
    # tops sorted by (middle, cot) so that each bottom meets a contiguous band of tops
    t_key = top.middle.astype(xp.float64) * 64.0 + (top.cot + 32.0)
    t_order = xp.argsort(t_key)
    t_key_sorted = t_key[t_order]
    er_t_max = float(top.er.max()) if top.er.shape[0] else 0.0
    cot_b = bot.cot
    tol2 = 2.0 * (bot.er + er_t_max) + scat_min2 * (1.0 + (xp.abs(cot_b) + 0.5) ** 2)
    tol = xp.minimum(xp.sqrt(tol2) + 1e-6, 20.0)
    b_key = bot.middle.astype(xp.float64) * 64.0 + 32.0
    lo = xp.searchsorted(t_key_sorted, b_key + cot_b - tol, side="left")
    hi = xp.searchsorted(t_key_sorted, b_key + cot_b + tol, side="right")
    b_idx, pos = expand_ranges(xp, lo, hi - lo)
    t_idx = t_order[pos]
    m_row = bot.middle[b_idx]
    m = mid[m_row]
    # ACTS' triplet test
    cot_t = top.cot[t_idx]
    cot_bb = cot_b[b_idx]
    dcot2 = (cot_bb - cot_t) ** 2
    error2 = (
        top.er[t_idx]
        + bot.er[b_idx]
        + 2.0 * (cot_bb * cot_t * sp.var_r[m] + sp.var_z[m]) * bot.inv_dr[b_idx] * top.inv_dr[t_idx]
    )
    i_sin_theta2 = 1.0 + cot_bb * cot_bb
    excess = dcot2 - error2
    ok = ~((excess > 0) & (excess > scat_min2 * i_sin_theta2))
    du = top.u[t_idx] - bot.u[b_idx]
    du = xp.where(du == 0, 1e-12, du)
    a = (top.v[t_idx] - bot.v[b_idx]) / du
    s2 = 1.0 + a * a
    b = bot.v[b_idx] - a * bot.u[b_idx]
    i_helix_diam2 = b * b / s2
    r_min = cfg.min_pt_gev / (PT_PER_TESLA_MM * bfield)
    ok &= i_helix_diam2 <= 1.0 / (2.0 * r_min) ** 2
    # pT-dependent scattering with this triplet's curvature
    pt2 = (PT_PER_TESLA_MM * bfield) ** 2 / xp.maximum(4.0 * i_helix_diam2, 1e-30)
    scat2 = (cfg.sigma_scattering * k_scat) ** 2 / pt2 * i_sin_theta2
    ok &= ~((excess > 0) & (excess > scat2))
    rm = sp.r[m]
    impact = xp.abs((a - b * rm) * rm)
    ok &= impact <= cfg.impact_max_mm
    keep = xp.nonzero(ok)[0]
    curvature = b / xp.sqrt(s2)
    # how well the two doublets line up in r-z, in units of the allowed scattering (smaller is better)
    chi = xp.maximum(excess, 0.0) / xp.maximum(scat2, 1e-12)
    return b_idx[keep], t_idx[keep], curvature[keep], impact[keep], chi[keep], m_row[keep]


def _filter(
    xp: ModuleType,
    sp: Spacepoints,
    bottom_sp: Array,
    top_sp: Array,
    b_idx: Array,
    m_row: Array,
    curv: Array,
    impact: Array,
    chi: Array,
    cot_top: Array,
    cfg: SeedingConfig,
    bfield: float,
) -> tuple[Array, Array]:
    """Seed weights and the mask of kept triplets (best per middle).

    A top is compatible with another of the same bottom doublet when both lie on the same helix:
    curvature within ``delta_inv_helix_diameter_per_mm``, cot(theta) within the scattering allowed
    at the triplet's pT, and on another layer. ACTS checks the curvature only; the cot(theta) test
    keeps random tops in dense events from promoting fake seeds.
    """
    n = b_idx.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=xp.float64), xp.zeros(0, dtype=bool)
    # compatible tops: same bottom doublet, curvature within tolerance, on another layer (|dr| > dr_min)
    order = xp.lexsort(xp.stack([curv, b_idx.astype(xp.float64)]))
    ckey = b_idx[order].astype(xp.float64) * 16.0 + (
        curv[order] + 4.0
    )  # |curvature| < 1/(2 R_min) << 1 per mm
    # short lever arms (end-cap triplets) measure curvature poorly: widen by 3 sigma of the sagitta
    b_sp = bottom_sp[order]
    t_sp = top_sp[order]
    lever2 = (sp.x[t_sp] - sp.x[b_sp]) ** 2 + (sp.y[t_sp] - sp.y[b_sp]) ** 2
    sigma_xy = xp.sqrt(xp.maximum(sp.var_r[t_sp], 1e-6))
    tol = cfg.delta_inv_helix_diameter_per_mm + 3.0 * 4.9 * sigma_xy / xp.maximum(lever2, 1.0)
    lo = xp.searchsorted(ckey, ckey - tol, side="left")
    hi = xp.searchsorted(ckey, ckey + tol, side="right")
    own, other = expand_ranges(xp, lo, hi - lo)
    r_t = sp.r[top_sp[order]]
    cot_o = cot_top[order]
    pt = PT_PER_TESLA_MM * bfield / xp.maximum(2.0 * xp.abs(curv[order]), 1e-12)
    cot_tol = cfg.sigma_scattering * cfg.scattering_k_gev() / pt * xp.sqrt(1.0 + cot_o * cot_o) + 0.005
    compatible = (xp.abs(r_t[other] - r_t[own]) > cfg.delta_r_min_mm) & (
        xp.abs(cot_o[other] - cot_o[own]) <= cot_tol[own]
    )
    n_compat = xp.zeros(n, dtype=xp.int64)
    scatter_add(xp, n_compat, own[compatible], xp.ones(int(compatible.sum()), dtype=xp.int64))
    n_compat = xp.minimum(n_compat, cfg.compat_seed_limit)
    weight_sorted = cfg.compat_seed_weight * n_compat - cfg.impact_weight_factor * impact[order]
    weight = xp.empty(n, dtype=xp.float64)
    weight[order] = weight_sorted
    # keep the best seeds of every middle by weight, plus the best-aligned ones: a particle with only
    # three pixel layers in reach has no compatible top and would lose to confirmed fakes
    keep = xp.zeros(n, dtype=bool)
    m_key = m_row.astype(xp.float64)
    best = xp.lexsort(xp.stack([-weight, m_key]))
    rank = rank_in_segment(xp, m_row[best])
    keep[best[rank < cfg.max_seeds_per_middle]] = True
    if cfg.max_aligned_seeds_per_middle > 0:
        quality = chi + impact / cfg.impact_max_mm
        aligned = xp.lexsort(xp.stack([quality, m_key]))
        rank = rank_in_segment(xp, m_row[aligned])
        keep[aligned[rank < cfg.max_aligned_seeds_per_middle]] = True
    return weight, keep


def find_seeds(
    xp: ModuleType, sp: Spacepoints, geo: SeedingGeometry, cfg: SeedingConfig, bfield_t: float
) -> Seeds:
    """Seeds of all events in ``sp`` (spacepoints of several events are never combined).

    Args:
        geo: the layer table from :func:`seeding_geometry`.
        bfield_t: the detector's field [T], used unless ``cfg.bfield_t`` is set.
    """
    bfield = cfg.bfield_t if cfg.bfield_t is not None else bfield_t
    two_r_min = 2.0 * cfg.min_pt_gev / (PT_PER_TESLA_MM * bfield)
    sel = xp.nonzero((sp.r >= cfg.r_min_mm) & (sp.r <= cfg.r_max_mm) & (xp.abs(sp.z) <= cfg.z_max_mm))[0]
    if sel.shape[0] < 3:
        return Seeds.from_parts(xp, sp.event, [])
    n_phi = max(1, round(2 * math.pi / cfg.phi_bin_width_rad))
    with section("seeding.grid"):
        grid = _grid(xp, sp, geo, sel, n_phi)
    middles = sel
    if fused.enabled(xp):
        return fused_seeding.find_seeds(
            xp,
            sp,
            geo,
            cfg,
            bfield,
            grid,
            middles,
            n_phi,
            cfg.scattering_k_gev(),
            PT_PER_TESLA_MM,
            _Z_SPAN,
            _Z_OFFSET,
        )
    # count candidates per middle (bottom + top ranges) to cut the work into bounded chunks
    own_b, lo_b, hi_b = _candidate_ranges(xp, sp, geo, grid, middles, False, cfg, two_r_min)
    own_t, lo_t, hi_t = _candidate_ranges(xp, sp, geo, grid, middles, True, cfg, two_r_min)
    work = xp.zeros(middles.shape[0], dtype=xp.int64)
    scatter_add(xp, work, own_b, hi_b - lo_b)
    scatter_add(xp, work, own_t, hi_t - lo_t)
    cum = xp.cumsum(work)
    total = int(cum[-1])
    n_chunks = max(1, -(-total // cfg.max_candidates_per_chunk))
    bounds = [0]
    if n_chunks > 1:
        cuts = xp.searchsorted(cum, xp.arange(1, n_chunks, dtype=xp.int64) * cfg.max_candidates_per_chunk)
        bounds += [int(c) for c in cuts.tolist()]
    bounds.append(middles.shape[0])
    parts = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        mid = middles[a:b]
        bot = _doublets(xp, sp, geo, grid, mid, False, cfg, two_r_min)
        top = _doublets(xp, sp, geo, grid, mid, True, cfg, two_r_min)
        if bot.middle.shape[0] == 0 or top.middle.shape[0] == 0:
            continue
        b_idx, t_idx, curv, impact, chi, m_row = _triplets(xp, sp, mid, bot, top, cfg, bfield)
        weight, keep = _filter(
            xp,
            sp,
            bot.other[b_idx],
            top.other[t_idx],
            b_idx,
            m_row,
            curv,
            impact,
            chi,
            top.cot[t_idx],
            cfg,
            bfield,
        )
        k = xp.nonzero(keep)[0]
        parts.append((bot.other[b_idx[k]], mid[m_row[k]], top.other[t_idx[k]], weight[k], bot.z0[b_idx[k]]))
    return Seeds.from_parts(xp, sp.event, parts)
