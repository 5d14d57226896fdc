"""Measurement creation's cluster reductions in two CUDA kernels.

The array code (:mod:`kernels.measurement_creation`) forms the local cell centres, then runs a dozen
scatter reductions over the cells (weights, weighted sums and squares, counts, channel extents) and
the per-cluster arithmetic, some forty launches and a wait for the host. Here ``measure_cells`` (one
thread per cell) does every per-cell sum with atomics in the same arithmetic, and
``measure_clusters`` (one thread per cluster) the means, variances, module, event and dimension.
The truth majority (``truth_*``) counts (cluster, truth) pairs in a hash table instead of two sorts. ``tests/test_fused_host.py`` and ``tests/test_fused.py``
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

// majority truth: an open-addressing table counts the cells of every (cluster, truth) pair; a slot is
// claimed by its first cell's index, so a pair is compared through the cells' own columns
__device__ __forceinline__ unsigned long long pair_hash_(long long k, long long t) {
    unsigned long long h = (unsigned long long)k * 0x9E3779B97F4A7C15ULL ^ (unsigned long long)t * 0xC2B2AE3D27D4EB4FULL;
    return h ^ (h >> 29);
}

extern "C" __global__ void truth_clear(long long size, long long n_clusters, long long* owner, int* count,
                                       int* best_count, long long* best_truth) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < size) {
        owner[i] = -1;
        count[i] = 0;
    }
    if (i < n_clusters) {
        best_count[i] = 0;
        best_truth[i] = 0x7fffffffffffffffLL;
    }
}

extern "C" __global__ void truth_count(const int* cluster, const long long* truth, int n, long long mask,
                                       long long* owner, int* count, long long* slot_of) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long k = cluster[i], t = truth[i];
    long long s = (long long)(pair_hash_(k, t) & (unsigned long long)mask);
    while (true) {
        long long prev = (long long)atomicCAS((unsigned long long*)&owner[s], (unsigned long long)-1LL,
                                              (unsigned long long)i);
        if (prev == -1 || (cluster[prev] == k && truth[prev] == t)) break;
        s = (s + 1) & mask;
    }
    atomicAdd(&count[s], 1);
    slot_of[i] = s;
}

extern "C" __global__ void truth_best_count(const int* cluster, int n, const int* count, const long long* slot_of,
                                            int* best_count) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicMax(&best_count[cluster[i]], count[slot_of[i]]);
}

extern "C" __global__ void truth_best_id(const int* cluster, const long long* truth, int n, const int* count,
                                         const long long* slot_of, const int* best_count, long long* best_truth) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (count[slot_of[i]] == best_count[cluster[i]]) atomicMin(&best_truth[cluster[i]], truth[i]);
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


def majority_truth(xp: ModuleType, cluster: Array, truth: Array, n_clusters: int) -> Array:
    """Most frequent truth id per cluster, ties to the smallest (int64), as
    :func:`kernels.measurement_creation.majority_truth`: counted in a hash table, no sort."""
    n = int(cluster.shape[0])
    i32, i64 = xp.int32, xp.int64
    size = 1 << max(4, (2 * n - 1).bit_length())  # at most half full
    owner, count = xp.empty(size, i64), xp.empty(size, i32)
    best_count, best_truth = xp.empty(max(n_clusters, 1), i32), xp.empty(max(n_clusters, 1), i64)
    _launch(
        "truth_clear",
        max(size, n_clusters),
        (i64(size), i64(n_clusters), owner, count, best_count, best_truth),
    )
    cluster = xp.ascontiguousarray(cluster, dtype=i32)
    truth = xp.ascontiguousarray(truth, dtype=i64)
    slot_of = xp.empty(n, i64)
    _launch("truth_count", n, (cluster, truth, i32(n), i64(size - 1), owner, count, slot_of))
    _launch("truth_best_count", n, (cluster, i32(n), count, slot_of, best_count))
    _launch("truth_best_id", n, (cluster, truth, i32(n), count, slot_of, best_count, best_truth))
    # a cluster without cells (none in the chain; the array code allows them) has no truth: -1
    return xp.where(best_count[:n_clusters] > 0, best_truth[:n_clusters], -1)
