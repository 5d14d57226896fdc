"""Fused CUDA kernels for the hot spots of track finding and fitting (CuPy backend only).

Each kernel computes, per row and in one launch, exactly what the array code it replaces computes
with dozens to hundreds of launches: the same helix formulas, the same fixed number of Newton
steps, the same guards. The array code stays the reference; ``tests/test_fused.py`` checks every
kernel against it on random inputs wherever a GPU is present.

Fast paths are looked up through :func:`enabled`; set ``TRACKFLEET_FUSED=0`` (or call
``set_enabled(False)``) to run the array code on the GPU instead.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

from kernels.cuda_module import CudaModule
from kernels.xp import Array, device_constant

_ENABLED = os.environ.get("TRACKFLEET_FUSED", "1") != "0"
_BLOCK = 128

_SOURCE = r"""
#define PI 3.14159265358979323846
#define TWO_PI 6.28318530717958647692
#define BIG 1e30

__device__ __forceinline__ double sinc_(double u) {
    return fabs(u) < 1e-4 ? 1.0 - u * u / 6.0 : sin(u) / u;
}

__device__ __forceinline__ double wrap_(double a) {
    double b = a + PI;
    return b - TWO_PI * floor(b / TWO_PI) - PI;
}

__device__ __forceinline__ void helix_(double x0, double y0, double z0, double phi0, double st, double ct,
                                       double h, double s, double* px, double* py, double* pz, double* pphi) {
    double half = 0.5 * h * s;
    double f = s * st * sinc_(half);
    double a = phi0 + half;
    *px = x0 + f * cos(a);
    *py = y0 + f * sin(a);
    *pz = z0 + s * ct;
    *pphi = phi0 + h * s;
}

__device__ __forceinline__ double guard_(double v, double eps) { return fabs(v) < eps ? eps : v; }

// Newton steps from a transported state's path length: kernels/propagation.py WARM_NEWTON_STEPS
#define WARM_STEPS 2

// rotation R (row-major 3x3, columns = local u, v, w), translation t; the Newton iteration for the path
// length starts at s_start, or at the straight-line estimate where s_start is NaN
__device__ void plane_(const double* R, const double* t, double x, double y, double z, double phi, double theta,
                       double h, int steps, double* s_out, double* l0, double* l1, double* phi_out,
                       double* ox, double* oy, double* oz, double s_start = nan("")) {
    double nx = R[2], ny = R[5], nz = R[8];
    double st = sin(theta), ct = cos(theta);
    double dist0 = nx * (t[0] - x) + ny * (t[1] - y) + nz * (t[2] - z);
    double cos_inc = nx * st * cos(phi) + ny * st * sin(phi) + nz * ct;
    double s = isnan(s_start) ? dist0 / guard_(cos_inc, 1e-9) : s_start;
    double px, py, pz, pphi;
    for (int k = 0; k < steps; ++k) {
        helix_(x, y, z, phi, st, ct, h, s, &px, &py, &pz, &pphi);
        double f = nx * (px - t[0]) + ny * (py - t[1]) + nz * (pz - t[2]);
        double df = nx * st * cos(pphi) + ny * st * sin(pphi) + nz * ct;
        s = s - f / guard_(df, 1e-9);
    }
    helix_(x, y, z, phi, st, ct, h, s, &px, &py, &pz, &pphi);
    double dx = px - t[0], dy = py - t[1], dz = pz - t[2];
    *l0 = R[0] * dx + R[3] * dy + R[6] * dz;
    *l1 = R[1] * dx + R[4] * dy + R[7] * dz;
    double resid = R[2] * dx + R[5] * dy + R[8] * dz;
    *s_out = fabs(resid) < 1e-3 ? s : nan("");
    *phi_out = pphi;
    *ox = px; *oy = py; *oz = pz;
}

extern "C" __global__ void intersect_plane(
    const double* rot, const double* trans, const int* module, const double* x, const double* y,
    const double* z, const double* phi, const double* theta, const double* h, int n, int steps,
    double* s, double* l0, double* l1, double* phi_out, double* ox, double* oy, double* oz) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int m = module[i];
    plane_(rot + 9 * (long)m, trans + 3 * (long)m, x[i], y[i], z[i], phi[i], theta[i], h[i], steps,
           s + i, l0 + i, l1 + i, phi_out + i, ox + i, oy + i, oz + i);
}

// global position of the bound parameters p (loc0, loc1) on the module with rotation R and translation t
__device__ __forceinline__ void bound_position_(const double* R, const double* t, const double* p, double* x,
                                                double* y, double* z) {
    *x = R[0] * p[0] + R[1] * p[1] + t[0];
    *y = R[3] * p[0] + R[4] * p[1] + t[1];
    *z = R[6] * p[0] + R[7] * p[1] + t[2];
}

// multiple scattering (Highland) in x/X0 = x0 of the module with rotation R, at the incidence of p
__device__ void scatter_(const double* R, const double* p, double* C, double x0) {
    double st = sin(p[3]);
    double cos_inc = R[2] * st * cos(p[2]) + R[5] * st * sin(p[2]) + R[8] * cos(p[3]);
    double mom = 1.0 / fmax(fabs(p[4]), 1e-9);
    double x = fmax(x0 / fmax(fabs(cos_inc), 0.05), 1e-8);
    double th0 = 0.0136 / mom * sqrt(x) * (1.0 + 0.038 * log(x));
    double sin_t = fmax(fabs(st), 1e-6);
    C[12] += th0 * th0 / (sin_t * sin_t);
    C[18] += th0 * th0;
}

__device__ void plane_map_(const double* rot, const double* trans, int src, int dst, const double* p,
                           double bfield, double c_light, int steps, double* out, double* s_out,
                           double s_start = nan("")) {
    double x, y, z;
    bound_position_(rot + 9 * (long)src, trans + 3 * (long)src, p, &x, &y, &z);
    double h = -p[4] * bfield * c_light;
    double l0, l1, pphi, ox, oy, oz;
    plane_(rot + 9 * (long)dst, trans + 3 * (long)dst, x, y, z, p[2], p[3], h, steps, s_out, &l0, &l1, &pphi,
           &ox, &oy, &oz, s_start);
    out[0] = l0; out[1] = l1; out[2] = wrap_(pphi); out[3] = p[3]; out[4] = p[4];
}

