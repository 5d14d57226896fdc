"""Event simulation with pyacts 48.1.0: particle gun + Fatras + geometric digitization into CSV files.

Why this module exists: the reconstruction needs realistic cells (not smeared measurements) with
full truth, in the ACTS/traccc CSV layout (domain.md sections 1-3). ACTS' Python examples can make
them; this module fixes the recipe so every data set is reproducible from its ``simulation.json``.

Recipe
------
* Detector: ``acts.examples.GenericDetector`` (18,728 sensitive modules), field
  ``acts.ConstantBField(0, 0, 2 T)``.
* Pile-up mode (``mu``): ``mu`` primary vertices per event, each with 35 charged pions (random charge
  sign), |eta| < 3, falling pT spectrum made of log-uniform pieces: 23 particles in 0.1-0.5 GeV,
  8 in 0.5-1 GeV, 4 in 1-10 GeV (``spectrum="flat"``: 35 in ``pt_range_gev``, log-uniform).
* Single-particle mode (``particles``): one vertex with ``particles`` particles (muons for
  ``species="muon"``), |eta| < 2.5, pT log-uniform in ``pt_range_gev`` (default 1-100 GeV for muons).
* Vertices: Gaussian, sigma_xy = 12.5 um, sigma_z = 50 mm, t = 0.
* Fatras with all EM interactions on and ``pMin = 0.1 GeV`` (its default of 0.5 GeV silently drops
  the soft part of the spectrum), FPE monitoring off.
* Digitization: geometric, with real cells, using the configuration written by
  :mod:`producer.sim.digi_config` (pixels 50x50 um, short strips 80 um x 1.2 mm, long strips 120 um
  1-D). ACTS' defaults are kept: ``doMerge`` and ``mergeCommonCorner`` on (clusters of different
  hits that share a cell or touch, corners included, become one measurement whose cells are the
  union), ``minEnergyDeposit`` 0 (no hit dropped for low deposit).

How a vertex gets all 35 pions
------------------------------
ACTS' ``ParametricParticleGenerator`` draws one pT range per generator, and the vertex generators
cannot be subclassed from Python, so one generator cannot produce the three-piece spectrum at one
vertex. We therefore run one ACTS sequencer *per event*: the vertex positions of that event are drawn
here (numpy, seeded by ``(seed, event)``), every (vertex, pT piece) pair becomes an
``EventGenerator.Generator`` with a ``FixedVertexGenerator`` at that position, and the HepMC3 input
converter merges primaries that coincide (``mergePrimaries``, threshold 1e-6 mm). The result is exactly
``mu`` primary vertices with 35 particles each; ``particle_id_pv`` numbers them 1..mu in draw order.
The per-event sequencer also gives us a natural hook for per-event progress and compression.

Random numbers
--------------
ACTS derives an event's random stream from ``(component seed, event number)``. We derive separate
component seeds for the generator, Fatras and digitization from the user seed with
``numpy.random.SeedSequence`` so that the components do not share a stream, and so that data sets made
with neighbouring seeds are not shifted copies of each other. The output is deterministic: the same
arguments give byte-identical CSV files (the gzip header carries no timestamp or file name).

Output (``out_dir``)
--------------------
``detectors.csv`` (``CsvTrackingGeometryWriter`` with only sensitive surfaces enabled; ACTS still adds
the two passive cylinders of volumes 5 and 10, with module_id 0), ``digitization-config.json``, per
event ``eventNNNNNNNNN-{particles,hits,measurements,cells,measurement-simhit-map}.csv`` in ACTS' row
order (never re-sorted: the measurement-simhit map indexes rows), and ``simulation.json`` (argv,
settings, versions, per-event counts and timings). With ``gzip`` every CSV, detectors.csv included,
becomes ``.csv.gz``. The header-only ``layer-volumes.csv``/``surface-grids.csv`` that the geometry
writer emits even when disabled are removed. ``particles`` are Fatras' simulated particles (initial
state, secondaries included; the generated list is not written separately because it equals the
primaries there).
"""

from __future__ import annotations

import argparse
import gzip as gzip_module
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from producer.sim.digi_config import build_digi_config, module_shapes, write_digi_config

logger = logging.getLogger(__name__)

