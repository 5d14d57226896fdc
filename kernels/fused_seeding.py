"""Fused CUDA seeding (CuPy backend): the algorithm of :mod:`kernels.seeding` in six launches.

1. ``doublets`` (count, then fill after a scan): one thread per (middle spacepoint, side) walks the
   same (layer, phi bin, z or r window) ranges of the sorted grid as the array code and applies the
   same doublet cuts; doublets come out grouped by middle, each with its conformal-frame values.
2. ``triplets`` (count, then fill): one thread per bottom doublet tests every top doublet of its
   middle with ACTS' triplet cuts (the array code pre-selects tops in a cot(theta) band; the exact
   cuts decide in both).
3. ``compat``: one thread per triplet counts the compatible tops of its bottom doublet and sets the
   seed weight.
4. ``select``: one thread per middle keeps its best seeds by weight and by alignment.

Memory is the exact doublet and triplet count, not a bound on candidates: no chunking needed.
``tests/test_fused.py`` checks the seeds against the array code.
"""

from __future__ import annotations

import itertools
import math
from types import ModuleType
from typing import Any

import numpy as np

from kernels.cuda_module import CudaModule
from kernels.edm.measurements import Spacepoints
from kernels.edm.seeds import Seeds
from kernels.profiling import section
from kernels.xp import Array, device_constant

_BLOCK = 128

