"""The CKF's per-step pruning of live candidates in a few CUDA kernels, without sorting.

After every layer step the array code (:func:`kernels.ckf._merge_duplicates` and
:func:`kernels.ckf._cap_per_seed`) keeps one candidate per (event, last two measurements) and then at
most ``max_per_seed`` candidates per seed, each with two stable radix sorts, a segmented rank and a
compaction. For one event that is ~40 small launches and two waits for the host per step, a quarter
of the event's time. Here the same selection is six kernels and a prefix sum, and no compaction:

0. ``prune_clear``: empty hash table and zero counters;
1. ``prune_insert``: every row puts its (event, m1, m2) key into an open-addressing hash table and
   keeps the slot; the slot's best quality (as order-preserving unsigned bits) is an ``atomicMin``;
2. ``prune_winner``: the rows with the slot's best quality race for the lowest row index (``atomicMin``),
   which is the stable sort's tie-break;
3. ``prune_count``: the winners count per seed;
4. ``prune_fill``: the winners of seeds over the cap list themselves per seed (any order);
5. ``prune_rank``: those rank themselves against their seed's list by (more measurements, lower chi^2,
   lower row) and stay when the rank is below the cap.

The result is a flag per row (the next layer step skips the others), the rows the array code keeps.
Which rows are kept does not depend on the order of the atomics. ``tests/test_fused_host.py`` and
``tests/test_fused.py`` check the result against the array code. The kernels read the packed tables'
columns at the positions kernels/candidates.py defines (chi2 = real column 30; event, seed, n_meas, m1,
m2 = index columns 1, 2, 4, 6, 7), as the layer search does.
"""

from __future__ import annotations

from types import ModuleType

from kernels.cuda_module import CudaModule
from kernels.xp import Array

_BLOCK = 128

_SOURCE = r"""
#define EMPTY_KEY (-1LL)
#define NO_ROW 0x7fffffffffffffffLL

// order-preserving unsigned image of a double (-0.0 counts as +0.0, as comparisons do)
__device__ __forceinline__ unsigned long long order_bits_(double d) {
    d = d + 0.0;
    unsigned long long b = (unsigned long long)__double_as_longlong(d);
    return (b >> 63) ? ~b : (b | 0x8000000000000000ULL);
}

__device__ __forceinline__ double quality_(const double* real, const long long* index, long long i) {
    long long nm = index[8 * i + 4];
    return real[32 * i + 30] / (double)(nm > 1 ? nm : 1) - 3.0 * (double)nm;
}

__device__ __forceinline__ long long merge_key_(const long long* index, long long i, long long n_meas_total) {
    const long long* r = index + 8 * i;
    return (r[1] * (n_meas_total + 1) + r[6]) * (n_meas_total + 1) + r[7];
}

// the hash table's empty slots and the per-seed counters, in one launch
extern "C" __global__ void prune_clear(
    long long size, long long n_seeds, long long* table_key, unsigned long long* table_q,
    unsigned long long* table_row, unsigned long long* count, unsigned long long* cursor) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < size) {
        table_key[i] = EMPTY_KEY;
        table_q[i] = ~0ULL;
        table_row[i] = (unsigned long long)NO_ROW;
    }
    if (i < n_seeds) {
        count[i] = 0;
        cursor[i] = 0;
    }
}

extern "C" __global__ void prune_insert(
    const double* real, const long long* index, int n, const long long* live, long long n_meas_total, int merge,
    long long* table_key, unsigned long long* table_q, long long mask, long long* slot_of) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (!merge || i >= *live) { slot_of[i] = -1; return; }
    long long key = merge_key_(index, i, n_meas_total);
    unsigned long long h = (unsigned long long)key * 0x9E3779B97F4A7C15ULL;
    long long s = (long long)((h ^ (h >> 29)) & (unsigned long long)mask);
    while (true) {
        long long prev = (long long)atomicCAS((unsigned long long*)&table_key[s], (unsigned long long)EMPTY_KEY,
                                              (unsigned long long)key);
        if (prev == EMPTY_KEY || prev == key) break;
        s = (s + 1) & mask;
    }
    slot_of[i] = s;
    atomicMin(&table_q[s], order_bits_(quality_(real, index, i)));
}

extern "C" __global__ void prune_winner(
    const double* real, const long long* index, int n, const long long* slot_of,
    const unsigned long long* table_q, unsigned long long* table_row) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long s = slot_of[i];
    if (s >= 0 && order_bits_(quality_(real, index, i)) == table_q[s])
        atomicMin(&table_row[s], (unsigned long long)i);
}

extern "C" __global__ void prune_count(
    const long long* index, int n, const long long* live, const long long* slot_of,
    const unsigned long long* table_row, bool* alive, unsigned long long* count) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long s = slot_of[i];
    bool a = i < *live && (s < 0 || table_row[s] == (unsigned long long)i);
    alive[i] = a;
    if (a) atomicAdd(&count[index[8 * i + 2]], 1ULL);
}

extern "C" __global__ void prune_fill(
    const long long* index, int n, const bool* alive, const unsigned long long* count,
    const long long* ends, long long cap, unsigned long long* cursor, long long* list) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || !alive[i]) return;
    long long seed = index[8 * i + 2];
    long long c = (long long)count[seed];
    if (c <= cap) return;
    list[ends[seed] - c + (long long)atomicAdd(&cursor[seed], 1ULL)] = i;
}

extern "C" __global__ void prune_rank(
    const double* real, const long long* index, int n, const bool* alive, const unsigned long long* count,
    const long long* ends, long long cap, const long long* list, bool* keep) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (!alive[i]) { keep[i] = false; return; }
    long long seed = index[8 * i + 2];
    long long c = (long long)count[seed];
    if (c <= cap) { keep[i] = true; return; }
    long long nm = index[8 * i + 4];
    double chi = real[32 * i + 30];
    long long rank = 0;
    for (long long p = ends[seed] - c; p < ends[seed]; ++p) {
        long long j = list[p];
        long long nj = index[8 * j + 4];
        double cj = real[32 * j + 30];
        rank += nj > nm || (nj == nm && (cj < chi || (cj == chi && j < i)));
    }
    keep[i] = rank < cap;
}
"""

