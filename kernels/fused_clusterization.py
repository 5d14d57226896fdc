"""Clusterization's connected components in two CUDA kernels, with no host wait between rounds.

The array code (:mod:`kernels.clusterization`) finds each cell's earlier neighbours with four binary
searches and compactions, then propagates minimum labels round by round, each round a dozen launches
and a wait for the host. Here:

1. ``cluster_unite`` (one thread per cell): the same binary searches for the four neighbours that sort
   before the cell, and each neighbour found is united with the cell in a union-find forest whose roots
   only ever hook under smaller roots (``atomicCAS``), as ECL-CC does on GPUs;
2. ``cluster_label`` (one thread per cell): the root of its tree.

Finding a root halves the path on the way (every pointer moves to its grandparent), so the trees stay
shallow even for one cluster of a whole lit-up module.

A root is never hooked under a larger index, so every component ends with its smallest cell as root:
the labels are exactly those of the array code, whatever order the threads run in.
``tests/test_fused_host.py`` and ``tests/test_fused.py`` check them against the array code.
"""

from __future__ import annotations

from types import ModuleType

from kernels.cuda_module import CudaModule
from kernels.xp import Array

_SOURCE = r"""
// The root of x's tree. Parents always have smaller indices than their children, so every pointer on
// the way may be moved up to its grandparent (path halving): another thread can only have moved it to
// another ancestor, and roots are never written here. This keeps trees shallow when one huge cluster
// (a noisy module) would otherwise hook into a chain as long as the cluster.
__device__ __forceinline__ int root_(int* parent, int x) {
    int prev = x, cur = parent[x];
    while (true) {
        int next = parent[cur];
        if (next == cur) return cur;
        parent[prev] = next;
        prev = cur;
        cur = next;
    }
}

extern "C" __global__ void cluster_unite(
    const long long* keys, const int* channel0, const int* channel1, int n, int channel_bits, int* parent) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int d1s[4] = {-1, -1, -1, 0};
    const int d0s[4] = {-1, 0, 1, -1};
    long long limit = 1LL << channel_bits;
    for (int k = 0; k < 4; ++k) {
        long long c0 = (long long)channel0[i] + d0s[k], c1 = (long long)channel1[i] + d1s[k];
        if (c1 < 0 || c0 < 0 || c0 >= limit) continue;
        long long target = keys[i] + ((long long)d1s[k] << channel_bits) + d0s[k];
        int lo = 0, hi = i;  // the neighbour sorts before the cell
        while (lo < hi) { int md = (lo + hi) >> 1; if (keys[md] < target) lo = md + 1; else hi = md; }
        if (lo >= i || keys[lo] != target) continue;
        int a = i, b = lo;
        while (true) {
            a = root_(parent, a);
            b = root_(parent, b);
            if (a == b) break;
            if (a < b) { int t = a; a = b; b = t; }  // hook the larger root under the smaller one
            if (atomicCAS(&parent[a], a, b) == a) break;
        }
    }
}

extern "C" __global__ void cluster_label(int* parent, int n, int* label) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    label[i] = root_(parent, i);
}
"""

_CUDA = CudaModule(_SOURCE)


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def component_labels(
    xp: ModuleType, keys: Array, channel0: Array, channel1: Array, channel_bits: int
) -> Array:
    """Label of each cell = smallest cell index of its 8-connected component (int32); ``keys`` ascending
    (:func:`kernels.clusterization.cell_keys`)."""
    n = int(keys.shape[0])
    c = xp.ascontiguousarray
    parent = xp.arange(n, dtype=xp.int32)
    args = (c(keys, dtype=xp.int64), c(channel0, dtype=xp.int32), c(channel1, dtype=xp.int32), xp.int32(n))
    _launch("cluster_unite", n, (*args, xp.int32(channel_bits), parent))
    label = xp.empty(n, dtype=xp.int32)
    _launch("cluster_label", n, (parent, xp.int32(n), label))
    return label
