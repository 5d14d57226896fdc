"""``trackfleet inspect PATH``: what an input holds, per event (cells, modules, per-volume counts, truth)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from kernels.detector import volume_of
from producer.io.detector import find_detector_files, load_detector
from producer.io.errors import InputError
from producer.io.events import discover, load_cells, load_truth
from producer.progress import Progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="event directory, cells file, multi-event CSV or .tfev file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--detector",
        help="directory with detectors.csv + digitization-config.json to validate cells against "
        "(default: found beside the input, if present)",
    )
    p.add_argument("--events", type=int, default=None, help="inspect at most this many events")


def summarize(path: str, detector_dir: str | None = None, max_events: int | None = None) -> dict[str, Any]:
    sources = discover(path)[:max_events]
    det = None
    det_dir = detector_dir
    if det_dir is None:
        try:
            find_detector_files(sources[0].cells.parent)
            det_dir = str(sources[0].cells.parent)
        except InputError:
            det_dir = None
    if det_dir is not None:
        det = load_detector(det_dir)
    events = []
    progress = Progress("inspect", len(sources))
    for s in sources:
        cells = load_cells(s, det)
        g = np.asarray(cells.geometry_id)
        vols, counts = np.unique(volume_of(g), return_counts=True)
        entry: dict[str, Any] = {
            "event_id": s.event_id,
            "n_cells": cells.size,
            "n_modules": int(np.unique(g).size),
            "cells_per_volume": {str(int(v)): int(c) for v, c in zip(vols, counts, strict=True)},
            "cells_file": str(s.cells),
        }
        if cells.measurement_id is not None:
            entry["n_truth_clusters"] = int(np.unique(np.asarray(cells.measurement_id)).size)
        if s.has_truth:
            t = load_truth(s)
            entry["n_particles"] = t.particles.size
            entry["n_measurements"] = t.measurements.size
            entry["n_hits"] = t.hits.size
            sel = (t.particles.pt > 1.0) & (np.abs(t.particles.eta) < 2.5) & (t.particles.charge != 0)
            entry["n_particles_pt_gt_1gev"] = int(sel.sum())
        events.append(entry)
        progress.step()
    progress.done()
    out: dict[str, Any] = {"input": str(path), "n_events": len(events), "events": events}
    if det is not None:
        out["detector"] = {
            "directory": det_dir,
            "modules": det.n_modules,
            "fingerprint": det.fingerprint(),
            "bfield_t": det.bfield_t,
        }
    return out


def run(args: argparse.Namespace) -> int:
    summary = summarize(args.path, args.detector, args.events)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"input: {summary['input']}  events: {summary['n_events']}")
    if "detector" in summary:
        d = summary["detector"]
        print(f"detector: {d['modules']} modules, fingerprint {d['fingerprint']}, B = {d['bfield_t']} T")
    head = (
        f"{'event':>9} {'cells':>8} {'modules':>8} {'particles':>9} {'meas':>7} {'hits':>7}  cells per volume"
    )
    print(head)
    for e in summary["events"]:
        vols = " ".join(f"{v}:{c}" for v, c in e["cells_per_volume"].items())
        print(
            f"{e['event_id']:>9} {e['n_cells']:>8} {e['n_modules']:>8} {e.get('n_particles', '-'):>9} "
            f"{e.get('n_measurements', '-'):>7} {e.get('n_hits', '-'):>7}  {vols}"
        )
    return 0
