"""``trackfleet validate``: tracking efficiency, fake and duplicate rates, resolutions and seeding
performance measured against simulation truth.

Inputs: an event directory with truth files (``--input``) and a directory with trackfleet's output
(``--tracks``): ``event<N>-tracks.csv`` + ``event<N>-track-measurements.csv`` and/or
``event<N>-seeds.csv``. A part whose files are absent for every event is reported as null.

Truth association and matching are in :mod:`producer.matching`. Definitions (counts are summed over
events before dividing; a ratio with a zero denominator is null):

- selected particle: ``|q| > 0`` (``charged_only``), pT > ``min_pt_gev``, ``|eta| < max_abs_eta`` and
  at least ``min_measurements`` measurements belonging to it (domain.md section 3: 1 GeV, 2.5, 7).
- ``efficiency`` = selected particles matched by >= 1 track / selected particles.
- ``fake_rate`` = tracks matched to no particle / all tracks (every track in the files, no cut).
  ``fake_rate_selected`` uses only tracks whose fitted parameters pass pT > ``min_pt_gev`` and
  ``|eta| < max_abs_eta`` (pT = sin(theta) / |q/p|, eta = -ln tan(theta/2)).
- ``duplicate_rate`` = matched tracks that are not their particle's primary track / matched tracks
  (all particles, selected or not; one primary per matched particle, see ``TrackMatch.duplicate``).
- resolution of parameter x over tracks matched to selected particles (duplicates included):
  residual = fitted - truth perigee (phi wrapped into [-pi, pi)); mean, std and ``width68`` (half the
  distance between the 15.87% and 84.13% quantiles). Pull = residual / sqrt(cov_xx), mean and std.
  q/pT = (q/p) / sin(theta) with var = J C J^T, J = d(q/pT)/d(theta, q/p) = (-(q/p) cos/sin^2, 1/sin).
- ``seeding_efficiency`` = selected particles with >= 1 seed whose three measurements all belong to
  them / selected particles.
- ``seeds_per_particle`` = seeds matched to selected particles / selected particles with >= 1 matched
  seed (the average multiplicity among seeded particles).
- ``fake_seed_fraction`` = seeds whose three measurements do not all belong to one particle / all seeds.
- seed resolution/pulls: seeds matched to selected particles; estimated q/pT, phi, theta against the
  particle's values at its production vertex; variances from ``var_qop``, ``var_theta``, ``var_phi``.
- ``efficiency_vs_pt`` (``_vs_eta``): particles passing every selection cut except the one on the
  binned variable, so the turn-on below the pT cut is visible; bins inside the cut sum to the totals.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from producer.io import seeds_csv
from producer.io.errors import InputError
from producer.io.events import EventSource, discover, load_truth
from producer.io.table import read_table
from producer.io.tracks_csv import read_tracks, tracks_paths
from producer.matching import match_seeds, match_tracks, measurement_truth, truth_perigee
from producer.progress import Progress

log = logging.getLogger(__name__)

#: pT bin edges [GeV] of ``efficiency_vs_pt``.
DEFAULT_PT_EDGES_GEV: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: pseudorapidity bin edges of ``efficiency_vs_eta``.
DEFAULT_ETA_EDGES: tuple[float, ...] = tuple(round(-3.0 + 0.25 * k, 2) for k in range(25))

TRACK_PARAMS = ("d0", "z0", "phi", "theta", "qop", "qopt")
SEED_PARAMS = ("qopt", "phi", "theta")
UNITS = {"d0": "mm", "z0": "mm", "phi": "rad", "theta": "rad", "qop": "e/GeV", "qopt": "e/GeV"}


@dataclass(frozen=True)
class SelectionCuts:
    """Which truth particles count, and the matching threshold.

    Attributes:
        min_pt_gev: particles need pT above this [GeV].
        max_abs_eta: and |eta| below this.
        min_measurements: and at least this many measurements belonging to them.
        charged_only: and a non-zero charge.
        match_fraction: purity and completeness threshold of the double-majority match (inclusive).
    """

    min_pt_gev: float = 1.0
    max_abs_eta: float = 2.5
    min_measurements: int = 7
    charged_only: bool = True
    match_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.match_fraction <= 1.0:
            raise ValueError(f"match_fraction must be in (0, 1], got {self.match_fraction}")
        if self.min_measurements < 0 or self.max_abs_eta <= 0 or self.min_pt_gev < 0:
            raise ValueError(f"invalid selection cuts {self}")


@dataclass
class Samples:
    """Per-object arrays pooled over events (the raw material of the summary and of plots).

    ``track_residual``/``track_pull``: parameter -> arrays for tracks matched to selected particles;
    ``seed_residual``/``seed_pull``: the same for seeds. ``particles``: per particle of every event
    pt [GeV], eta, the selection masks, and whether a track / seed matched it.
    """

    track_residual: dict[str, list[np.ndarray]] = field(default_factory=dict)
    track_pull: dict[str, list[np.ndarray]] = field(default_factory=dict)
    seed_residual: dict[str, list[np.ndarray]] = field(default_factory=dict)
    seed_pull: dict[str, list[np.ndarray]] = field(default_factory=dict)
    particles: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @staticmethod
    def add(target: dict[str, list[np.ndarray]], name: str, values: np.ndarray) -> None:
        target.setdefault(name, []).append(values)

    @staticmethod
    def pooled(source: dict[str, list[np.ndarray]], name: str) -> np.ndarray:
        parts = source.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)


def _num(x: float | None) -> float | None:
    """A JSON-safe number: None for None, NaN or infinity."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(a: int, b: int) -> float | None:
    return a / b if b > 0 else None