// out = J C J^T for 5x5 row-major matrices
__device__ void sandwich_(const double* J, const double* C, double* out) {
    double JC[25];
    for (int a = 0; a < 5; ++a)
        for (int b = 0; b < 5; ++b) {
            double acc = 0.0;
            for (int c = 0; c < 5; ++c) acc += J[5 * a + c] * C[5 * c + b];
            JC[5 * a + b] = acc;
        }
    for (int a = 0; a < 5; ++a)
        for (int b = 0; b < 5; ++b) {
            double acc = 0.0;
            for (int c = 0; c < 5; ++c) acc += JC[5 * a + c] * J[5 * b + c];
            out[5 * a + b] = acc;
        }
}

// base parameters on dst, their Jacobian J (row-major [out][in]) and J C J^T; returns the path length.
// The perturbed maps start their Newton iteration at the base's path length (NaN: the straight line)
// and need WARM_STEPS steps: the perturbations move the crossing by micrometres. So does the base where
// the caller knows the crossing already (s_start, not NaN)
__device__ double transport_(const double* rot, const double* trans, int src, int dst, const double* p,
                             const double* C, double bfield, double c_light, int steps, const double* fd,
                             double* base, double* J, double* out_cov, double s_start = nan("")) {
    double pert[5], step[5];
    for (int k = 0; k < 5; ++k) step[k] = fd[k] * (k == 4 ? fmax(fabs(p[4]), 1e-3) : 1.0);
    double s, s_dummy;
    plane_map_(rot, trans, src, dst, p, bfield, c_light, isnan(s_start) ? steps : WARM_STEPS, base, &s, s_start);
    for (int k = 0; k < 5; ++k) {
        double q[5];
        for (int j = 0; j < 5; ++j) q[j] = p[j];
        q[k] += step[k];
        plane_map_(rot, trans, src, dst, q, bfield, c_light, WARM_STEPS, pert, &s_dummy, s);
        for (int j = 0; j < 5; ++j) {
            double d = pert[j] - base[j];
            if (j == 2) d = wrap_(d);
            J[5 * j + k] = d / step[k];
        }
    }
    sandwich_(J, C, out_cov);
    return s;
}

// Kalman update of (x, P) with a 2-D (dim 2) or 1-D (dim 1, loc0 only) measurement; returns chi^2
__device__ double update_(const double* x, const double* P, double m0, double m1, double v0, double v1, int dim,
                          double* out_x, double* out_P) {
    double two = dim == 2 ? 1.0 : 0.0;
    double r0 = m0 - x[0];
    double r1 = (m1 - x[1]) * two;
    double s00 = P[0] + v0;
    double s11 = two > 0 ? P[6] + v1 : 1.0;
    double s01 = P[1] * two;
    double det = s00 * s11 - s01 * s01;
    double i00 = s11 / det, i11 = s00 / det, i01 = -s01 / det;
    double chi2 = r0 * (i00 * r0 + i01 * r1) + r1 * (i01 * r0 + i11 * r1);
    double k0[5], k1[5];
    for (int a = 0; a < 5; ++a) {
        double ph0 = P[5 * a + 0], ph1 = P[5 * a + 1] * two;
        k0[a] = ph0 * i00 + ph1 * i01;
        k1[a] = ph0 * i01 + ph1 * i11;
        out_x[a] = x[a] + k0[a] * r0 + k1[a] * r1;
    }
    double C[25];
    for (int a = 0; a < 5; ++a)
        for (int b = 0; b < 5; ++b)
            C[5 * a + b] = P[5 * a + b] - k0[a] * P[b] - k1[a] * P[5 + b] * two;
    for (int a = 0; a < 5; ++a)
        for (int b = 0; b < 5; ++b)
            out_P[5 * a + b] = 0.5 * (C[5 * a + b] + C[5 * b + a]);
    return chi2;
}

extern "C" __global__ void transport(
    const double* rot, const double* trans, const int* src, const int* dst, const double* params,
    const double* cov, int n, double bfield, double c_light, int steps, const double* fd,
    double* out_params, double* out_cov, double* out_s, double* out_jac) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out_s[i] = transport_(rot, trans, src[i], dst[i], params + 5 * (long)i, cov + 25 * (long)i, bfield, c_light,
                          steps, fd, out_params + 5 * (long)i, out_jac + 25 * (long)i, out_cov + 25 * (long)i);
}

// the nearest layer ahead of a track (not `exclude`, further than s_min): returns it (-1: none), s in *s_out
__device__ long long next_layer_(const bool* is_disc, const double* position, const double* lo, const double* hi,
                                 int n_layers, double x0, double y0, double z0, double phi0, double theta,
                                 double hh, long long exclude, double s_min, double tol, int steps, double* s_out) {
    double st = sin(theta), ct = cos(theta);
    double tx = st * cos(phi0), ty = st * sin(phi0);
    double a = fmax(tx * tx + ty * ty, 1e-18);
    double b = x0 * tx + y0 * ty;
    double best_s = BIG;
    long long best = 0;
    for (int l = 0; l < n_layers; ++l) {
        double pos = position[l];
        double s;
        bool reachable = true;
        if (is_disc[l]) {
            s = (pos - z0) / (fabs(ct) < 1e-12 ? 1e-12 : ct);
        } else {
            double c = x0 * x0 + y0 * y0 - pos * pos;
            // outside the cylinder and moving outwards: both crossings lie behind (skip the Newton steps)
            if (c > 0 && b >= 0) continue;
            double disc = b * b - a * c;
            reachable = disc >= 0;
            s = (-b + sqrt(fmax(disc, 0.0))) / a;
            double px, py, pz, pphi;
            for (int k = 0; k < steps; ++k) {
                helix_(x0, y0, z0, phi0, st, ct, hh, s, &px, &py, &pz, &pphi);
                double g = px * px + py * py - pos * pos;
                double dg = 2.0 * st * (px * cos(pphi) + py * sin(pphi));
                s = s - g / guard_(dg, 1e-9);
            }
        }
        double px, py, pz, pphi;
        helix_(x0, y0, z0, phi0, st, ct, hh, s, &px, &py, &pz, &pphi);
        double r = hypot(px, py);
        double u = is_disc[l] ? r : pz;
        bool ok = (u >= lo[l] - tol) && (u <= hi[l] + tol) && (s > s_min + 1e-3);
        ok = ok && (is_disc[l] || (reachable && fabs(r - pos) < 1.0));
        ok = ok && (fabs(hh * s) < PI) && ((long long)l != exclude);
        double s_ok = ok ? s : BIG;
        if (s_ok < best_s) { best_s = s_ok; best = l; }
    }
    *s_out = best_s;
    return best_s < BIG ? best : -1;
}

