"""What the GPU does while one event goes through the chain: kernels, copies and busy time per stage.

A batch-1 latency far above the GPU's own work means launches and host waits, not arithmetic, bound
it. This benchmark measures that gap per stage. It records the device's activity with PyTorch's
profiler (CUPTI underneath sees every kernel of the process, CuPy's included) while the chain
reconstructs each event alone, once per prefix of the chain (``last_stage`` = clusterization, then
measurements, ... then fitting), so that a stage's figures are the difference between two prefixes:

- ``wall_ms``: median wall time per event of the prefix, timed apart from the profiled runs (host
  clock, chain synchronized at the end);
- ``kernels``, ``memcpy``, ``memset``: device operations per event;
- ``busy_ms``: summed device time of those operations per event (overlaps counted twice; the chain
  uses one stream, so there are none);
- ``sync_calls``: explicit host waits (stream, device or event synchronizations) and ``copy_calls``:
  copy calls (a copy to the host waits for the device; one from pageable host memory waits for the
  stream), as far as CUPTI reports the runtime and driver calls;
- ``top_kernels``: the kernels of the whole chain by total device time, with their counts.

    python bench/gpu_timeline.py --input DIR [--events 3] [--batch 1] [--json OUT]

Needs CuPy, a CUDA GPU and PyTorch (only for its profiler; the chain does not use it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.pipeline import STAGES, Chain, ChainConfig  # noqa: E402
from kernels.xp import get_namespace  # noqa: E402
from producer.io.detector import find_detector_files, load_detector  # noqa: E402
from producer.io.events import discover, load_cells  # noqa: E402


def _trace_events(prof: Any) -> list[dict[str, Any]]:
    """The profiler's events as its Chrome trace writes them (categories kernel, gpu_memcpy,
    gpu_memset, cuda_runtime, cuda_driver, ...): kernels launched outside PyTorch appear there too."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return list(json.loads(path.read_text()).get("traceEvents", []))


def profile_prefix(chain: Chain, batches: list[list[Any]], repeat: int) -> dict[str, Any]:
    """Reconstruct every batch ``repeat`` times under the profiler; figures per event."""
    import torch

    xp = chain.xp
    walls: list[float] = []
    for b in batches:  # warm-up: compilation, memory pool
        chain.reconstruct_batch(b)
    for _ in range(repeat):  # wall times without the profiler, whose tracing slows launches
        for b in batches:
            t0 = time.perf_counter()
            chain.reconstruct_batch(b)
            xp.cuda.get_current_stream().synchronize()
            walls.append((time.perf_counter() - t0) / len(b))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeat):
            for b in batches:
                chain.reconstruct_batch(b)
                xp.cuda.get_current_stream().synchronize()
    n_events = repeat * sum(len(b) for b in batches)
    counts: Counter[str] = Counter()
    busy_us: defaultdict[str, float] = defaultdict(float)
    per_kernel: defaultdict[str, list[float]] = defaultdict(list)
    syncs = copies = 0
    for ev in _trace_events(prof):
        cat, name, dur = ev.get("cat", ""), str(ev.get("name", "")), float(ev.get("dur", 0.0) or 0.0)
        if cat in ("cuda_runtime", "cuda_driver"):
            syncs += "Synchronize" in name
            copies += "Memcpy" in name
            continue
        kind = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}.get(cat)
        if kind is None:
            continue
        counts[kind] += 1
        busy_us[kind] += dur
        if kind == "kernel":
            per_kernel[name].append(dur)
    return {
        "wall_ms": 1e3 * statistics.median(walls),
        "kernels": counts["kernel"] / n_events,
        "memcpy": counts["memcpy"] / n_events,
        "memset": counts["memset"] / n_events,
        "busy_ms": 1e-3 * sum(busy_us.values()) / n_events,
        "sync_calls": syncs / n_events,
        "copy_calls": copies / n_events,
        "top_kernels": sorted(
            (
                {
                    "name": k[:90],
                    "count_per_event": len(v) / n_events,
                    "ms_per_event": 1e-3 * sum(v) / n_events,
                }
                for k, v in per_kernel.items()
            ),
            key=lambda r: -r["ms_per_event"],
        )[:25],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="directory of events (traccc/ACTS CSV)")
    ap.add_argument("--events", type=int, default=3, help="events to load (default 3)")
    ap.add_argument("--batch", type=int, default=1, help="events per reconstruction (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions under the profiler (default 3)")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench/gpu_timeline.py: needs PyTorch for its profiler", file=sys.stderr)
        return 2
    xp = get_namespace("cupy")
    sources = discover(args.input)[: args.events]
    det = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    events = [load_cells(s, det) for s in sources]
    batches = [events[i : i + args.batch] for i in range(0, len(events), args.batch)]
    prefixes: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        chain = Chain(xp, det, ChainConfig(last_stage=stage))
        prefixes[stage] = profile_prefix(chain, batches, args.repeat)
        print(f"  up to {stage}: {prefixes[stage]['wall_ms']:.2f} ms", flush=True)
    stages: dict[str, dict[str, float]] = {}
    keys = ("wall_ms", "kernels", "memcpy", "memset", "busy_ms", "sync_calls", "copy_calls")
    prev = dict.fromkeys(keys, 0.0)
    for stage in STAGES:
        cur = prefixes[stage]
        stages[stage] = {k: round(cur[k] - prev[k], 3) for k in keys}
        prev = cur
    whole = prefixes[STAGES[-1]]
    print(
        f"{'stage':15s} {'wall ms':>8s} {'busy ms':>8s} {'kernels':>8s} {'memcpy':>7s} {'memset':>7s} {'syncs':>6s} {'copies':>6s}"
    )
    for stage, row in stages.items():
        print(
            f"{stage:15s} {row['wall_ms']:8.2f} {row['busy_ms']:8.2f} {row['kernels']:8.1f} "
            f"{row['memcpy']:7.1f} {row['memset']:7.1f} {row['sync_calls']:6.1f} {row['copy_calls']:6.1f}"
        )
    print(
        f"{'chain':15s} {whole['wall_ms']:8.2f} {whole['busy_ms']:8.2f} {whole['kernels']:8.1f} "
        f"{whole['memcpy']:7.1f} {whole['memset']:7.1f} {whole['sync_calls']:6.1f} {whole['copy_calls']:6.1f}"
    )
    for k in whole["top_kernels"][:15]:
        print(f"  {k['ms_per_event']:7.3f} ms  x{k['count_per_event']:6.1f}  {k['name']}")
    report = {
        "input": args.input,
        "batch": args.batch,
        "events": len(events),
        "stages": stages,
        "chain": whole,
        "prefixes": prefixes,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