Spectrum = Literal["falling", "flat"]
Species = Literal["pion", "muon"]

#: Charged particles per pile-up vertex.
PARTICLES_PER_VERTEX = 35
#: Falling pT spectrum per vertex: (count, pT min [GeV], pT max [GeV]), each piece log-uniform.
FALLING_PIECES: tuple[tuple[int, float, float], ...] = ((23, 0.1, 0.5), (8, 0.5, 1.0), (4, 1.0, 10.0))
#: Default flat-spectrum pT range [GeV] per species.
DEFAULT_PT_RANGE_GEV: dict[str, tuple[float, float]] = {"muon": (1.0, 100.0), "pion": (0.1, 10.0)}
#: |eta| acceptance of the generator: pile-up mode / single-particle mode.
ETA_MAX_PILEUP = 3.0
ETA_MAX_SINGLE = 2.5
#: Beam spot [mm].
VERTEX_SIGMA_XY_MM = 0.0125
VERTEX_SIGMA_Z_MM = 50.0
#: Solenoid field along z [T].
BFIELD_T = 2.0
#: Fatras minimum momentum [GeV] (ACTS default 0.5 would drop most of the falling spectrum).
FATRAS_PMIN_GEV = 0.1
#: Merge threshold for primary vertices in the HepMC3 converter [mm]; our shared vertices are identical.
MERGE_VERTEX_THRESHOLD_MM = 1e-6
#: Per-event file stems in the order ACTS writes them (and we report them).
EVENT_FILES = ("particles", "hits", "measurements", "cells", "measurement-simhit-map")
#: gzip level: 6 is within a few percent of 9 in size for these CSVs and much faster.
GZIP_LEVEL = 6
#: Seed-sequence stream ids per random component.
_STREAM_VERTEX, _STREAM_GENERATOR, _STREAM_FATRAS, _STREAM_DIGI = 0, 1, 2, 3

ProgressFn = Callable[[int, int, dict[str, Any]], None]


class SimulationUnavailable(RuntimeError):
    """Raised when pyacts (the ``sim`` extra) is not installed."""


@dataclass(frozen=True)
class SimulationSettings:
    """Resolved generator settings of one run (what ``simulation.json`` records as ``settings``).

    Attributes:
        events: number of events.
        mu: pile-up vertices per event, or ``None`` in single-particle mode.
        particles: particles per event in single-particle mode, else ``None``.
        seed: user seed; all random streams derive from it.
        spectrum: ``"falling"`` (three log-uniform pieces) or ``"flat"`` (log-uniform in pt_range_gev).
        species: ``"pion"`` (PDG 211) or ``"muon"`` (PDG 13), random charge sign.
        pt_range_gev: pT range of the flat spectrum [GeV]; ``None`` for falling.
        eta_max: generated |eta| < eta_max.
        gzip: compress CSV outputs.
    """

    events: int
    mu: int | None
    particles: int | None
    seed: int
    spectrum: Spectrum
    species: Species
    pt_range_gev: tuple[float, float] | None
    eta_max: float
    gzip: bool

    def __post_init__(self) -> None:
        if self.events < 1:
            raise ValueError("events must be >= 1")
        if (self.mu is None) == (self.particles is None):
            raise ValueError("give exactly one of mu (pile-up) or particles (single-particle mode)")
        if self.mu is not None and self.mu < 1:
            raise ValueError("mu must be >= 1")
        if self.particles is not None and self.particles < 1:
            raise ValueError("particles must be >= 1")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        if self.spectrum not in ("falling", "flat"):
            raise ValueError(f"unknown spectrum {self.spectrum!r}")
        if self.species not in ("pion", "muon"):
            raise ValueError(f"unknown species {self.species!r}")
        if self.pt_range_gev is not None:
            lo, hi = self.pt_range_gev
            if not 0 < lo < hi:
                raise ValueError(f"pT range must satisfy 0 < min < max, got {self.pt_range_gev}")
        if self.eta_max <= 0:
            raise ValueError("eta_max must be positive")

    def pieces(self) -> list[tuple[int, float, float]]:
        """(count, pT min, pT max) per pT piece for one vertex; counts sum to the vertex multiplicity."""
        total = PARTICLES_PER_VERTEX if self.particles is None else self.particles
        if self.spectrum == "flat":
            assert self.pt_range_gev is not None  # resolved by resolve_settings
            return [(total, *self.pt_range_gev)]
        if self.particles is None:
            return list(FALLING_PIECES)
        # Single-particle mode with a falling spectrum: split N in the 23:8:4 proportions
        # (largest remainder) so the shape is the same as at a pile-up vertex.
        weights = [c for c, _, _ in FALLING_PIECES]
        exact = [total * w / sum(weights) for w in weights]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[
            : total - sum(counts)
        ]:
            counts[i] += 1
        return [(c, lo, hi) for c, (_, lo, hi) in zip(counts, FALLING_PIECES, strict=True) if c > 0]

    @property
    def vertices_per_event(self) -> int:
        return 1 if self.mu is None else self.mu