extern "C" __global__ void next_layer(
    const bool* is_disc, const double* position, const double* lo, const double* hi, int n_layers,
    const double* x, const double* y, const double* z, const double* phi, const double* theta, const double* h,
    const long long* exclude, const double* s_min, double tol, int n, int steps, long long* out_layer,
    double* out_s) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out_layer[i] = next_layer_(is_disc, position, lo, hi, n_layers, x[i], y[i], z[i], phi[i], theta[i], h[i],
                               exclude[i], s_min[i], tol, steps, out_s + i);
}

extern "C" __global__ void kalman_update(
    const double* params, const double* cov, const double* m0, const double* m1, const double* v0,
    const double* v1, const signed char* dim, int n, double* out_params, double* out_cov, double* out_chi2) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out_chi2[i] = update_(params + 5 * (long)i, cov + 25 * (long)i, m0[i], m1[i], v0[i], v1[i], dim[i],
                          out_params + 5 * (long)i, out_cov + 25 * (long)i);
}


#define MAXB 4
// One CKF layer step for one candidate (mode 0), or the overlap search on its own layer (mode 1):
// scattering, navigation to the next layer, the module grid, plane crossings and bounds, transport
// to each searched module, and the best max_b measurements by chi^2 under chi2_max.
// Mode 0 writes the packed rows of the next step (kernels/candidates.py): slot q < n_found becomes a
// child with the Kalman update of its measurement (NODE keeps the parent's node: the caller links the
// child); a candidate without a measurement continues on its nearest prediction (a hole when it
// crossed a module inside its bounds) or stays put past a gap; a leaving candidate keeps its row.
// Flags: leaving, over max_holes, child valid, lone row kept; o_layer: the layer searched (-1: none).
// Mode 1 (max_b 1) extends the candidates in place (c_real/c_index are real/index) by their best
// measurement on another module of the same layer (layer_in), linked as node node_base + i;
// o_meas / node_parent are the node table's new entries (-1 where nothing was found).
extern "C" __global__ void layer_search(
    const double* rot, const double* trans, const double* material, const double* half_u,
    const int* module_layer, const bool* l_is_disc, const double* l_pos, const double* l_lo, const double* l_hi,
    const long long* l_n_phi, const long long* l_n_u, const double* l_u_lo, const double* l_u_hi,
    const long long* l_bin_offset, const long long* bin_start, const long long* bin_count, const int* bin_modules,
    int n_layers, const double* real, const long long* index, const long long* layer_in, int n, int mode,
    int n_modules, const long long* mkey,
    long long n_meas, const double* m0, const double* m1, const double* v0, const double* v1,
    const signed char* mdim, double bfield, double c_light, int steps, const double* fd, double layer_tol,
    double bounds_tol, double chi2_max, int max_b, int max_holes, long long* o_layer, long long* o_meas,
    double* c_real, long long* c_index, bool* c_ok, double* l_real, long long* l_index, bool* leaving,
    bool* too_many, bool* keep_lone, long long node_base, long long* node_parent, const bool* active,
    int has_active, const long long* n_limit) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || i >= *n_limit) return;  // n_limit: rows that exist (the tables may be larger)
    if (has_active && !active[i]) {  // pruned (mode 0): no row of the next step
        for (int q = 0; q < max_b; ++q) c_ok[(long long)i * max_b + q] = false;
        o_layer[i] = -1;
        leaving[i] = false;
        too_many[i] = false;
        keep_lone[i] = false;
        return;
    }
    // packed candidates (kernels/candidates.py): real row = params, cov, chi2, s_done; index row = module, event, ...
    const double* p = real + 32 * (long)i;
    const long long* irow = index + 8 * (long)i;
    int mod = (int)index[8 * (long)i];
    double x, y, z;
    bound_position_(rot + 9 * (long)mod, trans + 3 * (long)mod, p, &x, &y, &z);
    double phi = p[2], theta = p[3];
    double h = -p[4] * bfield * c_light;
    double st = sin(theta), ct = cos(theta);
    // scattering in the module the candidate sits on
    double C[25];
    for (int k = 0; k < 25; ++k) C[k] = p[5 + k];
    scatter_(rot + 9 * (long)mod, p, C, material[mod]);
    long long layer;
    double s_layer, lx, ly, lz;
    int exclude_module = -1;
    if (mode == 0) {
        layer = next_layer_(l_is_disc, l_pos, l_lo, l_hi, n_layers, x, y, z, phi, theta, h, module_layer[mod],
                            p[31], layer_tol, steps, &s_layer);
        o_layer[i] = layer;
        if (layer < 0) {
            for (int q = 0; q < max_b; ++q) c_ok[(long long)i * max_b + q] = false;
            for (int k = 0; k < 32; ++k) l_real[32 * (long)i + k] = p[k];
            for (int k = 0; k < 8; ++k) l_index[8 * (long)i + k] = irow[k];
            leaving[i] = true;
            too_many[i] = false;
            keep_lone[i] = false;
            return;
        }
        double pphi;
        helix_(x, y, z, phi, st, ct, h, s_layer, &lx, &ly, &lz, &pphi);
    } else {
        layer = layer_in[i];
        s_layer = 0.0;
        lx = x; ly = y; lz = z;
        exclude_module = mod;
    }
    // module grid of the layer around the crossing point
    double gphi = atan2(ly, lx);
    double gu = l_is_disc[layer] ? hypot(lx, ly) : lz;
    long long nph = l_n_phi[layer], nu = l_n_u[layer];
    long long bp = ((long long)floor((gphi + PI) / (2 * PI) * nph) % nph + nph) % nph;
    double w_u = (l_u_hi[layer] - l_u_lo[layer]) / nu;
    long long bu = (long long)floor((gu - l_u_lo[layer]) / w_u);
    bu = bu < 0 ? 0 : (bu > nu - 1 ? nu - 1 : bu);
    long long gbin = l_bin_offset[layer] + bp * nu + bu;
    long long b0 = bin_start[gbin], b1 = b0 + bin_count[gbin];
    int nf = 0;
    long long br_meas[MAXB];
    double br_chi[MAXB];
    int br_mod[MAXB];
    double br_p[MAXB][5], br_c[MAXB][25];
    double near_s = BIG;
    int near_m = -1;
    bool crossed = false;
    double near_p[5], near_c[25];
    double pp[5], pc[25], J[25];
    for (long long bi = b0; bi < b1; ++bi) {
        int m = bin_modules[bi];
        if (m == exclude_module) continue;
        double s_m, l0, l1, pphi, ox, oy, oz;
        plane_(rot + 9 * (long)m, trans + 3 * (long)m, x, y, z, phi, theta, h, steps, &s_m, &l0, &l1, &pphi,
               &ox, &oy, &oz);
        if (isnan(s_m) || !(s_m > 0)) continue;
        double hv = half_u[3 * (long)m + 2];
        double frac = (l1 + hv) / fmax(2 * hv, 1e-9);
        frac = frac < 0 ? 0 : (frac > 1 ? 1 : frac);
        double half_x = half_u[3 * (long)m] + (half_u[3 * (long)m + 1] - half_u[3 * (long)m]) * frac;
        if (fabs(l0) <= half_x && fabs(l1) <= hv) crossed = true;
        if (!(fabs(l0) <= half_x + bounds_tol && fabs(l1) <= hv + bounds_tol)) continue;
        double s_t = transport_(rot, trans, mod, m, p, C, bfield, c_light, steps, fd, pp, J, pc, s_m);
        if (isnan(s_t)) continue;
        if (mode == 0 && s_t < near_s) {
            near_s = s_t;
            near_m = m;
            for (int k = 0; k < 5; ++k) near_p[k] = pp[k];
            for (int k = 0; k < 25; ++k) near_c[k] = pc[k];
        }
        long long key = index[8 * (long)i + 1] * n_modules + m;
        long long lo = 0, hi = n_meas;
        while (lo < hi) { long long md = (lo + hi) >> 1; if (mkey[md] < key) lo = md + 1; else hi = md; }
        for (long long mi = lo; mi < n_meas && mkey[mi] == key; ++mi) {
            double two = mdim[mi] == 2 ? 1.0 : 0.0;
            double r0 = m0[mi] - pp[0];
            double r1 = (m1[mi] - pp[1]) * two;
            double s00 = pc[0] + v0[mi];
            double s11 = two > 0 ? pc[6] + v1[mi] : 1.0;
            double s01 = pc[1] * two;
            double det = s00 * s11 - s01 * s01;
            double chi = (r0 * r0 * s11 - 2.0 * r0 * r1 * s01 + r1 * r1 * s00) / det;
            if (!(chi < chi2_max)) continue;
            if (nf < max_b || chi < br_chi[nf - 1]) {
                int q = nf < max_b ? nf++ : nf - 1;
                while (q > 0 && br_chi[q - 1] > chi) {
                    br_chi[q] = br_chi[q - 1]; br_meas[q] = br_meas[q - 1]; br_mod[q] = br_mod[q - 1];
                    for (int k = 0; k < 5; ++k) br_p[q][k] = br_p[q - 1][k];
                    for (int k = 0; k < 25; ++k) br_c[q][k] = br_c[q - 1][k];
                    --q;
                }
                br_chi[q] = chi; br_meas[q] = mi; br_mod[q] = m;
                for (int k = 0; k < 5; ++k) br_p[q][k] = pp[k];
                for (int k = 0; k < 25; ++k) br_c[q][k] = pc[k];
            }
        }
    }
    if (mode == 1) {
        o_meas[i] = -1;
        node_parent[i] = -1;
        if (nf == 0) return;
        long long mi = br_meas[0];
        double* cr = c_real + 32 * (long)i;
        long long* ci = c_index + 8 * (long)i;
        double chi = update_(br_p[0], br_c[0], m0[mi], m1[mi], v0[mi], v1[mi], mdim[mi], cr, cr + 5);
        cr[30] += chi;
        o_meas[i] = mi;
        node_parent[i] = ci[3];
        ci[0] = br_mod[0];
        ci[3] = node_base + i;
        ci[4] += 1;
        ci[7] = ci[6];
        ci[6] = mi;
        return;
    }
    for (int q = 0; q < max_b; ++q) {
        long long c = (long long)i * max_b + q;
        c_ok[c] = q < nf;
        if (q >= nf) continue;
        long long mi = br_meas[q];
        double* cr = c_real + 32 * c;
        long long* ci = c_index + 8 * c;
        double chi = update_(br_p[q], br_c[q], m0[mi], m1[mi], v0[mi], v1[mi], mdim[mi], cr, cr + 5);
        cr[30] = p[30] + chi;
        cr[31] = 0.0;
        for (int k = 0; k < 8; ++k) ci[k] = irow[k];
        ci[0] = br_mod[q];
        ci[4] = irow[4] + 1;
        ci[6] = mi;
        ci[7] = irow[6];
    }
    double* lr = l_real + 32 * (long)i;
    long long* li = l_index + 8 * (long)i;
    for (int k = 0; k < 32; ++k) lr[k] = p[k];
    for (int k = 0; k < 8; ++k) li[k] = irow[k];
    bool lone = nf == 0;
    if (lone) {
        if (near_m >= 0) {
            for (int k = 0; k < 5; ++k) lr[k] = near_p[k];
            for (int k = 0; k < 25; ++k) lr[5 + k] = near_c[k];
            lr[31] = 0.0;
            li[0] = near_m;
        } else {
            for (int k = 0; k < 25; ++k) lr[5 + k] = C[k];
            lr[31] = s_layer;
        }
        li[5] = irow[5] + (crossed ? 1 : 0);
    }
    leaving[i] = false;
    too_many[i] = lone && li[5] > max_holes;
    keep_lone[i] = lone && !(li[5] > max_holes);
}

