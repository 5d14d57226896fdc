"""The rounds of the greedy ambiguity resolution (:mod:`kernels.ambiguity`) as two CUDA kernels.

Each round of the array code is about twenty small launches (two scatter-mins over the measurements,
gathers, two segmented sums, status updates) and a wait for the host; for one event that is a few
milliseconds of launches. Here a round is two kernels and one flag read back:

1. ``ambiguity_scatter`` (one thread per measurement of a candidate): the best rank of a kept and of
   a still-undecided candidate on every measurement (``atomicMin``);
2. ``ambiguity_decide`` (one thread per candidate): how many of its measurements better kept
   candidates hold and better undecided ones compete for, then the same decision as the array code.

``tests/test_fused_host.py`` and ``tests/test_fused.py`` check the result against the array code.
"""

from __future__ import annotations

from types import ModuleType

from kernels.cuda_module import CudaModule
from kernels.xp import Array

_SOURCE = r"""
// status: 0 undecided, 1 kept, 2 removed (kernels/ambiguity.py)
extern "C" __global__ void ambiguity_scatter(
    const long long* owner, const long long* meas, long long n_rows, const signed char* status,
    const long long* rank, unsigned long long* best_kept, unsigned long long* best_und) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows) return;
    long long o = owner[i];
    signed char s = status[o];
    if (s == 1) atomicMin(&best_kept[meas[i]], (unsigned long long)rank[o]);
    else if (s == 0) atomicMin(&best_und[meas[i]], (unsigned long long)rank[o]);
}

extern "C" __global__ void ambiguity_decide(
    const long long* offsets, const long long* meas, int n, const long long* rank,
    const unsigned long long* best_kept, const unsigned long long* best_und, long long max_shared,
    signed char* status, int* undecided) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || status[i] != 0) return;
    unsigned long long r = (unsigned long long)rank[i];
    long long taken = 0, pending = 0;
    for (long long p = offsets[i]; p < offsets[i + 1]; ++p) {
        taken += best_kept[meas[p]] < r;
        pending += best_und[meas[p]] < r;
    }
    // decided when no better undecided candidate competes for any of its measurements; hopeless
    // already when better kept ones hold too many
    if (pending == 0) status[i] = taken <= max_shared ? 1 : 2;
    else if (taken > max_shared) status[i] = 2;
    if (status[i] == 0) *undecided = 1;
}
"""

_CUDA = CudaModule(_SOURCE)


def _launch(name: str, n: int, args: tuple) -> None:
    _CUDA.launch(name, n, args)


def decide(
    xp: ModuleType,
    offsets: Array,
    measurements: Array,
    owner: Array,
    rank: Array,
    status: Array,
    n_measurements_total: int,
    max_shared: int,
    max_rounds: int,
) -> Array:
    """Run rounds until no candidate is undecided (at most ``max_rounds``); returns ``status`` (int8,
    updated in place) as :func:`kernels.ambiguity.resolve`'s loop leaves it."""
    n = int(offsets.shape[0]) - 1
    n_rows = int(measurements.shape[0])
    c = xp.ascontiguousarray
    offsets, measurements = c(offsets, dtype=xp.int64), c(measurements, dtype=xp.int64)
    owner, rank = c(owner, dtype=xp.int64), c(rank, dtype=xp.int64)
    big = n + 1
    best_kept = xp.empty(max(n_measurements_total, 1), dtype=xp.uint64)
    best_und = xp.empty_like(best_kept)
    undecided = xp.zeros(1, dtype=xp.int32)
    for _ in range(max_rounds):
        best_kept.fill(big)
        best_und.fill(big)
        undecided.fill(0)
        _launch(
            "ambiguity_scatter",
            n_rows,
            (owner, measurements, xp.int64(n_rows), status, rank, best_kept, best_und),
        )
        _launch(
            "ambiguity_decide",
            n,
            (
                offsets,
                measurements,
                xp.int32(n),
                rank,
                best_kept,
                best_und,
                xp.int64(max_shared),
                status,
                undecided,
            ),
        )
        if not int(undecided[0]):
            break
    return status
