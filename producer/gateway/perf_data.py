"""perf_analyzer input data from real events: ``trackfleet gateway --export-perf-data INPUT OUT.json``.

perf_analyzer cannot invent cells (the model's inputs have variable length), so it is fed a JSON file
(``--input-data OUT.json``) with one entry per event; perf_analyzer cycles through them. Each tensor is
the event's cells, sorted and merged as ``trackfleet reconstruct`` reads them (so the gateway skips its
sort), as base64 little-endian bytes with the event's shape::

    {"data": [{"GEOMETRY_ID": {"b64": "...", "shape": [n]}, "CHANNEL0": {...}, "CHANNEL1": {...},
               "VALUE": {...}, "TIMESTAMP": {...}, "EVENT_ID": {"content": [id], "shape": [1]},
               "TRUTH_ID": {...}}, ...]}

``TRUTH_ID`` is there when the events carry simulation truth, as the events ``producer`` sends do, so
that both paths move the same data. A mu=200 event (~330k cells, 32 bytes each) takes ~14 MB of JSON.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from kernels.edm.cells import Cells


def event_entry(cells: Cells) -> dict[str, Any]:
    """One perf_analyzer data entry (a "step") for one event's cells."""

    def b64(a: Any, dtype: str) -> dict[str, Any]:
        arr = np.ascontiguousarray(np.asarray(a), dtype=np.dtype(dtype))
        return {"b64": base64.b64encode(arr.tobytes()).decode("ascii"), "shape": [int(arr.shape[0])]}

    entry = {
        "GEOMETRY_ID": b64(cells.geometry_id, "<u8"),
        "CHANNEL0": b64(cells.channel0, "<i4"),
        "CHANNEL1": b64(cells.channel1, "<i4"),
        "VALUE": b64(cells.activation, "<f4"),
        "TIMESTAMP": b64(cells.time, "<f4"),
        "EVENT_ID": {"content": [int(cells.event_id)], "shape": [1]},
    }
    if cells.measurement_id is not None:
        # a producer sends the truth ids too: keep the requests the same size as the fleet's own events
        entry["TRUTH_ID"] = b64(cells.measurement_id, "<i8")
    return entry


def export_perf_data(input_path: str | Path, out: str | Path, limit: int | None = None) -> int:
    """Write perf_analyzer's ``--input-data`` JSON for the events of ``input_path``; returns the event count.

    Raises:
        InputError: unreadable input.
    """
    from producer.io.detector import find_detector_files, load_detector
    from producer.io.errors import InputError
    from producer.io.events import discover, load_cells

    sources = discover(input_path)[:limit]
    try:
        detector = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    except InputError:
        detector = None  # no detector beside the events: cells are read without checking them
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w") as f:
        f.write('{"data": [')
        for i, s in enumerate(sources):
            if i:
                f.write(", ")
            json.dump(event_entry(load_cells(s, detector)), f)
        f.write("]}\n")
    tmp.replace(out)
    return len(sources)
