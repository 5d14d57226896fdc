"""``trackfleet reconstruct``: the chain in one process over an input, like traccc's sequential
example; writes seeds and/or tracks per event, shows progress and a per-stage timing summary."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kernels.edm.cells import Cells
from kernels.pipeline import STAGES, Chain, ChainConfig, FrontResult
from kernels.xp import BACKENDS, get_namespace, to_numpy
from producer.io.detector import find_detector_files, load_detector
from producer.io.events import discover, load_cells
from producer.io.seeds_csv import write_seeds
from producer.io.tracks_csv import write_tracks
from producer.progress import Progress

log = logging.getLogger(__name__)

STAGE_ALIASES = {"seeding": "track_params", "all": STAGES[-1]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="event directory, cells file or multi-event CSV")
    p.add_argument("--output", required=True, help="directory for eventN-seeds.csv / eventN-tracks.csv")
    p.add_argument("--backend", choices=BACKENDS, default="numpy", help="array backend (default numpy)")
    p.add_argument("--events", type=int, default=None, help="reconstruct at most N events")
    p.add_argument(
        "--stages",
        default="all",
        help="run the chain up to this stage: 'seeding' (seeds + parameters), 'all' (default), or a stage "
        f"name ({', '.join(STAGES)})",
    )
    p.add_argument(
        "--batch", type=int, default=1, help="events reconstructed together in one pass (default 1)"
    )
    p.add_argument("--detector", default=None, help="detector directory (default: found beside the input)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over the first event (default 1)")


def seeds_table(front: FrontResult, i: int) -> dict[str, np.ndarray]:
    """Columns of ``producer.io.seeds_csv`` for event ``i`` of a batch (host arrays)."""
    sp, meas, seeds, params = front.spacepoints, front.measurements, front.seeds, front.params
    assert sp is not None and meas is not None and seeds is not None and params is not None
    ev = to_numpy(seeds.event)
    sel = np.flatnonzero(ev == i)
    truth = to_numpy(meas.truth_id)[to_numpy(sp.measurement)]
    x, y, z = to_numpy(sp.x), to_numpy(sp.y), to_numpy(sp.z)
    table: dict[str, np.ndarray] = {}
    for name, idx in (("bottom", seeds.bottom), ("middle", seeds.middle), ("top", seeds.top)):
        k = to_numpy(idx)[sel]
        table[f"measurement_id_{name}"] = truth[k]
        table[f"x_{name}"], table[f"y_{name}"], table[f"z_{name}"] = x[k], y[k], z[k]
    table["weight"] = to_numpy(seeds.weight)[sel]
    table["z_vertex"] = to_numpy(seeds.z_vertex)[sel]
    return table


def add_params(table: dict[str, np.ndarray], front: FrontResult, i: int, geometry_id: np.ndarray) -> None:
    params = front.params
    assert params is not None
    sel = np.flatnonzero(to_numpy(params.event) == i)
    p = to_numpy(params.params)[sel]
    c = to_numpy(params.cov)[sel]
    table["geometry_id"] = geometry_id[to_numpy(params.module)[sel]]
    for k, name in enumerate(("loc0", "loc1", "phi", "theta", "qop")):
        table[name] = p[:, k]
        table[f"var_{name}"] = c[:, k, k]


def _summary(per_event: list[dict[str, float]], n_events: int) -> dict[str, Any]:
    stages = [s for s in (*STAGES, "total") if any(s in t for t in per_event)]
    out: dict[str, Any] = {"events": n_events, "stages": {}}
    for s in stages:
        vals = [t[s] for t in per_event if s in t]
        out["stages"][s] = {"median_s": statistics.median(vals), "mean_s": statistics.fmean(vals)}
    totals = [t["total"] for t in per_event if "total" in t]
    out["seconds_per_event"] = statistics.median(totals) if totals else None
    return out


def run(args: argparse.Namespace) -> int:
    last = STAGE_ALIASES.get(args.stages, args.stages)
    if last not in STAGES:
        print(f"trackfleet reconstruct: unknown stage {args.stages!r}", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("trackfleet reconstruct: --batch must be >= 1", file=sys.stderr)
        return 2
    xp = get_namespace(args.backend)
    sources = discover(args.input)[: args.events]
    det_dir = args.detector or find_detector_files(sources[0].cells.parent)[0].parent
    det = load_detector(det_dir)
    chain = Chain(xp, det, ChainConfig(last_stage=last))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    events: list[Cells] = [load_cells(s, det) for s in sources]
    for _ in range(max(args.warmup, 0)):
        chain.run_front(events[:1], {})
    progress = Progress("reconstruct", len(events))
    per_event: list[dict[str, float]] = []
    full = last in ("finding", "ambiguity", "fitting")
    for start in range(0, len(events), args.batch):
        batch = events[start : start + args.batch]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if full:
            results = chain.reconstruct_batch(batch)
            timings = results[0][1]
            for tracks, _ in results:
                write_tracks(out, tracks)
        else:
            front = chain.run_front(batch, timings)
            chain._sync()
            timings["total"] = time.perf_counter() - t0
            if front.seeds is not None:
                gid = np.asarray(det.geometry_id)
                for i, e in enumerate(batch):
                    table = seeds_table(front, i)
                    if front.params is not None:
                        add_params(table, front, i, gid)
                    write_seeds(out, e.event_id, table)
        per_event.extend({k: v / len(batch) for k, v in timings.items()} for _ in batch)
        progress.step(len(batch))
    progress.done()
    summary = _summary(per_event, len(events))
    summary.update(
        {"backend": args.backend, "batch": args.batch, "last_stage": last, "input": str(args.input)}
    )
    (out / "timing.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'stage':<16} {'median ms/event':>16} {'mean ms/event':>14}")
    for s, v in summary["stages"].items():
        print(f"{s:<16} {v['median_s'] * 1e3:>16.2f} {v['mean_s'] * 1e3:>14.2f}")
    print(f"wrote {len(events)} events to {out}")
    return 0
