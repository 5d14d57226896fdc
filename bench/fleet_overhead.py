"""Fleet overhead: throughput through broker + workers against the standalone loop, same machine, same Chain.

- **standalone**: ``--workers`` processes, each with its own warm :class:`~kernels.pipeline.Chain`,
  looping ``Chain.reconstruct`` over the events already in memory (what ``trackfleet reconstruct`` does
  between reading and writing files).
- **fleet**: a broker and ``--workers`` numpy workers (``python -m broker`` / ``python -m worker``, TCP on
  127.0.0.1), fed by an in-process producer in closed loop with enough events in flight to saturate
  them (2 x total capacity). Each event crosses the network twice, is unpacked on the worker, and its
  tracks are packed and sent back.

Both sides first run a warm-up pass, then the timed ``--count`` events; the two sides alternate
``--repeat`` times and the medians are compared. Overhead at saturation is
``1 - fleet_events_per_s / standalone_events_per_s``. ``--simulate-compute-ms`` adds the same sleep per
event to both sides (a stand-in for a slower chain, e.g. a GPU run elsewhere).

    python bench/fleet_overhead.py [--input data/generic-mu20] [--workers 1 2] [--count 30] [--backend numpy]
                                   [--simulate-compute-ms MS] [--batch B] [--json FILE]

With ``--backend cupy`` all processes share GPU 0 (several instances per GPU, as in Triton).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.pipeline import Chain  # noqa: E402
from producer.client import ClientConfig, FleetClient, ProducerRun, RunConfig, load_inputs  # noqa: E402
from producer.io.detector import load_detector  # noqa: E402
from producer.io.events import iter_cells  # noqa: E402
from producer.launch import LocalFleet  # noqa: E402


def _standalone_loop(
    input_dir: str, count: int, warmup: int, simulate_ms: float, backend: str, out: Any
) -> None:
    from kernels.xp import get_namespace
    from worker.compute import select_device

    xp = get_namespace(backend)
    select_device(xp, 0)  # the same device and stream set-up as a worker
    det = load_detector(input_dir)
    chain = Chain(xp, det)
    cells = [c.to(xp) for c in iter_cells(input_dir, det)]
    for i in range(warmup):
        chain.reconstruct(cells[i % len(cells)])
    t0 = time.monotonic()
    for i in range(count):
        chain.reconstruct(cells[i % len(cells)])
        if simulate_ms:
            time.sleep(simulate_ms * 1e-3)
    out.put((count, time.monotonic() - t0))


def _standalone_proc(*args: Any) -> None:
    # Run the loop on a second thread, as a worker's compute thread does: numpy code runs ~10% faster
    # off the main thread here (glibc gives other threads their own malloc arena, which trims and
    # unmaps large temporaries less eagerly), and the comparison must not credit that to the fleet.
    t = threading.Thread(target=_standalone_loop, args=args)
    t.start()
    t.join()


def standalone(input_dir: Path, n_procs: int, count: int, simulate_ms: float, backend: str) -> dict[str, Any]:
    """``n_procs`` standalone loops in parallel, each doing ``count`` events; total events/s."""
    ctx = mp.get_context("spawn" if backend == "cupy" else "fork")
    out = ctx.Queue()
    per = max(1, count // n_procs)
    procs = [
        ctx.Process(target=_standalone_proc, args=(str(input_dir), per, 2, simulate_ms, backend, out))
        for _ in range(n_procs)
    ]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a standalone process failed") from None
    for p in procs:
        p.join()
    events = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    return {"events": events, "elapsed_s": round(elapsed, 3), "events_per_s": events / elapsed}


def fleet(
    input_dir: Path, n_workers: int, count: int, simulate_ms: float, batch: int, backend: str
) -> dict[str, Any]:
    """The same work through broker + workers; events/s at saturation and latency percentiles."""
    events = load_inputs(input_dir)
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = ["--log-level", "WARNING", "--batch", str(batch), "--backend", backend]
        if simulate_ms:
            worker_args += ["--simulate-compute-ms", str(simulate_ms)]
        with LocalFleet(
            Path(tmp), broker_args=["--log-level", "WARNING"], worker_args=worker_args, detector=input_dir
        ) as lf:
            lf.start_broker()
            lf.start_workers(n_workers)
            stats = lf.wait_ready(n_workers, timeout_s=120)
            concurrency = 2 * stats["capacity"]
            cfg = ClientConfig(endpoint=lf.frontend, timeout_s=600.0)
            with FleetClient(cfg) as client:
                ProducerRun(
                    client, events, RunConfig(concurrency=concurrency, count=2 * n_workers, progress=False)
                ).run()
                s = ProducerRun(
                    client,
                    events,
                    RunConfig(concurrency=concurrency, count=count, progress=False, drain_timeout_s=3600),
                ).run()
    return {
        "events": s.events_ok,
        "failed": s.events_failed + s.events_lost,
        "elapsed_s": round(s.elapsed_s, 3),
        "events_per_s": s.events_per_s,
        "latency_ms": s.latency_ms(),
        "concurrency": concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=ROOT / "data" / "generic-mu20", help="event directory")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker / standalone process counts"
    )
    p.add_argument("--count", type=int, default=30, help="timed events per configuration")
    p.add_argument("--simulate-compute-ms", type=float, default=0.0, help="extra sleep per event, both sides")
    p.add_argument("--batch", type=int, default=1, help="worker dynamic batch size")
    p.add_argument("--repeat", type=int, default=3, help="alternating runs per side; medians are reported")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend, both sides")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    load_detector(args.input)  # build the detector cache once, outside the timings
    rows = []
    for n in args.workers:
        # alternate the two sides so that a busy neighbour on a shared machine hits both alike
        sa_rates, fl_rates, latencies, failed, concurrency = [], [], [], 0, 0
        for _ in range(args.repeat):
            sa = standalone(args.input, n, args.count, args.simulate_compute_ms, args.backend)
            sa_rates.append(sa["events_per_s"])
            fl = fleet(args.input, n, args.count, args.simulate_compute_ms, args.batch, args.backend)
            fl_rates.append(fl["events_per_s"])
            latencies.append(fl["latency_ms"])
            failed += fl["failed"]
            concurrency = fl["concurrency"]
        sa_med, fl_med = statistics.median(sa_rates), statistics.median(fl_rates)
        rows.append(
            {
                "workers": n,
                "standalone_events_per_s": round(sa_med, 3),
                "fleet_events_per_s": round(fl_med, 3),
                "overhead": round(1.0 - fl_med / sa_med, 4),
                "standalone_runs": [round(x, 3) for x in sa_rates],
                "fleet_runs": [round(x, 3) for x in fl_rates],
                "fleet_latency_ms": latencies[fl_rates.index(sorted(fl_rates)[len(fl_rates) // 2])],
                "fleet_failed": failed,
                "fleet_concurrency": concurrency,
            }
        )
    sys.stdout.write(
        f"{'workers':>8} {'standalone ev/s':>16} {'fleet ev/s':>11} {'overhead':>9} {'fleet p50 ms':>13}\n"
    )
    for r in rows:
        sys.stdout.write(
            f"{r['workers']:>8} {r['standalone_events_per_s']:>16.2f} {r['fleet_events_per_s']:>11.2f} "
            f"{100 * r['overhead']:>8.1f}% {r['fleet_latency_ms']['p50']:>13.1f}\n"
        )
    result = {
        "benchmark": "fleet_overhead",
        "input": str(args.input),
        "cpus": os.cpu_count(),
        "count": args.count,
        "repeat": args.repeat,
        "backend": args.backend,
        "simulate_compute_ms": args.simulate_compute_ms,
        "results": rows,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