extern "C" __global__ void collect_measurements(
    const long long* parent, const long long* node_meas, const long long* last_node, const long long* offsets,
    int n, long long* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long cur = last_node[i], pos = offsets[i + 1] - 1;
    while (cur >= 0 && pos >= offsets[i]) {
        out[pos--] = node_meas[cur];
        cur = parent[cur];
    }
}

extern "C" __global__ void chi2_only(
    const double* params, const double* cov, const long long* row, const double* m0, const double* m1,
    const double* v0, const double* v1, const signed char* dim, const long long* meas, int n, double* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long r = row[i], m = meas[i];
    const double* P = cov + 25 * r;
    const double* x = params + 5 * r;
    double two = dim[m] == 2 ? 1.0 : 0.0;
    double r0 = m0[m] - x[0];
    double r1 = (m1[m] - x[1]) * two;
    double s00 = P[0] + v0[m];
    double s11 = two > 0 ? P[6] + v1[m] : 1.0;
    double s01 = P[1] * two;
    double det = s00 * s11 - s01 * s01;
    out[i] = (r0 * r0 * s11 - 2.0 * r0 * r1 * s01 + r1 * r1 * s00) / det;
}
// The CKF's start for one seed: the Kalman filter of its bottom, middle and top measurements (scattering on
// the module left, transport to the next measurement's module, update), as kernels/ckf.py's array start.
// Writes the seed's packed candidate row (kernels/candidates.py) and alive = false where a transport fails;
// node_parent / node_meas are the node table's next 3 n entries: bottom, middle, top of every seed, linked
// (node_base + i, node_base + n + i, node_base + 2 n + i; the candidate's node is the last).
extern "C" __global__ void seed_start(
    const double* rot, const double* trans, const double* material, const double* params, const double* cov,
    const int* module0, const int* event, const int* bottom, const int* middle, const int* top, const int* sp_meas,
    const int* meas_module, const double* local0, const double* local1, const double* v0, const double* v1,
    const signed char* dim, int n, double bfield, double c_light, int steps, const double* fd, long long node_base,
    double* out_real, long long* out_index, bool* alive, long long* node_parent, long long* node_meas) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double p[5], C[25], q[5], Q[25], J[25];
    for (int k = 0; k < 5; ++k) p[k] = params[5 * (long long)i + k];
    for (int k = 0; k < 25; ++k) C[k] = cov[25 * (long long)i + k];
    long long mi[3] = {sp_meas[bottom[i]], sp_meas[middle[i]], sp_meas[top[i]]};
    for (int k = 0; k < 3; ++k) {
        node_parent[(long long)k * n + i] = k == 0 ? -1 : node_base + (long long)(k - 1) * n + i;
        node_meas[(long long)k * n + i] = mi[k];
    }
    int module = module0[i];
    double chi2 = 0.0;
    bool ok = true;
    for (int k = 0; k < 3 && ok; ++k) {
        long long m = mi[k];
        if (k > 0) {
            int target = meas_module[m];
            scatter_(rot + 9 * (long long)module, p, C, material[module]);
            double s = transport_(rot, trans, module, target, p, C, bfield, c_light, steps, fd, q, J, Q);
            if (isnan(s)) {
                ok = false;
                break;
            }
            for (int a = 0; a < 5; ++a) p[a] = q[a];
            for (int a = 0; a < 25; ++a) C[a] = Q[a];
            module = target;
        }
        double d = update_(p, C, local0[m], local1[m], v0[m], v1[m], dim[m], q, Q);
        for (int a = 0; a < 5; ++a) p[a] = q[a];
        for (int a = 0; a < 25; ++a) C[a] = Q[a];
        if (k > 0) chi2 += d;  // the bottom measurement only fixes loc0/loc1, which the seed took from it
    }
    alive[i] = ok;
    double* r = out_real + 32 * (long long)i;
    long long* x = out_index + 8 * (long long)i;
    for (int a = 0; a < 5; ++a) r[a] = p[a];
    for (int a = 0; a < 25; ++a) r[5 + a] = C[a];
    r[30] = chi2;
    r[31] = 0.0;
    x[0] = module;
    x[1] = event[i];
    x[2] = i;
    x[3] = node_base + 2 * (long long)n + i;
    x[4] = 3;
    x[5] = 0;
    x[6] = mi[2];
    x[7] = mi[1];
}
// A CKF step's compaction: every set flag of layer_search's flag vector (leaving, over holes, children,
// lone; ends = its inclusive prefix sum) copies its packed row to position ends[j] - 1 of the selection:
// the finished rows [0, b1) go to row done_in[0] + dest of done_real / done_index (rows past done_cap are
// not written: the caller sees it from counts[2]), the children [b1, b2) and the lone rows [b2, total) to
// row - b1 of out_real / out_index (the next step's candidates). b1, b2 and total are read from ends
// here, so the caller need not wait for them. A child is linked as node node_base + its row among the
// children (node_parent / node_meas: the node table's new entries) and gets the layer its parent searched
// (child_layer). One thread also writes counts = (the next step's rows total - b1, its children b2 - b1,
// the finished rows so far done_in[0] + b1).
extern "C" __global__ void step_compact(
    const bool* flags, const long long* ends, int n, int k_max, const double* c_real, const long long* c_index,
    const double* l_real, const long long* l_index, const long long* layer, long long node_base, int n_flags,
    const long long* done_in, long long done_cap, double* done_real, long long* done_index,
    double* out_real, long long* out_index, long long* child_layer, long long* node_parent, long long* node_meas,
    long long* counts) {
    long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_flags) return;
    long long nk = (long long)n * k_max;
    long long b1 = ends[2LL * n - 1], b2 = ends[2LL * n + nk - 1], total = ends[3LL * n + nk - 1];
    long long done_base = done_in[0];
    if (j == 0) {
        counts[0] = total - b1;
        counts[1] = b2 - b1;
        counts[2] = done_base + b1;
    }
    if (!flags[j]) return;
    long long dest = ends[j] - 1, r;
    const double* sr;
    const long long* si;
    if (j < 2LL * n) {  // leaving or over max_holes: the candidate's own row
        r = j < n ? j : j - n;
        sr = l_real + 32 * r;
        si = l_index + 8 * r;
    } else if (j < 2LL * n + nk) {
        r = j - 2LL * n;
        sr = c_real + 32 * r;
        si = c_index + 8 * r;
    } else {
        r = j - 2LL * n - nk;
        sr = l_real + 32 * r;
        si = l_index + 8 * r;
    }
    if (dest < b1 && done_base + dest >= done_cap) return;
    double* dr = dest < b1 ? done_real + 32 * (done_base + dest) : out_real + 32 * (dest - b1);
    long long* di = dest < b1 ? done_index + 8 * (done_base + dest) : out_index + 8 * (dest - b1);
    for (int a = 0; a < 32; ++a) dr[a] = sr[a];
    for (int a = 0; a < 8; ++a) di[a] = si[a];
    if (dest >= b1 && dest < b2) {
        long long c = dest - b1;
        node_parent[c] = si[3];
        node_meas[c] = si[6];
        di[3] = node_base + c;
        child_layer[c] = layer[(j - 2LL * n) / k_max];
    }
}

