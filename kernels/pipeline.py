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

import numpy as np

from kernels.clusterization import ClusteringConfig, clusterize
from kernels.detector import Detector
from kernels.edm.cells import Cells
from kernels.edm.measurements import Measurements, Spacepoints
from kernels.edm.seeds import BoundParameters, Seeds
from kernels.edm.tracks import Tracks
from kernels.errors import ConfigError, DetectorMismatchError
from kernels.measurement_creation import create_measurements
from kernels.seeding import SeedingConfig, find_seeds, seeding_geometry
from kernels.spacepoint_formation import form_spacepoints
from kernels.track_params import TrackParamsConfig, estimate_parameters
from kernels.xp import backend_name

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
        event = xp.repeat(xp.arange(len(cells), dtype=xp.int32), xp.asarray(np.array(counts, np.int64)))
        module = det.module_index(xp, g)
        if g.shape[0]:
            bad = module < 0
            bins = det.seg_bins[xp.maximum(module, 0)]
            bad |= (c0 < 0) | (c1 < 0) | (c0 >= bins[:, 0]) | (c1 >= bins[:, 1])
            if bool(bad.any()):
                k = int(xp.nonzero(bad)[0][0])
                ev = events[int(event[k])].event_id
                raise DetectorMismatchError(
                    f"event {ev}: cell with geometry_id {int(g[k])}, channels ({int(c0[k])}, {int(c1[k])}) "
                    f"does not fit detector {self.fingerprint}"
                )
        return module, event, c0, c1, act, truth

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

    def reconstruct_batch(self, events: list[Cells]) -> list[tuple[Tracks, dict[str, float]]]:
        """Reconstruct several events in one pass; per event its tracks and the batch's stage times [s]."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.run_front(events, timings)
        self._sync()
        timings["total"] = time.perf_counter() - t0
        return [(Tracks.empty(e.event_id), dict(timings)) for e in events]
