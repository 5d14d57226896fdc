"""ACTS' own CPU reconstruction on trackfleet's events, scored side by side with trackfleet.

What this runs
--------------
pyacts 48.1.0 (the ``sim`` extra) reconstructs the events of ``--input`` with the chain of ACTS'
generic-detector examples (``Examples/Scripts/Python/full_chain_test.py`` with ``-G``), single
threaded by default:

1. *Measurements*: OUR ``event<N>-measurements.csv[.gz]`` is read with :mod:`producer.io` and every
   row is put, in file order, into an ``acts.examples.MeasurementContainer`` (2-D for local_key 6,
   1-D loc0 for long strips). The container index of a measurement is therefore its row, which is its
   ``measurement_id``: an ACTS track state's ``IndexSourceLink.index()`` *is* our truth id. ACTS'
   ``CsvMeasurementReader`` is not used because it re-sorts measurements within a module (unstably)
   without re-sorting the measurement->simhit map (domain.md section 3), and no ACTS truth (particles,
   simhits, truth matching) is read at all: scoring is done by :mod:`producer.validate` on the files
   we write, exactly as for trackfleet.
2. *Spacepoints*: ``SpacePointMaker`` on the pixel volumes 7, 8, 9 (2-D measurements only); with
   ``--seed-selection acts-example`` only on the pixel layers ACTS' generic example seeds from (its
   ``generic-seeding-config.json``: the barrel and the four disks per side closest to it).
3. *Seeding*: ``GridTripletSeedingAlgorithm`` (``addGridTripletSeeding``) with ACTS' defaults, which
   are the settings of domain.md section 3 (minPt 0.4 GeV, collision region +-150 mm, deltaR
   5-270 mm, cotThetaMax 10.02 = |eta| < 3, middle spacepoints at r 60-120 mm, 5 seeds per middle
   spacepoint), except impactMax 10 mm (ACTS' default is 20 mm; domain.md section 4 uses 10).
4. *Track parameters* from seeds: ``TrackParamsEstimationAlgorithm`` with the initial sigmas of the
   ACTS full-chain example (1 mm, 1 mm, 1 deg, 1 deg, sigma(q/pT) 0.1 e/GeV and 10% of pT, 1 ns).
5. *CKF*: ``TrackFindingAlgorithm`` with chi2 cut 15 (outliers 25), 2 branches per surface, two-way
   search, seed de-duplication and stay-on-seed, and the track selection of domain.md applied
   inside the CKF as the example does: pT > 0.5 GeV, |eta| < 3, |d0| < 4 mm, >= 7 measurements,
   <= 2 holes, <= 2 outliers. Tracks are expressed at a perigee surface at the origin.
6. *Ambiguity resolution*: ``GreedyAmbiguityResolutionAlgorithm``, <= 3 shared measurements, >= 7
   measurements.

``addSeeding``/``addCKFTracks``/``addAmbiguityResolution`` of ``acts.examples.reconstruction`` are not
used as a whole because each adds a ``TrackTruthMatcher`` that needs ACTS' truth collections (and so
the CSV truth readers); the algorithms they configure are instantiated here with the same settings.
``addGridTripletSeeding`` is used as is.

Outputs (``--output DIR``)
--------------------------
* ``DIR/acts/event<N>-tracks.csv`` + ``-track-measurements.csv`` (:func:`producer.io.tracks_csv.
  write_tracks`): perigee (d0, z0, phi, theta, q/p) with covariance, chi2, ndf (ACTS: the sum of the
  measurement dimensions), holes; measurement rows inside out with geometry_id, local0/1 and
  dimension taken from our measurements file and ``measurement_id`` = our truth id. Outliers are not
  listed (ACTS' ``nMeasurements`` does not count them either).
* ``DIR/acts/timing.json``: ``seconds_per_event`` (the reconstruction proper, below) and the rest.
* ``DIR/timing.csv``: the ACTS sequencer's per-element timing.

Time per event
--------------
From the sequencer's ``timing.csv`` (per-element totals divided by the event count): the
reconstruction time is spacepoint making + seeding + parameter estimation + CKF + ambiguity
resolution; "total" adds reading our CSV into ACTS and the Python extraction of the tracks.

Scoring
-------
:func:`producer.validate.validate` scores ``DIR/acts`` (and ``--trackfleet-tracks`` when given, whose
time per event is ``seconds_per_event`` of its ``timing.json`` if present) on the same events; the
script prints efficiency, fake rate, duplicate rate and time per event side by side, and ``--json``
writes every number as one object.

Usage::

    python bench/acts_reference.py --input data/generic-mu20 --output /tmp/acts-ref \\
        [--events N] [--trackfleet-tracks DIR] [--json FILE] [--threads 1] [--seed-selection pixel]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Run as `python bench/acts_reference.py` from anywhere: make the repository importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from kernels.edm.tracks import Tracks  # noqa: E402
from producer.io.events import EventSource, discover  # noqa: E402
from producer.io.measurements import TruthMeasurements, read_measurements  # noqa: E402
from producer.io.tracks_csv import write_tracks  # noqa: E402

log = logging.getLogger("bench.acts_reference")

#: Sub-directory of ``--output`` that receives the ACTS tracks.
ACTS_SUBDIR = "acts"
#: Name of the per-directory timing file (read for trackfleet, written for ACTS).
TIMING_JSON = "timing.json"
#: local_key bit of loc1 (ACTS sets 1 << (bound index + 1): loc0 = 2, loc1 = 4).
_KEY_LOC1 = 4


#: Seeding spacepoint selections: every pixel layer (the default), or the layers of ACTS' own
#: generic-detector example (``Examples/Configs/generic-seeding-config.json``: the four barrel layers
#: and, per side, the four endcap disks closest to the barrel).
SPACEPOINT_SELECTIONS: dict[str, tuple[tuple[int, int], ...]] = {
    "pixel": ((7, 0), (8, 0), (9, 0)),
    "acts-example": (
        *((8, layer) for layer in (2, 4, 6, 8)),
        *((7, layer) for layer in (8, 10, 12, 14)),
        *((9, layer) for layer in (2, 4, 6, 8)),
    ),
}


class ActsUnavailable(RuntimeError):
    """pyacts (module ``acts``) is not installed."""


@dataclass(frozen=True)
class ActsRecoConfig:
    """The ACTS reconstruction settings (units in the names; ACTS' unit system is mm, GeV, ns, e).

    Attributes:
        bfield_t: solenoid field along +z [T] (our simulation: 2 T).
        spacepoint_selection: (volume, layer) pairs whose (2-D) measurements become seeding
            spacepoints; layer 0 takes the whole volume (see :data:`SPACEPOINT_SELECTIONS`).
        seed_min_pt_gev: minimum seed pT [GeV].
        seed_collision_region_mm: |z| of the seed origin on the beam line [mm].
        seed_delta_r_mm: (min, max) radial distance of bottom/top spacepoints from the middle one [mm].
        seed_cot_theta_max: maximum |cot(theta)| of a doublet (10.0179 = |eta| < 3).
        seed_impact_max_mm: maximum transverse impact parameter of a triplet [mm].
        seed_max_per_middle_sp: seeds kept per middle spacepoint by the seed filter.
        initial_sigmas: initial track-parameter sigmas (loc0 [mm], loc1 [mm], phi [rad], theta [rad],
            q/p [e/GeV], t [ns]); the q/p entry is replaced by the q/pT terms below.
        initial_sigma_qopt: sigma of q/pT [e/GeV] added to the initial covariance.
        initial_sigma_pt_rel: relative pT sigma added to the initial covariance.
        ckf_chi2_measurement: chi2 cut for a measurement to extend a CKF branch.
        ckf_chi2_outlier: chi2 below which a rejected measurement becomes an outlier.
        ckf_branches_per_surface: measurements (branches) kept per surface.
        ckf_two_way: also search inwards from the seed.
        ckf_seed_deduplication: skip seeds whose spacepoints are already on a found track.
        ckf_stay_on_seed: force the seed's measurements onto the track.
        sel_min_pt_gev, sel_max_abs_eta, sel_max_abs_d0_mm, sel_min_measurements, sel_max_holes,
            sel_max_outliers: track selection applied inside the CKF.
        ambi_max_shared: greedy ambiguity resolution: at most this many shared measurements per track.
        ambi_min_measurements: and at least this many measurements.
        ambi_max_iterations: iteration cap of the greedy solver.
    """

    bfield_t: float = 2.0
    spacepoint_selection: tuple[tuple[int, int], ...] = ((7, 0), (8, 0), (9, 0))
    seed_min_pt_gev: float = 0.4
    seed_collision_region_mm: float = 150.0
    seed_delta_r_mm: tuple[float, float] = (5.0, 270.0)
    seed_cot_theta_max: float = 10.0179
    seed_impact_max_mm: float = 10.0
    seed_max_per_middle_sp: int = 5
    initial_sigmas: tuple[float, float, float, float, float, float] = (
        1.0,
        1.0,
        math.radians(1.0),
        math.radians(1.0),
        0.0,
        1.0,
    )
    initial_sigma_qopt: float = 0.1
    initial_sigma_pt_rel: float = 0.1
    ckf_chi2_measurement: float = 15.0
    ckf_chi2_outlier: float = 25.0
    ckf_branches_per_surface: int = 2
    ckf_two_way: bool = True
    ckf_seed_deduplication: bool = True
    ckf_stay_on_seed: bool = True
    sel_min_pt_gev: float = 0.5
    sel_max_abs_eta: float = 3.0
    sel_max_abs_d0_mm: float = 4.0
    sel_min_measurements: int = 7
    sel_max_holes: int = 2
    sel_max_outliers: int = 2
    ambi_max_shared: int = 3
    ambi_min_measurements: int = 7
    ambi_max_iterations: int = 1_000_000


def import_acts() -> Any:
    """Import pyacts or explain how to get it.

    Raises:
        ActsUnavailable: ``acts`` cannot be imported.
    """
    try:
        import acts
        import acts.examples
        import acts.examples.reconstruction
    except ImportError as exc:
        raise ActsUnavailable(
            "this benchmark needs pyacts 48.1.0 (module 'acts'); install the sim extra: "
            "pip install -e '.[sim]'"
        ) from exc
    return acts


def _acts_version(acts: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyacts")
    except PackageNotFoundError:  # a source build of ACTS
        return f"{acts.version.major}.{acts.version.minor}.{acts.version.patch}"


def select_events(input_dir: str | Path, max_events: int | None) -> list[EventSource]:
    """The first ``max_events`` events of ``input_dir`` (ascending id) that have a measurements file.

    The same slice that :func:`producer.validate.validate` takes with ``max_events``.

    Raises:
        ValueError: no event has a measurements file.
    """
    sources = discover(input_dir)[:max_events]
    missing = [s.event_id for s in sources if "measurements" not in s.truth]
    if missing:
        raise ValueError(f"{input_dir}: no measurements file for event(s) {missing[:10]}")
    if not sources:
        raise ValueError(f"{input_dir}: no events")
    return sources


# --- the ACTS sequence --------------------------------------------------------------------------


def _make_python_elements(acts: Any) -> tuple[type, type, type]:
    """Define the Python sequence elements (their base classes only exist once acts is imported)."""
    examples = acts.examples

    class MeasurementReader(examples.IReader):  # type: ignore[misc]
        """Puts OUR measurements, in file order, into an ACTS MeasurementContainer.

        Container index == file row == measurement_id (checked), so source-link indices are truth ids.
        """

        def __init__(self, sources: Sequence[EventSource], shared: dict[int, TruthMeasurements], level: Any):
            examples.IReader.__init__(self, "TrackfleetMeasurementReader", level)
            self.sources = list(sources)
            self.shared = shared
            self.out = examples.WriteDataHandle(self, examples.MeasurementContainer, "OutputMeasurements")
            self.out.initialize("measurements")
            self._geo_ids: dict[int, Any] = {}

        def availableEvents(self) -> tuple[int, int]:  # ACTS' name
            return (0, len(self.sources))

        def _geometry_id(self, value: int) -> Any:
            gid = self._geo_ids.get(value)
            if gid is None:
                gid = self._geo_ids[value] = acts.GeometryIdentifier(value)
            return gid

        def read(self, context: Any) -> Any:
            source = self.sources[context.eventNumber]
            m = read_measurements(source.truth["measurements"])
            if not np.array_equal(m.measurement_id, np.arange(m.size)):
                raise ValueError(f"{source.truth['measurements']}: measurement_id is not the row index")
            container = examples.MeasurementContainer()
            container.reserve(m.size)
            geo, key = m.geometry_id.tolist(), m.local_key.tolist()
            l0, l1, v0, v1 = (
                m.local0.tolist(),
                m.local1.tolist(),
                m.var_local0.tolist(),
                m.var_local1.tolist(),
            )
            for i in range(m.size):
                gid = self._geometry_id(geo[i])
                if key[i] & _KEY_LOC1:
                    container.emplaceMeasurement(gid, [0, 1], [l0[i], l1[i]], [v0[i], v1[i]])
                else:  # long strips: loc0 only
                    container.emplaceMeasurement(gid, [0], [l0[i]], [v0[i]])
            self.shared[context.eventNumber] = m
            self.out(context, container)
            return examples.ProcessCode.SUCCESS

    class MeasurementSubsetMaker(examples.IAlgorithm):  # type: ignore[misc]
        """Makes the ``measurement_subset`` (all measurements, ordered by geometry id) that spacepoint
        making and the CKF read.

        A separate algorithm because a subset points into its container: it has to be built from the
        container the whiteboard owns (the reader's Python object is disowned when it is stored).
        """

        def __init__(self, shared: dict[int, TruthMeasurements], level: Any):
            examples.IAlgorithm.__init__(self, "TrackfleetMeasurementSubset", level)
            self.shared = shared
            self.inp = examples.ReadDataHandle(self, examples.MeasurementContainer, "InputMeasurements")
            self.inp.initialize("measurements")
            self.out = examples.WriteDataHandle(self, examples.MeasurementSubset, "OutputMeasurementSubset")
            self.out.initialize("measurement_subset")

        def execute(self, context: Any) -> Any:
            container = self.inp(context.eventStore)
            order = np.argsort(self.shared[context.eventNumber].geometry_id, kind="stable")
            self.out(context, examples.MeasurementSubset(container, order.tolist()))
            return examples.ProcessCode.SUCCESS

    class TrackCollector(examples.IAlgorithm):  # type: ignore[misc]
        """Converts the resolved ACTS tracks into trackfleet's Tracks and writes them."""

        def __init__(
            self,
            sources: Sequence[EventSource],
            shared: dict[int, TruthMeasurements],
            out_dir: Path,
            on_event: Callable[[dict[str, Any]], None],
            level: Any,
        ):
            examples.IAlgorithm.__init__(self, "TrackfleetTrackCollector", level)
            self.sources, self.shared, self.out_dir, self.on_event = list(sources), shared, out_dir, on_event
            self.ckf = examples.ReadDataHandle(self, examples.ConstTrackContainer, "InputCkfTracks")
            self.ckf.initialize("ckf_tracks")
            self.tracks = examples.ReadDataHandle(self, examples.ConstTrackContainer, "InputTracks")
            self.tracks.initialize("ambi_tracks")

        def execute(self, context: Any) -> Any:
            source = self.sources[context.eventNumber]
            m = self.shared.pop(context.eventNumber)
            tracks = _convert_tracks(examples, self.tracks(context.eventStore), m, source.event_id)
            write_tracks(self.out_dir, tracks)
            self.on_event(
                {
                    "index": context.eventNumber,
                    "event_id": source.event_id,
                    "measurements": m.size,
                    "ckf_tracks": len(self.ckf(context.eventStore)),
                    "tracks": tracks.size,
                }
            )
            return examples.ProcessCode.SUCCESS

    return MeasurementReader, MeasurementSubsetMaker, TrackCollector


def _convert_tracks(examples: Any, container: Any, m: TruthMeasurements, event_id: int) -> Tracks:
    """ACTS tracks -> :class:`Tracks`, measurement rows inside out with our truth ids.

    Raises:
        RuntimeError: a track state's source link does not point at the same module and local
            position as our measurement of that id (the container-index == measurement_id premise).
    """
    params_all, cov_all = np.asarray(container.parameters), np.asarray(container.covariance)
    chi2_all, ndf_all, holes_all = container.chi2, container.ndf, container.nHoles
    n = len(container)
    params, cov = np.zeros((n, 5)), np.zeros((n, 5, 5))
    chi2, ndf, holes = np.zeros(n), np.zeros(n, np.int32), np.zeros(n, np.int32)
    offsets = np.zeros(n + 1, np.int64)
    ids: list[int] = []
    dims: list[int] = []
    calibrated: list[float] = []
    for k, track in enumerate(container):
        if not track.hasReferenceSurface:
            raise RuntimeError(f"event {event_id}: ACTS track {track.index} has no perigee parameters")
        j = track.index
        params[k], cov[k] = params_all[j, :5], cov_all[j, :5, :5]
        chi2[k], ndf[k], holes[k] = chi2_all[j], ndf_all[j], holes_all[j]
        # trackStatesReversed walks from the tip (outermost state) to the stem: reverse it.
        states = []
        for state in track.trackStatesReversed:
            flags = state.typeFlags
            if flags.hasMeasurement and not flags.isOutlier:
                link = examples.IndexSourceLink.fromSourceLink(state.uncalibratedSourceLink)
                states.append((link.index(), link.geometryId().value, state.effectiveCalibrated))
        for index, geo, values in reversed(states):
            if index >= m.size or geo != int(m.geometry_id[index]):
                raise RuntimeError(f"event {event_id}: source link {index} is not on module {geo}")
            ids.append(index)
            dims.append(len(values))
            calibrated.append(values[0])
        offsets[k + 1] = len(ids)
    idx = np.asarray(ids, np.int64)
    if idx.size and not np.allclose(np.asarray(calibrated), m.local0[idx], rtol=0, atol=1e-6):
        raise RuntimeError(f"event {event_id}: ACTS calibrated loc0 differs from our measurements file")
    return Tracks(
        params=params,
        cov=cov,
        chi2=chi2,
        ndf=ndf,
        n_holes=holes,
        meas_offsets=offsets,
        meas_geometry_id=m.geometry_id[idx].astype(np.uint64),
        meas_local0=m.local0[idx],
        meas_local1=m.local1[idx],
        meas_dimension=np.asarray(dims, np.int8),
        meas_truth_id=m.measurement_id[idx].astype(np.int64),
        event_id=event_id,
    )


def _build_sequence(
    acts: Any,
    sequencer: Any,
    cfg: ActsRecoConfig,
    sources: Sequence[EventSource],
    tracks_dir: Path,
    on_event: Callable[[dict[str, Any]], None],
    level: Any,
) -> tuple[dict[str, list[Any]], tuple[Any, ...]]:
    """Add every element to ``sequencer``.

    Returns:
        stage -> its elements (for the timing), and the detector objects the elements refer to
        (the caller keeps them alive while the sequencer runs).
    """
    from acts.examples.reconstruction import (
        SeedFilterConfigArg,
        SeedFinderConfigArg,
        SeedFinderOptionsArg,
        SeedingAlgorithmConfigArg,
        SpacePointGridConfigArg,
        addGridTripletSeeding,
    )

    examples = acts.examples
    u = acts.UnitConstants
    detector_cfg = examples.GenericDetector.Config()
    for name in ("logLevel", "layerLogLevel", "surfaceLogLevel", "volumeLogLevel"):
        setattr(detector_cfg, name, level)
    detector = examples.GenericDetector(detector_cfg)
    geometry = detector.trackingGeometry()
    field = acts.ConstantBField(acts.Vector3(0.0, 0.0, cfg.bfield_t * u.T))

    reader_cls, subset_cls, collector_cls = _make_python_elements(acts)
    shared: dict[int, TruthMeasurements] = {}
    reader = reader_cls(sources, shared, level)
    sequencer.addReader(reader)
    subset = subset_cls(shared, level)
    sequencer.addAlgorithm(subset)

    spacepoints = examples.SpacePointMaker(
        level=level,
        inputMeasurements="measurement_subset",
        outputSpacePoints="spacepoints",
        trackingGeometry=geometry,
        geometrySelection=[
            acts.GeometryIdentifier(volume=v, layer=layer) if layer else acts.GeometryIdentifier(volume=v)
            for v, layer in cfg.spacepoint_selection
        ],
    )
    sequencer.addAlgorithm(spacepoints)

    seeds = addGridTripletSeeding(
        sequencer,
        spacepoints.config.outputSpacePoints,
        SeedingAlgorithmConfigArg(),
        SeedFinderConfigArg(
            minPt=cfg.seed_min_pt_gev * u.GeV,
            cotThetaMax=cfg.seed_cot_theta_max,
            impactMax=cfg.seed_impact_max_mm * u.mm,
            maxSeedsPerSpM=cfg.seed_max_per_middle_sp,
            deltaR=(cfg.seed_delta_r_mm[0] * u.mm, cfg.seed_delta_r_mm[1] * u.mm),
            collisionRegion=(-cfg.seed_collision_region_mm * u.mm, cfg.seed_collision_region_mm * u.mm),
        ),
        SeedFinderOptionsArg(bFieldInZ=cfg.bfield_t * u.T),
        SeedFilterConfigArg(),
        SpacePointGridConfigArg(),
        level,
        outputSeeds="seeds",
    )
    s = cfg.initial_sigmas
    estimation = examples.TrackParamsEstimationAlgorithm(
        level=level,
        inputSeeds=seeds,
        outputTrackParameters="estimatedparameters",
        outputSeeds="estimatedseeds",
        trackingGeometry=geometry,
        magneticField=field,
        initialSigmas=[s[0] * u.mm, s[1] * u.mm, s[2], s[3], s[4] * u.e / u.GeV, s[5] * u.ns],
        initialSigmaQoverPt=cfg.initial_sigma_qopt * u.e / u.GeV,
        initialSigmaPtRel=cfg.initial_sigma_pt_rel,
        initialVarInflation=[1.0] * 6,
    )
    sequencer.addAlgorithm(estimation)

    selector = acts.TrackSelector.Config(
        ptMin=cfg.sel_min_pt_gev * u.GeV,
        absEtaMax=cfg.sel_max_abs_eta,
        loc0Min=-cfg.sel_max_abs_d0_mm * u.mm,
        loc0Max=cfg.sel_max_abs_d0_mm * u.mm,
        minMeasurements=cfg.sel_min_measurements,
        maxHoles=cfg.sel_max_holes,
        maxOutliers=cfg.sel_max_outliers,
    )
    ckf = examples.TrackFindingAlgorithm(
        level=level,
        measurementSelectorCfg=acts.MeasurementSelector.Config(
            [
                (
                    acts.GeometryIdentifier(),
                    (
                        [],
                        [cfg.ckf_chi2_measurement],
                        [cfg.ckf_chi2_outlier],
                        [cfg.ckf_branches_per_surface],
                    ),
                )
            ]
        ),
        inputMeasurements="measurement_subset",
        inputInitialTrackParameters="estimatedparameters",
        inputSeeds="estimatedseeds",
        outputTracks="ckf_tracks",
        findTracks=examples.TrackFindingAlgorithm.makeTrackFinderFunction(geometry, field, level),
        findTracksBrem=examples.TrackFindingAlgorithm.makeBremTrackFinderFunction(geometry, field, level),
        trackingGeometry=geometry,
        magneticField=field,
        trackSelectorCfg=selector,
        twoWay=cfg.ckf_two_way,
        seedDeduplication=cfg.ckf_seed_deduplication,
        stayOnSeed=cfg.ckf_stay_on_seed,
    )
    sequencer.addAlgorithm(ckf)

    ambiguity = examples.GreedyAmbiguityResolutionAlgorithm(
        level=level,
        inputTracks="ckf_tracks",
        outputTracks="ambi_tracks",
        maximumSharedHits=cfg.ambi_max_shared,
        nMeasurementsMin=cfg.ambi_min_measurements,
        maximumIterations=cfg.ambi_max_iterations,
    )
    sequencer.addAlgorithm(ambiguity)

    collector = collector_cls(sources, shared, tracks_dir, on_event, level)
    sequencer.addAlgorithm(collector)
    stages = {
        "read": [reader, subset],
        "spacepoints": [spacepoints],
        # addGridTripletSeeding returns the key only; its algorithm is named after its class.
        "seeding": ["GridTripletSeedingAlgorithm", estimation],
        "ckf": [ckf],
        "ambiguity": [ambiguity],
        "extract": [collector],
    }
    return stages, (detector, geometry, field)


#: Stages that make up ACTS' reconstruction time (reading our CSV and extracting tracks excluded).
RECO_STAGES = ("spacepoints", "seeding", "ckf", "ambiguity")


def _read_timing(path: Path, stages: dict[str, list[Any]], n_events: int) -> dict[str, Any]:
    """Per-stage seconds per event from the sequencer's ``timing.csv``."""
    with path.open(newline="") as fh:
        rows = {r["identifier"]: float(r["time_total_s"]) for r in csv.DictReader(fh)}
    per_element = {k.split(":", 1)[-1]: v / n_events for k, v in rows.items()}
    per_stage: dict[str, float] = {}
    for stage, elements in stages.items():
        names = [e if isinstance(e, str) else e.name() for e in elements]
        missing = [n for n in names if n not in per_element]
        if missing:
            raise RuntimeError(f"{path}: no timing for {missing} (have {sorted(per_element)})")
        per_stage[stage] = sum(per_element[n] for n in names)
    reco = sum(per_stage[s] for s in RECO_STAGES)
    return {
        "seconds_per_event": reco,
        "total_seconds_per_event": sum(per_element.values()),
        "stages_seconds_per_event": per_stage,
        "elements_seconds_per_event": per_element,
        "reco_stages": list(RECO_STAGES),
        "source": str(path),
    }


def _print_event(total: int, start: list[float]) -> Callable[[dict[str, Any]], None]:
    """A per-event progress line on stderr; the time is the wall time since the previous event."""

    def report(info: dict[str, Any]) -> None:
        now = time.perf_counter()
        elapsed, start[0] = now - start[0], now
        sys.stderr.write(
            f"acts: event {info['index'] + 1}/{total} (#{info['event_id']}): {info['measurements']} "
            f"measurements, {info['ckf_tracks']} CKF tracks -> {info['tracks']} after ambiguity "
            f"resolution, {elapsed:.2f} s\n"
        )
        sys.stderr.flush()

    return report


def run_acts(
    input_dir: str | Path,
    output_dir: str | Path,
    max_events: int | None = None,
    threads: int = 1,
    cfg: ActsRecoConfig | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Reconstruct the events with ACTS and write the tracks to ``output_dir/acts``.

    Parameters:
        input_dir: event directory with our measurements files.
        output_dir: receives ``acts/`` (tracks + timing.json) and the sequencer's ``timing.csv``.
        max_events: the first this many events (ascending id); all by default.
        threads: ACTS sequencer threads (1: the reference timing).
        cfg: reconstruction settings (defaults: :class:`ActsRecoConfig`).
        on_event: called after each event with a dict (index, event_id, measurements, ckf_tracks,
            tracks); default: a progress line on stderr.

    Returns:
        ``events`` (ids), ``tracks_dir``, ``n_tracks`` (per event), ``timing`` (see
        :func:`_read_timing`, plus ``wall_seconds``), ``config``, ``acts_version``, ``threads``.

    Raises:
        ActsUnavailable: pyacts is not installed.
        ValueError: no usable events.
    """
    acts = import_acts()
    cfg = cfg or ActsRecoConfig()
    sources = select_events(input_dir, max_events)
    out = Path(output_dir)
    tracks_dir = out / ACTS_SUBDIR
    tracks_dir.mkdir(parents=True, exist_ok=True)
    level = acts.logging.INFO if log.isEnabledFor(logging.DEBUG) else acts.logging.WARNING

    per_event: list[dict[str, Any]] = []
    start = [time.perf_counter()]
    report = on_event or _print_event(len(sources), start)

    def record(info: dict[str, Any]) -> None:
        per_event.append(info)
        report(info)

    sequencer = acts.examples.Sequencer(
        events=len(sources),
        numThreads=threads,
        trackFpes=False,
        logLevel=level,
        outputDir=str(out),
    )
    stages, keepalive = _build_sequence(acts, sequencer, cfg, sources, tracks_dir, record, level)
    t0 = time.perf_counter()
    start[0] = t0
    sequencer.run()
    wall = time.perf_counter() - t0
    del keepalive

    timing = _read_timing(out / "timing.csv", stages, len(sources))
    timing["wall_seconds"] = wall
    # With several threads the per-element times overlap; wall / events is then the throughput.
    timing["wall_seconds_per_event"] = wall / len(sources)
    timing["threads"] = threads
    timing["events"] = len(sources)
    (tracks_dir / TIMING_JSON).write_text(json.dumps(timing, indent=2) + "\n")
    per_event.sort(key=lambda e: e["index"])
    return {
        "events": [s.event_id for s in sources],
        "tracks_dir": str(tracks_dir),
        "n_tracks": [e["tracks"] for e in per_event],
        "n_ckf_tracks": [e["ckf_tracks"] for e in per_event],
        "timing": timing,
        "config": asdict(cfg),
        "acts_version": _acts_version(acts),
        "threads": threads,
    }


# --- scoring and the table ----------------------------------------------------------------------

#: validate() keys shown in the table and copied into the summary.
METRICS = ("efficiency", "fake_rate", "duplicate_rate")


def _validate(input_dir: str | Path, tracks_dir: str | Path, n_events: int) -> dict[str, Any]:
    """producer.validate.validate on the first ``n_events`` events.

    Raises:
        SystemExit: producer.validate is not importable (it is the one place metrics are defined).
    """
    try:
        from producer.validate import validate
    except ImportError as exc:
        raise SystemExit(
            f"producer.validate is not importable ({exc}); the tracks are written to {tracks_dir}, "
            "score them with `trackfleet validate` once it exists"
        ) from exc
    return validate(input_dir, tracks_dir, max_events=n_events)


def _trackfleet_seconds(tracks_dir: Path) -> float | None:
    path = tracks_dir / TIMING_JSON
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("seconds_per_event")
    return float(value) if isinstance(value, int | float) else None


def _summary(result: dict[str, Any], seconds: float | None, n_events: int) -> dict[str, Any]:
    n_tracks = result.get("n_tracks")
    return {
        **{k: result.get(k) for k in METRICS},
        "fake_rate_selected": result.get("fake_rate_selected"),
        "n_selected_particles": result.get("n_selected_particles"),
        "n_tracks": n_tracks,
        "tracks_per_event": None if n_tracks is None else n_tracks / n_events,
        "seconds_per_event": seconds,
    }


def format_table(columns: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table: one column per reconstruction."""

    def pct(x: Any) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    def num(x: Any, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [
        ("efficiency", lambda c: pct(c["efficiency"])),
        ("fake rate", lambda c: pct(c["fake_rate"])),
        ("duplicate rate", lambda c: pct(c["duplicate_rate"])),
        ("tracks / event", lambda c: num(c["tracks_per_event"], ".1f")),
        ("time / event [s]", lambda c: num(c["seconds_per_event"], ".3f")),
    ]
    names = list(columns)
    width = max(16, *(len(n) for n in names))
    lines = [f"{'':<18}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for label, fmt in rows:
        lines.append(f"{label:<18}" + "".join(f"{fmt(columns[n]):>{width + 2}}" for n in names))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run ACTS' CPU reconstruction (seeding, CKF, greedy ambiguity resolution) on the "
        "events and print its performance beside trackfleet's."
    )
    p.add_argument("--input", required=True, type=Path, help="event directory (our measurements + truth)")
    p.add_argument("--output", required=True, type=Path, help="output directory (ACTS tracks in acts/)")
    p.add_argument("--events", type=int, default=None, help="the first N events (default: all)")
    p.add_argument("--trackfleet-tracks", type=Path, default=None, help="trackfleet's tracks to compare")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="ACTS sequencer threads (default 1)")
    p.add_argument(
        "--seed-selection",
        choices=sorted(SPACEPOINT_SELECTIONS),
        default="pixel",
        help="seeding spacepoints: every pixel layer (default) or the layers of ACTS' generic example",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="ACTS INFO logging")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if args.events is not None and args.events < 1:
        p.error("--events must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")

    try:
        cfg = ActsRecoConfig(spacepoint_selection=SPACEPOINT_SELECTIONS[args.seed_selection])
        acts_run = run_acts(args.input, args.output, args.events, args.threads, cfg)
    except (ActsUnavailable, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    n_events = len(acts_run["events"])
    timing = acts_run["timing"]
    sys.stderr.write(
        f"acts: {n_events} events, reconstruction {timing['seconds_per_event']:.3f} s/event "
        f"(total with I/O {timing['total_seconds_per_event']:.3f} s/event, wall "
        f"{timing['wall_seconds_per_event']:.3f} s/event, {args.threads} thread(s))\n"
    )

    acts_result = _validate(args.input, acts_run["tracks_dir"], n_events)
    columns = {
        f"ACTS {acts_run['acts_version']}": _summary(acts_result, timing["seconds_per_event"], n_events)
    }
    report: dict[str, Any] = {
        "input": str(args.input),
        "events": acts_run["events"],
        "n_events": n_events,
        "acts": {
            **acts_run,
            "seed_selection": args.seed_selection,
            "summary": columns[next(iter(columns))],
            "validation": acts_result,
        },
        "trackfleet": None,
    }
    if args.trackfleet_tracks is not None:
        tf_result = _validate(args.input, args.trackfleet_tracks, n_events)
        seconds = _trackfleet_seconds(args.trackfleet_tracks)
        columns["trackfleet"] = _summary(tf_result, seconds, n_events)
        report["trackfleet"] = {
            "tracks_dir": str(args.trackfleet_tracks),
            "summary": columns["trackfleet"],
            "validation": tf_result,
        }

    sys.stdout.write(
        f"{args.input}: {n_events} events; efficiency over particles with pT > "
        f"{acts_result['cuts']['min_pt_gev']} GeV, |eta| < {acts_result['cuts']['max_abs_eta']}, "
        f">= {acts_result['cuts']['min_measurements']} measurements; ACTS time = spacepoints + "
        f"seeding + CKF + ambiguity resolution, {args.threads} thread(s)\n"
    )
    sys.stdout.write(format_table(columns) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