// out[k] = a[at_k] for the (up to) four positions: several values of a device array, one launch and
// one copy to the host
extern "C" __global__ void pick(const long long* a, int n_at, long long at0, long long at1, long long at2,
                                long long at3, long long* out) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_at) return;
    out[k] = a[k == 0 ? at0 : k == 1 ? at1 : k == 2 ? at2 : at3];
}
"""

_C_LIGHT = 0.299792458e-3
_FD_STEPS = (1e-4, 1e-4, 1e-7, 1e-7, 1e-6)
_CUDA = CudaModule(_SOURCE, _BLOCK)


def set_enabled(flag: bool) -> None:
    """Switch the fused kernels on or off (tests compare both paths)."""
    global _ENABLED
    _ENABLED = flag


def enabled(xp: ModuleType) -> bool:
    """True when ``xp`` is CuPy and the fused kernels are switched on."""
    return _ENABLED and xp.__name__.split(".")[0] == "cupy"


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def pick(xp: ModuleType, a: Array, at: tuple[int, ...]) -> Array:
    """``a[list(at)]`` (int64, up to four positions) in one launch: no index array to copy to the device."""
    if not 1 <= len(at) <= 4:
        raise ValueError("pick takes one to four positions")
    out = xp.empty(len(at), xp.int64)
    pos = [xp.int64(p) for p in (*at, *(0,) * (4 - len(at)))]
    _launch("pick", len(at), (a, xp.int32(len(at)), *pos, out))
    return out


def _f64(xp: ModuleType, a: Array) -> Array:
    return xp.ascontiguousarray(a, dtype=xp.float64)


def intersect_plane(xp: ModuleType, det: Any, module: Array, x, y, z, phi, theta, h, steps: int) -> tuple:
    n = int(module.shape[0])
    out = [xp.empty(n, dtype=xp.float64) for _ in range(7)]
    _launch(
        "intersect_plane",
        n,
        (
            det.rotation,
            det.translation,
            xp.ascontiguousarray(module, dtype=xp.int32),
            *(_f64(xp, a) for a in (x, y, z, phi, theta, h)),
            xp.int32(n),
            xp.int32(steps),
            *out,
        ),
    )
    return tuple(out)


def transport(
    xp: ModuleType, det: Any, src: Array, dst: Array, params: Array, cov: Array, bfield: float, steps: int
) -> tuple:
    n = int(params.shape[0])
    out_p = xp.empty((n, 5), dtype=xp.float64)
    out_c = xp.empty((n, 5, 5), dtype=xp.float64)
    out_s = xp.empty(n, dtype=xp.float64)
    out_j = xp.empty((n, 5, 5), dtype=xp.float64)
    fd = _fd_steps(xp)
    _launch(
        "transport",
        n,
        (
            det.rotation,
            det.translation,
            xp.ascontiguousarray(src, dtype=xp.int32),
            xp.ascontiguousarray(dst, dtype=xp.int32),
            _f64(xp, params),
            _f64(xp, cov),
            xp.int32(n),
            xp.float64(bfield),
            xp.float64(_C_LIGHT),
            xp.int32(steps),
            fd,
            out_p,
            out_c,
            out_s,
            out_j,
        ),
    )
    return out_p, out_c, out_s, out_j


def next_layer(
    xp: ModuleType, nav: Any, x, y, z, phi, theta, h, exclude, s_min, tol: float, steps: int
) -> tuple:
    n = int(x.shape[0])
    out_l = xp.empty(n, dtype=xp.int64)
    out_s = xp.empty(n, dtype=xp.float64)
    _launch(
        "next_layer",
        n,
        (
            xp.ascontiguousarray(nav.is_disc, dtype=xp.bool_),
            _f64(xp, nav.position),
            _f64(xp, nav.lo),
            _f64(xp, nav.hi),
            xp.int32(nav.position.shape[0]),
            *(_f64(xp, a) for a in (x, y, z, phi, theta, h)),
            xp.ascontiguousarray(exclude, dtype=xp.int64),
            _f64(xp, s_min),
            xp.float64(tol),
            xp.int32(n),
            xp.int32(steps),
            out_l,
            out_s,
        ),
    )
    return out_l, out_s


def kalman_update(xp: ModuleType, params, cov, m0, m1, v0, v1, dim) -> tuple:
    n = int(params.shape[0])
    out_p = xp.empty((n, 5), dtype=xp.float64)
    out_c = xp.empty((n, 5, 5), dtype=xp.float64)
    out_chi = xp.empty(n, dtype=xp.float64)
    _launch(
        "kalman_update",
        n,
        (
            _f64(xp, params),
            _f64(xp, cov),
            *(_f64(xp, a) for a in (m0, m1, v0, v1)),
            xp.ascontiguousarray(dim, dtype=xp.int8),
            xp.int32(n),
            out_p,
            out_c,
            out_chi,
        ),
    )
    return out_p, out_c, out_chi


def collect_measurements(
    xp: ModuleType, parent: Array, node_meas: Array, last_node: Array, offsets: Array, total: int
) -> Array:
    """Measurements of every candidate in CSR order (``offsets``, ``total`` of them), walking the node
    links back."""
    n = int(last_node.shape[0])
    out = xp.zeros(total, dtype=xp.int64)
    c = xp.ascontiguousarray
    args = (c(parent, dtype=xp.int64), c(node_meas, dtype=xp.int64), c(last_node, dtype=xp.int64),
            c(offsets, dtype=xp.int64), xp.int32(n), out)  # fmt: skip
    _launch("collect_measurements", n, args)
    return out


def chi2_gather(xp: ModuleType, params, cov, row, m0, m1, v0, v1, dim, meas) -> Array:
    """chi^2 of measurements ``meas`` against states ``params[row]`` (gathers inside the kernel)."""
    n = int(row.shape[0])
    out = xp.empty(n, dtype=xp.float64)
    _launch(
        "chi2_only",
        n,
        (
            _f64(xp, params),
            _f64(xp, cov),
            xp.ascontiguousarray(row, dtype=xp.int64),
            *(_f64(xp, a) for a in (m0, m1, v0, v1)),
            xp.ascontiguousarray(dim, dtype=xp.int8),
            xp.ascontiguousarray(meas, dtype=xp.int64),
            xp.int32(n),
            out,
        ),
    )
    return out


def _fd_steps(xp: ModuleType) -> Array:
    """The finite-difference steps on the device (copied once)."""
    return device_constant(xp, ("fd_steps", *_FD_STEPS), lambda: np.asarray(_FD_STEPS, dtype=np.float64))


def seed_start(
    xp: ModuleType, det: Any, geo: Any, meas: Any, sp: Any, seeds: Any, params: Any, v0: Array, v1: Array,
    node_base: int, steps: int,
) -> tuple[Array, ...]:  # fmt: skip
    """The CKF's start for every seed (see the kernel): packed rows ``real`` [n, 32], ``index`` [n, 8],
    ``alive`` (bool) and the node table's next 3 n entries (``node_parent``, ``node_meas``)."""
    n = int(seeds.bottom.shape[0])
    f64, i64, i32 = xp.float64, xp.int64, xp.int32
    c = xp.ascontiguousarray
    rot, trans, material = _geometry_args(xp, det, geo, geo.nav)[:3]
    real = xp.empty((n, 32), f64)
    index = xp.empty((n, 8), i64)
    alive = xp.empty(n, xp.bool_)
    node_parent = xp.empty(3 * n, i64)
    node_meas = xp.empty(3 * n, i64)
    args = (
        rot,
        trans,
        material,
        c(params.params, dtype=f64),
        c(params.cov, dtype=f64),
        c(params.module, dtype=i32),
        c(seeds.event, dtype=i32),
        c(seeds.bottom, dtype=i32),
        c(seeds.middle, dtype=i32),
        c(seeds.top, dtype=i32),
        c(sp.measurement, dtype=i32),
        c(meas.module, dtype=i32),
        c(meas.local0, dtype=f64),
        c(meas.local1, dtype=f64),
        c(v0, dtype=f64),
        c(v1, dtype=f64),
        c(meas.dimension, dtype=xp.int8),
        i32(n),
        f64(det.bfield_t),
        f64(_C_LIGHT),
        i32(steps),
        _fd_steps(xp),
        i64(node_base),
        real,
        index,
        alive,
        node_parent,
        node_meas,
    )
    _launch("seed_start", n, args)
    return real, index, alive, node_parent, node_meas


