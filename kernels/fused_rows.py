"""Spacepoint formation, seed parameter estimation and the fit's measurement variances, each in one
CUDA kernel.

Both stages are per-row arithmetic: the array code (:mod:`kernels.spacepoint_formation`,
:mod:`kernels.track_params`) spends some fifty and ninety launches per batch on gathers and
elementwise operations, which at batch 1 cost far more host time than the arithmetic costs the GPU.
Here one thread per spacepoint (``spacepoints``), per seed (``track_params``) or per measurement
(``measurement_variances``, :mod:`kernels.measurement_errors`) does the same
arithmetic in the same order; the module is compiled without fused multiply-adds so that the results
are those of the array code bit for bit wherever the math library agrees. ``tests/test_fused_host.py``
and ``tests/test_fused.py`` compare both with the array code.
"""

from __future__ import annotations

from types import ModuleType

from kernels.cuda_module import CudaModule
from kernels.xp import Array

_SOURCE = r"""
extern "C" __global__ void spacepoints(
    const long long* sel, int n, const int* module, const int* event, const double* local0, const double* local1,
    const double* var0, const double* var1, const double* rotation, const double* translation,
    int* out_meas, int* out_module, int* out_event, double* x_, double* y_, double* z_, double* r_, double* phi_,
    double* var_r, double* var_z) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long k = sel[i];
    int m = module[k];
    const double* R = rotation + 9 * (long long)m;
    const double* t = translation + 3 * (long long)m;
    double l0 = local0[k], l1 = local1[k];
    double x = R[0] * l0 + R[1] * l1 + t[0];
    double y = R[3] * l0 + R[4] * l1 + t[1];
    double z = R[6] * l0 + R[7] * l1 + t[2];
    double r = hypot(x, y);
    double rx = r > 0 ? x / r : 1.0;
    double ry = r > 0 ? y / r : 0.0;
    double ur = R[0] * rx + R[3] * ry;
    double vr = R[1] * rx + R[4] * ry;
    out_meas[i] = (int)k;
    out_module[i] = m;
    out_event[i] = event[k];
    x_[i] = x;
    y_[i] = y;
    z_[i] = z;
    r_[i] = r;
    phi_[i] = atan2(y, x);
    var_r[i] = ur * ur * var0[k] + vr * vr * var1[k];
    var_z[i] = R[6] * R[6] * var0[k] + R[7] * R[7] * var1[k];
}

extern "C" __global__ void track_params(
    const int* bottom, const int* middle, const int* top, int n, const double* sx, const double* sy,
    const double* sz, const int* sp_meas, const double* local0, const double* local1, const int* meas_module,
    double pt_per_radius, double bsign, double s_loc0, double s_loc1, double s_phi, double s_theta,
    double sigma_q_over_pt, double* params, double* cov,
    int* out_module) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int b = bottom[i], m = middle[i], t = top[i];
    double x1 = sx[b], y1 = sy[b], z1 = sz[b], x2 = sx[m], y2 = sy[m], x3 = sx[t], y3 = sy[t];
    // the circle through the three points (kernels.track_params.circle_through)
    double ax = x2 - x1, ay = y2 - y1, bx = x3 - x1, by = y3 - y1;
    double d = 2.0 * (ax * by - ay * bx);
    double d_safe = fabs(d) < 1e-12 ? 1e-12 : d;
    double a2 = ax * ax + ay * ay, b2 = bx * bx + by * by;
    double ux = (by * a2 - ay * b2) / d_safe;
    double uy = (ax * b2 - bx * a2) / d_safe;
    double radius = sqrt(ux * ux + uy * uy);
    double turn = (x2 - x1) * (y3 - y2) - (y2 - y1) * (x3 - x2);
    double cx = x1 + ux, cy = y1 + uy;
    double rx = x1 - cx, ry = y1 - cy;
    bool ccw = turn > 0;
    double tx = ccw ? -ry : ry;
    double ty = ccw ? rx : -rx;
    double phi = atan2(ty, tx);
    double charge = (ccw ? -1.0 : 1.0) * bsign;
    double pt = pt_per_radius * radius;
    double chord = hypot(x3 - x1, y3 - y1);
    double arc = 2.0 * radius * asin(fmin(chord / (2.0 * radius), 1.0));
    double theta = atan2(arc, sz[t] - z1);
    double sin_t = sin(theta);
    double qop = charge * sin_t / pt;
    int mb = sp_meas[b];
    double* p = params + 5 * (long long)i;
    p[0] = local0[mb];
    p[1] = local1[mb];
    p[2] = phi;
    p[3] = theta;
    p[4] = qop;
    double* c = cov + 25 * (long long)i;
    for (int j = 0; j < 25; ++j) c[j] = 0.0;
    c[0] = s_loc0;
    c[6] = s_loc1;
    c[12] = s_phi;
    c[18] = s_theta;
    double sq = sigma_q_over_pt * sin_t;
    c[24] = sq * sq;
    out_module[i] = meas_module[mb];
}

extern "C" __global__ void measurement_variances(
    const int* module, const int* extent0, const int* extent1, int n, const int* volume_id, const double* seg_min,
    const double* seg_max, const int* seg_bins, const double* table, int n_extent, double* var0, double* var1) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int m = module[i];
    int vol = volume_id[m];
    for (int axis = 0; axis < 2; ++axis) {
        double pitch = (seg_max[2 * m + axis] - seg_min[2 * m + axis]) / (double)seg_bins[2 * m + axis];
        int e = (axis == 0 ? extent0[i] : extent1[i]) - 1;
        e = e < 0 ? 0 : (e > n_extent - 1 ? n_extent - 1 : e);
        double scale = seg_bins[2 * m + axis] <= 1 ? 1.0 : table[((long long)vol * 2 + axis) * n_extent + e];
        (axis == 0 ? var0 : var1)[i] = pitch * pitch / 12.0 * scale;
    }
}
"""

