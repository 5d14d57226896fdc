"""Aggregate throughput of N independent chain processes sharing one GPU (Triton's "instances"),
without the network: each process reconstructs the events in a loop, in batches of B, for a fixed
time; the parent samples GPU utilization with NVML and sums the rates.

    python bench/multi_instance.py --input DIR --backend cupy --instances 1 4 8 --batch 2 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _worker(args: argparse.Namespace, start_at: float, queue: mp.Queue) -> None:
    from kernels.pipeline import Chain, ChainConfig
    from kernels.xp import get_namespace
    from producer.io.detector import find_detector_files, load_detector
    from producer.io.events import discover, load_cells

    xp = get_namespace(args.backend)
    sources = discover(args.input)[: args.events]
    det = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    events = [load_cells(s, det).to(xp) for s in sources]
    chain = Chain(xp, det, ChainConfig())
    chain.reconstruct_batch(events[: args.batch])  # warm-up
    while time.time() < start_at:
        time.sleep(0.01)
    done, k, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        batch = [events[(k + i) % len(events)] for i in range(args.batch)]
        chain.reconstruct_batch(batch)
        done += len(batch)
        k += len(batch)
    elapsed = time.perf_counter() - t0
    mem = None
    if args.backend == "cupy":
        import cupy

        mem = int(cupy.get_default_memory_pool().total_bytes())
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    queue.put(
        {"pid": os.getpid(), "events": done, "seconds": elapsed, "gpu_pool_bytes": mem, "host_rss_bytes": rss}
    )


def _gpu_sampler(stop: mp.Event, queue: mp.Queue, interval: float = 0.2) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        queue.put({"util": [], "mem_used": []})
        return
    util, mem = [], []
    while not stop.is_set():
        util.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        mem.append(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        time.sleep(interval)
    queue.put({"util": util, "mem_used": mem})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--backend", default="cupy", choices=("numpy", "cupy"))
    ap.add_argument("--instances", type=int, nargs="+", default=[1])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for n in args.instances:
        q: mp.Queue = ctx.Queue()
        start_at = time.time() + 15.0 + 2.0 * n  # all processes start measuring together, after warm-up
        procs = [ctx.Process(target=_worker, args=(args, start_at, q)) for _ in range(n)]
        for p in procs:
            p.start()
        while time.time() < start_at:
            time.sleep(0.05)
        gq: mp.Queue = ctx.Queue()
        stop = ctx.Event()
        sampler = ctx.Process(target=_gpu_sampler, args=(stop, gq))
        sampler.start()
        results = [q.get(timeout=args.seconds + 600) for _ in procs]
        stop.set()
        gpu = gq.get(timeout=30)
        for p in (*procs, sampler):
            p.join(timeout=30)
        rate = sum(r["events"] / r["seconds"] for r in results)
        row = {
            "instances": n,
            "batch": args.batch,
            "events_per_s": rate,
            "gpu_utilization_median": statistics.median(gpu["util"]) / 100 if gpu["util"] else None,
            "gpu_memory_used_max_bytes": max(gpu["mem_used"]) if gpu["mem_used"] else None,
            "gpu_pool_bytes_per_instance": [r["gpu_pool_bytes"] for r in results],
            "host_rss_bytes_per_instance": [r["host_rss_bytes"] for r in results],
        }
        rows.append(row)
        print(
            f"instances {n} batch {args.batch}: {rate:.2f} events/s, GPU util {row['gpu_utilization_median']}, "
            f"pool/instance {max(x or 0 for x in row['gpu_pool_bytes_per_instance']) / 1e9:.2f} GB",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"input": args.input, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