def step_compact(
    xp: ModuleType, res: dict[str, Array], ends: Array, n: int, k_max: int, out_rows: int, child_rows: int,
    node_base: int, done: tuple[Array, Array], done_in: Array,
) -> tuple[Array, ...]:  # fmt: skip
    """The rows a mode-0 :func:`layer_search` over ``n`` rows selected, in flag order (see the kernel):
    the finished rows into ``done`` (real, index) from row ``done_in[0]`` on (rows past the tables'
    length are dropped), and new tables for the next step (``real``, ``index``: the children, then the
    lone rows), ``child_layer``, the node table's new entries for the children, and ``counts`` (device,
    int64: the next step's rows, its children, the finished rows so far).

    Args:
        ends: inclusive prefix sum of ``res["flags"]`` (int64).
        out_rows, child_rows: rows of the new tables and children entries (at least the counts).
    """
    i64 = xp.int64
    real = xp.empty((out_rows, 32), xp.float64)
    index = xp.empty((out_rows, 8), i64)
    child_layer = xp.empty(child_rows, i64)
    node_parent = xp.empty(child_rows, i64)
    node_meas = xp.empty(child_rows, i64)
    counts = xp.empty(3, i64)
    n_flags = int(res["flags"].shape[0])
    done_real, done_index = done
    args = (
        res["flags"], ends, xp.int32(n), xp.int32(k_max), res["c_real"], res["c_index"], res["l_real"],
        res["l_index"], res["layer"], i64(node_base), xp.int32(n_flags), done_in, i64(done_real.shape[0]), done_real, done_index, real, index, child_layer, node_parent, node_meas, counts,
    )  # fmt: skip
    _launch("step_compact", n_flags, args)
    return real, index, child_layer, node_parent, node_meas, counts