_CUDA = CudaModule(_SOURCE, _BLOCK)


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def prune(
    xp: ModuleType, real: Array, index: Array, n_meas_total: int, n_seeds: int, max_per_seed: int, merge: bool,
    live: Array,
) -> Array:  # fmt: skip
    """Which of the packed candidates ``real``/``index`` (kernels/candidates.py) survive the duplicate
    merge (when ``merge``) and the per-seed cap (bool per row): the rows the array code keeps.

    Args:
        live: the rows that exist (device, one int64; the tables may hold more): the others are not kept.
        n_meas_total: measurements the m1/m2 columns index (the merge key's radix).
        n_seeds: seeds the seed column indexes (its values are in [0, n_seeds)).
        max_per_seed: live candidates kept per seed.
    """
    n = int(index.shape[0])
    i64, u64 = xp.int64, xp.uint64
    n32 = xp.int32(n)
    size = 1 << max(4, (2 * n - 1).bit_length())  # at most half full: short probe chains
    size_used = size if merge else 1
    table_key = xp.empty(size_used, dtype=i64)
    table_q = xp.empty(size_used, dtype=u64)
    table_row = xp.empty(size_used, dtype=u64)
    n_counts = max(n_seeds, 1)
    count = xp.empty(n_counts, dtype=u64)
    cursor = xp.empty(n_counts, dtype=u64)
    _launch(
        "prune_clear",
        max(size_used, n_counts),
        (i64(size_used), i64(n_counts), table_key, table_q, table_row, count, cursor),
    )
    slot_of = xp.empty(n, dtype=i64)
    mask = i64(size - 1)
    _launch(
        "prune_insert",
        n,
        (real, index, n32, live, i64(n_meas_total), xp.int32(merge), table_key, table_q, mask, slot_of),
    )
    _launch("prune_winner", n, (real, index, n32, slot_of, table_q, table_row))
    del table_key, table_q
    alive = xp.empty(n, dtype=bool)
    _launch("prune_count", n, (index, n32, live, slot_of, table_row, alive, count))
    del table_row, slot_of
    ends = xp.cumsum(count, dtype=i64)
    listing = xp.empty(n, dtype=i64)
    cap = i64(max_per_seed)
    _launch("prune_fill", n, (index, n32, alive, count, ends, cap, cursor, listing))
    keep = xp.empty(n, dtype=bool)
    _launch("prune_rank", n, (real, index, n32, alive, count, ends, cap, listing, keep))
    return keep
