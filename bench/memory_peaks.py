"""Memory peak of each stage of the chain for one batch, measured on the CPU.

What a GPU worker's CuPy pool keeps is the peak of its largest batch. This runs the fused path with
the CUDA kernels compiled for the host (tests/host_kernels.py, needs a C++ compiler), so the arrays
allocated are those of the GPU path, and reports the peak of traced memory (numpy allocations are
traced by tracemalloc) within each stage, and within the sections of seeding and finding (a section
that contains others reports only what follows its last inner section). A proxy
for the GPU pool, without a GPU: the pool adds its block rounding and caching on top.

    python bench/memory_peaks.py --input DIR --batch 8 [--events 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from host_kernels import compiler, install  # noqa: E402

from kernels import ckf, fused_seeding  # noqa: E402
from kernels.pipeline import STAGES, Chain, ChainConfig  # noqa: E402
from producer.io.detector import find_detector_files, load_detector  # noqa: E402
from producer.io.events import discover, load_cells  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="event directory with its detector files")
    ap.add_argument("--batch", type=int, default=8, help="events per batch, cycling the input (default 8)")
    ap.add_argument("--events", type=int, default=None, help="input events to load (default all)")
    ap.add_argument("--json", type=Path, help="also write the peaks here")
    args = ap.parse_args()
    if compiler() is None:
        print("memory_peaks: needs a C++ compiler (g++) for the host build of the kernels", file=sys.stderr)
        return 2
    sources = discover(args.input)[: args.events]
    det = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    loaded = [load_cells(s, det) for s in sources]
    batch = [loaded[i % len(loaded)] for i in range(args.batch)]
    install()
    chain = Chain(np, det, ChainConfig())

    stage_peaks: list[int] = []
    # tracemalloc has one peak counter: a section resets it, so what it had seen is carried here
    carried = [0]

    def stage_done() -> None:  # the chain calls this at the end of every stage
        stage_peaks.append(max(tracemalloc.get_traced_memory()[1], carried[0]))
        carried[0] = 0
        tracemalloc.reset_peak()

    section_peaks: defaultdict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def section(name: str) -> Iterator[None]:
        carried[0] = max(carried[0], tracemalloc.get_traced_memory()[1])
        tracemalloc.reset_peak()
        try:
            yield
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            section_peaks[name] = max(section_peaks[name], peak)
            carried[0] = max(carried[0], peak)

    chain._sync = stage_done  # type: ignore[method-assign]
    ckf.section = section  # type: ignore[assignment]
    fused_seeding.section = section  # type: ignore[assignment]
    tracemalloc.start()
    t0 = time.perf_counter()
    chain.reconstruct_batch(batch)
    elapsed = time.perf_counter() - t0
    tracemalloc.stop()
    stages = dict(zip([s for s in STAGES if s != "total"], stage_peaks, strict=False))
    report = {
        "input": args.input,
        "batch": args.batch,
        "seconds": round(elapsed, 1),
        "stage_peak_mb": {k: round(v / 1e6, 1) for k, v in stages.items()},
        "section_peak_mb": {k: round(v / 1e6, 1) for k, v in sorted(section_peaks.items())},
        "batch_peak_mb": round(max(stage_peaks, default=0) / 1e6, 1),
    }
    for k, v in report["stage_peak_mb"].items():
        print(f"{k:28s} {v:9.1f} MB")
    for k, v in report["section_peak_mb"].items():
        print(f"  {k:26s} {v:9.1f} MB")
    print(f"batch of {args.batch}: peak {report['batch_peak_mb']} MB ({elapsed:.1f} s on the host)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