def no_limit(xp: ModuleType) -> Array:
    """A device row count larger than any table (for kernels whose rows all exist)."""
    return device_constant(xp, ("no_limit",), lambda: np.asarray([2**62], dtype=np.int64))


def _geometry_args(xp: ModuleType, det: Any, geo: Any, nav: Any) -> tuple:
    """The detector and navigation arrays of :func:`layer_search`, converted once per geometry."""
    global _GEOMETRY_ARGS
    if _GEOMETRY_ARGS is not None and _GEOMETRY_ARGS[0] is geo and _GEOMETRY_ARGS[1] is xp:
        return _GEOMETRY_ARGS[2]
    f64, i64, i32 = xp.float64, xp.int64, xp.int32
    c = xp.ascontiguousarray
    args = (
        c(det.rotation, dtype=f64),
        c(det.translation, dtype=f64),
        c(geo.material, dtype=f64),
        c(geo.half_u, dtype=f64),
        c(det.layer_index, dtype=i32),
        c(nav.is_disc, dtype=xp.bool_),
        c(nav.position, dtype=f64),
        c(nav.lo, dtype=f64),
        c(nav.hi, dtype=f64),
        c(nav.n_phi, dtype=i64),
        c(nav.n_u, dtype=i64),
        c(nav.u_lo, dtype=f64),
        c(nav.u_hi, dtype=f64),
        c(nav.bin_offset, dtype=i64),
        c(nav.bin_start, dtype=i64),
        c(nav.bin_count, dtype=i64),
        c(nav.bin_modules, dtype=i32),
        i32(nav.position.shape[0]),
    )
    _GEOMETRY_ARGS = (geo, xp, args, _fd_steps(xp), xp.zeros(1, i64))
    return args


