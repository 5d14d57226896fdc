"""Measurement creation's cluster reductions in two CUDA kernels.

The array code (:mod:`kernels.measurement_creation`) forms the local cell centres, then runs a dozen
scatter reductions over the cells (weights, weighted sums and squares, counts, channel extents) and
the per-cluster arithmetic, some forty launches and a wait for the host. Here ``measure_cells`` (one
thread per cell) does every per-cell sum with atomics in the same arithmetic, and
``measure_clusters`` (one thread per cluster) the means, variances, module, event and dimension.
The truth majority keeps the array code. ``tests/test_fused_host.py`` and ``tests/test_fused.py``
check the result against the array code.
"""

from __future__ import annotations

from types import ModuleType

from kernels.cuda_module import CudaModule
from kernels.xp import Array

_SOURCE = r"""
extern "C" __global__ void measure_cells(
    const int* module, const int* channel0, const int* channel1, const double* activation, const int* cluster,
    int n, const double* seg_min, const double* seg_max, const int* seg_bins, double* sums, int* ncell,
    int* hi0, int* lo0, int* hi1, int* lo1, long long* first) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int m = module[i], k = cluster[i];
    double a0 = seg_min[2 * m], a1 = seg_min[2 * m + 1];
    double p0 = (seg_max[2 * m] - a0) / (double)seg_bins[2 * m];
    double p1 = (seg_max[2 * m + 1] - a1) / (double)seg_bins[2 * m + 1];
    double l0 = a0 + ((double)channel0[i] + 0.5) * p0;
    double l1 = a1 + ((double)channel1[i] + 0.5) * p1;
    double w = activation[i];
    double w0 = w * l0, w1 = w * l1;
    double* s = sums + 7 * (long long)k;
    atomicAdd(s, w);
    atomicAdd(s + 1, w0);
    atomicAdd(s + 2, w1);
    atomicAdd(s + 3, w0 * l0);
    atomicAdd(s + 4, w1 * l1);
    atomicAdd(s + 5, l0);
    atomicAdd(s + 6, l1);
    atomicAdd(&ncell[k], 1);
    atomicMax(&hi0[k], channel0[i]);
    atomicMin(&lo0[k], channel0[i]);
    atomicMax(&hi1[k], channel1[i]);
    atomicMin(&lo1[k], channel1[i]);
    first[k] = i;  // any cell of the cluster: they share module and event
}

extern "C" __global__ void measure_clusters(
    const double* sums, const int* ncell, const long long* first, const int* module, const int* event, int n,
    const double* seg_min, const double* seg_max, const int* seg_bins, const signed char* dimension,
    double* local0, double* local1, double* var0, double* var1, int* out_module, int* out_event,
    signed char* out_dim) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    const double* s = sums + 7 * (long long)k;
    bool safe = s[0] > 0;
    double sw = safe ? s[0] : 1.0;
    double mean0 = safe ? s[1] / sw : 0.0, mean1 = safe ? s[2] / sw : 0.0;
    if (!safe) {  // a cluster of zero total activation: the plain mean of its cells
        double cnt = (double)ncell[k];
        mean0 = s[5] / cnt;
        mean1 = s[6] / cnt;
    }
    int m = module[first[k]];
    double p0 = (seg_max[2 * m] - seg_min[2 * m]) / (double)seg_bins[2 * m];
    double p1 = (seg_max[2 * m + 1] - seg_min[2 * m + 1]) / (double)seg_bins[2 * m + 1];
    double f = safe ? 1.0 : 0.0;
    local0[k] = mean0;
    local1[k] = mean1;
    var0[k] = fmax(s[3] / sw - mean0 * mean0, 0.0) * f + p0 * p0 / 12.0;
    var1[k] = fmax(s[4] / sw - mean1 * mean1, 0.0) * f + p1 * p1 / 12.0;
    out_module[k] = m;
    out_event[k] = event[first[k]];
    out_dim[k] = dimension[m];
}
"""

_CUDA = CudaModule(_SOURCE)


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def cluster_moments(
    xp: ModuleType, det, module: Array, event: Array, channel0: Array, channel1: Array, activation: Array,
    cluster: Array, n_clusters: int,
) -> dict[str, Array]:  # fmt: skip
    """Per cluster: local0/1 and var0/1 (float64), module/event (int32), dimension (int8), n_cells and
    extent0/1 (int32), as :func:`kernels.measurement_creation.create_measurements` computes them."""
    n = int(cluster.shape[0])
    c = xp.ascontiguousarray
    i32, f64 = xp.int32, xp.float64
    module, event = c(module, dtype=i32), c(event, dtype=i32)
    geometry = (c(det.seg_min, dtype=f64), c(det.seg_max, dtype=f64), c(det.seg_bins, dtype=i32))
    sums = xp.zeros((n_clusters, 7), dtype=f64)
    ncell = xp.zeros(n_clusters, dtype=i32)
    extent = [xp.full(n_clusters, v, dtype=i32) for v in (-1, 2**30, -1, 2**30)]
    first = xp.zeros(n_clusters, dtype=xp.int64)
    cells = (
        module,
        c(channel0, dtype=i32),
        c(channel1, dtype=i32),
        c(activation, dtype=f64),
        c(cluster, dtype=i32),
    )
    _launch("measure_cells", n, (*cells, i32(n), *geometry, sums, ncell, *extent, first))
    out = {
        "local0": xp.empty(n_clusters, f64),
        "local1": xp.empty(n_clusters, f64),
        "var0": xp.empty(n_clusters, f64),
        "var1": xp.empty(n_clusters, f64),
        "module": xp.empty(n_clusters, i32),
        "event": xp.empty(n_clusters, i32),
        "dimension": xp.empty(n_clusters, xp.int8),
    }
    dim = c(det.dimension, dtype=xp.int8)
    _launch("measure_clusters", n_clusters, (sums, ncell, first, module, event, i32(n_clusters), *geometry, dim,
                                             *out.values()))  # fmt: skip
    out["n_cells"] = ncell
    out["extent0"] = extent[0] - extent[1] + 1
    out["extent1"] = extent[2] - extent[3] + 1
    return out