# no fused multiply-adds: the same roundings as the array code's separate operations
_CUDA = CudaModule(_SOURCE, options=("--fmad=false",))


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def spacepoints(xp: ModuleType, det, meas) -> dict[str, Array]:
    """Columns of :class:`kernels.edm.measurements.Spacepoints` for the 2-D measurements."""
    sel = xp.nonzero(meas.dimension == 2)[0].astype(xp.int64, copy=False)
    n = int(sel.shape[0])
    c = xp.ascontiguousarray
    i32, f64 = xp.int32, xp.float64
    out = {name: xp.empty(n, i32) for name in ("measurement", "module", "event")}
    out |= {name: xp.empty(n, f64) for name in ("x", "y", "z", "r", "phi", "var_r", "var_z")}
    columns = (meas.module, meas.event, meas.local0, meas.local1, meas.var0, meas.var1)
    args = (
        c(sel),
        i32(n),
        *(c(a, dtype=i32 if k < 2 else f64) for k, a in enumerate(columns)),
        c(det.rotation, dtype=f64),
        c(det.translation, dtype=f64),
        *out.values(),
    )
    _launch("spacepoints", n, args)
    return out


def track_params(
    xp: ModuleType,
    sp,
    meas,
    seeds,
    bfield: float,
    pt_per_tesla_mm: float,
    sigma2: tuple,
    sigma_q_over_pt: float,
) -> tuple[Array, Array, Array]:
    """(params [n, 5], cov [n, 5, 5], module (int32)) of every seed, as
    :func:`kernels.track_params.estimate_parameters` computes them; ``sigma2``: the squared sigmas of
    loc0, loc1, phi, theta."""
    n = int(seeds.bottom.shape[0])
    c = xp.ascontiguousarray
    i32, f64 = xp.int32, xp.float64
    params = xp.empty((n, 5), f64)
    cov = xp.empty((n, 5, 5), f64)
    module = xp.empty(n, i32)
    args = (
        c(seeds.bottom, dtype=i32),
        c(seeds.middle, dtype=i32),
        c(seeds.top, dtype=i32),
        i32(n),
        c(sp.x, dtype=f64),
        c(sp.y, dtype=f64),
        c(sp.z, dtype=f64),
        c(sp.measurement, dtype=i32),
        c(meas.local0, dtype=f64),
        c(meas.local1, dtype=f64),
        c(meas.module, dtype=i32),
        f64(pt_per_tesla_mm * abs(bfield)),
        f64(1.0 if bfield >= 0 else -1.0),
        *(f64(v) for v in sigma2),
        f64(sigma_q_over_pt),
        params,
        cov,
        module,
    )
    _launch("track_params", n, args)
    return params, cov, module


def measurement_variances(xp: ModuleType, det, meas, table: Array) -> tuple[Array, Array]:
    """(var0, var1) of :func:`kernels.measurement_errors.measurement_variances`'s "extent" model;
    ``table``: its factors [256, 2, n_extent] on the device."""
    n = int(meas.module.shape[0])
    c = xp.ascontiguousarray
    i32, f64 = xp.int32, xp.float64
    var0, var1 = xp.empty(n, f64), xp.empty(n, f64)
    args = (
        c(meas.module, dtype=i32), c(meas.extent0, dtype=i32), c(meas.extent1, dtype=i32), i32(n),
        c(det.volume_id, dtype=i32), c(det.seg_min, dtype=f64), c(det.seg_max, dtype=f64),
        c(det.seg_bins, dtype=i32), table, i32(table.shape[2]), var0, var1,
    )  # fmt: skip
    _launch("measurement_variances", n, args)
    return var0, var1