def resolve_settings(
    events: int,
    mu: int | None = None,
    particles: int | None = None,
    seed: int = 42,
    spectrum: Spectrum | None = None,
    species: Species = "pion",
    pt_range_gev: tuple[float, float] | None = None,
    eta_max: float | None = None,
    gzip: bool = True,
) -> SimulationSettings:
    """Fill the mode-dependent defaults and validate.

    Defaults: spectrum ``falling`` for pions and ``flat`` for muons; flat pT range 1-100 GeV for
    muons and 0.1-10 GeV for pions; |eta| < 3 with pile-up and < 2.5 in single-particle mode.

    Raises:
        ValueError: inconsistent or out-of-range arguments.
    """
    if spectrum is None:
        spectrum = "flat" if species == "muon" else "falling"
    if spectrum == "flat" and pt_range_gev is None:
        pt_range_gev = DEFAULT_PT_RANGE_GEV[species]
    if spectrum == "falling" and pt_range_gev is not None:
        raise ValueError("a pT range only applies to the flat spectrum")
    if eta_max is None:
        eta_max = ETA_MAX_PILEUP if particles is None else ETA_MAX_SINGLE
    return SimulationSettings(
        events=events,
        mu=mu,
        particles=particles,
        seed=seed,
        spectrum=spectrum,
        species=species,
        pt_range_gev=None if pt_range_gev is None else (float(pt_range_gev[0]), float(pt_range_gev[1])),
        eta_max=float(eta_max),
        gzip=gzip,
    )


@dataclass
class EventRecord:
    """Per-event bookkeeping written to ``simulation.json``."""

    event: int
    vertices: int
    particles_generated: int
    particles: int = 0
    hits: int = 0
    measurements: int = 0
    cells: int = 0
    elapsed_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def _import_acts() -> Any:
    """Import pyacts or explain how to get it."""
    try:
        import acts
        import acts.examples
        import acts.examples.hepmc3
        import acts.examples.json
    except ImportError as exc:
        raise SimulationUnavailable(
            "event simulation needs pyacts 48.1.0 (module 'acts'); install the sim extra: "
            "pip install -e '.[sim]'"
        ) from exc
    return acts


def _component_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for one random component, independent across streams and user seeds."""
    import numpy as np

    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint32)[0])


def _draw_vertices(seed: int, event: int, n: int) -> list[tuple[float, float, float]]:
    """Gaussian beam-spot vertex positions [mm] for one event, deterministic in (seed, event)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_VERTEX, event]))
    xy = rng.normal(0.0, VERTEX_SIGMA_XY_MM, size=(n, 2))
    z = rng.normal(0.0, VERTEX_SIGMA_Z_MM, size=n)
    return [(float(xy[i, 0]), float(xy[i, 1]), float(z[i])) for i in range(n)]


def _count_rows(path: Path) -> int:
    """Data rows of a CSV file (lines minus the header)."""
    n = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return max(0, n - 1)


def _gzip_file(path: Path) -> Path:
    """Compress ``path`` to ``path.gz`` reproducibly (no mtime or name in the header) and delete it."""
    target = path.with_name(path.name + ".gz")
    with (
        path.open("rb") as src,
        target.open("wb") as raw,
        gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 20)
    path.unlink()
    return target


def event_stem(event: int) -> str:
    """ACTS' per-event file prefix, e.g. ``event000000042``."""
    return f"event{event:09d}"