_GEOMETRY_ARGS: tuple | None = None


def layer_search(
    xp: ModuleType,
    det: Any,
    geo: Any,
    nav: Any,
    real: Array,
    index: Array,
    layer_in: Array | None,
    mode: int,
    mkey: Array,
    meas: Any,
    v0: Array,
    v1: Array,
    cfg: Any,
    max_b: int,
    steps: int,
    node_base: int = 0,
    active: Array | None = None,
    n_limit: Array | None = None,
) -> dict[str, Array]:
    """One CKF layer step (mode 0) or overlap search (mode 1) for all packed candidates
    (``real``, ``index`` of :class:`kernels.candidates.Candidates`): see the kernel.

    Mode 0 returns the next step's packed rows: ``c_real``/``c_index``/``c_ok`` (max_b slots per
    candidate), ``l_real``/``l_index`` (one per candidate), the flags ``leaving``, ``too_many``,
    ``keep_lone`` (``cfg.max_holes`` applies) and ``layer`` (the layer each candidate searched).
    Mode 1 (``max_b`` 1, ``layer_in`` the layers) extends every candidate that finds a measurement on
    another module of its layer in place (``real`` and ``index`` are updated; they must be contiguous
    float64 / int64) as node ``node_base + row``; ``meas`` and ``node_parent`` are the node table's
    next ``n`` entries (-1 where nothing was found). ``active`` (mode 0, bool per candidate): only
    these take part; the others set no flag. ``n_limit`` (device, one int64): only the rows below it
    exist (mode 1; the tables may be larger), the others are not touched."""
    n = int(real.shape[0])
    f64, i64, i32 = xp.float64, xp.int64, xp.int32
    if max_b > 4:
        raise ValueError("fused layer_search supports at most 4 branches per surface")
    if real.shape[1:] != (32,) or index.shape[1:] != (8,):
        raise ValueError("layer_search expects packed candidates: real [n, 32], index [n, 8]")
    in_place = mode == 1
    if in_place and (max_b != 1 or real.dtype != f64 or index.dtype != i64 or not real.flags.c_contiguous
                     or not index.flags.c_contiguous or layer_in is None):  # fmt: skip
        raise ValueError("layer_search: the overlap search needs max_b 1, layers and contiguous tables")
    # outputs a mode does not write get one-row placeholders
    n_rows = 1 if in_place else n
    # the four flag vectors are consecutive parts of one (leaving, over holes, children, lone): what
    # step_compact scans
    flags = xp.empty(3 * n_rows + n_rows * max_b, xp.bool_)
    nk = n_rows * max_b
    out = {
        "flags": flags,
        "layer": xp.empty(n_rows, i64),
        "meas": xp.empty(n if in_place else 1, i64),
        "c_real": real if in_place else xp.empty((n * max_b, 32), f64),
        "c_index": index if in_place else xp.empty((n * max_b, 8), i64),
        "c_ok": flags[2 * n_rows : 2 * n_rows + nk],
        "l_real": xp.empty((n_rows, 32), f64),
        "l_index": xp.empty((n_rows, 8), i64),
        "leaving": flags[:n_rows],
        "too_many": flags[n_rows : 2 * n_rows],
        "keep_lone": flags[2 * n_rows + nk :],
        "node_parent": xp.empty(n if in_place else 1, i64),
    }
    c = xp.ascontiguousarray
    geometry = _geometry_args(xp, det, geo, nav)
    assert _GEOMETRY_ARGS is not None
    fd, no_layer = _GEOMETRY_ARGS[3], _GEOMETRY_ARGS[4]
    args = (
        *geometry,
        c(real, dtype=f64),
        c(index, dtype=i64),
        c(layer_in, dtype=i64) if layer_in is not None else no_layer,
        i32(n),
        i32(mode),
        i32(det.n_modules),
        c(mkey, dtype=i64),
        i64(mkey.shape[0]),
        c(meas.local0, dtype=f64),
        c(meas.local1, dtype=f64),
        c(v0, dtype=f64),
        c(v1, dtype=f64),
        c(meas.dimension, dtype=xp.int8),
        f64(det.bfield_t),
        f64(_C_LIGHT),
        i32(steps),
        fd,
        f64(cfg.layer_tolerance_mm),
        f64(cfg.bounds_tolerance_mm),
        f64(cfg.chi2_max),
        i32(max_b),
        i32(cfg.max_holes),
        out["layer"],
        out["meas"],
        out["c_real"],
        out["c_index"],
        out["c_ok"],
        out["l_real"],
        out["l_index"],
        out["leaving"],
        out["too_many"],
        out["keep_lone"],
        i64(node_base),
        out["node_parent"],
        active if active is not None else out["leaving"],
        i32(active is not None),
        n_limit if n_limit is not None else no_limit(xp),
    )
    _launch("layer_search", n, args)
    return out
