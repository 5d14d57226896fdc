"""Per-stage timing of the reconstruction chain in one process (no fleet), numpy or CuPy.

For each backend and batch size: warm up, then reconstruct the events ``--repeat`` times and report
the median time per event of every stage, the GPU memory the process holds (CuPy pool and NVML's
per-process figure) and the host RSS. Optionally writes the tracks of the first repetition and runs
``trackfleet validate`` on them, so physics is measured on exactly the timed path.

Every batch holds exactly ``--batch`` events, whatever the number of loaded events: batch k of a
repetition is ``events[(k * batch + i) % len(events)]`` for i in 0..batch-1, cycling through the
events, and a repetition runs ``ceil(len(events) / batch)`` batches so that every event is
reconstructed at least once (with 3 events and ``--batch 8``: one batch of 8 = the 3 events, the 3
again and 2 of them a third time). The reported "batch" is this real size, and times per event
divide by it. With ``--tracks``, each distinct event's tracks are written once (copies skipped)
and validated over ``len(events)`` events.

    python bench/chain_bench.py --input DIR --backend cupy --batch 1 4 --repeat 3 --json out.json
                                [--rows-without-wait N] [--tracks DIR] [--sections]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.pipeline import STAGES, Chain, ChainConfig  # noqa: E402
from kernels.xp import get_namespace  # noqa: E402
from producer.io.detector import find_detector_files, load_detector  # noqa: E402
from producer.io.events import discover, load_cells  # noqa: E402
from producer.io.tracks_csv import write_tracks  # noqa: E402


def gpu_memory_bytes() -> dict[str, int | None]:
    out: dict[str, int | None] = {"cupy_pool_bytes": None, "nvml_process_bytes": None}
    try:
        import cupy

        out["cupy_pool_bytes"] = int(cupy.get_default_memory_pool().total_bytes())
    except Exception:
        return out
    try:
        import pynvml

        pynvml.nvmlInit()
        dev = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
        handle = pynvml.nvmlDeviceGetHandleByIndex(dev)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid():
                out["nvml_process_bytes"] = int(p.usedGpuMemory or 0)
    except Exception:
        pass
    return out


def host_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument(
        "--tracks", default=None, help="write the tracks of the first pass here and validate them"
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", action="store_true", help="also time sections inside stages (synchronizes)")
    ap.add_argument(
        "--rows-without-wait", type=int, default=None, metavar="N",
        help="FindingConfig.max_rows_without_wait (0: every CKF step waits for its exact sizes)",
    )  # fmt: skip
    args = ap.parse_args()
    xp = get_namespace(args.backend)
    sources = discover(args.input)[: args.events]
    det = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    events = [load_cells(s, det) for s in sources]
    config = ChainConfig()
    if args.rows_without_wait is not None:
        finding = dataclasses.replace(config.finding, max_rows_without_wait=args.rows_without_wait)
        config = dataclasses.replace(config, finding=finding)
    chain = Chain(xp, det, config)
    chain.reconstruct_batch(events[:1])  # warm-up: kernel compilation, memory pool
    results = []
    if args.sections:
        from kernels import profiling

        profiling.enable(xp)
    for batch in args.batch:
        if args.sections:
            profiling.TIMES.clear()
        per_event: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
        walls = []
        n_batches = -(-len(events) // batch)  # every event at least once per repetition
        written: set[int] = set()
        for rep in range(args.repeat):
            for start in range(0, n_batches * batch, batch):
                idx = [(start + i) % len(events) for i in range(batch)]
                chunk = [events[j] for j in idx]
                t0 = time.perf_counter()
                out = chain.reconstruct_batch(chunk)
                walls.append((time.perf_counter() - t0) / len(chunk))
                for stage, v in out[0][1].items():
                    per_event.setdefault(stage, []).append(v / len(chunk))
                if rep == 0 and args.tracks and batch == args.batch[0]:
                    for j, (tracks, _) in zip(idx, out, strict=True):
                        if j not in written:  # copies of an event in a cycled batch: write once
                            written.add(j)
                            write_tracks(args.tracks, tracks)
        row = {
            "backend": args.backend,
            "batch": batch,
            "events": len(events),
            "batches_per_repeat": n_batches,
            "repeat": args.repeat,
            "median_ms_per_event": {s: 1e3 * statistics.median(v) for s, v in per_event.items() if v},
            "events_per_s": 1.0 / statistics.median(walls),
            **gpu_memory_bytes(),
            "host_rss_bytes": host_rss_bytes(),
        }
        if args.sections:
            n_done = n_batches * batch * args.repeat
            row["sections_ms_per_event"] = {k: 1e3 * v / n_done for k, v in sorted(profiling.TIMES.items())}
            print("  sections ms/event:", {k: round(v, 2) for k, v in row["sections_ms_per_event"].items()})
        results.append(row)
        print(
            f"{args.backend} batch {batch}: {row['events_per_s']:.2f} events/s; ms/event "
            + ", ".join(f"{s} {v:.2f}" for s, v in row["median_ms_per_event"].items())
            + f"; gpu pool {row['cupy_pool_bytes']} nvml {row['nvml_process_bytes']} rss {row['host_rss_bytes']}",
            flush=True,
        )
    report = {"input": args.input, "results": results}
    if args.tracks:
        from producer.validate import validate

        v = validate(args.input, args.tracks, max_events=len(events))
        report["physics"] = {k: v[k] for k in ("efficiency", "fake_rate", "duplicate_rate", "n_tracks")}
        print("physics:", report["physics"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
