"""Fused CUDA Kalman fit (CuPy backend): forward filter, RTS smoother and perigee extrapolation of
every track, one launch for all tracks of a batch.

On the GPU each track has ``_LANES`` lanes of a warp: all of them run the filter and the smoother
(the same values in every lane), while the five perturbed plane maps of each transport's
finite-difference Jacobian, and the six maps of the perigee Jacobian, run side by side, one per
lane. A batch of one event has only a few thousand tracks, so the fit's time is one thread's
latency, mostly those maps. The host build of the tests (no warps) keeps one thread per track.

The arithmetic is that of :mod:`kernels.fitting` step for step (scattering, finite-difference
transport, update, smoother gain solved in the diagonally scaled basis, beam-pipe scattering,
perigee Jacobian). Only the filtered states are kept (in a scratch array); the smoother recomputes
each step's prediction and Jacobian from them instead of storing three more arrays per state.
``tests/test_fused.py`` checks the result against the array code.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from kernels import fused
from kernels.cuda_module import CudaModule
from kernels.xp import Array

_FIT_SOURCE = r"""
#if FIT_LANES > 1 && (FIT_LANES < 8 || FIT_LANES > 32 || (FIT_LANES & (FIT_LANES - 1)))
#error "FIT_LANES: 1, or a power of two from 8 (the perigee Jacobian's six maps) to 32"
#endif
#if FIT_LANES > 1
// the track's lanes: FIT_LANES consecutive lanes of a warp (blocks are whole warps). Every lane of a
// track has the same length and the same values, so the group, not the warp, stays converged, and
// tracks of different lengths need no warp-wide loop bound
__device__ __forceinline__ unsigned group_mask_() {
    return (0xffffffffu >> (32 - FIT_LANES)) << ((threadIdx.x & 31) & ~(FIT_LANES - 1));
}
__device__ __forceinline__ void group_sync_(unsigned mask) { __syncwarp(mask); }
#else
__device__ __forceinline__ unsigned group_mask_() { return 1u; }
__device__ __forceinline__ void group_sync_(unsigned) {}
#endif