_SOURCE = r"""
#define PI 3.14159265358979323846
#define TWO_PI 6.28318530717958647692

// configuration vector layout (see CFG_* in Python)
#define DR_MIN 0
#define DR_MAX 1
#define C0 2
#define C1 3
#define COT_MAX 4
#define IMPACT_MAX 5
#define TWO_R_MIN 6
#define PHI_WIDTH 7
#define SCAT_MIN2 8
#define SIGMA_K2 9
#define INV_4RMIN2 10
#define CB2 11
#define DELTA_IHD 12
#define COMPAT_W 13
#define IMPACT_W 14
#define COMPAT_LIMIT 15
#define SIGMA_K 16
#define CB 17
#define Z_SPAN 18
#define Z_OFFSET 19

__device__ __forceinline__ double phi_reach_(double r_in, double r_out, double two_r_min, double impact) {
    double bend = asin(fmin(r_out / two_r_min, 1.0)) - asin(fmin(r_in / two_r_min, 1.0));
    double imp = asin(fmin(impact / fmax(r_in, 1e-3), 1.0)) - asin(fmin(impact / fmax(r_out, 1e-3), 1.0));
    return 1.05 * (fabs(bend) + fabs(imp)) + 1e-3;
}

__device__ __forceinline__ long long lower_(const double* a, long long n, double v) {
    long long lo = 0, hi = n;
    while (lo < hi) { long long mid = (lo + hi) >> 1; if (a[mid] < v) lo = mid + 1; else hi = mid; }
    return lo;
}
__device__ __forceinline__ long long upper_(const double* a, long long n, double v) {
    long long lo = 0, hi = n;
    while (lo < hi) { long long mid = (lo + hi) >> 1; if (a[mid] <= v) lo = mid + 1; else hi = mid; }
    return lo;
}

// one thread per (middle, layer): the candidate window on that layer (z on barrels, r on discs)
// and the phi bins it spans; n_bins = 0 where the layer cannot hold a partner
extern "C" __global__ void doublet_windows(
    const double* z, const double* r, const double* phi, const long long* middles, int n_mid, int n_layers,
    int n_phi, const bool* is_disc, const double* lr_lo, const double* lr_hi, const double* lz_lo,
    const double* lz_hi, int top, const double* cfg, int* n_bins_out, double* c_lo_out, double* c_hi_out,
    long long* b_lo_out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_mid * n_layers) return;
    int row = (int)(i / n_layers);
    int l = (int)(i % n_layers);
    long long m = middles[row];
    double rm = r[m], zm = z[m], phim = phi[m];
    double c0 = cfg[C0], c1 = cfg[C1], cotmax = cfg[COT_MAX];
    double dr_lo = top ? rm + cfg[DR_MIN] : rm - cfg[DR_MAX];
    double dr_hi = top ? rm + cfg[DR_MAX] : rm - cfg[DR_MIN];
    double r_lo = lr_lo[l] - 1.0, r_hi = lr_hi[l] + 1.0, z_lo = lz_lo[l] - 1.0, z_hi = lz_hi[l] + 1.0;
    double c_lo, c_hi, r_other;
    bool ok;
    if (!is_disc[l]) {
        double ra = fmax(r_lo, dr_lo), rb = fmin(r_hi, dr_hi);
        double zw0 = c0 + (zm - c0) * ra / rm, zw1 = c1 + (zm - c1) * ra / rm;
        double zw2 = c0 + (zm - c0) * rb / rm, zw3 = c1 + (zm - c1) * rb / rm;
        double bz_lo = fmin(fmin(zw0, zw1), fmin(zw2, zw3));
        double bz_hi = fmax(fmax(zw0, zw1), fmax(zw2, zw3));
        double d_far = fmax(fabs(ra - rm), fabs(rb - rm)) * cotmax;
        bz_lo = fmax(bz_lo, zm - d_far);
        bz_hi = fmin(bz_hi, zm + d_far);
        double margin = 2.0 + 0.005 * fmax(fabs(bz_lo), fabs(bz_hi));
        ok = (ra <= rb) && (bz_lo <= bz_hi);
        c_lo = bz_lo - margin; c_hi = bz_hi + margin;
        r_other = top ? rb : ra;
    } else {
        double d0_ = (zm == c0) ? 1e-9 : zm - c0, d1_ = (zm == c1) ? 1e-9 : zm - c1;
        double q0 = (z_lo - c0) / d0_, q1 = (z_lo - c1) / d1_, q2 = (z_hi - c0) / d0_, q3 = (z_hi - c1) / d1_;
        double q_lo = fmin(fmin(q0, q1), fmin(q2, q3)), q_hi = fmax(fmax(q0, q1), fmax(q2, q3));
        double a = fmax(rm * q_lo, fmax(r_lo, dr_lo));
        double b = fmin(rm * q_hi, fmin(r_hi, dr_hi));
        double dz_min = fmax(fmax(z_lo - zm, zm - z_hi), 0.0) / cotmax;
        if (top) a = fmax(a, rm + dz_min); else b = fmin(b, rm - dz_min);
        double margin = 1.0 + 0.005 * fabs(b);
        ok = (q_lo > 0) && (a <= b);
        c_lo = a - margin; c_hi = b + margin;
        r_other = top ? b : a;
    }
    if (!ok) { n_bins_out[i] = 0; return; }
    double r_o = fmax(r_other, 1.0);
    double reach = top ? phi_reach_(rm, r_o, cfg[TWO_R_MIN], cfg[IMPACT_MAX])
                       : phi_reach_(r_o, rm, cfg[TWO_R_MIN], cfg[IMPACT_MAX]);
    long long b_lo = (long long)floor((phim - reach + PI) / cfg[PHI_WIDTH]);
    long long b_hi = (long long)floor((phim + reach + PI) / cfg[PHI_WIDTH]);
    long long n_bins = b_hi - b_lo + 1;
    if (n_bins > n_phi) n_bins = n_phi;
    n_bins_out[i] = (int)n_bins;
    c_lo_out[i] = c_lo; c_hi_out[i] = c_hi; b_lo_out[i] = b_lo;
}

// one thread per (middle, layer, phi bin) item; mode 0: count doublets; mode 1: fill from offset[item]
// one thread per selected spacepoint: its grid key, packed as kernels/seeding.py's _grid packs it
// (seg * z_span is an exact integer in double precision, so a fused multiply-add rounds as the array code)
extern "C" __global__ void grid_keys(const long long* sel, long long n_sel, const int* sp_module,
                                     const int* module_layer, const double* sp_phi, const int* sp_event,
                                     const double* sp_r, const double* sp_z, const bool* is_disc, int n_layers,
                                     int n_phi, double z_span, double z_offset, double* key) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_sel) return;
    long long s = sel[i];
    long long layer = module_layer[sp_module[s]];
    long long bin = (long long)floor((sp_phi[s] + PI) / TWO_PI * n_phi) % n_phi;
    bin = bin < 0 ? bin + n_phi : bin;
    long long seg = ((long long)sp_event[s] * n_layers + layer) * n_phi + bin;
    double coord = is_disc[layer] ? sp_r[s] : sp_z[s];
    key[i] = (double)seg * z_span + (coord + z_offset);
}

// one thread per work item: its (middle, layer) window and its phi bin within the window, from the
// inclusive prefix sum of the windows' bin counts (items are numbered window by window)
extern "C" __global__ void expand_items(const long long* bins_end, long long n_ml, long long n_items,
                                        long long* item_ml, long long* item_k) {
    long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (it >= n_items) return;
    long long lo = 0, hi = n_ml;  // first window whose end is past it
    while (lo < hi) { long long md = (lo + hi) >> 1; if (bins_end[md] <= it) lo = md + 1; else hi = md; }
    item_ml[it] = lo;
    item_k[it] = it - (lo > 0 ? bins_end[lo - 1] : 0);
}

// one thread per middle m in [0, n_mid]: its first work item (windows are grouped by middle, n_layers
// each) and its first doublet (item_cum: exclusive doublet offsets per item, the total last)
extern "C" __global__ void middle_offsets(const long long* bins_end, const long long* item_cum, int n_mid,
                                          int n_layers, long long* mid_item_off, long long* doublets_per_mid) {
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m > n_mid) return;
    long long first = m > 0 ? bins_end[(long long)m * n_layers - 1] : 0;
    mid_item_off[m] = first;
    doublets_per_mid[m] = item_cum[first];
}

// r, z and phi of the spacepoints in grid order (what doublet_scan reads per candidate)
extern "C" __global__ void grid_columns(const double* r, const double* z, const double* phi,
                                        const long long* grid_order, long long n_grid, double* g_r, double* g_z,
                                        double* g_phi) {
    long long pos = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pos >= n_grid) return;
    long long o = grid_order[pos];
    g_r[pos] = r[o];
    g_z[pos] = z[o];
    g_phi[pos] = phi[o];
}

extern "C" __global__ void doublet_scan(
    const double* x, const double* y, const double* z, const double* r, const double* phi,
    const double* var_r, const double* var_z, const int* event,
    const long long* grid_order, const double* grid_key, const double* g_r, const double* g_z,
    const double* g_phi, long long n_grid, int n_phi, int n_layers, const long long* middles, const long long* item_ml, const long long* item_k, long long n_items,
    long long row0, const double* c_lo_a, const double* c_hi_a, const long long* b_lo_a,
    int top, const double* cfg, int mode, int* count, const long long* offset,
    int* o_middle, long long* o_other, double* o_cot, double* o_z0, double* o_u, double* o_v,
    double* o_er, double* o_inv_dr) {
    long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (it >= n_items) return;
    long long ml = item_ml[it];
    int row = (int)(ml / n_layers);
    int l = (int)(ml % n_layers);
    long long m = middles[row];
    double rm = r[m], zm = z[m], phim = phi[m];
    double c0 = cfg[C0], c1 = cfg[C1], cotmax = cfg[COT_MAX];
    long long bb = ((b_lo_a[ml] + item_k[it]) % n_phi + n_phi) % n_phi;
    long long seg = ((long long)event[m] * n_layers + l) * n_phi + bb;
    double base = (double)seg * cfg[Z_SPAN] + cfg[Z_OFFSET];
    long long lo = lower_(grid_key, n_grid, base + c_lo_a[ml]);
    long long hi = upper_(grid_key, n_grid, base + c_hi_a[ml]);
    int found = 0;
    long long out = mode ? offset[it] : 0;
    // the window's candidates are consecutive grid positions: their r, z, phi are read in grid order
    // (g_*), not through grid_order, so one thread's reads are sequential
    for (long long pos = lo; pos < hi; ++pos) {
        double ro = g_r[pos], zo = g_z[pos];
        double dr = top ? ro - rm : rm - ro;
        double dz = top ? zo - zm : zm - zo;
        bool good = (dr >= cfg[DR_MIN]) && (dr <= cfg[DR_MAX]);
        double cot = dz / (good ? dr : 1.0);
        double z0 = zm - rm * cot;
        good = good && (fabs(cot) <= cotmax) && (z0 >= c0) && (z0 <= c1);
        double r_in = fmin(ro, rm), r_out = fmax(ro, rm);
        double dp = g_phi[pos] - phim + PI;
        dp = fabs(dp - TWO_PI * floor(dp / TWO_PI) - PI);
        good = good && (dp <= phi_reach_(r_in, r_out, cfg[TWO_R_MIN], cfg[IMPACT_MAX]));
        if (!good) continue;
        if (mode) {
            long long o = grid_order[pos];
            double cos_m = x[m] / rm, sin_m = y[m] / rm;
            double dx = x[o] - x[m], dy = y[o] - y[m];
            double xr = dx * cos_m + dy * sin_m, yr = dy * cos_m - dx * sin_m;
            double inv_dr2 = 1.0 / (xr * xr + yr * yr);
            double inv_dr = sqrt(inv_dr2);
            double c = (zo - zm) * inv_dr * (top ? 1.0 : -1.0);
            o_middle[out] = (int)(row - row0); o_other[out] = o; o_cot[out] = c; o_z0[out] = z0;
            o_u[out] = xr * inv_dr2; o_v[out] = yr * inv_dr2;
            o_er[out] = ((var_z[m] + var_z[o]) + c * c * (var_r[m] + var_r[o])) * inv_dr2;
            o_inv_dr[out] = inv_dr;
            ++out;
        }
        ++found;
    }
    if (!mode) count[it] = found;
}

// one thread per bottom doublet j; tops of its middle are [top_off[mid], top_off[mid + 1])
extern "C" __global__ void triplets(
    const int* b_mid, const double* b_cot, const double* b_u, const double* b_v, const double* b_er,
    const double* b_inv_dr, int n_bot, const long long* top_off, const double* t_cot, const double* t_u,
    const double* t_v, const double* t_er, const double* t_inv_dr, const long long* middles, const double* r,
    const double* var_r, const double* var_z, const double* cfg, int mode, int* count, const long long* offset,
    long long* o_bot, long long* o_top, double* o_curv, double* o_impact, double* o_chi) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_bot) return;
    int mr = b_mid[j];
    long long m = middles[mr];
    double rm = r[m];
    double cot_b = b_cot[j], ub = b_u[j], vb = b_v[j], erb = b_er[j], idb = b_inv_dr[j];
    double i_sin2 = 1.0 + cot_b * cot_b;
    int found = 0;
    long long out = mode ? offset[j] : 0;
    for (long long t = top_off[mr]; t < top_off[mr + 1]; ++t) {
        double cot_t = t_cot[t];
        double dcot2 = (cot_b - cot_t) * (cot_b - cot_t);
        double error2 = t_er[t] + erb + 2.0 * (cot_b * cot_t * var_r[m] + var_z[m]) * idb * t_inv_dr[t];
        double excess = dcot2 - error2;
        if (excess > 0 && excess > cfg[SCAT_MIN2] * i_sin2) continue;
        double du = t_u[t] - ub;
        if (du == 0) du = 1e-12;
        double a = (t_v[t] - vb) / du;
        double s2 = 1.0 + a * a;
        double b = vb - a * ub;
        double ihd2 = b * b / s2;
        if (ihd2 > cfg[INV_4RMIN2]) continue;
        double pt2 = cfg[CB2] / fmax(4.0 * ihd2, 1e-30);
        double scat2 = cfg[SIGMA_K2] / pt2 * i_sin2;
        if (excess > 0 && excess > scat2) continue;
        double impact = fabs((a - b * rm) * rm);
        if (impact > cfg[IMPACT_MAX]) continue;
        if (mode) {
            o_bot[out] = j; o_top[out] = t; o_curv[out] = b / sqrt(s2); o_impact[out] = impact;
            o_chi[out] = fmax(excess, 0.0) / fmax(scat2, 1e-12);
            ++out;
        }
        ++found;
    }
    if (!mode) count[j] = found;
}

// one thread per triplet: compatible tops of the same bottom doublet, then the seed weight
extern "C" __global__ void compat(
    const long long* tr_bot, const long long* tr_top, const double* curv, const double* impact, int n_trip,
    const long long* trip_off, const long long* b_other, const long long* t_other, const double* t_cot,
    const double* x, const double* y, const double* r, const double* var_r, const double* cfg, double* weight) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_trip) return;
    long long j = tr_bot[i];
    long long tsp = t_other[tr_top[i]], bsp = b_other[j];
    double lever2 = (x[tsp] - x[bsp]) * (x[tsp] - x[bsp]) + (y[tsp] - y[bsp]) * (y[tsp] - y[bsp]);
    double sigma_xy = sqrt(fmax(var_r[tsp], 1e-6));
    double tol = cfg[DELTA_IHD] + 3.0 * 4.9 * sigma_xy / fmax(lever2, 1.0);
    double c_own = t_cot[tr_top[i]];
    double pt = cfg[CB] / fmax(2.0 * fabs(curv[i]), 1e-12);
    double cot_tol = cfg[SIGMA_K] / pt * sqrt(1.0 + c_own * c_own) + 0.005;
    double r_own = r[tsp];
    int n = 0;
    for (long long k = trip_off[j]; k < trip_off[j + 1]; ++k) {
        if (fabs(curv[k] - curv[i]) > tol) continue;
        long long osp = t_other[tr_top[k]];
        if (!(fabs(r[osp] - r_own) > cfg[DR_MIN])) continue;
        if (fabs(t_cot[tr_top[k]] - c_own) > cot_tol) continue;
        ++n;
    }
    double limit = cfg[COMPAT_LIMIT];
    double nc = n < limit ? (double)n : limit;
    weight[i] = cfg[COMPAT_W] * nc - cfg[IMPACT_W] * impact[i];
}

#define MAXK 16
// one thread per middle: keep the best max_w by weight and the best max_a by alignment quality
extern "C" __global__ void select_seeds(
    const long long* mid_trip_off, const double* weight, const double* chi, const double* impact, int n_mid,
    int max_w, int max_a, double impact_max, bool* keep) {
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= n_mid) return;
    long long best_w[MAXK], best_a[MAXK];
    int nw = 0, na = 0;
    for (long long t = mid_trip_off[m]; t < mid_trip_off[m + 1]; ++t) {
        double w = weight[t];
        // insertion keeps the earlier triplet first among equal weights (stable, as the array code)
        if (nw < max_w || w > weight[best_w[nw - 1]]) {
            int p = nw < max_w ? nw++ : nw - 1;
            while (p > 0 && weight[best_w[p - 1]] < w) { best_w[p] = best_w[p - 1]; --p; }
            best_w[p] = t;
        }
        double q = chi[t] + impact[t] / impact_max;
        if (na < max_a || q < chi[best_a[na - 1]] + impact[best_a[na - 1]] / impact_max) {
            int p = na < max_a ? na++ : na - 1;
            while (p > 0 && chi[best_a[p - 1]] + impact[best_a[p - 1]] / impact_max > q) {
                best_a[p] = best_a[p - 1]; --p;
            }
            best_a[p] = t;
        }
    }
    for (int k = 0; k < nw; ++k) keep[best_w[k]] = true;
    for (int k = 0; k < na; ++k) keep[best_a[k]] = true;
}
"""

