"""Truth matching: measurements -> particles, tracks and seeds -> particles, and truth perigee parameters.

Everything here is vectorized numpy over a whole event (no Python loop over measurements, hits or
tracks), so a mu=200 event (80k measurements, 7k particles, 10k tracks) is matched in milliseconds.

Definitions (the ones ACTS' ``TrackTruthMatcher`` and domain.md section 3 use):

- A measurement belongs to the particle that contributed most of its simulated hits
  (measurement_id -> hit_id through the simhit map, hit_id -> particle_id through the hits file);
  ties go to the particle whose hit comes first in the simhit map. A particle's measurements are the
  measurements that belong to it.
- A track matches particle P when at least ``min_fraction`` (0.5) of the track's measurements belong
  to P (purity; the denominator counts every measurement of the track, also those without truth)
  *and* the track holds at least ``min_fraction`` of P's measurements (completeness). A track matches
  at most one particle: if two qualify (an exact 50/50 split) it takes the one of which it holds the
  larger share, then the one met first along the track.
- A seed matches P when all three of its measurements belong to P.

Truth perigee parameters follow ACTS' bound perigee convention with respect to the z axis:
``(d0, z0, phi, theta, q/p)``; the point of closest approach is ``(-d0 sin(phi), d0 cos(phi), z0)``
with ``phi`` the momentum direction there, i.e. d0 > 0 when the perigee lies on the left of the track
direction seen from +z (ACTS ``LineSurface::localToGlobal``: loc0 along ``lineDirection x direction``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: c in GeV / (T m e): a charge-1 particle with pT = 1 GeV in 1 T bends with a radius of 1 / C_LIGHT m.
C_LIGHT = 0.299792458


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """Start positions of runs of equal consecutive key tuples (the keys are already sorted)."""
    n = keys[0].shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    change = np.zeros(n, bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def lookup_index(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Position of each ``query`` value in ``sorted_keys`` (ascending, unique), -1 where absent."""
    query = np.asarray(query)
    if sorted_keys.shape[0] == 0:
        return np.full(query.shape, -1, np.int64)
    pos = np.searchsorted(sorted_keys, query)
    pos = np.minimum(pos, sorted_keys.shape[0] - 1)
    return np.where(sorted_keys[pos] == query, pos, -1).astype(np.int64)


@dataclass(frozen=True)
class MeasurementTruth:
    """Truth particle of every measurement of one event.

    Attributes:
        measurement_id: truth measurement ids, ascending and unique (int64 [M]).
        particle: index into ``particle_id`` of the particle each measurement belongs to, -1 when the
            measurement has no simulated hit (int64 [M]).
        particle_id: packed barcodes of every particle seen in the particles or hits file, ascending
            and unique (uint64 [P]).
        n_measurements: number of measurements belonging to each particle (int64 [P]).
    """

    measurement_id: np.ndarray
    particle: np.ndarray
    particle_id: np.ndarray
    n_measurements: np.ndarray

    def particle_of(self, measurement_ids: np.ndarray) -> np.ndarray:
        """Particle index (into ``particle_id``) of each truth measurement id; -1 for unknown ids or -1."""
        pos = lookup_index(self.measurement_id, np.asarray(measurement_ids, np.int64))
        return np.where(pos >= 0, self.particle[np.maximum(pos, 0)] if self.particle.size else -1, -1)

    def particle_index(self, particle_ids: np.ndarray) -> np.ndarray:
        """Index of each packed barcode in ``particle_id``; -1 where absent."""
        return lookup_index(self.particle_id, np.asarray(particle_ids, np.uint64))


