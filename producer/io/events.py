"""Find the events of an input and load them.

An input is one of:
- a directory of ``event<N>-cells.csv[.gz]`` files (truth files beside them are picked up),
- a single per-event cells file ``event<N>-cells.csv[.gz]``,
- one CSV holding many events with an ``event_id`` column,
- a directory of packed events ``event<N>.tfev`` or one such file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kernels.detector import Detector
from kernels.edm.cells import Cells
from kernels.edm.packed import event_from_bytes
from producer.io.cells import read_cells, read_cells_multi
from producer.io.errors import InputError
from producer.io.hits import Hits, read_hits
from producer.io.measurements import TruthMeasurements, read_measurements
from producer.io.particles import Particles, read_particles
from producer.io.simhit_map import SimHitMap, read_simhit_map
from producer.io.table import read_text, split_header

_EVENT_FILE = re.compile(
    r"^event(\d+)-(cells|measurements|hits|particles|measurement-simhit-map)\.csv(\.gz)?$"
)
_PACKED_FILE = re.compile(r"^event(\d+)\.tfev$")
TRUTH_KINDS = ("measurements", "hits", "particles", "measurement-simhit-map")


@dataclass(frozen=True)
class EventSource:
    """Where one event's data lives.

    Attributes:
        event_id: event number.
        cells: the cells file (CSV or .tfev), or the multi-event CSV this event is part of.
        truth: kind -> path for measurements, hits, particles, measurement-simhit-map when present.
        multi: True when ``cells`` holds many events (``event_id`` column).
    """

    event_id: int
    cells: Path
    truth: dict[str, Path] = field(default_factory=dict)
    multi: bool = False

    @property
    def has_truth(self) -> bool:
        return all(k in self.truth for k in TRUTH_KINDS)


@dataclass(frozen=True)
class EventTruth:
    measurements: TruthMeasurements
    hits: Hits
    particles: Particles
    simhit_map: SimHitMap


def event_file_name(event_id: int, kind: str, suffix: str = ".csv") -> str:
    return f"event{event_id:09d}-{kind}{suffix}"


def _is_multi_event(path: Path) -> bool:
    names, _, _ = split_header(path, read_text(path)[:4096] + "\n")
    return "event_id" in names


def discover(path: str | Path) -> list[EventSource]:
    """All events of an input, in ascending event id.

    Raises:
        InputError: nothing readable at ``path``, or an event with two cells files.
    """
    p = Path(path)
    if p.is_dir():
        found: dict[int, dict[str, Path]] = {}
        packed: dict[int, Path] = {}
        for f in sorted(p.iterdir()):
            m = _EVENT_FILE.match(f.name)
            if m:
                kinds = found.setdefault(int(m.group(1)), {})
                if m.group(2) in kinds:
                    raise InputError(f, f"event {int(m.group(1))} has two {m.group(2)} files")
                kinds[m.group(2)] = f
            elif (mp := _PACKED_FILE.match(f.name)) is not None:
                packed[int(mp.group(1))] = f
        sources = [
            EventSource(ev, kinds["cells"], {k: v for k, v in kinds.items() if k != "cells"})
            for ev, kinds in sorted(found.items())
            if "cells" in kinds
        ]
        if not sources and packed:
            sources = [EventSource(ev, f) for ev, f in sorted(packed.items())]
        if not sources:
            raise InputError(p, "no event files (expected event<N>-cells.csv[.gz] or event<N>.tfev)")
        return sources
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if (mp := _PACKED_FILE.match(p.name)) is not None:
        return [EventSource(int(mp.group(1)), p)]
    m = _EVENT_FILE.match(p.name)
    if m and m.group(2) == "cells" and not _is_multi_event(p):
        ev = int(m.group(1))
        truth = {}
        for kind in TRUTH_KINDS:
            for suffix in (".csv", ".csv.gz"):
                f = p.parent / event_file_name(ev, kind, suffix)
                if f.is_file():
                    truth[kind] = f
        return [EventSource(ev, p, truth)]
    if _is_multi_event(p):
        return [EventSource(c.event_id, p, multi=True) for c in read_cells_multi(p)]
    if m is None:
        # a single-event cells file with another name: event id 0
        return [EventSource(0, p)]
    raise InputError(p, "not a cells file")


def load_cells(source: EventSource, detector: Detector | None = None) -> Cells:
    """The event's cells, sorted and merged (see :mod:`producer.io.cells`)."""
    if source.cells.suffix == ".tfev":
        try:
            packed = event_from_bytes(source.cells.read_bytes())
        except ValueError as exc:
            raise InputError(source.cells, str(exc)) from None
        return packed.to_cells()
    if source.multi:
        for c in read_cells_multi(source.cells, detector):
            if c.event_id == source.event_id:
                return c
        raise InputError(source.cells, f"no event {source.event_id}", column="event_id")
    return read_cells(source.cells, source.event_id, detector)


def iter_cells(path: str | Path, detector: Detector | None = None) -> Iterator[Cells]:
    """Cells of every event of an input; a multi-event CSV is parsed once."""
    sources = discover(path)
    if sources and sources[0].multi:
        yield from read_cells_multi(sources[0].cells, detector)
        return
    for s in sources:
        yield load_cells(s, detector)


def load_truth(source: EventSource) -> EventTruth:
    """Truth of one event.

    Raises:
        InputError: a truth file is missing.
    """
    missing = [k for k in TRUTH_KINDS if k not in source.truth]
    if missing:
        raise InputError(source.cells, f"event {source.event_id} has no truth file(s) {missing}")
    hits = read_hits(source.truth["hits"])
    return EventTruth(
        measurements=read_measurements(source.truth["measurements"]),
        hits=hits,
        particles=read_particles(source.truth["particles"]),
        simhit_map=read_simhit_map(source.truth["measurement-simhit-map"], n_hits=hits.size),
    )