#if FIT_LANES > 1
// transport_ with the five perturbed maps side by side: every lane maps the base (the perturbed maps
// start from its path length), lane k < 5 the map with parameter k perturbed, and the Jacobian's
// columns are gathered by shuffles. The operations are transport_'s, in its order
__device__ double fit_transport_(int lane, unsigned mask, const double* rot, const double* trans, int src, int dst,
                                 const double* p, const double* C, double bfield, double c_light, int steps,
                                 const double* fd, double* base, double* J, double* out_cov) {
    double s, col[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    plane_map_(rot, trans, src, dst, p, bfield, c_light, steps, base, &s);
    if (lane < 5) {
        double step = fd[lane] * (lane == 4 ? fmax(fabs(p[4]), 1e-3) : 1.0);
        double q[5], pert[5], s_dummy;
        // a select, not q[lane] += step: a lane-indexed local array would live in memory
        for (int j = 0; j < 5; ++j) q[j] = j == lane ? p[j] + step : p[j];
        plane_map_(rot, trans, src, dst, q, bfield, c_light, WARM_STEPS, pert, &s_dummy, s);
        for (int j = 0; j < 5; ++j) {
            double d = pert[j] - base[j];
            if (j == 2) d = wrap_(d);
            col[j] = d / step;
        }
    }
    for (int k = 0; k < 5; ++k)
        for (int j = 0; j < 5; ++j) J[5 * j + k] = __shfl_sync(mask, col[j], k, FIT_LANES);
    sandwich_(J, C, out_cov);
    return s;
}
#else
__device__ double fit_transport_(int, unsigned, const double* rot, const double* trans, int src, int dst,
                                 const double* p, const double* C, double bfield, double c_light, int steps,
                                 const double* fd, double* base, double* J, double* out_cov) {
    return transport_(rot, trans, src, dst, p, C, bfield, c_light, steps, fd, base, J, out_cov);
}
#endif

__device__ void perigee_map_(const double* rot, const double* trans, int module, const double* p, double bfield,
                             double c_light, int steps, double* out) {
    double x, y, z;
    bound_position_(rot + 9 * (long)module, trans + 3 * (long)module, p, &x, &y, &z);
    double phi = p[2], theta = p[3];
    double h = -p[4] * bfield * c_light;
    double st = sin(theta), ct = cos(theta);
    double s = -(x * cos(phi) + y * sin(phi)) / fmax(st, 1e-9);
    double px, py, pz, pphi;
    for (int k = 0; k < steps; ++k) {
        helix_(x, y, z, phi, st, ct, h, s, &px, &py, &pz, &pphi);
        double tx = st * cos(pphi), ty = st * sin(pphi);
        double g = px * tx + py * ty;
        double dg = tx * tx + ty * ty + h * st * (px * -sin(pphi) * st + py * cos(pphi) * st) / fmax(st, 1e-9);
        s = s - g / (fabs(dg) < 1e-12 ? 1e-12 : dg);
    }
    helix_(x, y, z, phi, st, ct, h, s, &px, &py, &pz, &pphi);
    pphi = wrap_(pphi);
    out[0] = -px * sin(pphi) + py * cos(pphi);
    out[1] = pz; out[2] = pphi; out[3] = theta; out[4] = p[4];
}

// X = A^-1 B for 5x5 A (symmetric positive), 5x5 B, in the basis scaling A to unit diagonal
__device__ void spd_solve_(const double* A, const double* B, double* X) {
    double d[5], M[25], Y[25];
    for (int a = 0; a < 5; ++a) d[a] = sqrt(fmax(fabs(A[6 * a]), 1e-300));
    for (int a = 0; a < 5; ++a)
        for (int b = 0; b < 5; ++b) { M[5 * a + b] = A[5 * a + b] / (d[a] * d[b]); Y[5 * a + b] = B[5 * a + b] / d[a]; }
    // Gaussian elimination with partial pivoting
    for (int c = 0; c < 5; ++c) {
        int piv = c;
        for (int r = c + 1; r < 5; ++r) if (fabs(M[5 * r + c]) > fabs(M[5 * piv + c])) piv = r;
        if (piv != c)
            for (int k = 0; k < 5; ++k) {
                double t1 = M[5 * c + k]; M[5 * c + k] = M[5 * piv + k]; M[5 * piv + k] = t1;
                double t2 = Y[5 * c + k]; Y[5 * c + k] = Y[5 * piv + k]; Y[5 * piv + k] = t2;
            }
        double inv = 1.0 / M[6 * c];
        for (int r = c + 1; r < 5; ++r) {
            double f = M[5 * r + c] * inv;
            for (int k = c; k < 5; ++k) M[5 * r + k] -= f * M[5 * c + k];
            for (int k = 0; k < 5; ++k) Y[5 * r + k] -= f * Y[5 * c + k];
        }
    }
    for (int c = 4; c >= 0; --c)
        for (int k = 0; k < 5; ++k) {
            double acc = Y[5 * c + k];
            for (int j = c + 1; j < 5; ++j) acc -= M[5 * c + j] * X[5 * j + k];
            X[5 * c + k] = acc / M[6 * c];
        }
    for (int a = 0; a < 5; ++a)
        for (int k = 0; k < 5; ++k) X[5 * a + k] /= d[a];
}

// perigee parameters per of the bound parameters p on module first, and their Jacobian PJ by forward
// differences
#if FIT_LANES > 1
// The six maps side by side: lane 0 maps p, lane k + 1 p with parameter k perturbed
__device__ void perigee_jacobian_(int lane, unsigned mask, const double* rot, const double* trans, int first,
                                  const double* p, double bfield, double c_light, int steps, const double* fd,
                                  double* per, double* PJ) {
    int k = lane - 1;
    double step = k >= 0 && k < 5 ? fd[k] * (k == 4 ? fmax(fabs(p[4]), 1e-3) : 1.0) : 1.0;
    double q[5], m[5] = {0.0, 0.0, 0.0, 0.0, 0.0}, col[5];
    for (int j = 0; j < 5; ++j) q[j] = j == k ? p[j] + step : p[j];
    if (lane < 6) perigee_map_(rot, trans, first, q, bfield, c_light, steps, m);
    for (int j = 0; j < 5; ++j) per[j] = __shfl_sync(mask, m[j], 0, FIT_LANES);
    for (int j = 0; j < 5; ++j) {
        double d = m[j] - per[j];
        if (j == 2) d = wrap_(d);
        col[j] = d / step;
    }
    for (int c = 0; c < 5; ++c)
        for (int j = 0; j < 5; ++j) PJ[5 * j + c] = __shfl_sync(mask, col[j], c + 1, FIT_LANES);
}
#else
__device__ void perigee_jacobian_(int, unsigned, const double* rot, const double* trans, int first, const double* p,
                                  double bfield, double c_light, int steps, const double* fd, double* per,
                                  double* PJ) {
    double pert[5], q[5], step_[5];
    for (int k = 0; k < 5; ++k) step_[k] = fd[k] * (k == 4 ? fmax(fabs(p[4]), 1e-3) : 1.0);
    perigee_map_(rot, trans, first, p, bfield, c_light, steps, per);
    for (int k = 0; k < 5; ++k) {
        for (int j = 0; j < 5; ++j) q[j] = p[j];
        q[k] += step_[k];
        perigee_map_(rot, trans, first, q, bfield, c_light, steps, pert);
        for (int j = 0; j < 5; ++j) {
            double d = pert[j] - per[j];
            if (j == 2) d = wrap_(d);
            PJ[5 * j + k] = d / step_[k];
        }
    }
}
#endif

extern "C" __global__ void fit_tracks(
    const double* rot, const double* trans, const double* material, const long long* offsets,
    const long long* measurements, int n_tracks, const int* m_module, const double* m_l0, const double* m_l1,
    const double* m_v0, const double* m_v1, const signed char* m_dim, const double* start_p, const double* start_c,
    double cov_scale, double beam_pipe_x0, double bfield, double c_light, int steps, const double* fd, int n_max,
    double* scratch, double* out_p, double* out_c, double* out_chi2, int* out_ndf, bool* out_ok) {
    int thread = blockIdx.x * blockDim.x + threadIdx.x;
    int i = thread / FIT_LANES, lane = thread % FIT_LANES;
    // the track's lanes leave together: the others' shuffles do not involve them
    if (i >= n_tracks) return;
    unsigned mask = group_mask_();
    long long base = offsets[i];
    int len = (int)(offsets[i + 1] - base);
    double* store = scratch + (long)i * n_max * 30;
    double p[5], C[25], pp[5], pc[25], J[25], Cq[25];
    for (int k = 0; k < 5; ++k) p[k] = start_p[5 * (long)i + k];
    for (int k = 0; k < 25; ++k) C[k] = start_c[25 * (long)i + k] * cov_scale;
    long long mi = measurements[base];
    int module = m_module[mi];
    update_(p, C, m_l0[mi], m_l1[mi], m_v0[mi], m_v1[mi], m_dim[mi], pp, pc);
    for (int k = 0; k < 5; ++k) p[k] = pp[k];
    for (int k = 0; k < 25; ++k) C[k] = pc[k];
    double chi2 = 0.0;
    int ndf = m_dim[mi] - 5;
    bool ok = true;
    if (lane == 0) {
        for (int k = 0; k < 5; ++k) store[k] = p[k];
        for (int k = 0; k < 25; ++k) store[5 + k] = C[k];
    }
    for (int step = 1; step < len; ++step) {
        mi = measurements[base + step];
        int target = m_module[mi];
        for (int k = 0; k < 25; ++k) Cq[k] = C[k];
        scatter_(rot + 9 * (long)module, p, Cq, material[module]);
        double s = fit_transport_(lane, mask, rot, trans, module, target, p, Cq, bfield, c_light, steps, fd, pp, J,
                                  pc);
        if (isnan(s)) {
            ok = false;
            for (int k = 0; k < 5; ++k) pp[k] = p[k];
            for (int k = 0; k < 25; ++k) pc[k] = Cq[k];
        }
        chi2 += update_(pp, pc, m_l0[mi], m_l1[mi], m_v0[mi], m_v1[mi], m_dim[mi], p, C);
        module = target;
        ndf += m_dim[mi];
        if (lane == 0) {
            double* st_k = store + 30 * (long)step;
            for (int k = 0; k < 5; ++k) st_k[k] = p[k];
            for (int k = 0; k < 25; ++k) st_k[5 + k] = C[k];
        }
    }
    group_sync_(mask);  // lane 0's stores, visible to the track's other lanes
    // smoother: p, C hold the last filtered (= smoothed) state
    for (int step = len - 2; step >= 0; --step) {
        const double* fp = store + 30 * (long)step;
        const double* fc = fp + 5;
        int mod_k = m_module[measurements[base + step]];
        int mod_n = m_module[measurements[base + step + 1]];
        for (int k = 0; k < 25; ++k) Cq[k] = fc[k];
        scatter_(rot + 9 * (long)mod_k, fp, Cq, material[mod_k]);
        double s = fit_transport_(lane, mask, rot, trans, mod_k, mod_n, fp, Cq, bfield, c_light, steps, fd, pp, J,
                                  pc);
        if (isnan(s)) {
            for (int k = 0; k < 5; ++k) pp[k] = fp[k];
            for (int k = 0; k < 25; ++k) pc[k] = Cq[k];
        }
        double JF[25], X[25], G[25];
        for (int a = 0; a < 5; ++a)
            for (int b = 0; b < 5; ++b) {
                double acc = 0.0;
                for (int c = 0; c < 5; ++c) acc += J[5 * a + c] * fc[5 * c + b];
                JF[5 * a + b] = acc;
            }
        spd_solve_(pc, JF, X);
        for (int a = 0; a < 5; ++a)
            for (int b = 0; b < 5; ++b) G[5 * a + b] = X[5 * b + a];
        double diff[5];
        for (int a = 0; a < 5; ++a) diff[a] = p[a] - pp[a];
        diff[2] = wrap_(diff[2]);
        double np_[5], D[25], GD[25];
        for (int a = 0; a < 5; ++a) {
            double acc = fp[a];
            for (int c = 0; c < 5; ++c) acc += G[5 * a + c] * diff[c];
            np_[a] = acc;
        }
        for (int k = 0; k < 25; ++k) D[k] = C[k] - pc[k];
        sandwich_(G, D, GD);  // smoothed covariance: P_f + G (P_s' - P_pred) G^T
        for (int k = 0; k < 25; ++k) C[k] = fc[k] + GD[k];
        for (int a = 0; a < 5; ++a) p[a] = np_[a];
    }
    int first = m_module[measurements[base]];
    double mom = 1.0 / fmax(fabs(p[4]), 1e-9);
    double x = fmax(beam_pipe_x0, 1e-8);
    double th0 = 0.0136 / mom * sqrt(x) * (1.0 + 0.038 * log(x));
    double sin_t = fmax(fabs(sin(p[3])), 1e-6);
    C[12] += th0 * th0 / (sin_t * sin_t);
    C[18] += th0 * th0;
    double per[5], PJ[25], PC[25];
    perigee_jacobian_(lane, mask, rot, trans, first, p, bfield, c_light, steps, fd, per, PJ);
    sandwich_(PJ, C, PC);
    if (lane != 0) return;
    for (int k = 0; k < 25; ++k) out_c[25 * (long)i + k] = PC[k];
    for (int a = 0; a < 5; ++a) {
        out_p[5 * (long)i + a] = per[a];
        ok = ok && isfinite(per[a]) && PC[6 * a] > 0;
    }
    out_chi2[i] = chi2;
    out_ndf[i] = ndf;
    out_ok[i] = ok;
}
"""

_BLOCK = 64  # whole warps: a track's lanes must share one
# lanes of a warp per track on the GPU: 8, 16 or 32 (six do the work), or 1 (one thread per track)
_LANES = 8
#: tracks up to which a launch gives each track _LANES lanes: a small batch leaves most of the GPU idle,
#: and lanes shorten each track's chain of transports; past it the GPU is full with one thread per track,
#: and the lanes' repeated filter algebra would only cost (batch 16 at mu=200: 0.23 -> 0.57 ms per event)
_LANES_UP_TO = 16_384


def full_source() -> str:
    # NVRTC defines __CUDACC_RTC__; the host build of the tests runs threads one after another, with
    # no warps to shuffle in, so it keeps one thread per track
    lanes = (
        f"#ifndef FIT_LANES\n#ifdef __CUDACC_RTC__\n#define FIT_LANES {_LANES}\n"
        "#else\n#define FIT_LANES 1\n#endif\n#endif\n"
    )
    return fused._SOURCE + lanes + _FIT_SOURCE


def _module(lanes: int) -> CudaModule:
    """The fit compiled for ``lanes`` lanes per track. Without contracted multiply-adds, so that the
    lanes' arithmetic and one thread's round alike (the compiler would contract them differently in the
    two layouts): a track's fit does not depend on which one the batch size picks."""
    return CudaModule(full_source, _BLOCK, ("--fmad=false", f"--define-macro=FIT_LANES={lanes}"))


_MODULES = {lanes: _module(lanes) for lanes in (1, _LANES)}  # compiled on first use


def _kernel(lanes: int = _LANES) -> Any:
    return _MODULES[lanes].function("fit_tracks")


def fit_tracks(
    xp: ModuleType,
    det: Any,
    material: Array,
    meas: Any,
    offsets: Array,
    measurements: Array,
    start_params: Array,
    start_cov: Array,
    variances: tuple[Array, Array],
    cov_scale: float,
    beam_pipe_x0: float,
    steps: int,
) -> tuple[Array, Array, Array, Array, Array]:
    """(perigee params [T, 5], cov [T, 5, 5], chi2 [T], ndf [T], ok [T])."""
    n = int(offsets.shape[0]) - 1
    length = offsets[1:] - offsets[:-1]
    n_max = int(length.max()) if n else 0
    f64 = xp.float64
    out_p = xp.empty((n, 5), dtype=f64)
    out_c = xp.empty((n, 5, 5), dtype=f64)
    out_chi2 = xp.empty(n, dtype=f64)
    out_ndf = xp.empty(n, dtype=xp.int32)
    out_ok = xp.empty(n, dtype=xp.bool_)
    if n == 0:
        return out_p, out_c, out_chi2, out_ndf, out_ok
    scratch = xp.empty(n * n_max * 30, dtype=f64)
    args = (
        det.rotation,
        det.translation,
        xp.ascontiguousarray(material, dtype=f64),
        xp.ascontiguousarray(offsets, dtype=xp.int64),
        xp.ascontiguousarray(measurements, dtype=xp.int64),
        xp.int32(n),
        xp.ascontiguousarray(meas.module, dtype=xp.int32),
        *(xp.ascontiguousarray(a, dtype=f64) for a in (meas.local0, meas.local1, variances[0], variances[1])),
        xp.ascontiguousarray(meas.dimension, dtype=xp.int8),
        xp.ascontiguousarray(start_params, dtype=f64),
        xp.ascontiguousarray(start_cov, dtype=f64),
        xp.float64(cov_scale),
        xp.float64(beam_pipe_x0),
        xp.float64(det.bfield_t),
        xp.float64(0.299792458e-3),
        xp.int32(steps),
        fused._fd_steps(xp),
        xp.int32(n_max),
        scratch,
        out_p,
        out_c,
        out_chi2,
        out_ndf,
        out_ok,
    )
    lanes = _LANES if n <= _LANES_UP_TO else 1
    _kernel(lanes)((math.ceil(n * lanes / _BLOCK),), (_BLOCK,), args)
    return out_p, out_c, out_chi2, out_ndf, out_ok