def measurement_truth(
    measurement_id: np.ndarray,
    map_measurement_id: np.ndarray,
    map_hit_id: np.ndarray,
    hit_particle_id: np.ndarray,
    particle_id: np.ndarray | None = None,
) -> MeasurementTruth:
    """Associate every measurement with its majority particle.

    Parameters:
        measurement_id: ids of the measurements file (int64 [M]; any order, duplicates collapse).
        map_measurement_id, map_hit_id: the measurement -> simulated-hit map rows, in file order (int64).
        hit_particle_id: packed barcode of every simulated hit, indexed by hit_id (uint64 [H]).
        particle_id: barcodes of the particles file (uint64), so particles without hits get an index too.

    Returns:
        The association. Map rows whose measurement id is not in the measurements file are ignored.
    """
    mids = np.unique(np.asarray(measurement_id, np.int64))
    extra = np.zeros(0, np.uint64) if particle_id is None else np.asarray(particle_id, np.uint64)
    pids = np.unique(np.concatenate([extra, np.asarray(hit_particle_id, np.uint64)]))
    particle = np.full(mids.shape[0], -1, np.int64)
    if map_measurement_id.shape[0]:
        row_meas = lookup_index(mids, np.asarray(map_measurement_id, np.int64))
        row_part = lookup_index(pids, np.asarray(hit_particle_id, np.uint64)[map_hit_id])
        keep = np.flatnonzero(row_meas >= 0)
        m, p = row_meas[keep], row_part[keep]
        # count hits per (measurement, particle); lexsort is stable, so the first row of a run is
        # the pair's first appearance in the map
        order = np.lexsort((p, m))
        m, p, first = m[order], p[order], keep[order]
        starts = _run_starts(m, p)
        counts = np.diff(np.append(starts, m.shape[0]))
        rm, rp, rfirst = m[starts], p[starts], first[starts]
        # per measurement: most hits, ties to the earliest map row
        best = np.lexsort((rfirst, -counts, rm))
        rm, rp = rm[best], rp[best]
        head = _run_starts(rm)
        particle[rm[head]] = rp[head]
    n_meas = np.bincount(particle[particle >= 0], minlength=pids.shape[0]).astype(np.int64)
    return MeasurementTruth(measurement_id=mids, particle=particle, particle_id=pids, n_measurements=n_meas)


@dataclass(frozen=True)
class TrackMatch:
    """Result of matching one event's tracks.

    Attributes:
        particle: matched particle index per track, -1 for a fake (int64 [T]).
        n_shared: measurements of the track from the matched particle, else from its majority particle
            (int64 [T]).
        purity: ``n_shared`` / track measurements (float64 [T]; 0 for a track without measurements).
        completeness: ``n_shared`` / measurements of that particle (float64 [T]; 0 without a particle).
        duplicate: matched track that is not its particle's primary track (bool [T]); the primary is
            the matched track holding most of the particle's measurements, ties to the lowest index.
    """

    particle: np.ndarray
    n_shared: np.ndarray
    purity: np.ndarray
    completeness: np.ndarray
    duplicate: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        return self.particle >= 0


def match_tracks(
    meas_offsets: np.ndarray,
    meas_particle: np.ndarray,
    n_particle_measurements: np.ndarray,
    min_fraction: float = 0.5,
) -> TrackMatch:
    """Double-majority matching of tracks to particles.

    Parameters:
        meas_offsets: track ``t`` owns rows ``meas_offsets[t]:meas_offsets[t+1]`` (int64 [T+1]).
        meas_particle: particle index of each track measurement row, -1 without truth (int64).
        n_particle_measurements: measurements per particle (int64 [P]).
        min_fraction: the purity and completeness threshold (inclusive).
    """
    offsets = np.asarray(meas_offsets, np.int64)
    n_tracks = offsets.shape[0] - 1
    n_meas = np.diff(offsets)
    owner = np.repeat(np.arange(n_tracks), n_meas)
    rows = np.flatnonzero(np.asarray(meas_particle) >= 0)
    t, p = owner[rows], np.asarray(meas_particle, np.int64)[rows]
    order = np.lexsort((p, t))  # stable: the run's first row is the first one along the track
    t, p, pos = t[order], p[order], rows[order]
    starts = _run_starts(t, p)
    count = np.diff(np.append(starts, t.shape[0]))
    rt, rp, rpos = t[starts], p[starts], pos[starts]
    n_part = np.asarray(n_particle_measurements, np.int64)[rp] if rp.size else np.zeros(0, np.int64)
    # a tiny tolerance keeps ratios like 7/10 >= 0.7 exact-inclusive despite rounding
    eps = 1e-9
    ok = (count + eps >= min_fraction * n_meas[rt]) & (count + eps >= min_fraction * n_part)
    completeness = count / np.maximum(n_part, 1)

    particle = np.full(n_tracks, -1, np.int64)
    n_shared = np.zeros(n_tracks, np.int64)
    compl = np.zeros(n_tracks)
    # majority particle of every track (diagnostics for unmatched tracks): most rows, then first along it
    maj = np.lexsort((rpos, -count, rt))
    head = maj[_run_starts(rt[maj])]
    n_shared[rt[head]] = count[head]
    compl[rt[head]] = completeness[head]
    # matched particle: among qualifying pairs, most rows, then larger share of the particle, then first
    cand = np.flatnonzero(ok)
    sel = cand[np.lexsort((rpos[cand], -completeness[cand], -count[cand], rt[cand]))]
    head = sel[_run_starts(rt[sel])]
    particle[rt[head]] = rp[head]
    n_shared[rt[head]] = count[head]
    compl[rt[head]] = completeness[head]

    duplicate = np.zeros(n_tracks, bool)
    m = np.flatnonzero(particle >= 0)
    if m.size:
        # primary track per particle: largest completeness, then lowest track index
        o = m[np.lexsort((m, -n_shared[m], particle[m]))]
        first = np.zeros(o.size, bool)
        first[_run_starts(particle[o])] = True
        duplicate[o[~first]] = True
    purity = n_shared / np.maximum(n_meas, 1)
    return TrackMatch(
        particle=particle, n_shared=n_shared, purity=purity, completeness=compl, duplicate=duplicate
    )


