"""Measurement creation's cluster reductions in two CUDA kernels.

The array code (:mod:`kernels.measurement_creation`) forms the local cell centres, then runs a dozen
scatter reductions over the cells (weights, weighted sums and squares, counts, channel extents) and
the per-cluster arithmetic, some forty launches and a wait for the host. Here ``cluster_span`` (one
thread per cell) finds each cluster's first and last cell, and ``measure_clusters`` (one thread per
cluster) sums its cells between the two in cell order, in the same arithmetic, then forms the means,
variances, module, event, dimension and extents: deterministic, where summing with atomics gave
results that differed from run to run in the last bits.
The truth majority (``truth_*``) counts (cluster, truth) pairs in a hash table instead of two sorts. ``tests/test_fused_host.py`` and ``tests/test_fused.py``
check the result against the array code.
"""

from __future__ import annotations

from types import ModuleType

from kernels.cuda_module import CudaModule
from kernels.xp import Array

_SOURCE = r"""
extern "C" __global__ void cluster_span(const int* cluster, int n, int* first, int* last) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicMin(&first[cluster[i]], i);
    atomicMax(&last[cluster[i]], i);
}

extern "C" __global__ void measure_clusters(
    const int* module, const int* event, const int* channel0, const int* channel1, const double* activation,
    const int* cluster, const int* first, const int* last, int n_clusters, const double* seg_min,
    const double* seg_max, const int* seg_bins, const signed char* dimension, double* local0, double* local1,
    double* var0, double* var1, int* out_module, int* out_event, signed char* out_dim, int* ncell,
    int* extent0, int* extent1) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_clusters) return;
    int i0 = first[k], i1 = last[k];
    int m = module[i0 <= i1 ? i0 : 0];  // (a cluster without cells: none in the chain)
    double a0 = seg_min[2 * m], a1 = seg_min[2 * m + 1];
    double p0 = (seg_max[2 * m] - a0) / (double)seg_bins[2 * m];
    double p1 = (seg_max[2 * m + 1] - a1) / (double)seg_bins[2 * m + 1];
    double sw = 0.0, sw0 = 0.0, sw1 = 0.0, sw00 = 0.0, sw11 = 0.0, sl0 = 0.0, sl1 = 0.0;
    int count = 0, hi0 = -1, lo0 = 1 << 30, hi1 = -1, lo1 = 1 << 30;
    // the cluster's cells lie between its first and last cell: summed in cell order, the same bits
    // every run (atomic sums would add in whatever order the threads come)
    for (int i = i0; i <= i1; ++i) {
        if (cluster[i] != k) continue;
        int c0 = channel0[i], c1 = channel1[i];
        double l0 = a0 + ((double)c0 + 0.5) * p0;
        double l1 = a1 + ((double)c1 + 0.5) * p1;
        double w = activation[i];
        double w0 = w * l0, w1 = w * l1;
        sw += w;
        sw0 += w0;
        sw1 += w1;
        sw00 += w0 * l0;
        sw11 += w1 * l1;
        sl0 += l0;
        sl1 += l1;
        count += 1;
        hi0 = c0 > hi0 ? c0 : hi0;
        lo0 = c0 < lo0 ? c0 : lo0;
        hi1 = c1 > hi1 ? c1 : hi1;
        lo1 = c1 < lo1 ? c1 : lo1;
    }
    bool safe = sw > 0;
    double sws = safe ? sw : 1.0;
    double mean0 = safe ? sw0 / sws : sl0 / (double)count;  // zero total activation: the plain mean
    double mean1 = safe ? sw1 / sws : sl1 / (double)count;
    double f = safe ? 1.0 : 0.0;
    local0[k] = mean0;
    local1[k] = mean1;
    var0[k] = fmax(sw00 / sws - mean0 * mean0, 0.0) * f + p0 * p0 / 12.0;
    var1[k] = fmax(sw11 / sws - mean1 * mean1, 0.0) * f + p1 * p1 / 12.0;
    out_module[k] = m;
    out_event[k] = event[i0 <= i1 ? i0 : 0];
    out_dim[k] = dimension[m];
    ncell[k] = count;
    extent0[k] = hi0 - lo0 + 1;
    extent1[k] = hi1 - lo1 + 1;
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
    cluster = c(cluster, dtype=i32)
    first = xp.full(n_clusters, 2**31 - 1, dtype=i32)
    last = xp.full(n_clusters, -1, dtype=i32)
    _launch("cluster_span", n, (cluster, i32(n), first, last))
    out = {
        "local0": xp.empty(n_clusters, f64),
        "local1": xp.empty(n_clusters, f64),
        "var0": xp.empty(n_clusters, f64),
        "var1": xp.empty(n_clusters, f64),
        "module": xp.empty(n_clusters, i32),
        "event": xp.empty(n_clusters, i32),
        "dimension": xp.empty(n_clusters, xp.int8),
        "n_cells": xp.empty(n_clusters, i32),
        "extent0": xp.empty(n_clusters, i32),
        "extent1": xp.empty(n_clusters, i32),
    }
    cells = (
        c(module, dtype=i32),
        c(event, dtype=i32),
        c(channel0, dtype=i32),
        c(channel1, dtype=i32),
        c(activation, dtype=f64),
        cluster,
    )
    geometry = (c(det.seg_min, dtype=f64), c(det.seg_max, dtype=f64), c(det.seg_bins, dtype=i32))
    dim = c(det.dimension, dtype=xp.int8)
    _launch(
        "measure_clusters", n_clusters, (*cells, first, last, i32(n_clusters), *geometry, dim, *out.values())
    )
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
