"""Where the chain's time goes: run it under cProfile with every CUDA launch made synchronous
(``CUDA_LAUNCH_BLOCKING=1``), so that each array operation's host-side time is its device time plus
its launch cost, and print the functions of :mod:`kernels` by cumulative and own time, plus the
number of CuPy kernel launches per event.

    CUDA_LAUNCH_BLOCKING=1 python bench/profile_chain.py --input DIR --backend cupy --batch 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.pipeline import Chain, ChainConfig  # noqa: E402
from kernels.xp import get_namespace  # noqa: E402
from producer.io.detector import find_detector_files, load_detector  # noqa: E402
from producer.io.events import discover, load_cells  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=None, help="write the full statistics here")
    args = ap.parse_args()
    xp = get_namespace(args.backend)
    sources = discover(args.input)[: args.batch]
    det = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    events = [load_cells(s, det) for s in sources]
    chain = Chain(xp, det, ChainConfig())
    chain.reconstruct_batch(events)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    chain.reconstruct_batch(events)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(r"kernels", args.top)
    stats.sort_stats("tottime").print_stats(args.top)
    text = buf.getvalue()
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