def match_seeds(
    particle_bottom: np.ndarray, particle_middle: np.ndarray, particle_top: np.ndarray
) -> np.ndarray:
    """Particle index per seed when all three spacepoints' measurements belong to it, else -1."""
    b = np.asarray(particle_bottom, np.int64)
    same = (b >= 0) & (b == particle_middle) & (b == particle_top)
    return np.where(same, b, -1)


def truth_perigee(
    vertex: np.ndarray, momentum: np.ndarray, charge: np.ndarray, bfield_t: float
) -> np.ndarray:
    """Perigee parameters of the truth helices with respect to the z axis, in a solenoid field along +z.

    The particle starts at ``vertex`` with ``momentum``; the helix (no energy loss) is followed forward
    or backward to its point of closest approach (PCA) to the z axis in the transverse plane.

    With signed curvature ``rho = -q B c / pT`` [1/mm] (rho > 0: counter-clockwise seen from +z),
    ``a = -x0 sin(phi0) + y0 cos(phi0)`` and ``b = x0 cos(phi0) + y0 sin(phi0)``:

    - ``d0 = (2a + rho r0^2) / (1 + sqrt(1 + 2 a rho + rho^2 r0^2))`` (equals h (|c| - R) for a circle
      of radius R and centre c, h = sign(rho); tends to ``a`` for a straight line),
    - ``phi = atan2(sin(phi0) - rho x0, cos(phi0) + rho y0)`` (direction at the PCA),
    - ``z0 = z_vertex + s cot(theta)`` with transverse path ``s = atan2(-rho b, 1 + rho a) / rho``
      (``-b`` for a straight line),
    - ``theta = atan2(pT, pz)``, ``q/p = q / |p|``.

    Parameters:
        vertex: production vertex [mm] (float64 [n, 3]).
        momentum: momentum at the vertex [GeV] (float64 [n, 3]).
        charge: [e] (float64 [n]).
        bfield_t: field along +z [T].

    Returns:
        float64 [n, 5]: d0 [mm], z0 [mm], phi [rad], theta [rad], q/p [e/GeV].
    """
    x0, y0, z_v = (np.asarray(vertex, np.float64)[:, k] for k in range(3))
    px, py, pz = (np.asarray(momentum, np.float64)[:, k] for k in range(3))
    q = np.asarray(charge, np.float64)
    pt = np.hypot(px, py)
    p = np.sqrt(pt * pt + pz * pz)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(pt > 0, -q * bfield_t * C_LIGHT * 1e-3 / pt, 0.0)
        phi0 = np.arctan2(py, px)
        s0, c0 = np.sin(phi0), np.cos(phi0)
        a = -x0 * s0 + y0 * c0
        b = x0 * c0 + y0 * s0
        r2 = x0 * x0 + y0 * y0
        d0 = (2 * a + rho * r2) / (1 + np.sqrt(np.maximum(1 + 2 * a * rho + rho * rho * r2, 0.0)))
        phi = np.arctan2(s0 - rho * x0, c0 + rho * y0)
        straight = np.abs(rho) < 1e-12
        s = np.where(straight, -b, np.arctan2(-rho * b, 1 + rho * a) / np.where(straight, 1.0, rho))
        z0 = z_v + np.where(pt > 0, s * pz / np.where(pt > 0, pt, 1.0), 0.0)
        theta = np.arctan2(pt, pz)
        qop = np.where(p > 0, q / np.where(p > 0, p, 1.0), 0.0)
    return np.stack([d0, z0, phi, theta, qop], axis=1)