_CUDA = CudaModule(_SOURCE, _BLOCK)


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def grid_keys(
    xp: ModuleType, sp: Spacepoints, module_layer: Array, is_disc: Array, sel: Array, n_phi: int, z_span: float,
    z_offset: float,
) -> Array:  # fmt: skip
    """The seeding grid's sort key of the spacepoints ``sel`` in one launch (see :func:`kernels.seeding._grid`)."""
    c = xp.ascontiguousarray
    key = xp.empty(sel.shape[0], xp.float64)
    args = (
        c(sel, dtype=xp.int64), xp.int64(sel.shape[0]), c(sp.module, dtype=xp.int32), c(module_layer, dtype=xp.int32),
        c(sp.phi, dtype=xp.float64), c(sp.event, dtype=xp.int32), c(sp.r, dtype=xp.float64),
        c(sp.z, dtype=xp.float64), c(is_disc, dtype=xp.bool_), xp.int32(is_disc.shape[0]),
        xp.int32(n_phi), xp.float64(z_span), xp.float64(z_offset), key,
    )  # fmt: skip
    _launch("grid_keys", int(sel.shape[0]), args)
    return key


def _unused(xp: ModuleType, dtype: Any) -> Array:
    """A one-element array for an output argument the launch's mode does not write (the counting passes
    leave them alone): the same one every time, no allocation and no launch."""
    return device_constant(xp, ("unused", np.dtype(dtype).str), lambda: np.zeros(1, dtype))