class _Simulator:
    """Holds the detector, field and digitization config shared by the per-event sequencers."""

    def __init__(self, acts: Any, settings: SimulationSettings, out_dir: Path, acts_level: Any) -> None:
        self.acts = acts
        self.settings = settings
        self.out_dir = out_dir
        self.level = acts_level
        u = acts.UnitConstants
        cfg = acts.examples.GenericDetector.Config()
        for name in ("logLevel", "layerLogLevel", "surfaceLogLevel", "volumeLogLevel"):
            setattr(cfg, name, acts_level)
        self.detector = acts.examples.GenericDetector(cfg)
        self.geometry = self.detector.trackingGeometry()
        self.field = acts.ConstantBField(acts.Vector3(0.0, 0.0, BFIELD_T * u.T))
        self.surfaces = self.geometry.geoIdSurfaceMap()
        self.digi_path = out_dir / "digitization-config.json"
        self.digi_config = build_digi_config(module_shapes(self.geometry))
        write_digi_config(self.digi_config, self.digi_path)
        self.digi_container = acts.examples.json.readDigiConfigFromJson(str(self.digi_path))
        # The sequencer always writes a timing file; keep it out of the data directory.
        self.scratch = Path(tempfile.mkdtemp(prefix="trackfleet-sim-"))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _sequencer(self, events: int, skip: int) -> Any:
        acts = self.acts
        return acts.examples.Sequencer(
            events=events,
            skip=skip,
            numThreads=1,
            trackFpes=False,
            logLevel=self.level,
            outputDir=str(self.scratch),
        )

    def _event_generator(self, generators: list[Any], seed: int) -> Any:
        acts = self.acts
        return acts.examples.EventGenerator(
            level=self.level,
            generators=generators,
            randomNumbers=acts.examples.RandomNumbers(seed=seed),
            outputEvent="hepmc3_event",
        )

    def _generators(self, event: int) -> list[Any]:
        """One ACTS generator per (vertex, pT piece), all pieces of a vertex at the same position."""
        acts = self.acts
        s = self.settings
        u = acts.UnitConstants
        pdg = acts.PdgParticle.eMuon if s.species == "muon" else acts.PdgParticle.ePionPlus
        gens = []
        for x, y, z in _draw_vertices(s.seed, event, s.vertices_per_event):
            position = acts.Vector4(x * u.mm, y * u.mm, z * u.mm, 0.0)
            for count, lo, hi in s.pieces():
                gens.append(
                    acts.examples.EventGenerator.Generator(
                        multiplicity=acts.examples.FixedMultiplicityGenerator(n=1),
                        vertex=acts.examples.FixedVertexGenerator(fixed=position),
                        particles=acts.examples.ParametricParticleGenerator(
                            p=(lo * u.GeV, hi * u.GeV),
                            pTransverse=True,
                            pLogUniform=True,
                            eta=(-s.eta_max, s.eta_max),
                            etaUniform=True,
                            numParticles=count,
                            pdg=pdg,
                            randomizeCharge=True,
                        ),
                    )
                )
        return gens

    def run_event(self, event: int, write_geometry: bool = False) -> EventRecord:
        """Simulate, digitize and write one event; returns its counts (files still uncompressed).

        With ``write_geometry`` the sequencer also writes ``detectors.csv`` at the end of its run (a
        sequencer needs an event source, so this rides on an event).
        """
        acts = self.acts
        s = self.settings
        u = acts.UnitConstants
        t0 = time.perf_counter()
        record = EventRecord(
            event=event,
            vertices=s.vertices_per_event,
            particles_generated=s.vertices_per_event * sum(c for c, _, _ in s.pieces()),
        )
        seq = self._sequencer(events=1, skip=event)
        out = str(self.out_dir)
        seq.addReader(
            self._event_generator(self._generators(event), _component_seed(s.seed, _STREAM_GENERATOR))
        )
        seq.addAlgorithm(
            acts.examples.hepmc3.HepMC3InputConverter(
                level=self.level,
                inputEvent="hepmc3_event",
                outputParticles="particles_generated",
                outputVertices="vertices_generated",
                mergePrimaries=True,
                primaryVertexSpatialThreshold=MERGE_VERTEX_THRESHOLD_MM * u.mm,
            )
        )
        seq.addAlgorithm(
            acts.examples.FatrasSimulation(
                level=self.level,
                inputParticles="particles_generated",
                outputParticles="particles_simulated",
                outputSimHits="simhits",
                randomNumbers=acts.examples.RandomNumbers(seed=_component_seed(s.seed, _STREAM_FATRAS)),
                trackingGeometry=self.geometry,
                magneticField=self.field,
                generateHitsOnSensitive=True,
                emScattering=True,
                emEnergyLossIonisation=True,
                emEnergyLossRadiation=True,
                emPhotonConversion=True,
                pMin=FATRAS_PMIN_GEV * u.GeV,
            )
        )
        digi_cfg = acts.examples.DigitizationAlgorithm.Config(
            digitizationConfigs=self.digi_container,
            surfaceByIdentifier=self.surfaces,
            randomNumbers=acts.examples.RandomNumbers(seed=_component_seed(s.seed, _STREAM_DIGI)),
            inputSimHits="simhits",
            outputMeasurements="measurements",
            outputClusters="clusters",
            outputMeasurementParticlesMap="measurement_particles_map",
            outputMeasurementSimHitsMap="measurement_simhits_map",
            outputParticleMeasurementsMap="particle_measurements_map",
            outputSimHitMeasurementsMap="simhit_measurements_map",
        )
        seq.addAlgorithm(acts.examples.DigitizationAlgorithm(digi_cfg, self.level))
        seq.addWriter(
            acts.examples.CsvParticleWriter(
                level=self.level, inputParticles="particles_simulated", outputDir=out, outputStem="particles"
            )
        )
        seq.addWriter(
            acts.examples.CsvSimHitWriter(
                level=self.level, inputSimHits="simhits", outputDir=out, outputStem="hits"
            )
        )
        seq.addWriter(
            acts.examples.CsvMeasurementWriter(
                level=self.level,
                inputMeasurements="measurements",
                inputClusters="clusters",
                inputMeasurementSimHitsMap="measurement_simhits_map",
                outputDir=out,
            )
        )
        if write_geometry:
            seq.addWriter(
                acts.examples.CsvTrackingGeometryWriter(
                    level=self.level,
                    trackingGeometry=self.geometry,
                    outputDir=out,
                    writePerEvent=False,
                    writeSensitive=True,
                    writeBoundary=False,
                    writeSurfaceGrid=False,
                    writeLayerVolume=False,
                )
            )
        seq.run()

        stem = event_stem(event)
        for name in EVENT_FILES:
            path = self.out_dir / f"{stem}-{name}.csv"
            if not path.is_file():
                raise RuntimeError(f"ACTS did not write {path}")
            rows = _count_rows(path)
            key = name.replace("-", "_")
            if key in ("particles", "hits", "measurements", "cells"):
                setattr(record, key, rows)
            record.files[name] = path.name
        record.elapsed_s = round(time.perf_counter() - t0, 3)
        return record