def _wrap(dphi: np.ndarray) -> np.ndarray:
    """Angle difference folded into [-pi, pi)."""
    return (dphi + np.pi) % (2 * np.pi) - np.pi


def _qopt(
    theta: np.ndarray, qop: np.ndarray, var_theta: np.ndarray, var_qop: np.ndarray, cov_tq: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q/pT [e/GeV] and its variance from (theta, q/p) with their covariance (first-order propagation)."""
    s, c = np.sin(theta), np.cos(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        j_theta = -qop * c / (s * s)
        j_qop = 1.0 / s
        var = j_theta * j_theta * var_theta + j_qop * j_qop * var_qop + 2 * j_theta * j_qop * cov_tq
        return qop / s, var


def _stats(x: np.ndarray, robust: bool) -> dict[str, Any]:
    """n, mean, std (and width68 when ``robust``) of the finite entries; numbers are null when n = 0."""
    x = x[np.isfinite(x)]
    out: dict[str, Any] = {"n": int(x.size)}
    out["mean"] = _num(x.mean()) if x.size else None
    out["std"] = _num(x.std()) if x.size else None
    if robust:
        if x.size:
            lo, hi = np.quantile(x, [0.158655, 0.841345])
            out["width68"] = _num(0.5 * (hi - lo))
        else:
            out["width68"] = None
    return out


def _binned(
    values: np.ndarray, population: np.ndarray, passed: np.ndarray, edges: tuple[float, ...], label: str
) -> dict[str, Any]:
    """Efficiency per bin of ``values`` over ``population`` (bool), counting ``passed`` (bool)."""
    e = np.asarray(edges, np.float64)
    v = values[population]
    n = np.histogram(v, bins=e)[0]
    k = np.histogram(v[passed[population]], bins=e)[0]
    eff = [_ratio(int(a), int(b)) for a, b in zip(k, n, strict=True)]
    err = [None if f is None else math.sqrt(f * (1 - f) / int(b)) for f, b in zip(eff, n, strict=True)]
    return {
        "variable": label,
        "edges": [float(x) for x in e],
        "n": [int(x) for x in n],
        "n_matched": [int(x) for x in k],
        "efficiency": eff,
        "uncertainty": err,
    }


def _has_tracks(tracks_dir: Path, event_id: int) -> bool:
    tpath, mpath = tracks_paths(tracks_dir, event_id)
    return (tpath.exists() and mpath.exists()) or (
        tpath.with_suffix(".csv.gz").exists() and mpath.with_suffix(".csv.gz").exists()
    )


def _seeds_file(tracks_dir: Path, event_id: int) -> Path | None:
    p = seeds_csv.seeds_path(tracks_dir, event_id)
    for cand in (p, p.with_suffix(".csv.gz")):
        if cand.exists():
            return cand
    return None


def _event(
    source: EventSource, tracks_dir: Path, cuts: SelectionCuts, bfield_t: float, samples: Samples
) -> dict[str, Any]:
    """Counts of one event (appending its per-object arrays to ``samples``)."""
    t0 = time.perf_counter()
    truth = load_truth(source)
    mt = measurement_truth(
        truth.measurements.measurement_id,
        truth.simhit_map.measurement_id,
        truth.simhit_map.hit_id,
        truth.hits.particle_id,
        truth.particles.particle_id,
    )
    parts = truth.particles
    n_parts = parts.size
    prow = mt.particle_index(parts.particle_id)  # particle row -> association index (always found)
    row_of = np.full(mt.particle_id.shape[0], -1, np.int64)
    row_of[prow] = np.arange(n_parts)
    nmeas = mt.n_measurements[prow]
    pt, eta = parts.pt, parts.eta
    base = nmeas >= cuts.min_measurements
    if cuts.charged_only:
        base &= parts.charge != 0
    pt_ok = pt > cuts.min_pt_gev
    with np.errstate(invalid="ignore"):
        eta_ok = np.abs(eta) < cuts.max_abs_eta
    selected = base & pt_ok & eta_ok
    n_sel = int(selected.sum())
    ev: dict[str, Any] = {
        "event_id": source.event_id,
        "n_particles": n_parts,
        "n_measurements": mt.measurement_id.shape[0],
        "n_selected_particles": n_sel,
    }
    Samples.add(samples.particles, "pt", pt)
    Samples.add(samples.particles, "eta", eta)
    Samples.add(samples.particles, "pop_pt", base & eta_ok)
    Samples.add(samples.particles, "pop_eta", base & pt_ok)

    found = np.zeros(n_parts, bool)  # matched by a track
    seeded = np.zeros(n_parts, bool)  # matched by a seed
    truth_params: np.ndarray | None = None

    def truth_rows(rows: np.ndarray) -> np.ndarray:
        nonlocal truth_params
        if truth_params is None:
            truth_params = truth_perigee(parts.vertex, parts.momentum, parts.charge, bfield_t)
        return truth_params[rows]

    if _has_tracks(tracks_dir, source.event_id):
        tr = read_tracks(tracks_dir, source.event_id).to_numpy()
        tm = match_tracks(
            tr.meas_offsets, mt.particle_of(tr.meas_truth_id), mt.n_measurements, cuts.match_fraction
        )
        matched = tm.matched
        trow = np.where(matched, row_of[np.maximum(tm.particle, 0)], -1)
        found[trow[trow >= 0]] = True
        theta, qop = tr.params[:, 3], tr.params[:, 4]
        with np.errstate(divide="ignore", invalid="ignore"):
            reco_pt = np.abs(np.sin(theta) / qop)
            reco_eta = -np.log(np.tan(0.5 * theta))
            reco_ok = (reco_pt > cuts.min_pt_gev) & (np.abs(reco_eta) < cuts.max_abs_eta)
        ev.update(
            n_tracks=tr.size,
            n_matched_tracks=int(matched.sum()),
            n_fake_tracks=int((~matched).sum()),
            n_duplicate_tracks=int(tm.duplicate.sum()),
            n_tracks_selected=int(reco_ok.sum()),
            n_fake_tracks_selected=int((reco_ok & ~matched).sum()),
            n_matched_selected_particles=int((found & selected).sum()),
        )
        use = np.flatnonzero(trow >= 0)
        use = use[selected[trow[use]]]
        if use.size:
            ref = truth_rows(trow[use])
            fit, cov = tr.params[use], tr.cov[use]
            var = np.diagonal(cov, axis1=1, axis2=2)
            res = fit - ref
            res[:, 2] = _wrap(res[:, 2])
            qopt, var_qopt = _qopt(fit[:, 3], fit[:, 4], var[:, 3], var[:, 4], cov[:, 3, 4])
            res_qopt = qopt - ref[:, 4] / np.sin(ref[:, 3])
            with np.errstate(divide="ignore", invalid="ignore"):
                sig = np.where(var > 0, np.sqrt(var), np.nan)
                sig_qopt = np.where(var_qopt > 0, np.sqrt(var_qopt), np.nan)
                for k, name in enumerate(TRACK_PARAMS[:5]):
                    Samples.add(samples.track_residual, name, res[:, k])
                    Samples.add(samples.track_pull, name, res[:, k] / sig[:, k])
                Samples.add(samples.track_residual, "qopt", res_qopt)
                Samples.add(samples.track_pull, "qopt", res_qopt / sig_qopt)

    seeds_file = _seeds_file(tracks_dir, source.event_id)
    if seeds_file is not None:
        sd = read_table(seeds_file, seeds_csv.COLUMNS)
        sp = match_seeds(*(mt.particle_of(sd[f"measurement_id_{s}"]) for s in seeds_csv.SP))
        srow = np.where(sp >= 0, row_of[np.maximum(sp, 0)], -1)
        good = np.flatnonzero(srow >= 0)
        good = good[selected[srow[good]]]
        seeded[srow[srow >= 0]] = True
        ev.update(
            n_seeds=int(sp.shape[0]),
            n_fake_seeds=int((sp < 0).sum()),
            n_seeds_matched_selected=int(good.size),
            n_seeded_selected_particles=int((seeded & selected).sum()),
        )
        if good.size:
            rows = srow[good]
            theta, qop, phi = sd["theta"][good], sd["qop"][good], sd["phi"][good]
            qopt, var_qopt = _qopt(
                theta, qop, sd["var_theta"][good], sd["var_qop"][good], np.zeros(good.size)
            )
            true_qopt = np.where(pt[rows] > 0, parts.charge[rows] / np.where(pt[rows] > 0, pt[rows], 1), 0)
            res = {
                "qopt": qopt - true_qopt,
                "phi": _wrap(phi - parts.phi[rows]),
                "theta": theta - parts.theta[rows],
            }
            var = {"qopt": var_qopt, "phi": sd["var_phi"][good], "theta": sd["var_theta"][good]}
            for name in SEED_PARAMS:
                with np.errstate(invalid="ignore"):
                    sig = np.where(var[name] > 0, np.sqrt(np.abs(var[name])), np.nan)
                Samples.add(samples.seed_residual, name, res[name])
                Samples.add(samples.seed_pull, name, res[name] / sig)

    has_tracks, has_seeds = "n_tracks" in ev, "n_seeds" in ev
    ev.update(_track_rates(ev if has_tracks else None))
    ev.update(_seed_rates(ev if has_seeds else None))
    for k in () if has_tracks else _TRACK_COUNTS:
        ev[k] = None
    for k in () if has_seeds else _SEED_COUNTS:
        ev[k] = None
    ev["time_s"] = round(time.perf_counter() - t0, 4)
    Samples.add(samples.particles, "has_found", np.full(n_parts, has_tracks))
    Samples.add(samples.particles, "has_seeded", np.full(n_parts, has_seeds))
    Samples.add(samples.particles, "found", found)
    Samples.add(samples.particles, "seeded", seeded)
    return ev


def _track_rates(c: dict[str, int] | None) -> dict[str, float | None]:
    """efficiency, fake_rate, fake_rate_selected, duplicate_rate from summed counts (None: no tracks)."""
    if c is None:
        return dict.fromkeys(("efficiency", "fake_rate", "fake_rate_selected", "duplicate_rate"))
    return {
        "efficiency": _ratio(c["n_matched_selected_particles"], c["n_selected_particles"]),
        "fake_rate": _ratio(c["n_fake_tracks"], c["n_tracks"]),
        "fake_rate_selected": _ratio(c["n_fake_tracks_selected"], c["n_tracks_selected"]),
        "duplicate_rate": _ratio(c["n_duplicate_tracks"], c["n_matched_tracks"]),
    }


def _seed_rates(c: dict[str, int] | None) -> dict[str, float | None]:
    """seeding_efficiency, seeds_per_particle, fake_seed_fraction from summed counts (None: no seeds)."""
    if c is None:
        return dict.fromkeys(("seeding_efficiency", "seeds_per_particle", "fake_seed_fraction"))
    return {
        "seeding_efficiency": _ratio(c["n_seeded_selected_particles"], c["n_selected_particles"]),
        "seeds_per_particle": _ratio(c["n_seeds_matched_selected"], c["n_seeded_selected_particles"]),
        "fake_seed_fraction": _ratio(c["n_fake_seeds"], c["n_seeds"]),
    }


_TRACK_COUNTS = (
    "n_tracks",
    "n_matched_tracks",
    "n_fake_tracks",
    "n_duplicate_tracks",
    "n_tracks_selected",
    "n_fake_tracks_selected",
    "n_matched_selected_particles",
)
_SEED_COUNTS = ("n_seeds", "n_fake_seeds", "n_seeds_matched_selected", "n_seeded_selected_particles")


def run_validation(
    input_dir: str | Path,
    tracks_dir: str | Path,
    cuts: SelectionCuts | None = None,
    bfield_t: float = 2.0,
    max_events: int | None = None,
    pt_edges_gev: tuple[float, ...] = DEFAULT_PT_EDGES_GEV,
    eta_edges: tuple[float, ...] = DEFAULT_ETA_EDGES,
) -> tuple[dict[str, Any], Samples]:
    """:func:`validate`, also returning the pooled per-object arrays (for plots)."""
    cuts = cuts or SelectionCuts()
    if max_events is not None and max_events < 1:
        raise ValueError(f"max_events must be at least 1, got {max_events}")
    tdir = Path(tracks_dir)
    sources = discover(input_dir)[:max_events]
    with_truth = [s for s in sources if s.has_truth]
    if not with_truth:
        raise InputError(input_dir, "no event has truth files (measurements, hits, particles, simhit map)")
    if len(with_truth) < len(sources):
        log.warning(
            "%d event(s) without truth files skipped: %s",
            len(sources) - len(with_truth),
            [s.event_id for s in sources if not s.has_truth][:10],
        )
    t0 = time.perf_counter()
    samples = Samples()
    per_event = []
    progress = Progress("validate", len(with_truth))
    for s in with_truth:
        per_event.append(_event(s, tdir, cuts, bfield_t, samples))
        progress.step()
    progress.done()

    ev_tracks = [e for e in per_event if e.get("n_tracks") is not None]
    ev_seeds = [e for e in per_event if e.get("n_seeds") is not None]
    for kind, evs in (("tracks", ev_tracks), ("seeds", ev_seeds)):
        if evs and len(evs) < len(per_event):
            missing = sorted({e["event_id"] for e in per_event} - {e["event_id"] for e in evs})
            log.warning(
                "no %s files for %d event(s) %s; they are left out of the %s metrics",
                kind,
                len(missing),
                missing[:10],
                kind,
            )

    # each part's denominators use only the events that have that part's files
    sel = ("n_selected_particles",)
    tc = {k: sum(e[k] for e in ev_tracks) for k in (*_TRACK_COUNTS, *sel)} if ev_tracks else None
    sc = {k: sum(e[k] for e in ev_seeds) for k in (*_SEED_COUNTS, *sel)} if ev_seeds else None
    result: dict[str, Any] = {
        "input": str(input_dir),
        "tracks": str(tracks_dir),
        "n_events": len(per_event),
        "n_events_with_tracks": len(ev_tracks),
        "n_events_with_seeds": len(ev_seeds),
        "cuts": asdict(cuts),
        "bfield_t": bfield_t,
        "n_particles": sum(e["n_particles"] for e in per_event),
        "n_selected_particles": sum(e["n_selected_particles"] for e in per_event),
        **_track_rates(tc),
        **_seed_rates(sc),
    }
    for k in _TRACK_COUNTS:
        result[k] = None if tc is None else tc[k]
    for k in _SEED_COUNTS:
        result[k] = None if sc is None else sc[k]
    result["n_seeds_per_event"] = [e["n_seeds"] for e in ev_seeds] if ev_seeds else None
    result["mean_seeds_per_event"] = float(np.mean(result["n_seeds_per_event"])) if ev_seeds else None

    part = {k: np.concatenate(v) for k, v in samples.particles.items()}

    def binned(flag: str, present: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if not present:
            return None, None
        have = part[f"has_{flag}"]  # particles of the events that have this part's files
        passed = part[flag]
        vs_pt = _binned(part["pt"], part["pop_pt"] & have, passed, pt_edges_gev, "pt [GeV]")
        vs_eta = _binned(part["eta"], part["pop_eta"] & have, passed, eta_edges, "eta")
        return vs_pt, vs_eta

    result["efficiency_vs_pt"], result["efficiency_vs_eta"] = binned("found", bool(ev_tracks))
    result["seeding_efficiency_vs_pt"], result["seeding_efficiency_vs_eta"] = binned("seeded", bool(ev_seeds))
    result["resolution"] = (
        {p: _stats(Samples.pooled(samples.track_residual, p), True) for p in TRACK_PARAMS}
        if ev_tracks
        else None
    )
    result["pulls"] = (
        {p: _stats(Samples.pooled(samples.track_pull, p), False) for p in TRACK_PARAMS} if ev_tracks else None
    )
    result["seed_resolution"] = (
        {p: _stats(Samples.pooled(samples.seed_residual, p), True) for p in SEED_PARAMS} if ev_seeds else None
    )
    result["seed_pulls"] = (
        {p: _stats(Samples.pooled(samples.seed_pull, p), False) for p in SEED_PARAMS} if ev_seeds else None
    )
    result["units"] = dict(UNITS)
    result["per_event"] = per_event
    result["time_s"] = round(time.perf_counter() - t0, 3)
    return result, samples


def validate(
    input_dir: str | Path,
    tracks_dir: str | Path,
    cuts: SelectionCuts | None = None,
    bfield_t: float = 2.0,
    max_events: int | None = None,
) -> dict[str, Any]:
    """Measure reconstruction performance against simulation truth (definitions: module docstring).

    Parameters:
        input_dir: event directory with cells and truth files.
        tracks_dir: directory holding ``event<N>-tracks.csv``/``-track-measurements.csv`` and/or
            ``event<N>-seeds.csv``.
        cuts: particle selection and matching threshold (default: pT > 1 GeV, |eta| < 2.5, >= 7
            measurements, charged, 50%).
        bfield_t: solenoid field along +z [T] used for the truth perigee parameters.
        max_events: validate at most this many events (in ascending event id).

    Returns:
        A JSON-serializable dict; rates whose files are absent (or whose denominator is 0) are None.

    Raises:
        InputError: no events, no truth, or unreadable files.
        ValueError: ``max_events`` below 1.
    """
    return run_validation(input_dir, tracks_dir, cuts, bfield_t, max_events)[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SelectionCuts()
    p.add_argument("--input", required=True, help="event directory with cells and truth files")
    p.add_argument("--tracks", required=True, help="directory with event<N>-tracks.csv / -seeds.csv")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    p.add_argument("--events", type=int, default=None, help="validate at most this many events")
    p.add_argument("--bfield", type=float, default=2.0, help="solenoid field along +z [T] (default 2)")
    p.add_argument("--min-pt", type=float, default=d.min_pt_gev, help="particle selection: pT > this [GeV]")
    p.add_argument("--max-eta", type=float, default=d.max_abs_eta, help="particle selection: |eta| < this")
    p.add_argument(
        "--min-measurements", type=int, default=d.min_measurements, help="particle selection: >= this many"
    )
    p.add_argument(
        "--include-neutral", action="store_true", help="do not require a non-zero charge for selection"
    )
    p.add_argument(
        "--match-fraction", type=float, default=d.match_fraction, help="double-majority threshold (0.5)"
    )


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.4g}"


def format_summary(r: dict[str, Any]) -> str:
    """A human-readable table of a :func:`validate` result."""
    lines = [
        f"input: {r['input']}  tracks: {r['tracks']}  events: {r['n_events']} "
        f"(tracks: {r['n_events_with_tracks']}, seeds: {r['n_events_with_seeds']})",
        f"selected particles: {r['n_selected_particles']} of {r['n_particles']}  "
        f"(pT > {r['cuts']['min_pt_gev']} GeV, |eta| < {r['cuts']['max_abs_eta']}, "
        f">= {r['cuts']['min_measurements']} measurements)",
        "",
        f"{'metric':<28}{'value':>12}  counts",
        f"{'efficiency':<28}{_fmt(r['efficiency'], True):>12}  "
        f"{r['n_matched_selected_particles']} / {r['n_selected_particles']}",
        f"{'fake rate (all tracks)':<28}{_fmt(r['fake_rate'], True):>12}  {r['n_fake_tracks']} / {r['n_tracks']}",
        f"{'fake rate (pT, eta cuts)':<28}{_fmt(r['fake_rate_selected'], True):>12}  "
        f"{r['n_fake_tracks_selected']} / {r['n_tracks_selected']}",
        f"{'duplicate rate':<28}{_fmt(r['duplicate_rate'], True):>12}  "
        f"{r['n_duplicate_tracks']} / {r['n_matched_tracks']}",
        f"{'seeding efficiency':<28}{_fmt(r['seeding_efficiency'], True):>12}  "
        f"{r['n_seeded_selected_particles']} / {r['n_selected_particles']}",
        f"{'seeds per seeded particle':<28}{_fmt(r['seeds_per_particle']):>12}",
        f"{'fake seed fraction':<28}{_fmt(r['fake_seed_fraction'], True):>12}  {r['n_fake_seeds']} / {r['n_seeds']}",
        f"{'seeds per event (mean)':<28}{_fmt(r['mean_seeds_per_event']):>12}",
    ]
    for title, res, pulls in (
        ("track parameters", r["resolution"], r["pulls"]),
        ("seed parameters", r["seed_resolution"], r["seed_pulls"]),
    ):
        if res is None:
            continue
        lines += [
            "",
            f"{title:<16}{'n':>8}{'res mean':>12}{'res std':>12}{'width68':>12}{'pull mean':>11}{'pull std':>10}",
        ]
        for name, st in res.items():
            pl = pulls[name]
            lines.append(
                f"{name + ' [' + UNITS[name] + ']':<16}{st['n']:>8}{_fmt(st['mean']):>12}{_fmt(st['std']):>12}"
                f"{_fmt(st['width68']):>12}{_fmt(pl['mean']):>11}{_fmt(pl['std']):>10}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.events is not None and args.events < 1:
        log.error("--events must be at least 1")
        return 2
    try:
        cuts = SelectionCuts(
            min_pt_gev=args.min_pt,
            max_abs_eta=args.max_eta,
            min_measurements=args.min_measurements,
            charged_only=not args.include_neutral,
            match_fraction=args.match_fraction,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    result, samples = run_validation(args.input, args.tracks, cuts, args.bfield, args.events)
    if result["n_events_with_tracks"] == 0 and result["n_events_with_seeds"] == 0:
        log.warning("no tracks or seeds files for these events in %s", args.tracks)
    if args.plots:
        try:
            from producer.plots import write_plots
        except ImportError:
            log.warning("matplotlib is not installed: no plots written (pip install 'trackfleet[plot]')")
        else:
            paths = write_plots(result, samples, args.plots)
            log.info("wrote %d plot(s) to %s", len(paths), args.plots)
    if args.json:
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
    else:
        sys.stdout.write(format_summary(result) + "\n")
    return 0
