"""The reconstruction chain: cells -> clusters -> measurements -> spacepoints -> seeds -> track
parameters -> combinatorial Kalman filter -> ambiguity resolution -> Kalman fit -> tracks.

:class:`Chain` holds what is prepared once per process (the detector on the device, lookup grids,
compiled kernels) — traccc's ``initialize()`` — and runs the pure stage functions on a batch of
events: every stage sees the whole batch at once, events told apart by an event index, so a batch
pays the per-launch overheads once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from kernels.ambiguity import AmbiguityConfig, resolve
from kernels.ckf import FindingConfig, TrackCandidates, find_tracks, finding_geometry
from kernels.clusterization import ClusteringConfig, clusterize
from kernels.detector import Detector
from kernels.edm.cells import Cells
from kernels.edm.measurements import Measurements, Spacepoints
from kernels.edm.seeds import BoundParameters, Seeds
from kernels.edm.tracks import Tracks
from kernels.errors import ConfigError, DetectorMismatchError, EventFormatError
from kernels.fitting import FittingConfig, fit_tracks
from kernels.measurement_creation import create_measurements
from kernels.measurement_errors import MeasurementErrorConfig, measurement_variances
from kernels.navigation import NavigationConfig, build_navigation
from kernels.seeding import SeedingConfig, find_seeds, seeding_geometry
from kernels.segments import expand_ranges
from kernels.spacepoint_formation import form_spacepoints
from kernels.track_params import TrackParamsConfig, estimate_parameters
from kernels.xp import backend_name, repeat_index, to_host_many

FRONT_STAGES = ("clusterization", "measurements", "spacepoints", "seeding", "track_params")
BACK_STAGES = ("finding", "ambiguity", "fitting")
STAGES = FRONT_STAGES + BACK_STAGES


@dataclass(frozen=True)
class ChainConfig:
    """Configuration of the whole chain; each stage's config documents its fields and units.

    Attributes:
        last_stage: run the chain up to and including this stage (default: all of it).
    """

    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    seeding: SeedingConfig = field(default_factory=SeedingConfig)
    track_params: TrackParamsConfig = field(default_factory=TrackParamsConfig)
    navigation: NavigationConfig = field(default_factory=NavigationConfig)
    finding: FindingConfig = field(default_factory=FindingConfig)
    ambiguity: AmbiguityConfig = field(default_factory=AmbiguityConfig)
    fitting: FittingConfig = field(default_factory=FittingConfig)
    measurement_errors: MeasurementErrorConfig = field(default_factory=MeasurementErrorConfig)
    last_stage: str = STAGES[-1]

    def __post_init__(self) -> None:
        if self.last_stage not in STAGES:
            raise ConfigError(f"unknown stage {self.last_stage!r}; stages are {', '.join(STAGES)}")

    def runs(self, stage: str) -> bool:
        return STAGES.index(stage) <= STAGES.index(self.last_stage)


@dataclass
class FrontResult:
    """What the first half of the chain produced for a batch (all arrays in the chain's namespace)."""

    event_ids: list[int]
    measurements: Measurements | None = None
    spacepoints: Spacepoints | None = None
    seeds: Seeds | None = None
    params: BoundParameters | None = None


class Chain:
    """A warm reconstruction chain for one detector on one device.

    Args:
        xp: numpy or cupy.
        detector: the detector (host arrays; moved to ``xp`` here, once).
        config: chain configuration.
    """

    def __init__(self, xp: ModuleType, detector: Detector, config: ChainConfig | None = None) -> None:
        self.xp = xp
        self.backend = backend_name(xp)
        self.config = config or ChainConfig()
        self.detector_host = detector
        self.detector = detector.to(xp)
        self.fingerprint = detector.fingerprint()
        self.seeding_geometry = seeding_geometry(xp, detector)
        self.finding_geometry = finding_geometry(
            xp, detector, build_navigation(detector, self.config.navigation), self.config.finding
        )

    def _sync(self) -> None:
        if self.backend == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def _concat(self, events: list[Cells]) -> tuple:
        """Batch columns in the chain's namespace, with module index and event index per cell."""
        xp, det = self.xp, self.detector
        cells = [e.to(xp) for e in events]
        counts = [c.size for c in cells]
        cat = (
            (lambda name: xp.concatenate([getattr(c, name) for c in cells]))
            if len(cells) > 1
            else (lambda name: getattr(cells[0], name))
        )
        g, c0, c1, act = cat("geometry_id"), cat("channel0"), cat("channel1"), cat("activation")
        truth = cat("measurement_id") if all(c.has_truth for c in cells) else None
        if len(cells) == 1:  # no index array to copy to the device
            event = xp.zeros(counts[0], dtype=xp.int32)
        else:
            event = repeat_index(xp, xp.asarray(np.array(counts, np.int64)), sum(counts)).astype(xp.int32)
        module = det.module_index(xp, g)
        if g.shape[0]:
            self._check_cells(events, event, g, module, c0, c1, act, cat("time"))
        return module, event, c0, c1, act, truth

    def _check_cells(
        self, events: list[Cells], event: Any, g: Any, module: Any, c0: Any, c1: Any, act: Any, time_ns: Any
    ) -> None:
        """Every cell on a module of the detector, inside its segmentation, with finite values: the
        fleet's check of what it reconstructs (the producer's reader and the gateway check only what
        they need to pack an event). One host wait for all checks; the error names the first bad cell.

        Raises:
            DetectorMismatchError: a cell on an unknown module or outside its module's bins.
            EventFormatError: a non-finite charge or time.
        """
        xp, det = self.xp, self.detector
        bins = det.seg_bins[xp.maximum(module, 0)]
        outside = (module < 0) | (c0 < 0) | (c1 < 0) | (c0 >= bins[:, 0]) | (c1 >= bins[:, 1])
        not_finite = ~(xp.isfinite(act) & xp.isfinite(time_ns))
        if not bool((outside | not_finite).any()):
            return
        for bad, error in ((outside, DetectorMismatchError), (not_finite, EventFormatError)):
            if bool(bad.any()):
                k = int(xp.nonzero(bad)[0][0])
                what = (
                    f"does not fit detector {self.fingerprint}"
                    if error is DetectorMismatchError
                    else f"has a value that is not finite (value {float(act[k])}, time {float(time_ns[k])} ns)"
                )
                raise error(
                    f"event {events[int(event[k])].event_id}: cell with geometry_id {int(g[k])}, "
                    f"channels ({int(c0[k])}, {int(c1[k])}) {what}"
                )

    def run_front(self, events: list[Cells], timings: dict[str, float]) -> FrontResult:
        """The first half of the chain on a batch; adds each stage's wall time [s] to ``timings``."""
        xp, det, cfg = self.xp, self.detector, self.config
        result = FrontResult(event_ids=[e.event_id for e in events])

        def stamp(stage: str, t0: float) -> float:
            self._sync()
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - t0
            return now

        t = time.perf_counter()
        module, event, c0, c1, act, truth = self._concat(events)
        # clusters never span events: the module key folds the event index in
        module_key = event.astype(xp.int64) * det.n_modules + module
        cluster, n_clusters = clusterize(xp, module_key, c0, c1, cfg.clustering)
        t = stamp("clusterization", t)
        if not cfg.runs("measurements"):
            return result
        result.measurements = create_measurements(
            xp, det, module, event, c0, c1, act, cluster, n_clusters, truth
        )
        t = stamp("measurements", t)
        if not cfg.runs("spacepoints"):
            return result
        result.spacepoints = form_spacepoints(xp, det, result.measurements)
        t = stamp("spacepoints", t)
        if not cfg.runs("seeding"):
            return result
        result.seeds = find_seeds(xp, result.spacepoints, self.seeding_geometry, cfg.seeding, det.bfield_t)
        t = stamp("seeding", t)
        if not cfg.runs("track_params"):
            return result
        result.params = estimate_parameters(
            xp, result.spacepoints, result.measurements, result.seeds, cfg.track_params, det.bfield_t
        )
        stamp("track_params", t)
        return result

    def reconstruct(self, cells: Cells) -> tuple[Tracks, dict[str, float]]:
        """Tracks of one event and the wall time of each stage [s]."""
        return self.reconstruct_batch([cells])[0]

    def run_back(self, front: FrontResult, timings: dict[str, float]) -> list[Tracks]:
        """The second half of the chain on the batch's seeds; tracks per event (host arrays)."""
        xp, det, cfg = self.xp, self.detector, self.config
        n_events = len(front.event_ids)
        if (
            not cfg.runs("finding")
            or front.params is None
            or front.measurements is None
            or front.seeds is None
            or front.spacepoints is None
        ):
            return [Tracks.empty(e) for e in front.event_ids]

        def stamp(stage: str, t0: float) -> float:
            self._sync()
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - t0
            return now

        t = time.perf_counter()
        meas = front.measurements
        variances = measurement_variances(xp, det, meas, cfg.measurement_errors)
        cands = find_tracks(
            xp,
            det,
            self.finding_geometry,
            meas,
            front.spacepoints,
            front.seeds,
            front.params,
            variances,
            cfg.finding,
        )
        t = stamp("finding", t)
        if not cfg.runs("ambiguity"):
            sel = xp.arange(cands.size, dtype=xp.int64)
            return self._to_tracks(front, cands, sel, cands.offsets, cands.measurements, None, n_events)
        keep = resolve(xp, cands.offsets, cands.measurements, cands.chi2, meas.size, cfg.ambiguity)
        t = stamp("ambiguity", t)
        # the kept candidates, their measurements in CSR order: what the fit and the output both take
        sel = xp.nonzero(keep)[0]
        offsets, rows = _subset_csr(xp, cands.offsets, sel)
        measurements = cands.measurements[rows]
        if not cfg.runs("fitting"):
            return self._to_tracks(front, cands, sel, offsets, measurements, None, n_events)
        seed_rows = cands.seed[sel]
        fit = fit_tracks(
            xp,
            det,
            self.finding_geometry.material,
            meas,
            offsets,
            measurements,
            front.params.params[seed_rows],
            front.params.cov[seed_rows],
            variances,
            cfg.fitting,
        )
        stamp("fitting", t)
        return self._to_tracks(front, cands, sel, offsets, measurements, fit, n_events)

    def _to_tracks(
        self, front: FrontResult, cands: TrackCandidates, sel, offsets, mi, fit, n_events: int
    ) -> list[Tracks]:
        """Split the batch's tracks by event (host arrays).

        Args:
            sel: the candidates that make tracks; offsets, mi: their measurements (CSR).
            fit: their fit, or None (the last filtered states are reported).
        """
        xp = self.xp
        meas = front.measurements
        assert meas is not None
        if fit is not None:
            params, cov, chi2, ndf = fit.params, fit.cov, fit.chi2, fit.ndf
            good = fit.ok
        else:
            # unfitted candidates: report the last filtered state as it is (bound, not perigee)
            params, cov, chi2 = cands.params[sel], cands.cov[sel], cands.chi2[sel]
            ndf = (offsets[1:] - offsets[:-1]).astype(xp.int32) * 2 - 5
            good = xp.ones(sel.shape[0], dtype=bool)
        host = {
            "event": cands.event[sel],
            "params": params,
            "cov": cov,
            "chi2": chi2,
            "ndf": ndf,
            "holes": cands.n_holes[sel],
            "good": good,
            "offsets": offsets,
            "geometry_id": self.detector.geometry_id[meas.module[mi]],
            "local0": meas.local0[mi],
            "local1": meas.local1[mi],
            "dimension": meas.dimension[mi],
            "truth": meas.truth_id[mi],
        }
        # one wait for all the copies, not one per array
        h = dict(zip(host, to_host_many(list(host.values())), strict=True))
        out = []
        for i, event_id in enumerate(front.event_ids):
            tr = np.flatnonzero((h["event"] == i) & h["good"])
            off, mrows = _subset_csr(np, h["offsets"], tr)
            out.append(
                Tracks(
                    params=h["params"][tr],
                    cov=h["cov"][tr],
                    chi2=h["chi2"][tr].astype(np.float64),
                    ndf=h["ndf"][tr].astype(np.int32),
                    n_holes=h["holes"][tr].astype(np.int32),
                    meas_offsets=off,
                    meas_geometry_id=h["geometry_id"][mrows].astype(np.uint64),
                    meas_local0=h["local0"][mrows],
                    meas_local1=h["local1"][mrows],
                    meas_dimension=h["dimension"][mrows].astype(np.int8),
                    meas_truth_id=h["truth"][mrows],
                    event_id=event_id,
                )
            )
        return out

    def reconstruct_batch(self, events: list[Cells]) -> list[tuple[Tracks, dict[str, float]]]:
        """Reconstruct several events in one pass; per event its tracks and the batch's stage times [s]."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        front = self.run_front(events, timings)
        tracks = self.run_back(front, timings)
        self._sync()
        timings["total"] = time.perf_counter() - t0
        return [(t, dict(timings)) for t in tracks]


def _subset_csr(xp: ModuleType, offsets, rows):
    """CSR offsets of the selected rows and the item indices they cover."""
    length = (offsets[1:] - offsets[:-1])[rows]
    new = xp.zeros(rows.shape[0] + 1, dtype=xp.int64)
    new[1:] = xp.cumsum(length)
    _, items = expand_ranges(xp, offsets[:-1][rows], length)
    return new, items