def _drop_header_only(out: Path, names: Sequence[str]) -> None:
    """Remove side files that CsvTrackingGeometryWriter writes (header only) even when disabled."""
    for name in names:
        path = out / name
        if path.is_file() and _count_rows(path) == 0:
            path.unlink()
        elif path.is_file():
            logger.warning("%s has content; keeping it", path)


def _existing_outputs(out_dir: Path) -> list[Path]:
    """Files a previous run may have left that this run would mix with."""
    patterns = (
        "event*-*.csv",
        "event*-*.csv.gz",
        "detectors.csv",
        "detectors.csv.gz",
        "digitization-config.json",
        "simulation.json",
        "layer-volumes.csv",
        "surface-grids.csv",
    )
    found: list[Path] = []
    for pattern in patterns:
        found.extend(out_dir.glob(pattern))
    return sorted(found)


def simulate(
    out_dir: str | os.PathLike[str],
    events: int,
    mu: int | None = None,
    particles: int | None = None,
    seed: int = 42,
    spectrum: Spectrum | None = None,
    species: Species = "pion",
    pt_range_gev: tuple[float, float] | None = None,
    gzip: bool = True,
    progress: ProgressFn | None = None,
    *,
    eta_max: float | None = None,
    overwrite: bool = False,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Simulate ``events`` events into ``out_dir`` (see the module docstring for the recipe).

    Parameters:
        out_dir: output directory (created if missing).
        events: number of events; files are numbered 0..events-1.
        mu: pile-up vertices per event (35 charged particles each); exclusive with ``particles``.
        particles: particles per event from a single vertex (single-particle studies).
        seed: seed for every random stream; the same arguments give byte-identical CSV files.
        spectrum: ``"falling"`` or ``"flat"``; default falling for pions, flat for muons.
        species: ``"pion"`` or ``"muon"``.
        pt_range_gev: (min, max) pT of the flat spectrum [GeV]; default 1-100 (muons), 0.1-10 (pions).
        gzip: compress the CSV files to ``.csv.gz`` (after each event) and delete the plain ones.
        progress: called after each event as ``progress(done, total, record_dict)``.
        eta_max: |eta| acceptance; default 3 with pile-up, 2.5 in single-particle mode.
        overwrite: delete outputs of an earlier run in ``out_dir`` first instead of refusing.
        command: the command line to record in ``simulation.json`` (defaults to ``sys.argv``).

    Raises:
        SimulationUnavailable: pyacts is not installed.
        ValueError: invalid arguments.
        FileExistsError: ``out_dir`` holds outputs of an earlier run and ``overwrite`` is false.

    Returns:
        The summary that is also written to ``out_dir/simulation.json``.
    """
    settings = resolve_settings(
        events=events,
        mu=mu,
        particles=particles,
        seed=seed,
        spectrum=spectrum,
        species=species,
        pt_range_gev=pt_range_gev,
        eta_max=eta_max,
        gzip=gzip,
    )
    acts = _import_acts()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = _existing_outputs(out)
    if stale:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds simulation outputs ({stale[0].name}, ...); "
                "choose an empty directory or overwrite"
            )
        logger.info("removing %d outputs of an earlier run from %s", len(stale), out)
        for path in stale:
            path.unlink()

    acts_level = acts.logging.INFO if logger.isEnabledFor(logging.DEBUG) else acts.logging.WARNING
    t_start = time.perf_counter()
    sim = _Simulator(acts, settings, out, acts_level)
    try:
        logger.info(
            "geometry ready: %d digitization entries written to %s",
            len(sim.digi_config["entries"]),
            sim.digi_path.name,
        )
        geometry_file = out / "detectors.csv"
        records: list[EventRecord] = []
        for i in range(settings.events):
            record = sim.run_event(i, write_geometry=i == 0)
            if i == 0:
                if not geometry_file.is_file():
                    raise RuntimeError(f"ACTS did not write {geometry_file}")
                _drop_header_only(out, ("layer-volumes.csv", "surface-grids.csv"))
                if settings.gzip:
                    geometry_file = _gzip_file(geometry_file)
            if settings.gzip:
                for name, fname in record.files.items():
                    record.files[name] = _gzip_file(out / fname).name
            records.append(record)
            if progress is not None:
                progress(i + 1, settings.events, asdict(record))
    finally:
        sim.close()

    elapsed = time.perf_counter() - t_start
    summary = _summary(acts, settings, out, geometry_file, records, elapsed, command)
    (out / "simulation.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("simulated %d events into %s in %.1f s", settings.events, out, elapsed)
    return summary


def _summary(
    acts: Any,
    settings: SimulationSettings,
    out: Path,
    geometry_file: Path,
    records: list[EventRecord],
    elapsed: float,
    command: Sequence[str] | None,
) -> dict[str, Any]:
    """The content of ``simulation.json``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pyacts_version = version("pyacts")
    except PackageNotFoundError:  # e.g. a source build of ACTS
        pyacts_version = f"{acts.version.major}.{acts.version.minor}.{acts.version.patch}"
    totals = {k: sum(getattr(r, k) for r in records) for k in ("particles", "hits", "measurements", "cells")}
    return {
        "command": list(sys.argv if command is None else command),
        "settings": asdict(settings),
        "seed": settings.seed,
        "pyacts_version": pyacts_version,
        "python": platform.python_version(),
        "generator": {
            "vertex_sigma_xy_mm": VERTEX_SIGMA_XY_MM,
            "vertex_sigma_z_mm": VERTEX_SIGMA_Z_MM,
            "vertices_per_event": settings.vertices_per_event,
            "pieces_per_vertex": [
                {"count": c, "pt_min_gev": lo, "pt_max_gev": hi, "log_uniform": True}
                for c, lo, hi in settings.pieces()
            ],
            "pdg": 13 if settings.species == "muon" else 211,
            "random_charge": True,
            "eta_max": settings.eta_max,
        },
        "detector": {"name": "acts.examples.GenericDetector", "bfield_t": [0.0, 0.0, BFIELD_T]},
        "fatras": {"pmin_gev": FATRAS_PMIN_GEV, "em_interactions": True},
        "digitization": {
            "config": "digitization-config.json",
            "doMerge": True,
            "mergeCommonCorner": True,
            "minEnergyDeposit": 0.0,
        },
        "geometry_file": geometry_file.name,
        "events": [asdict(r) for r in records],
        "totals": totals,
        "elapsed_s": round(elapsed, 3),
    }


# --- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``trackfleet simulate`` options to ``parser``."""
    parser.add_argument("--events", type=int, required=True, help="number of events")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--mu", type=int, help="pile-up: vertices per event, 35 charged particles each")
    mode.add_argument(
        "--particles", type=int, help="single-particle study: particles per event from one vertex"
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--spectrum",
        choices=("falling", "flat"),
        default=None,
        help="pT spectrum: falling (23/8/4 in 0.1-0.5/0.5-1/1-10 GeV) or flat "
        "(log-uniform in --pt-min..--pt-max); default falling for pions, flat for muons",
    )
    parser.add_argument("--species", choices=("pion", "muon"), default="pion", help="particle species")
    parser.add_argument(
        "--pt-min",
        type=float,
        default=None,
        help="flat spectrum: minimum pT [GeV] (default 1 for muons, 0.1 for pions)",
    )
    parser.add_argument(
        "--pt-max",
        type=float,
        default=None,
        help="flat spectrum: maximum pT [GeV] (default 100 for muons, 10 for pions)",
    )
    parser.add_argument(
        "--eta-max",
        type=float,
        default=None,
        help="|eta| acceptance (default 3 with --mu, 2.5 with --particles)",
    )
    parser.add_argument("--no-gzip", dest="gzip", action="store_false", help="keep plain CSV files")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete outputs of an earlier run in --out instead of refusing",
    )