def _exclusive(xp: ModuleType, counts: Array) -> tuple[Array, int]:
    off = xp.zeros(counts.shape[0] + 1, dtype=xp.int64)
    off[1:] = xp.cumsum(counts)
    return off, int(off[-1])


def find_seeds(
    xp: ModuleType,
    sp: Spacepoints,
    geo: Any,
    cfg: Any,
    bfield: float,
    grid: Any,
    middles: Array,
    n_phi: int,
    scattering_k: float,
    pt_per_tesla_mm: float,
    z_span: float,
    z_offset: float,
) -> Seeds:
    """Seeds of the batch (same arguments as the array code's internals; see :mod:`kernels.seeding`)."""
    f64 = xp.float64
    two_r_min = 2.0 * cfg.min_pt_gev / (pt_per_tesla_mm * bfield)
    r_min = cfg.min_pt_gev / (pt_per_tesla_mm * bfield)
    cb = pt_per_tesla_mm * bfield
    constants = [
        float(v)
        for v in (
            cfg.delta_r_min_mm,
            cfg.delta_r_max_mm,
            cfg.collision_z_min_mm,
            cfg.collision_z_max_mm,
            cfg.cot_theta_max,
            cfg.impact_max_mm,
            two_r_min,
            2 * math.pi / n_phi,
            (cfg.sigma_scattering * scattering_k / cfg.min_pt_gev) ** 2,
            (cfg.sigma_scattering * scattering_k) ** 2,
            1.0 / (2.0 * r_min) ** 2,
            cb * cb,
            cfg.delta_inv_helix_diameter_per_mm,
            cfg.compat_seed_weight,
            cfg.impact_weight_factor,
            float(cfg.compat_seed_limit),
            cfg.sigma_scattering * scattering_k,
            cb,
            z_span,
            z_offset,
        )
    ]
    # copied to the device once per configuration
    cfgv = device_constant(xp, ("seeding", *constants), lambda: np.asarray(constants, dtype=np.float64))
    cols = [xp.ascontiguousarray(a, dtype=f64) for a in (sp.x, sp.y, sp.z, sp.r, sp.phi, sp.var_r, sp.var_z)]
    x, y, z, r, phi, var_r, var_z = cols
    event = xp.ascontiguousarray(sp.event, dtype=xp.int32)
    order = xp.ascontiguousarray(grid.order, dtype=xp.int64)
    key = xp.ascontiguousarray(grid.key, dtype=f64)
    mids = xp.ascontiguousarray(middles, dtype=xp.int64)
    n_mid = int(mids.shape[0])
    layers = (
        xp.ascontiguousarray(geo.is_disc, dtype=xp.bool_),
        *(xp.ascontiguousarray(a, dtype=f64) for a in (geo.r_lo, geo.r_hi, geo.z_lo, geo.z_hi)),
    )
    n_grid = xp.int64(key.shape[0])
    g_r, g_z, g_phi = (xp.empty(key.shape[0], f64) for _ in range(3))
    _launch("grid_columns", key.shape[0], (r, z, phi, order, n_grid, g_r, g_z, g_phi))
    grid_args = (
        x,
        y,
        z,
        r,
        phi,
        var_r,
        var_z,
        event,
        order,
        key,
        g_r,
        g_z,
        g_phi,
        n_grid,
        xp.int32(n_phi),
        xp.int32(geo.n_layers),
    )
    n_layers = geo.n_layers
    # middles in blocks of at most max_candidates_per_chunk (middle, layer) windows: the windows and
    # work items of a whole mu=200 batch would otherwise hold ~1 GB at once
    block = max(1, cfg.max_candidates_per_chunk // max(n_layers, 1))
    parts = []
    for b0 in range(0, n_mid, block):
        parts += _middle_block(
            xp, grid_args, xp.ascontiguousarray(mids[b0 : b0 + block]), layers, n_layers, n_phi, cfgv, cfg,
            x, y, z, r, phi, var_r, var_z,
        )  # fmt: skip
    return Seeds.from_parts(xp, sp.event, parts)


def _middle_block(
    xp: ModuleType, grid_args: tuple, mids: Array, layers: tuple, n_layers: int, n_phi: int, cfgv: Array,
    cfg: Any, x: Array, y: Array, z: Array, r: Array, phi: Array, var_r: Array, var_z: Array,
) -> list[tuple]:  # fmt: skip
    """Seed parts (see :func:`_chunk`) of the middles ``mids``."""
    f64, i64 = xp.float64, xp.int64
    n_mid = int(mids.shape[0])
    n_ml = n_mid * n_layers
    d_i, d_l, d_d = _unused(xp, np.int32), _unused(xp, np.int64), _unused(xp, np.float64)
    # per side: windows of every (middle, layer), then one work item per (middle, layer, phi bin) so
    # that dense windows do not serialize a thread; count doublets per item, then cut the middles into
    # chunks whose doublets fit the bound: memory stays bounded whatever the pile-up or batch size
    sides: list[dict[str, Array]] = []
    for top in (0, 1):
        side = {"n_bins": xp.empty(n_ml, dtype=xp.int32)}
        side.update({k: xp.empty(n_ml, dtype=f64) for k in ("c_lo", "c_hi")})
        side["b_lo"] = xp.empty(n_ml, dtype=i64)
        with section("seeding.doublet_windows"):
            _launch(
                "doublet_windows",
                n_ml,
                (
                    z, r, phi, mids, xp.int32(n_mid), xp.int32(n_layers), xp.int32(n_phi), *layers,
                    xp.int32(top), cfgv, side["n_bins"], side["c_lo"], side["c_hi"], side["b_lo"],
                ),
            )  # fmt: skip
        side["bins_end"] = xp.cumsum(side.pop("n_bins"), dtype=i64)  # inclusive: item ends per window
        sides.append(side)
    # both sides' item totals in one copy to the host
    n_items_side = (
        [int(t) for t in xp.stack([sd["bins_end"][-1] for sd in sides]).tolist()] if n_ml else [0, 0]
    )
    for top, (side, n_items) in enumerate(zip(sides, n_items_side, strict=True)):
        side["item_ml"] = xp.empty(n_items, dtype=i64)
        side["item_k"] = xp.empty(n_items, dtype=i64)
        _launch(
            "expand_items",
            n_items,
            (side["bins_end"], i64(n_ml), i64(n_items), side["item_ml"], side["item_k"]),
        )
        count = xp.empty(n_items, dtype=xp.int32)
        with section("seeding.doublets_count"):
            _launch(
                "doublet_scan",
                n_items,
                (
                    *grid_args, mids, side["item_ml"], side["item_k"], i64(n_items), i64(0), side["c_lo"],
                    side["c_hi"], side["b_lo"], xp.int32(top), cfgv, xp.int32(0), count, d_l, d_i, d_l,
                    *(d_d,) * 6,
                ),
            )  # fmt: skip
        # doublet offsets per item (exclusive, with the total at the end), and per middle: its first item
        # and its first doublet (items are grouped by middle)
        side["item_cum"] = item_cum = xp.empty(n_items + 1, dtype=i64)
        item_cum[:1] = 0
        if n_items:
            xp.cumsum(count, dtype=i64, out=item_cum[1:])
        del count  # the fill pass reads the offsets only: hold one table per item, not two
        side["mid_item_off"] = xp.empty(n_mid + 1, dtype=i64)
        side["doublets_per_mid"] = xp.empty(n_mid + 1, dtype=i64)
        _launch(
            "middle_offsets",
            n_mid + 1,
            (side.pop("bins_end"), item_cum, xp.int32(n_mid), xp.int32(n_layers), side["mid_item_off"],
             side["doublets_per_mid"]),
        )  # fmt: skip
    # doublets per middle, both sides, cumulative (doublets_per_mid is already a prefix sum)
    cum = sides[0]["doublets_per_mid"][1:] + sides[1]["doublets_per_mid"][1:]
    total = int(cum[-1]) if n_mid else 0
    n_chunks = max(1, -(-total // cfg.max_candidates_per_chunk))
    bounds = [0]
    if n_chunks > 1:
        cuts = xp.searchsorted(cum, xp.arange(1, n_chunks, dtype=i64) * cfg.max_candidates_per_chunk)
        bounds += [int(c) for c in cuts.tolist()]
    bounds.append(n_mid)
    # each side's first item and first doublet of every chunk boundary, in one copy to the host (one chunk:
    # the first and last entries, a strided view, no copy to the device)
    at = slice(0, n_mid + 1, n_mid) if len(bounds) == 2 and n_mid > 0 else xp.asarray(bounds)
    host = xp.stack([sd[k][at] for sd in sides for k in ("mid_item_off", "doublets_per_mid")]).tolist()
    item_at, doublet_at = host[0::2], host[1::2]
    parts: list[tuple] = []
    for c, (lo_m, hi_m) in enumerate(itertools.pairwise(bounds)):
        if hi_m <= lo_m:
            continue
        part = _chunk(
            xp,
            grid_args,
            mids,
            lo_m,
            hi_m,
            sides,
            [(h[c], h[c + 1]) for h in item_at],
            [h[c + 1] - h[c] for h in doublet_at],
            n_layers,
            cfgv,
            cfg,
            x,
            y,
            r,
            var_r,
            var_z,
        )
        if part is not None:
            parts.append(part)
    return parts


def _chunk(
    xp: ModuleType,
    grid_args: tuple,
    mids: Array,
    lo_m: int,
    hi_m: int,
    sides: list[dict],
    item_ranges: list[tuple[int, int]],
    totals: list[int],
    n_layers: int,
    cfgv: Array,
    cfg: Any,
    x: Array,
    y: Array,
    r: Array,
    var_r: Array,
    var_z: Array,
) -> tuple | None:
    """Seeds of the middles [lo_m, hi_m): (bottom, middle, top, weight, z_vertex).

    Args:
        item_ranges: each side's work items of these middles; totals: each side's doublets of them.
    """
    f64 = xp.float64
    n_mid = hi_m - lo_m
    filled = []
    for top, (side, (i0, i1), total) in enumerate(zip(sides, item_ranges, totals, strict=True)):
        # the chunk's doublets start at item i0's offset (a view when the chunk starts the block)
        item_cum, per_mid = side["item_cum"], side["doublets_per_mid"]
        off = item_cum[i0 : i1 + 1] if i0 == 0 else item_cum[i0 : i1 + 1] - item_cum[i0]
        mid_start = per_mid[lo_m : hi_m + 1] if lo_m == 0 else per_mid[lo_m : hi_m + 1] - per_mid[lo_m]
        d = {
            "middle": xp.empty(total, xp.int32),
            "other": xp.empty(total, xp.int64),
            **{k: xp.empty(total, f64) for k in ("cot", "z0", "u", "v", "er", "inv_dr")},
        }
        with section("seeding.doublets_fill"):
            _launch(
                "doublet_scan",
                i1 - i0,
                (
                    *grid_args,
                    mids,
                    side["item_ml"][i0:i1],
                    side["item_k"][i0:i1],
                    xp.int64(i1 - i0),
                    xp.int64(lo_m),
                    side["c_lo"],
                    side["c_hi"],
                    side["b_lo"],
                    xp.int32(top),
                    cfgv,
                    xp.int32(1),
                    _unused(xp, np.int32),  # the counts: written by the counting pass only
                    off,
                    d["middle"],
                    d["other"],
                    d["cot"],
                    d["z0"],
                    d["u"],
                    d["v"],
                    d["er"],
                    d["inv_dr"],
                ),
            )
        filled.append((d, mid_start))
    (bot, bot_off), (top, top_off) = filled
    mids = mids[lo_m:hi_m]
    n_bot = int(bot["middle"].shape[0])
    if n_bot == 0 or int(top["middle"].shape[0]) == 0:
        return None
    targs = (
        bot["middle"],
        bot["cot"],
        bot["u"],
        bot["v"],
        bot["er"],
        bot["inv_dr"],
        xp.int32(n_bot),
        top_off,
        top["cot"],
        top["u"],
        top["v"],
        top["er"],
        top["inv_dr"],
        mids,
        r,
        var_r,
        var_z,
        cfgv,
    )
    tcount = xp.zeros(n_bot, dtype=xp.int32)
    d_l, d_d = _unused(xp, np.int64), _unused(xp, np.float64)
    with section("seeding.triplets_count"):
        _launch("triplets", n_bot, (*targs, xp.int32(0), tcount, d_l, d_l, d_l, d_d, d_d, d_d))
    trip_off, n_trip = _exclusive(xp, tcount)
    if n_trip == 0:
        return None
    tr_bot, tr_top = xp.empty(n_trip, xp.int64), xp.empty(n_trip, xp.int64)
    curv, impact, chi = (xp.empty(n_trip, f64) for _ in range(3))
    with section("seeding.triplets_fill"):
        _launch("triplets", n_bot, (*targs, xp.int32(1), tcount, trip_off, tr_bot, tr_top, curv, impact, chi))
    weight = xp.empty(n_trip, f64)
    with section("seeding.compat"):
        _launch(
            "compat",
            n_trip,
            (
                tr_bot,
                tr_top,
                curv,
                impact,
                xp.int32(n_trip),
                trip_off,
                bot["other"],
                top["other"],
                top["cot"],
                x,
                y,
                r,
                var_r,
                cfgv,
                weight,
            ),
        )
    keep = xp.zeros(n_trip, dtype=xp.bool_)
    mid_trip_off = xp.ascontiguousarray(trip_off[bot_off])
    with section("seeding.select"):
        _launch(
            "select_seeds",
            n_mid,
            (
                mid_trip_off,
                weight,
                chi,
                impact,
                xp.int32(n_mid),
                xp.int32(min(cfg.max_seeds_per_middle, 16)),
                xp.int32(min(cfg.max_aligned_seeds_per_middle, 16)),
                xp.float64(cfg.impact_max_mm),
                keep,
            ),
        )
    k = xp.nonzero(keep)[0]
    return (
        bot["other"][tr_bot[k]],
        mids[bot["middle"][tr_bot[k]]],
        top["other"][tr_top[k]],
        weight[k],
        bot["z0"][tr_bot[k]],
    )
