"""Tests of ``trackfleet validate``: truth association, double-majority matching, rates, seeds, the
truth perigee (ACTS d0 sign), the JSON output and the CLI, on small synthetic events written as ACTS
48 CSV files, plus a truth-track closure test on the bundled data set."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from kernels.edm.tracks import Tracks
from producer.cli import main
from producer.io import seeds_csv
from producer.io.events import discover, event_file_name, load_truth
from producer.io.tracks_csv import write_tracks
from producer.matching import (
    C_LIGHT,
    match_tracks,
    measurement_truth,
    truth_perigee,
)
from producer.validate import SelectionCuts, validate

BFIELD_T = 2.0
COV_DIAG = np.array([1e-2, 1e-2, 1e-6, 1e-6, 1e-6])  # sigma: 0.1 mm, 0.1 mm, 1 mrad, 1 mrad, 1e-3 e/GeV

MEAS_HEADER = (
    "measurement_id,geometry_id,local_key,local0,local1,phi,theta,time,"
    "var_local0,var_local1,var_phi,var_theta,var_time"
)
ID_HEADER = "particle_id_pv,particle_id_sv,particle_id_part,particle_id_gen,particle_id_subpart"
HITS_HEADER = f"{ID_HEADER},geometry_id,tx,ty,tz,tt,tpx,tpy,tpz,te,deltapx,deltapy,deltapz,deltae,index"
PART_HEADER = f"{ID_HEADER},particle_type,process,vx,vy,vz,vt,px,py,pz,m,q"
CELLS_HEADER = "geometry_id,measurement_id,channel0,channel1,timestamp,value"


@dataclass
class SyntheticEvent:
    """A tiny event: particles, one simulated hit per measurement unless told otherwise."""

    particles: list[tuple[int, tuple[float, ...]]] = field(default_factory=list)  # (number, row values)
    hits: list[tuple[int, int]] = field(default_factory=list)  # (particle number, geometry_id)
    measurements: list[int] = field(default_factory=list)  # geometry ids, measurement_id = position
    simhit: list[tuple[int, int]] = field(default_factory=list)  # (measurement_id, hit_id)

    def particle(
        self,
        pt: float,
        eta: float,
        phi: float = 0.3,
        q: float = 1.0,
        n_meas: int = 10,
        vertex: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> tuple[int, list[int]]:
        """Add a particle with ``n_meas`` single-hit measurements; returns (number, measurement ids)."""
        number = len(self.particles) + 1
        theta = 2 * math.atan(math.exp(-eta))
        p = pt / math.sin(theta)
        mom = (pt * math.cos(phi), pt * math.sin(phi), p * math.cos(theta))
        self.particles.append((number, (211 if q else 22, 0, *vertex, 0.0, *mom, 0.13957, q)))
        return number, [self.measurement([(number, 1)]) for _ in range(n_meas)]

    def measurement(self, contributions: list[tuple[int, int]]) -> int:
        """A measurement made of hits: [(particle number, n hits), ...] in map order."""
        mid = len(self.measurements)
        geo = (8 << 56) | (mid + 1) << 8
        self.measurements.append(geo)
        for number, n in contributions:
            for _ in range(n):
                self.simhit.append((mid, len(self.hits)))
                self.hits.append((number, geo))
        return mid

    def barcode(self, number: int) -> int:
        return (1 << 52) | (number << 24)

    def write(self, directory: Path, event_id: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)

        def put(kind: str, header: str, rows: list[str]) -> None:
            (directory / event_file_name(event_id, kind)).write_text("\n".join([header, *rows]) + "\n")

        put("cells", CELLS_HEADER, [f"{g},{m},1,1,0,1" for m, g in enumerate(self.measurements)])
        put(
            "measurements",
            MEAS_HEADER,
            [
                f"{m},{g},6,{0.1 * m:.3f},0.5,0,0,0,0.0002,0.0002,0,0,0"
                for m, g in enumerate(self.measurements)
            ],
        )
        put(
            "hits",
            HITS_HEADER,
            [f"1,0,{n},0,0,{g},1,2,3,0,1,0,0,1,0,0,0,0,{k}" for k, (n, g) in enumerate(self.hits)],
        )
        put(
            "particles",
            PART_HEADER,
            [f"1,0,{n},0,0," + ",".join(f"{v:.12g}" for v in row) for n, row in self.particles],
        )
        put("measurement-simhit-map", "measurement_id,hit_id", [f"{m},{h}" for m, h in self.simhit])

    def truth_params(self, number: int) -> np.ndarray:
        row = np.array(self.particles[number - 1][1])
        return truth_perigee(row[None, 2:5], row[None, 6:9], row[None, 10], BFIELD_T)[0]


def make_tracks(
    event: SyntheticEvent, tracks: list[tuple[np.ndarray, list[int]]], event_id: int = 0
) -> Tracks:
    """Tracks with given perigee parameters and truth measurement ids (-1: without truth)."""
    n = len(tracks)
    ids = np.array([m for _, ms in tracks for m in ms], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(ms) for _, ms in tracks], out=offsets[1:])
    geo = np.array([event.measurements[m] if m >= 0 else 0 for m in ids], np.uint64)
    return Tracks(
        params=np.array([p for p, _ in tracks], np.float64).reshape(n, 5),
        cov=np.tile(np.diag(COV_DIAG), (n, 1, 1)),
        chi2=np.ones(n),
        ndf=np.full(n, 10, np.int32),
        n_holes=np.zeros(n, np.int32),
        meas_offsets=offsets,
        meas_geometry_id=geo,
        meas_local0=0.1 * ids.astype(np.float64),
        meas_local1=np.full(ids.size, 0.5),
        meas_dimension=np.full(ids.size, 2, np.int8),
        meas_truth_id=ids,
        event_id=event_id,
    )


@pytest.fixture
def event() -> tuple[SyntheticEvent, dict[str, tuple[int, list[int]]]]:
    """Three selected particles and four that fail one cut each."""
    ev = SyntheticEvent()
    parts = {
        "a": ev.particle(pt=2.0, eta=0.0, phi=0.3),
        "b": ev.particle(pt=5.0, eta=1.0, phi=-2.0, q=-1.0),
        "c": ev.particle(pt=10.0, eta=-1.5, phi=3.0, vertex=(0.01, -0.02, 12.0)),
        "soft": ev.particle(pt=0.5, eta=0.2),
        "forward": ev.particle(pt=3.0, eta=2.8),
        "short": ev.particle(pt=3.0, eta=0.5, n_meas=5),
        "neutral": ev.particle(pt=3.0, eta=0.5, q=0.0),
    }
    return ev, parts


def perfect(ev: SyntheticEvent, parts: dict[str, tuple[int, list[int]]], names: str = "abc") -> list:
    return [(ev.truth_params(parts[k][0]), parts[k][1]) for k in names]


def run(tmp_path: Path, ev: SyntheticEvent, tracks: list | None, seeds: dict | None = None, **kw) -> dict:
    ev.write(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if tracks is not None:
        write_tracks(out, make_tracks(ev, tracks))
    if seeds is not None:
        seeds_csv.write_seeds(out, 0, seeds)
    return validate(tmp_path / "in", out, bfield_t=BFIELD_T, **kw)


def test_perfect_tracks(tmp_path, event):
    ev, parts = event
    r = run(tmp_path, ev, perfect(ev, parts))
    assert r["n_selected_particles"] == 3
    assert (r["efficiency"], r["fake_rate"], r["duplicate_rate"]) == (1.0, 0.0, 0.0)
    assert r["fake_rate_selected"] == 0.0 and r["n_tracks_selected"] == 3
    assert r["n_tracks"] == 3 and r["n_matched_tracks"] == 3
    for name, st in r["resolution"].items():
        assert st["n"] == 3
        assert abs(st["mean"]) < 1e-7 and st["std"] < 1e-7, name
    assert all(abs(p["mean"]) < 1e-3 for p in r["pulls"].values())
    # seeds absent: their keys exist and are null
    for key in (
        "seeding_efficiency",
        "seeds_per_particle",
        "fake_seed_fraction",
        "seed_resolution",
        "n_seeds",
    ):
        assert r[key] is None


def test_resolution_and_pull_values(tmp_path, event):
    ev, parts = event
    tracks = perfect(ev, parts)
    shift = np.array([0.05, -0.2, 0.002, 0.0, 0.0])
    tracks = [(p + shift, ms) for p, ms in tracks]
    r = run(tmp_path, ev, tracks)
    res, pulls = r["resolution"], r["pulls"]
    assert res["d0"]["mean"] == pytest.approx(0.05, abs=1e-7)
    assert res["z0"]["mean"] == pytest.approx(-0.2, abs=1e-7)
    assert res["phi"]["mean"] == pytest.approx(0.002, abs=1e-8)
    assert res["d0"]["std"] == pytest.approx(0.0, abs=1e-7) and res["d0"]["width68"] == pytest.approx(
        0, abs=1e-7
    )
    assert pulls["d0"]["mean"] == pytest.approx(0.5, rel=1e-5)
    assert pulls["z0"]["mean"] == pytest.approx(-2.0, rel=1e-5)
    assert pulls["phi"]["mean"] == pytest.approx(2.0, rel=1e-4)


def test_phi_residual_wraps(tmp_path, event):
    ev, parts = event
    p, ms = ev.truth_params(parts["c"][0]), parts["c"][1]  # phi near +pi
    p = p.copy()
    p[2] = p[2] + 0.001 - 2 * np.pi
    r = run(tmp_path, ev, [(p, ms)])
    assert r["resolution"]["phi"]["n"] == 1
    assert r["resolution"]["phi"]["mean"] == pytest.approx(0.001, abs=1e-7)


def test_qopt_error_propagation(tmp_path, event):
    ev, parts = event
    r = run(tmp_path, ev, perfect(ev, parts, "b"))
    p = ev.truth_params(parts["b"][0])
    assert r["pulls"]["qopt"]["n"] == 1
    # shift q/p: the residual is dq/p / sin(theta); the sigma is propagated at the fitted values
    shifted = p.copy()
    shifted[4] += 1e-3
    theta, qop = shifted[3], shifted[4]
    j_theta, j_qop = -qop * math.cos(theta) / math.sin(theta) ** 2, 1 / math.sin(theta)
    sigma = math.sqrt(j_theta**2 * COV_DIAG[3] + j_qop**2 * COV_DIAG[4])
    r = run(tmp_path, ev, [(shifted, parts["b"][1])])
    assert r["resolution"]["qopt"]["mean"] == pytest.approx(1e-3 / math.sin(theta), rel=1e-6)
    assert r["pulls"]["qopt"]["mean"] == pytest.approx(1e-3 / math.sin(theta) / sigma, rel=1e-5)


def test_fake_track(tmp_path, event):
    ev, parts = event
    (a, ma), mb, mc = parts["a"], parts["b"][1], parts["c"][1]
    fake = (ev.truth_params(a), ma[:3] + mb[:3] + mc[:2])  # majority 3/8 < 50%
    r = run(tmp_path, ev, [*perfect(ev, parts), fake])
    assert r["n_tracks"] == 4 and r["n_fake_tracks"] == 1
    assert r["fake_rate"] == pytest.approx(0.25)
    assert r["efficiency"] == 1.0 and r["duplicate_rate"] == 0.0
    assert r["fake_rate_selected"] == pytest.approx(0.25)  # params pass pT > 1, |eta| < 2.5


def test_fake_rate_selected_uses_reconstructed_params(tmp_path, event):
    ev, parts = event
    a = parts["a"][0]
    soft = ev.truth_params(a).copy()
    soft[4] = 1 / 0.5  # pT = 0.5 GeV at theta = pi/2
    r = run(tmp_path, ev, [*perfect(ev, parts), (soft, [-1] * 8)])
    assert r["fake_rate"] == pytest.approx(0.25)
    assert r["n_tracks_selected"] == 3 and r["fake_rate_selected"] == 0.0


def test_duplicate_track(tmp_path, event):
    ev, parts = event
    a, ma = parts["a"]
    r = run(tmp_path, ev, [*perfect(ev, parts), (ev.truth_params(a), ma[:6])])
    assert r["n_matched_tracks"] == 4 and r["n_duplicate_tracks"] == 1
    assert r["duplicate_rate"] == pytest.approx(0.25)
    assert r["efficiency"] == 1.0 and r["fake_rate"] == 0.0
    # both tracks of particle a enter the resolution
    assert r["resolution"]["d0"]["n"] == 4


@pytest.mark.parametrize(
    ("from_a", "from_b", "unknown", "expect"),
    [
        (5, 5, 0, "a"),  # 50% of the track from each, 50% of each particle: a (met first) - see tie test
        (4, 5, 0, "b"),  # b: 5/9 of the track, 5/10 of the particle
        (4, 4, 1, None),  # 4/9 < 50%: fake even though the track holds 40% of both
        (5, 0, 0, "a"),  # pure, holds exactly half of a
        (4, 0, 0, None),  # pure, holds only 40% of a
        (5, 0, 5, "a"),  # 5/10 of the track (measurements without truth count in the denominator)
        (5, 0, 6, None),  # 5/11 of the track
    ],
)
def test_fifty_percent_edges(tmp_path, from_a, from_b, unknown, expect):
    ev = SyntheticEvent()
    a, ma = ev.particle(pt=2.0, eta=0.0)
    _, mb = ev.particle(pt=3.0, eta=0.3)
    ms = ma[:from_a] + mb[:from_b] + [-1] * unknown
    r = run(tmp_path, ev, [(ev.truth_params(a), ms)])
    assert r["n_fake_tracks"] == (1 if expect is None else 0)
    assert r["n_matched_selected_particles"] == (0 if expect is None else 1)


def test_fifty_fifty_tie_prefers_larger_share_then_first():
    # two particles each own 5 of a 10-measurement track; a has 10 measurements, b only 8
    offsets = np.array([0, 10, 20])
    rows = np.array([0] * 5 + [1] * 5 + [1] * 5 + [0] * 5)
    m = match_tracks(offsets, rows, np.array([10, 8]))
    assert m.particle.tolist() == [1, 1]  # b: 5/8 of the particle beats 5/10
    m = match_tracks(offsets, rows, np.array([10, 10]))
    assert m.particle.tolist() == [0, 1]  # equal shares: the particle met first along the track
    assert m.duplicate.tolist() == [False, False]


def test_unselected_particles_ignored(tmp_path, event):
    ev, parts = event
    others = [(ev.truth_params(parts[k][0]), parts[k][1]) for k in ("soft", "forward", "short", "neutral")]
    r = run(tmp_path, ev, [*perfect(ev, parts, "ab"), *others])
    assert r["n_selected_particles"] == 3
    assert r["efficiency"] == pytest.approx(2 / 3)
    # tracks of unselected particles are matched: not fakes, and not in the resolutions
    assert r["fake_rate"] == 0.0 and r["n_matched_tracks"] == 6
    assert r["resolution"]["d0"]["n"] == 2


def test_custom_cuts(tmp_path, event):
    ev, parts = event
    r = run(
        tmp_path,
        ev,
        perfect(ev, parts),
        cuts=SelectionCuts(min_pt_gev=0.4, max_abs_eta=3.0, min_measurements=5, charged_only=False),
    )
    assert r["n_selected_particles"] == 7
    assert r["efficiency"] == pytest.approx(3 / 7)


def test_efficiency_bins(tmp_path, event):
    ev, parts = event
    r = run(tmp_path, ev, perfect(ev, parts, "ab"))
    vs_pt, vs_eta = r["efficiency_vs_pt"], r["efficiency_vs_eta"]
    assert len(vs_pt["n"]) == len(vs_pt["edges"]) - 1 == len(vs_pt["efficiency"])
    # pT population: every cut but pT -> a, b, c and the 0.5 GeV particle
    assert sum(vs_pt["n"]) == 4 and sum(vs_pt["n_matched"]) == 2
    k = int(np.searchsorted(vs_pt["edges"], 0.5, side="right")) - 1
    assert vs_pt["n"][k] == 1 and vs_pt["efficiency"][k] == 0.0
    above = [k for k, lo in enumerate(vs_pt["edges"][:-1]) if lo >= 1.0]
    assert sum(vs_pt["n"][k] for k in above) == 3 and sum(vs_pt["n_matched"][k] for k in above) == 2
    # eta population: every cut but eta -> a, b, c and the eta = 2.8 particle
    assert sum(vs_eta["n"]) == 4 and sum(vs_eta["n_matched"]) == 2
    assert all(e is None for e, n in zip(vs_eta["efficiency"], vs_eta["n"], strict=True) if n == 0)


def seeds_table(ev: SyntheticEvent, triplets: list[tuple[int, int, int]], params: list[np.ndarray]) -> dict:
    n = len(triplets)
    t = {f"measurement_id_{s}": np.array([tr[k] for tr in triplets]) for k, s in enumerate(seeds_csv.SP)}
    for s in seeds_csv.SP:
        for c in "xyz":
            t[f"{c}_{s}"] = np.zeros(n)
    t["weight"] = np.zeros(n)
    t["z_vertex"] = np.zeros(n)
    t["geometry_id"] = np.array([ev.measurements[tr[0]] if tr[0] >= 0 else 0 for tr in triplets], np.uint64)
    t["loc0"] = np.zeros(n)
    t["loc1"] = np.zeros(n)
    p = np.array(params).reshape(n, 3)  # phi, theta, qop
    t["phi"], t["theta"], t["qop"] = p[:, 0], p[:, 1], p[:, 2]
    t["var_loc0"] = t["var_loc1"] = np.ones(n)
    t["var_phi"] = t["var_theta"] = np.full(n, 1e-4)
    t["var_qop"] = np.full(n, 1e-2)
    return t


def particle_truth(ev: SyntheticEvent, number: int, dphi: float = 0.0) -> np.ndarray:
    row = ev.particles[number - 1][1]
    px, py, pz, q = row[6], row[7], row[8], row[10]
    pt = math.hypot(px, py)
    return np.array([math.atan2(py, px) + dphi, math.atan2(pt, pz), q / math.hypot(pt, pz)])


def test_seed_metrics(tmp_path, event):
    ev, parts = event
    (a, ma), (b, mb), (_, mc), (soft, ms) = parts["a"], parts["b"], parts["c"], parts["soft"]
    triplets = [
        (ma[0], ma[1], ma[2]),  # a
        (ma[2], ma[3], ma[4]),  # a again
        (mb[0], mb[1], mb[2]),  # b
        (ma[5], ma[6], mb[3]),  # mixed: fake
        (mc[0], -1, mc[2]),  # unknown measurement: fake
        (ms[0], ms[1], ms[2]),  # unselected particle: matched, not fake, not counted
    ]
    params = [particle_truth(ev, a, 0.01), particle_truth(ev, a, 0.01), particle_truth(ev, b, 0.01)]
    params += [particle_truth(ev, a)] * 2 + [particle_truth(ev, soft)]
    r = run(tmp_path, ev, None, seeds_table(ev, triplets, params))
    assert r["n_seeds"] == 6 and r["n_seeds_per_event"] == [6] and r["mean_seeds_per_event"] == 6.0
    assert r["seeding_efficiency"] == pytest.approx(2 / 3)
    assert r["seeds_per_particle"] == pytest.approx(3 / 2)
    assert r["fake_seed_fraction"] == pytest.approx(2 / 6)
    assert r["seed_resolution"]["phi"]["n"] == 3
    assert r["seed_resolution"]["phi"]["mean"] == pytest.approx(0.01, abs=1e-7)
    assert r["seed_pulls"]["phi"]["mean"] == pytest.approx(1.0, rel=1e-5)
    assert r["seed_resolution"]["qopt"]["mean"] == pytest.approx(0.0, abs=1e-7)
    assert r["seed_resolution"]["theta"]["mean"] == pytest.approx(0.0, abs=1e-7)
    assert r["seeding_efficiency_vs_pt"] is not None
    # tracks absent: their keys exist and are null
    for key in ("efficiency", "fake_rate", "duplicate_rate", "n_tracks", "resolution", "efficiency_vs_pt"):
        assert r[key] is None


def test_majority_association():
    # m0: 2 hits of particle 7, 1 of 9 -> 7; m1: 1 each, 9 first in the map -> 9; m2: no hits; m3: 9
    hit_pid = np.array([7, 9, 7, 9, 7, 9], np.uint64)
    map_m = np.array([0, 0, 0, 1, 1, 3])
    map_h = np.array([0, 1, 2, 3, 4, 5])
    mt = measurement_truth(np.array([3, 2, 1, 0]), map_m, map_h, hit_pid, np.array([5, 7, 9], np.uint64))
    assert mt.particle_id.tolist() == [5, 7, 9]
    assert mt.particle_of(np.array([0, 1, 2, 3, -1, 42])).tolist() == [1, 2, -1, 2, -1, -1]
    assert mt.n_measurements.tolist() == [0, 1, 2]


def test_measurement_shared_by_particles(tmp_path):
    ev = SyntheticEvent()
    a, ma = ev.particle(pt=2.0, eta=0.0, n_meas=7)
    b, mb = ev.particle(pt=2.0, eta=0.1, n_meas=6)
    merged = ev.measurement([(b, 1), (a, 2)])  # belongs to a (2 hits against 1)
    tie = ev.measurement([(b, 1), (a, 1)])  # tie: b's hit comes first in the map
    r = run(tmp_path, ev, [(ev.truth_params(a), [*ma, merged]), (ev.truth_params(b), [*mb, tie])])
    assert r["n_selected_particles"] == 2  # b reaches 7 measurements only with the tied one
    assert r["efficiency"] == 1.0 and r["fake_rate"] == 0.0


def _helix(vertex, momentum, q, s):
    """Positions along the truth helix at transverse path lengths s (independent of truth_perigee)."""
    pt = math.hypot(momentum[0], momentum[1])
    phi0 = math.atan2(momentum[1], momentum[0])
    radius = pt / (C_LIGHT * 1e-3 * abs(q) * BFIELD_T)
    # the Lorentz force q v x B fixes the sense of rotation
    force = np.cross([math.cos(phi0), math.sin(phi0), 0.0], [0.0, 0.0, BFIELD_T]) * q
    sense = np.sign(np.cross([math.cos(phi0), math.sin(phi0), 0.0], force)[2])  # +1: counter-clockwise
    rho = sense / radius
    phi = phi0 + rho * s
    x = vertex[0] + (np.sin(phi) - math.sin(phi0)) / rho
    y = vertex[1] - (np.cos(phi) - math.cos(phi0)) / rho
    z = vertex[2] + s * momentum[2] / pt
    return x, y, z, phi


@pytest.mark.parametrize("q", [1.0, -1.0])
@pytest.mark.parametrize("vertex", [(1.0, -2.0, 5.0), (-0.5, -0.3, -20.0), (0.0, 0.0, 3.0)])
def test_truth_perigee_matches_brute_force(q, vertex):
    momentum = (0.3, 0.6, 0.4)  # pT = 0.67 GeV: R = 1.1 m in 2 T
    d0, z0, phi, theta, qop = truth_perigee(
        np.array([vertex]), np.array([momentum]), np.array([q]), BFIELD_T
    )[0]
    s = np.linspace(-50.0, 50.0, 2_000_001)
    x, y, z, ph = _helix(vertex, momentum, q, s)
    k = int(np.argmin(x * x + y * y))
    # ACTS perigee: the PCA is (-d0 sin phi, d0 cos phi, z0), phi = direction at the PCA
    assert -d0 * math.sin(phi) == pytest.approx(x[k], abs=1e-4)
    assert d0 * math.cos(phi) == pytest.approx(y[k], abs=1e-4)
    assert abs(d0) == pytest.approx(math.hypot(x[k], y[k]), abs=1e-6)
    assert z0 == pytest.approx(z[k], abs=1e-4)
    assert phi == pytest.approx(math.atan2(math.sin(ph[k]), math.cos(ph[k])), abs=1e-6)
    assert theta == pytest.approx(math.atan2(math.hypot(*momentum[:2]), momentum[2]))
    assert qop == pytest.approx(q / math.sqrt(sum(m * m for m in momentum)))


def test_truth_perigee_d0_sign():
    # A straight track along +x passing at y = +1 mm: the PCA lies left of the direction -> d0 > 0.
    # In 2 T a positive particle bends clockwise: starting at the origin along +x, its circle lies
    # to the right (centre at y < 0), the origin is on the track, d0 = 0; starting at y = +1 mm, d0 > 0.
    straight = truth_perigee(
        np.array([[5.0, 1.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]), np.array([0.0]), BFIELD_T
    )
    assert straight[0, 0] == pytest.approx(1.0) and straight[0, 1] == pytest.approx(0.0)
    assert straight[0, 2] == pytest.approx(0.0)
    bent = truth_perigee(np.array([[0.0, 1.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]), np.array([1.0]), BFIELD_T)
    assert bent[0, 0] > 0.99


def test_json_keys_and_per_event(tmp_path, event):
    ev, parts = event
    r = run(tmp_path, ev, perfect(ev, parts))
    text = json.dumps(r, allow_nan=False)
    back = json.loads(text)
    for key in (
        "efficiency",
        "fake_rate",
        "duplicate_rate",
        "seeding_efficiency",
        "seeds_per_particle",
        "fake_seed_fraction",
        "n_events",
        "n_selected_particles",
        "n_tracks",
        "n_seeds",
        "efficiency_vs_pt",
        "efficiency_vs_eta",
        "resolution",
        "pulls",
        "seed_resolution",
        "seed_pulls",
        "per_event",
    ):
        assert key in back, key
    assert back["n_events"] == 1 and len(back["per_event"]) == 1
    e = back["per_event"][0]
    assert e["event_id"] == 0 and e["efficiency"] == 1.0 and e["n_seeds"] is None


def test_multiple_events_pool_counts(tmp_path, event):
    ev, parts = event
    ev.write(tmp_path / "in", 0)
    ev.write(tmp_path / "in", 1)
    ev.write(tmp_path / "in", 2)
    out = tmp_path / "out"
    write_tracks(out, make_tracks(ev, perfect(ev, parts), 0))
    write_tracks(out, make_tracks(ev, perfect(ev, parts, "a"), 1))  # event 2 has no tracks file
    r = validate(tmp_path / "in", out, bfield_t=BFIELD_T)
    assert r["n_events"] == 3 and r["n_events_with_tracks"] == 2
    assert r["efficiency"] == pytest.approx(4 / 6)
    assert [e["efficiency"] for e in r["per_event"]] == [1.0, pytest.approx(1 / 3), None]
    r = validate(tmp_path / "in", out, bfield_t=BFIELD_T, max_events=1)
    assert r["n_events"] == 1 and r["efficiency"] == 1.0


def test_cli_json(tmp_path, event, capsys):
    ev, parts = event
    ev.write(tmp_path / "in")
    write_tracks(tmp_path / "out", make_tracks(ev, perfect(ev, parts)))
    rc = main(["validate", "--input", str(tmp_path / "in"), "--tracks", str(tmp_path / "out"), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["efficiency"] == 1.0 and r["fake_rate"] == 0.0 and r["duplicate_rate"] == 0.0
    assert r["seeding_efficiency"] is None


def test_cli_table_and_cuts(tmp_path, event, capsys):
    ev, parts = event
    ev.write(tmp_path / "in")
    write_tracks(tmp_path / "out", make_tracks(ev, perfect(ev, parts)))
    args = ["validate", "--input", str(tmp_path / "in"), "--tracks", str(tmp_path / "out")]
    assert main([*args, "--min-pt", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "efficiency" in out and "75.00%" in out and "3 / 4" in out
    assert main([*args, "--match-fraction", "0"]) == 2


def test_cli_plots(tmp_path, event, caplog):
    ev, parts = event
    ev.write(tmp_path / "in")
    write_tracks(tmp_path / "out", make_tracks(ev, perfect(ev, parts)))
    plots = tmp_path / "plots"
    args = ["validate", "--input", str(tmp_path / "in"), "--tracks", str(tmp_path / "out"), "--json"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--plots", str(plots)]) == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in caplog.text
        assert not plots.exists()
    else:
        assert (plots / "efficiency_vs_pt.png").is_file()
        assert (plots / "track_pulls.png").is_file()


def test_bundled_truth_tracks(bundled, tmp_path):
    """Closure: one track per selected particle built from its own truth measurements."""
    sources = [s for s in discover(bundled) if s.has_truth][:2]
    assert sources, f"no events with truth in {bundled}"
    cuts = SelectionCuts()
    for s in sources:
        truth = load_truth(s)
        meas, parts = truth.measurements, truth.particles
        mt = measurement_truth(
            meas.measurement_id,
            truth.simhit_map.measurement_id,
            truth.simhit_map.hit_id,
            truth.hits.particle_id,
            parts.particle_id,
        )
        prow = mt.particle_index(parts.particle_id)
        sel = (
            (parts.charge != 0)
            & (parts.pt > cuts.min_pt_gev)
            & (np.abs(parts.eta) < cuts.max_abs_eta)
            & (mt.n_measurements[prow] >= cuts.min_measurements)
        )
        sel_rows = np.flatnonzero(sel)
        assert sel_rows.size > 0
        # measurements of the selected particles, grouped by particle
        track_of_assoc = np.full(mt.particle_id.shape[0], -1)
        track_of_assoc[prow[sel_rows]] = np.arange(sel_rows.size)
        owner = track_of_assoc[np.maximum(mt.particle, 0)]
        owner[mt.particle < 0] = -1
        on = np.flatnonzero(owner >= 0)
        on = on[np.argsort(owner[on], kind="stable")]
        counts = np.bincount(owner[on], minlength=sel_rows.size)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        file_row = np.argsort(meas.measurement_id, kind="stable")  # sorted id -> file row
        rows = file_row[on]
        n = sel_rows.size
        tracks = Tracks(
            params=truth_perigee(
                parts.vertex[sel_rows], parts.momentum[sel_rows], parts.charge[sel_rows], 2.0
            ),
            cov=np.tile(np.diag(COV_DIAG), (n, 1, 1)),
            chi2=np.zeros(n),
            ndf=np.full(n, 10, np.int32),
            n_holes=np.zeros(n, np.int32),
            meas_offsets=offsets.astype(np.int64),
            meas_geometry_id=meas.geometry_id[rows],
            meas_local0=meas.local0[rows],
            meas_local1=meas.local1[rows],
            meas_dimension=meas.dimension[rows],
            meas_truth_id=mt.measurement_id[on],
            event_id=s.event_id,
        )
        write_tracks(tmp_path, tracks)
    r = validate(bundled, tmp_path, bfield_t=2.0, max_events=len(sources))
    assert r["n_selected_particles"] > 0
    assert (r["efficiency"], r["fake_rate"], r["duplicate_rate"]) == (1.0, 0.0, 0.0)
    for name in ("resolution", "pulls"):
        for st in r[name].values():
            assert st["n"] == r["n_selected_particles"]
            assert math.isfinite(st["mean"]) and math.isfinite(st["std"])
    assert abs(r["resolution"]["d0"]["mean"]) < 1e-6  # written with 9 significant digits