def _print_progress(done: int, total: int, record: dict[str, Any]) -> None:
    """One progress line per event on stderr (logs may be silenced; this is for the operator)."""
    sys.stderr.write(
        f"event {done}/{total} (#{record['event']}): {record['elapsed_s']:.2f} s, "
        f"{record['particles']} particles, {record['hits']} hits, "
        f"{record['measurements']} measurements, {record['cells']} cells\n"
    )
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``trackfleet simulate``; returns the process exit code."""
    pt_range: tuple[float, float] | None = None
    spectrum = args.spectrum
    if args.pt_min is not None or args.pt_max is not None:
        lo_default, hi_default = DEFAULT_PT_RANGE_GEV[args.species]
        pt_range = (
            args.pt_min if args.pt_min is not None else lo_default,
            args.pt_max if args.pt_max is not None else hi_default,
        )
        # A pT range only means something for the flat spectrum, so asking for one selects it.
        spectrum = spectrum or "flat"
    try:
        summary = simulate(
            args.out,
            events=args.events,
            mu=args.mu,
            particles=args.particles,
            seed=args.seed,
            spectrum=spectrum,
            species=args.species,
            pt_range_gev=pt_range,
            gzip=args.gzip,
            progress=_print_progress,
            eta_max=args.eta_max,
            overwrite=args.overwrite,
        )
    except (SimulationUnavailable, ValueError, FileExistsError) as exc:
        logger.error("%s", exc)
        return 2
    totals = summary["totals"]
    sys.stderr.write(
        f"done: {len(summary['events'])} events in {summary['elapsed_s']:.1f} s -> {args.out} "
        f"({totals['particles']} particles, {totals['hits']} hits, {totals['measurements']} measurements, "
        f"{totals['cells']} cells)\n"
    )
    return 0
