"""Host time per CuPy operation: what each launch and each wait costs the chain at batch 1.

At batch 1 the chain's wall time is mostly host time: every array operation and kernel launch costs
the Python process some microseconds whatever the GPU does, and every copy to the host waits for the
device. This measures, on tiny arrays (so the GPU's own time is negligible), the host microseconds of
each kind of operation the chain uses, as the median over ``--calls`` calls without synchronizing in
between (launches queue up asynchronously, as in the chain), and the round trip of a copy to the host
(a wait on an idle device).

It also times the chain's two large transfers at batch 1 with mu=200 sizes, each the old way (one copy
per array) against one batched copy through ``kernels.xp``: an event's packed cell columns to the
device (``to_device_many``, what ``PackedEvent.to_cells`` does) and the tracks' arrays back to the
host (``to_host_many``, what ``Chain`` does at its end), per call until the data is there (the copies
to the device are followed by a synchronization).

    python bench/launch_costs.py [--calls 2000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from kernels.xp import to_device_many, to_host_many, to_numpy  # noqa: E402

# a mu=200 event: ~330k cells in ~20k modules (the packed wire columns), and ~8k tracks of ~11
# measurements at the chain's end
MU200_CELLS, MU200_MODULES = 330_000, 20_000
MU200_TRACKS, MEAS_PER_TRACK = 8_000, 11


def _per_call_us(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    for _ in range(50):  # warm-up: compilation, memory pool
        fn()
    sync()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return statistics.median(samples)


def _transfer_ops(cp) -> dict[str, Callable[[], object]]:
    """The old and the batched way of each large transfer (each call until its data is there)."""
    rng = np.random.default_rng(1)
    n, m = MU200_CELLS, MU200_MODULES
    columns = [
        np.full(m, n // m, dtype="<u4"),  # module_counts
        np.sort(rng.integers(1, 2**60, m, dtype=np.uint64)).astype("<u8"),  # module_ids
        rng.integers(0, 1400, n).astype("<u2"),  # channel0
        rng.integers(0, 300, n).astype("<u2"),  # channel1
        rng.random(n).astype("<f4"),  # activation
        rng.random(n).astype("<f4"),  # time
        rng.integers(0, 10**6, n).astype("<u4"),  # measurement_id (simulated events carry it)
    ]
    t, k = MU200_TRACKS, MU200_TRACKS * MEAS_PER_TRACK
    results = [
        cp.zeros(t, cp.int32),  # event
        cp.zeros((t, 6), cp.float64),  # params
        cp.zeros((t, 6, 6), cp.float64),  # cov
        cp.zeros(t, cp.float64),  # chi2
        cp.zeros(t, cp.int32),  # ndf
        cp.zeros(t, cp.int32),  # holes
        cp.zeros(t, bool),  # good
        cp.zeros(t + 1, cp.int64),  # offsets
        cp.zeros(k, cp.uint64),  # geometry_id
        cp.zeros(k, cp.float32),  # local0
        cp.zeros(k, cp.float32),  # local1
        cp.zeros(k, cp.int8),  # dimension
        cp.zeros(k, cp.int64),  # truth
    ]
    sync = cp.cuda.get_current_stream().synchronize
    mb_in = sum(c.nbytes for c in columns) / 1e6
    mb_out = sum(r.nbytes for r in results) / 1e6
    return {
        f"to_device {len(columns)} columns {mb_in:.1f} MB, asarray each": lambda: (
            [cp.asarray(c) for c in columns],
            sync(),
        ),
        f"to_device {len(columns)} columns {mb_in:.1f} MB, to_device_many": lambda: (
            to_device_many(cp, columns),
            sync(),
        ),
        f"to_host {len(results)} arrays {mb_out:.1f} MB, to_numpy each": lambda: [
            to_numpy(r) for r in results
        ],
        f"to_host {len(results)} arrays {mb_out:.1f} MB, to_host_many": lambda: to_host_many(results),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per sample (5 samples, median)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        import cupy as cp
    except ImportError:
        print("bench/launch_costs.py: needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    stream = cp.cuda.get_current_stream()
    n = 1024
    a = cp.arange(n, dtype=cp.float64)
    b = cp.ones(n, dtype=cp.float64)
    table = cp.ones((n, 32), dtype=cp.float64)
    rows = cp.arange(0, n, 2, dtype=cp.int64)
    flags = cp.arange(n) % 3 == 0
    src = r"""
    extern "C" __global__ void k1(double* a, int n) {}
    extern "C" __global__ void k10(double* a, double* b, double* c, double* d, double* e, double* f, double* g,
                                   double* h, int n, double x) {}
    """
    many = ", ".join(f"double* p{i}" for i in range(40))
    src += f'extern "C" __global__ void k45({many}, int n, int m, double x, double y, long long z) {{}}\n'
    mod = cp.RawModule(code=src)
    k1, k10, k45 = (mod.get_function(k) for k in ("k1", "k10", "k45"))
    ptrs = [cp.empty(4) for _ in range(40)]
    i32, f64, i64 = cp.int32, cp.float64, cp.int64
    ops: dict[str, Callable[[], object]] = {
        "raw_kernel_1_arg": lambda: k1((8,), (128,), (a, i32(n))),
        "raw_kernel_10_args": lambda: k10((8,), (128,), (a, a, a, a, a, a, a, a, i32(n), f64(1.0))),
        "raw_kernel_45_args": lambda: k45((8,), (128,), (*ptrs, i32(n), i32(1), f64(1.0), f64(2.0), i64(3))),
        "elementwise_add": lambda: a + b,
        "elementwise_where": lambda: cp.where(flags, a, b),
        "take_rows_32_cols": lambda: table[rows],
        "cumsum_int64": lambda: cp.cumsum(flags, dtype=cp.int64),
        "empty": lambda: cp.empty(n, dtype=cp.float64),
        "zeros": lambda: cp.zeros(n, dtype=cp.float64),
        "ascontiguousarray_noop": lambda: cp.ascontiguousarray(a, dtype=cp.float64),
        "astype_int32": lambda: rows.astype(cp.int32),
        "slice_view": lambda: table[10:20],
    }
    report: dict[str, float] = {}
    for name, fn in ops.items():
        report[name] = round(_per_call_us(fn, args.calls, stream.synchronize), 2)
    waits = {
        "nonzero (waits)": lambda: cp.nonzero(flags)[0],
        "get_4_values (round trip)": lambda: a[:4].get(),
        "int_of_element (round trip)": lambda: int(rows[-1]),
        "asarray_from_host_4 (waits)": lambda: cp.asarray([1.0, 2.0, 3.0, 4.0]),
    }
    for name, fn in waits.items():
        report[name] = round(_per_call_us(fn, max(args.calls // 10, 50), stream.synchronize), 2)
    for name, fn in _transfer_ops(cp).items():
        report[name] = round(_per_call_us(fn, max(args.calls // 100, 20), stream.synchronize), 2)
    width = max(map(len, report))
    for name, us in report.items():
        print(f"{name:{width}s} {us:8.2f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
