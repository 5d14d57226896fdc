"""Host time per CuPy operation: what each launch and each wait costs the chain at batch 1.

At batch 1 the chain's wall time is mostly host time: every array operation and kernel launch costs
the Python process some microseconds whatever the GPU does, and every copy to the host waits for the
device. This measures, on tiny arrays (so the GPU's own time is negligible), the host microseconds of
each kind of operation the chain uses, as the median over ``--calls`` calls without synchronizing in
between (launches queue up asynchronously, as in the chain), and the round trip of a copy to the host
(a wait on an idle device).

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
    width = max(map(len, report))
    for name, us in report.items():
        print(f"{name:{width}s} {us:8.2f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
