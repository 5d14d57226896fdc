"""Combinatorial Kalman filter (track finding), batched over all candidates of a batch of events.

Every seed starts as one candidate: its estimated parameters are filtered through the seed's own
three measurements (bottom, middle, top). Then, one step for all active candidates at once:

1. navigation finds the next layer each candidate reaches (:func:`kernels.navigation.next_layer`)
   and the modules around the crossing;
2. the candidate is transported to each module plane (helix, finite-difference Jacobian); modules
   whose bounds the prediction lies in (with a tolerance) are searched;
3. every measurement on those modules gets a chi^2 against the prediction; the best
   ``max_branches_per_surface`` under ``chi2_max`` become children (Kalman update), each linked to
   its parent (parent node, measurement), as traccc does;
4. a candidate without a compatible measurement continues on its prediction: a hole if it crossed
   a module inside its bounds, nothing if it passed through a gap;
5. material: each module crossing adds multiple scattering (:mod:`kernels.kalman`).

Candidates stop when they leave the detector, exceed ``max_holes``, or after ``max_steps`` layers;
each seed keeps at most ``max_branches_per_seed`` live candidates (most measurements, then lowest
chi^2). After a measurement is added, the other modules of the same layer ahead of it are searched too
(without branching): tracks crossing the overlap of two modules collect both hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from kernels import fused, fused_prune
from kernels.candidates import CHI2, COV, HOLES, M1, M2, MODULE, N_MEAS, NODE, PARAMS, S_DONE, Candidates
from kernels.detector import Detector
from kernels.edm.measurements import Measurements, Spacepoints
from kernels.edm.seeds import BoundParameters, Seeds
from kernels.errors import ConfigError
from kernels.kalman import add_scattering, chi2_gather, update
from kernels.navigation import NavigationGrid, modules_near, next_layer
from kernels.profiling import section
from kernels.propagation import NEWTON_STEPS, bound_to_global, helix_at, intersect_plane, transport, turn_rate
from kernels.segments import expand_ranges, rank_in_segment
from kernels.xp import Array, HostCopy, argsort_stable, asarray, to_numpy

# x/X0 crossed per layer at normal incidence in the ACTS generic detector, by volume: the value for
# which Highland's formula reproduces the simulated polar-angle scattering between consecutive hits
# (3 mu=50 events, p > 1 GeV, each hit's incidence angle accounted for)
GENERIC_MATERIAL = {
    7: 0.023,
    8: 0.019,
    9: 0.023,
    12: 0.029,
    13: 0.017,
    14: 0.030,
    16: 0.065,
    17: 0.025,
    18: 0.072,
}


@dataclass(frozen=True)
class FindingConfig:
    """Track-finding configuration.

    Attributes:
        chi2_max: largest chi^2 of a measurement added to a candidate (15).
        max_branches_per_surface: children per candidate and layer (2).
        max_branches_per_seed: live candidates per seed (4).
        max_holes: holes allowed before a candidate stops (2).
        max_steps: layers followed at most (40).
        min_measurements: shortest candidate kept as a track candidate (7).
        max_rows_without_wait: on the GPU, a CKF step whose tables can be sized from a bound of at most
            this many rows runs without waiting for the host; above it the step waits for its exact
            sizes (131072; 0: every step waits). A step holds ~1.4 kB of GPU memory per row of its
            bound: at mu=200 and batch 1 the early steps wait, the later ones do not.
        bounds_tolerance_mm: a prediction this far outside a module still searches it [mm] (0.5).
        layer_tolerance_mm: a crossing this far outside a layer's extent still visits it [mm] (10).
        merge_duplicates: after every step keep one candidate per (event, last two measurements), the
            one with most measurements and lowest chi^2 (True).
        material_x0_by_volume: x/X0 per layer crossing, by volume id (generic detector values).
        material_x0_default: x/X0 for volumes not listed (0.03).
    """

    chi2_max: float = 15.0
    max_branches_per_surface: int = 2
    max_branches_per_seed: int = 4
    max_holes: int = 2
    max_steps: int = 40
    min_measurements: int = 7
    max_rows_without_wait: int = 131_072
    bounds_tolerance_mm: float = 0.5
    layer_tolerance_mm: float = 10.0
    merge_duplicates: bool = True
    material_x0_by_volume: dict[int, float] = field(default_factory=lambda: dict(GENERIC_MATERIAL))
    material_x0_default: float = 0.03

    def __post_init__(self) -> None:
        if self.chi2_max <= 0 or self.max_branches_per_surface < 1 or self.max_branches_per_seed < 1:
            raise ConfigError("FindingConfig: chi2_max > 0 and at least one branch per surface and seed")
        if self.max_holes < 0 or self.max_steps < 1 or self.min_measurements < 3:
            raise ConfigError("FindingConfig: max_holes >= 0, max_steps >= 1, min_measurements >= 3")
        if self.max_rows_without_wait < 0:
            raise ConfigError("FindingConfig: max_rows_without_wait >= 0")


@dataclass(frozen=True)
class FindingGeometry:
    """What finding needs of the detector, prepared once: navigation grid and material per module."""

    nav: NavigationGrid
    material: Array  # x/X0 per module crossing (float64 [M])
    half_u: Array  # local half-widths for the bounds check (float64 [M, 3]: u at v=-hv, u at v=+hv, hv)


def finding_geometry(
    xp: ModuleType, det: Detector, nav: NavigationGrid, cfg: FindingConfig
) -> FindingGeometry:
    vol = np.asarray(det.volume_id)
    mat = np.array([cfg.material_x0_by_volume.get(int(v), cfg.material_x0_default) for v in vol])
    b = np.asarray(det.bounds)
    rect = np.asarray(det.bounds_type) == 6
    hx_lo = np.where(rect, np.maximum(-b[:, 0], b[:, 2]), b[:, 0])
    hx_hi = np.where(rect, np.maximum(-b[:, 0], b[:, 2]), b[:, 1])
    hy = np.where(rect, np.maximum(-b[:, 1], b[:, 3]), b[:, 2])
    return FindingGeometry(
        nav=nav.to(xp), material=asarray(xp, mat), half_u=asarray(xp, np.stack([hx_lo, hx_hi, hy], axis=1))
    )


def inside_bounds(
    xp: ModuleType, geo: FindingGeometry, module: Array, l0: Array, l1: Array, tol: float
) -> Array:
    """Local point inside the (rectangle or trapezoid) bounds, widened by ``tol`` [mm]."""
    hu = geo.half_u[module]
    hv = hu[:, 2]
    frac = xp.clip((l1 + hv) / xp.maximum(2 * hv, 1e-9), 0.0, 1.0)
    half_x = hu[:, 0] + (hu[:, 1] - hu[:, 0]) * frac
    return (xp.abs(l0) <= half_x + tol) & (xp.abs(l1) <= hv + tol)


@dataclass(frozen=True)
class TrackCandidates:
    """Found track candidates: measurement indices per candidate, inside out.

    Attributes:
        offsets: candidate ``i`` owns ``measurements[offsets[i]:offsets[i+1]]`` (int64 [C+1]).
        measurements: indices into :class:`Measurements` (int64).
        seed: seed index of each candidate (int64 [C]); event: event index (int32 [C]).
        chi2: sum of the filtered chi^2 (float64 [C]); n_holes (int32 [C]).
        params, cov, module: the last filtered state (bound to ``module``).
    """

    offsets: Array
    measurements: Array
    seed: Array
    event: Array
    chi2: Array
    n_holes: Array
    params: Array
    cov: Array
    module: Array

    @property
    def size(self) -> int:
        return int(self.seed.shape[0])

    @property
    def n_measurements(self) -> Array:
        return self.offsets[1:] - self.offsets[:-1]


class _Nodes:
    """Append-only link table: (parent node, measurement) per filtered state."""

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        self.parent: list[Array] = []
        self.meas: list[Array] = []
        self.count = 0

    def add(self, parent: Array, meas: Array) -> Array:
        n = parent.shape[0]
        ids = self.xp.arange(self.count, self.count + n, dtype=self.xp.int64)
        self.parent.append(parent.astype(self.xp.int64))
        self.meas.append(meas.astype(self.xp.int64))
        self.count += n
        return ids

    def append(self, parent: Array, meas: Array) -> None:
        """Append entries whose ids the caller assigned (count, count + 1, ...); int64 arrays."""
        self.parent.append(parent)
        self.meas.append(meas)
        self.count += int(parent.shape[0])

    def arrays(self) -> tuple[Array, Array]:
        xp = self.xp
        if not self.parent:
            return xp.zeros(0, dtype=xp.int64), xp.zeros(0, dtype=xp.int64)
        return xp.concatenate(self.parent), xp.concatenate(self.meas)


def _meas_ranges(xp: ModuleType, meas: Measurements, n_modules: int) -> Array:
    """Sorted (event, module) key of each measurement."""
    return meas.event.astype(xp.int64) * n_modules + meas.module.astype(xp.int64)


def _cos_incidence(xp: ModuleType, det: Detector, module: Array, phi: Array, theta: Array) -> Array:
    rot = det.rotation[module]
    st = xp.sin(theta)
    return rot[:, 0, 2] * st * xp.cos(phi) + rot[:, 1, 2] * st * xp.sin(phi) + rot[:, 2, 2] * xp.cos(theta)


def find_tracks(
    xp: ModuleType,
    det: Detector,
    geo: FindingGeometry,
    meas: Measurements,
    sp: Spacepoints,
    seeds: Seeds,
    params: BoundParameters,
    variances: tuple[Array, Array],
    cfg: FindingConfig,
) -> TrackCandidates:
    """Track candidates of all seeds (see the module docstring).

    Args:
        variances: measurement variances (loc0, loc1) for the filter (:mod:`kernels.measurement_errors`).
    """
    bfield = det.bfield_t
    n_mod = det.n_modules
    mkey = _meas_ranges(xp, meas, n_mod)
    mv0, mv1 = variances
    nodes = _Nodes(xp)
    ctx = _Context(xp, det, geo, meas, mkey, mv0, mv1, cfg, bfield)
    if fused.enabled(xp):
        return _collect(xp, nodes, _find_fused(ctx, sp, seeds, params, nodes), cfg)

    state = _start(xp, det, geo, meas, sp, seeds, params, mv0, mv1, nodes)
    finished: list[Candidates] = []
    for _ in range(cfg.max_steps):
        if state.size == 0:
            break
        with section("finding.step"):
            done, state = _array_step(ctx, state, nodes)
        finished.extend(done)
        if state.size:
            with section("finding.prune"):
                state = _prune(xp, state, meas.size, seeds.size, cfg)
    if state.size:
        finished.append(state)
    return _collect(xp, nodes, finished, cfg)


def _start(
    xp: ModuleType, det: Detector, geo: FindingGeometry, meas: Measurements, sp: Spacepoints, seeds: Seeds,
    params: BoundParameters, mv0: Array, mv1: Array, nodes: _Nodes,
) -> Candidates:  # fmt: skip
    """The first candidates: each seed's bottom, middle and top measurements filtered in turn
    (scattering on the module left, transport, update); seeds whose transport fails are dropped."""
    bfield = det.bfield_t
    seed_meas = [sp.measurement[seeds.bottom], sp.measurement[seeds.middle], sp.measurement[seeds.top]]
    p, c = params.params, params.cov
    module = params.module
    chi2 = xp.zeros(seeds.size, dtype=xp.float64)
    alive = xp.ones(seeds.size, dtype=bool)
    node = xp.full(seeds.size, -1, dtype=xp.int64)
    for k, mi in enumerate(seed_meas):
        if k > 0:
            target = meas.module[mi]
            _, _, _, phi_, th_, _ = bound_to_global(xp, det, module, p)
            c = add_scattering(xp, p, c, geo.material[module], _cos_incidence(xp, det, module, phi_, th_))
            p, c, s, _ = transport(xp, det, module, target, p, c, bfield)
            alive &= ~xp.isnan(s)
            p = xp.where(alive[:, None], p, params.params)
            c = xp.where(alive[:, None, None], c, params.cov)
            module = target
        p, c, dchi2 = update(xp, p, c, meas.local0[mi], meas.local1[mi], mv0[mi], mv1[mi], meas.dimension[mi])
        if k > 0:  # the bottom measurement only fixes loc0/loc1, which the seed took from it
            chi2 += dchi2
        node = nodes.add(node, mi)
    keep = xp.nonzero(alive)[0]
    return Candidates.build(
        xp,
        params=p[keep],
        cov=c[keep],
        chi2=chi2[keep],
        s_done=0.0,
        module=module[keep],
        event=seeds.event[keep],
        seed=keep,
        node=node[keep],
        n_meas=3,
        holes=0,
        m1=seed_meas[2][keep],
        m2=seed_meas[1][keep],
    )


def _prune(
    xp: ModuleType, state: Candidates, n_meas_total: int, n_seeds: int, cfg: FindingConfig
) -> Candidates:
    """The live candidates after a step's duplicate merge (when configured) and per-seed cap, in row
    order (the fused path keeps the same rows with kernels/fused_prune.py)."""
    if cfg.merge_duplicates:
        state = _merge_duplicates(xp, state, n_meas_total)
    return _cap_per_seed(xp, state, cfg.max_branches_per_seed)


def _merge_duplicates(xp: ModuleType, state: Candidates, n_meas_total: int) -> Candidates:
    """Keep one candidate per (event, last two measurements): different seeds of one particle reach
    the same measurements after a few layers, and following each of them would only make duplicates."""
    key = (state.event * (n_meas_total + 1) + state.m1) * (n_meas_total + 1) + state.m2
    n_meas = state.n_meas
    quality = state.chi2 / xp.maximum(n_meas, 1) - 3.0 * n_meas
    # lexsort by (key, quality) as two stable radix sorts, least significant key first
    order = argsort_stable(xp, quality)
    order = order[argsort_stable(xp, key[order])]
    first = rank_in_segment(xp, key[order]) == 0
    keep = xp.sort(order[first])
    return state.take(keep)


def _cap_per_seed(xp: ModuleType, state: Candidates, max_per_seed: int) -> Candidates:
    """At most ``max_per_seed`` live candidates per seed: most measurements, then lowest chi^2."""
    seed = state.seed
    # lexsort by (seed, -n_meas, chi2) as two stable radix sorts: chi2, then seed and n_meas in one key
    # (n_meas < 1024: 3 seed measurements plus at most two per layer step)
    order = argsort_stable(xp, state.chi2)
    major = seed * 1024 + (1023 - xp.minimum(state.n_meas, 1023))
    order = order[argsort_stable(xp, major[order])]
    keep = xp.sort(order[rank_in_segment(xp, seed[order]) < max_per_seed])
    return state.take(keep)


@dataclass
class _Found:
    """Result of a measurement search on one layer for a set of candidates."""

    cand: Array  # candidate row per compatible (candidate, measurement)
    pair: Array  # row into pred_* per compatible measurement
    meas: Array  # measurement index
    chi2: Array
    pred_params: Array  # predicted states on the searched modules
    pred_cov: Array
    module: Array  # module of each prediction
    crossed: Array  # per candidate: crossed a module inside its bounds
    nearest: Array  # per candidate: row of its nearest prediction, -1 if none


class _Context:
    """The per-call constants of a finding run, and the layer search shared by both phases."""

    def __init__(self, xp, det, geo, meas, mkey, mv0, mv1, cfg, bfield) -> None:
        self.xp, self.det, self.geo, self.meas, self.mkey = xp, det, geo, meas, mkey
        self.mv0, self.mv1, self.cfg, self.bfield = mv0, mv1, cfg, bfield

    def search(self, st, cov, layer, lx, ly, lz, x, y, z, phi, theta, h, exclude_module) -> _Found:
        """Transport candidates to the modules of ``layer`` around (lx, ly, lz) and test their measurements."""
        xp, det, geo, meas, cfg = self.xp, self.det, self.geo, self.meas, self.cfg
        n = layer.shape[0]
        owner, mod = modules_near(xp, geo.nav, layer, lx, ly, lz)
        if exclude_module is not None:
            other = mod != exclude_module[owner]
            owner, mod = owner[other], mod[other]
        s_m, l0, l1, _, _, _, _ = intersect_plane(
            xp, det, mod, x[owner], y[owner], z[owner], phi[owner], theta[owner], h[owner]
        )
        valid = ~xp.isnan(s_m) & (s_m > 0)
        in_strict = valid & inside_bounds(xp, geo, mod, l0, l1, 0.0)
        in_search = valid & inside_bounds(xp, geo, mod, l0, l1, cfg.bounds_tolerance_mm)
        crossed = xp.zeros(n, dtype=bool)
        crossed[owner[in_strict]] = True
        sel = xp.nonzero(in_search)[0]
        o_sel, mod_sel = owner[sel], mod[sel]
        pp, pc, s_t, _ = transport(
            xp, det, st.module[o_sel], mod_sel, st.params[o_sel], cov[o_sel], self.bfield, s_m[sel]
        )
        ok_t = ~xp.isnan(s_t)
        nearest = xp.full(n, -1, dtype=xp.int64)
        okr = xp.nonzero(ok_t)[0]
        if okr.shape[0]:
            o2 = o_sel[okr]
            srt = xp.lexsort(xp.stack([s_t[okr], o2.astype(xp.float64)]))
            first = rank_in_segment(xp, o2[srt]) == 0
            nearest[o2[srt][first]] = okr[srt][first]
        key = st.event[o_sel] * det.n_modules + mod_sel.astype(xp.int64)
        lo = xp.searchsorted(self.mkey, key, side="left")
        hi = xp.where(ok_t, xp.searchsorted(self.mkey, key, side="right"), lo)
        pair, mi = expand_ranges(xp, lo, hi - lo)
        chi = chi2_gather(xp, pp, pc, pair, meas.local0, meas.local1, self.mv0, self.mv1, meas.dimension, mi)
        good = chi < cfg.chi2_max
        pair, mi, chi = pair[good], mi[good], chi[good]
        return _Found(o_sel[pair], pair, mi, chi, pp, pc, mod_sel, crossed, nearest)

    def overlap(self, children: Candidates, layer: Array, nodes: _Nodes) -> None:
        """A second measurement on another module of the same layer (module overlaps), ahead of the
        first: the children that find one are extended in place."""
        xp, det, meas = self.xp, self.det, self.meas
        if children.size == 0:
            return
        module, params = children.module, children.params
        x, y, z, phi, theta, qop = bound_to_global(xp, det, module, params)
        cov = add_scattering(
            xp, params, children.cov, self.geo.material[module], _cos_incidence(xp, det, module, phi, theta)
        )
        h = turn_rate(qop, self.bfield)
        found = self.search(children, cov, layer, x, y, z, x, y, z, phi, theta, h, module)
        cand, pair, mi, chi = found.cand, found.pair, found.meas, found.chi2
        order = xp.lexsort(xp.stack([chi, cand.astype(xp.float64)]))
        best = order[rank_in_segment(xp, cand[order]) == 0]
        cand, pair, mi = cand[best], pair[best], mi[best]
        if cand.shape[0] == 0:
            return
        up_p, up_c, up_chi = update(
            xp,
            found.pred_params[pair],
            found.pred_cov[pair],
            meas.local0[mi],
            meas.local1[mi],
            self.mv0[mi],
            self.mv1[mi],
            meas.dimension[mi],
        )
        _extend(children, cand, up_p, up_c, up_chi, found.module[pair], mi, nodes)


def _extend(
    cands: Candidates,
    rows: Array | slice,
    params: Array,
    cov: Array,
    chi2: Array,
    module: Array,
    meas: Array,
    nodes: _Nodes,
) -> None:
    """Candidates ``rows`` (indices or a slice) take one more measurement each (updated states on
    ``module``), in place."""
    real, index = cands.real, cands.index
    real[rows, PARAMS] = params
    real[rows, COV] = cov.reshape(-1, 25)
    real[rows, CHI2] += chi2
    index[rows, MODULE] = module
    index[rows, NODE] = nodes.add(index[rows, NODE], meas)
    index[rows, M2] = index[rows, M1]
    index[rows, M1] = meas
    index[rows, N_MEAS] += 1


def _array_step(ctx: _Context, st: Candidates, nodes: _Nodes) -> tuple[list[Candidates], Candidates]:
    """One layer step of all candidates with array code: (finished candidates, live candidates)."""
    xp, det, geo, meas, cfg, bfield = ctx.xp, ctx.det, ctx.geo, ctx.meas, ctx.cfg, ctx.bfield
    mv0, mv1 = ctx.mv0, ctx.mv1
    done: list[Candidates] = []
    module, params = st.module, st.params
    x, y, z, phi, theta, qop = bound_to_global(xp, det, module, params)
    # scattering in the module the candidate sits on, before leaving it
    cov = add_scattering(
        xp, params, st.cov, geo.material[module], _cos_incidence(xp, det, module, phi, theta)
    )
    h = turn_rate(qop, bfield)
    layer, s_layer = next_layer(
        xp, geo.nav, x, y, z, phi, theta, h, det.layer_index[module].astype(xp.int64), st.s_done,
        cfg.layer_tolerance_mm,
    )  # fmt: skip
    go = _split_leaving(xp, st, layer, done)
    st = st.take(go)
    cov = cov[go]
    x, y, z, phi, theta, h, layer, s_layer = (a[go] for a in (x, y, z, phi, theta, h, layer, s_layer))
    lx, ly, lz, _ = helix_at(xp, x, y, z, phi, theta, h, s_layer)
    found = ctx.search(st, cov, layer, lx, ly, lz, x, y, z, phi, theta, h, exclude_module=None)
    cand, pair, mi, chi = found.cand, found.pair, found.meas, found.chi2
    order = xp.lexsort(xp.stack([chi, cand.astype(xp.float64)]))
    cand, pair, mi, chi = cand[order], pair[order], mi[order], chi[order]
    take = rank_in_segment(xp, cand) < cfg.max_branches_per_surface
    cand, pair, mi, chi = cand[take], pair[take], mi[take], chi[take]
    up_p, up_c, up_chi = update(
        xp,
        found.pred_params[pair],
        found.pred_cov[pair],
        meas.local0[mi],
        meas.local1[mi],
        mv0[mi],
        mv1[mi],
        meas.dimension[mi],
    )
    children = _children(xp, st, cand, up_p, up_c, up_chi, found.module[pair], mi, nodes)
    ctx.overlap(children, layer[cand], nodes)
    # candidates without a compatible measurement continue on their prediction at the nearest
    # module crossed (a hole when inside its bounds), or stay put past a gap in the layer
    n = go.shape[0]
    has = xp.zeros(n, dtype=bool)
    has[cand] = True
    lost = xp.nonzero(~has)[0]
    pr = found.nearest[lost]
    moved = pr >= 0
    pr0 = xp.maximum(pr, 0)
    if found.pred_params.shape[0]:
        pred = (found.pred_params[pr0], found.pred_cov[pr0], found.module[pr0])
    else:
        pred = (st.params[lost], cov[lost], st.module[lost])
    lone = _continue_without_measurement(
        xp, st, lost, cov[lost], moved, pred, found.crossed[lost], s_layer[lost], cfg.max_holes, done
    )
    return done, Candidates.concat(xp, [children, lone])


def _split_leaving(xp: ModuleType, st: Candidates, layer: Array, done: list[Candidates]) -> Array:
    """Rows of the candidates that reach another layer; those leaving the detector go to ``done``."""
    go = xp.nonzero(layer >= 0)[0]
    if go.shape[0] < st.size:
        done.append(st.take(xp.nonzero(layer < 0)[0]))
    return go


def _find_fused(
    ctx: _Context, sp: Spacepoints, seeds: Seeds, params: BoundParameters, nodes: _Nodes
) -> list[Candidates]:
    """The CKF on the GPU: the finished candidates in the order of the array code, the last step's live
    ones last.

    The start is one kernel (``seed_start``). A step is a layer search (one kernel writes every row the
    step may produce and four flag vectors), a prefix sum of the flags, one compaction kernel, the
    overlap search and the prune (kernels/fused_prune.py), which marks the rows the next step takes
    (``active``) instead of compacting them. The compaction reads its bounds from the prefix sum itself
    and writes the step's counts (rows, children, finished so far) to the device; the host copies
    them back without waiting and sizes the next tables from a bound:

    next rows <= max_branches_per_surface x this step's rows, this step's rows <= the same factor x the
    previous step's, whose exact count the host reads once the GPU has gone past it (one step behind,
    so the host waits while the GPU works on the step in between). Tables are then up to
    max_branches_per_surface^2 times the live rows, the rows past the live count idle. Where that
    bound exceeds ``FindingConfig.max_rows_without_wait`` (large batches), the step waits for its
    exact sizes instead.
    """
    xp, det, geo, meas, cfg = ctx.xp, ctx.det, ctx.geo, ctx.meas, ctx.cfg
    k_max = cfg.max_branches_per_surface
    real, index, active, node_parent, node_meas = fused.seed_start(
        xp, det, geo, meas, sp, seeds, params, ctx.mv0, ctx.mv1, nodes.count, NEWTON_STEPS
    )
    nodes.append(node_parent, node_meas)
    n_seeds = seeds.size
    if n_seeds == 0:
        return []
    # no step has more rows than the prune's cap allows: max_branches_per_seed per seed, each branching
    rows_bound = max(n_seeds, k_max * cfg.max_branches_per_seed * n_seeds)
    done = _DoneTables(xp, 0)  # sized by the first step that finishes rows
    counts: list[HostCopy] = []  # per step: (next rows, children, finished so far in its table), on the host
    rows = [n_seeds]  # rows of each step's input table
    for step in range(cfg.max_steps):
        cap = rows[-1]
        if cap == 0:  # an exactly sized step left nothing
            break
        if step >= 2:
            # step - 2's counts: the GPU has finished that step and works on the next one
            live_prev = int(counts[step - 2].value()[0])
            if live_prev == 0:  # step - 1 had nothing to do, nor has any later one
                break
            bound = min(rows_bound, k_max * cap, k_max * k_max * live_prev)
        else:
            bound = min(rows_bound, k_max * cap)
        with section("finding.layer_search"):
            res = fused.layer_search(
                xp, det, geo, geo.nav, real, index, None, 0, ctx.mkey, meas, ctx.mv0, ctx.mv1, cfg, k_max,
                NEWTON_STEPS, active=active,
            )  # fmt: skip
        ends = xp.cumsum(res["flags"], dtype=xp.int64)
        if bound > cfg.max_rows_without_wait:
            # exact sizes: one wait for the host (the GPU idles until the next launches)
            n_bounds = (2 * cap - 1, 2 * cap + cap * k_max - 1, 3 * cap + cap * k_max - 1)
            b1, b2, total = (int(c) for c in to_numpy(fused.pick(xp, ends, n_bounds)))
            out_rows, child_rows = total - b1, b2 - b1
            table, done_in = done.reserve(step, counts, rows, b1, exact=True)
        else:
            out_rows = child_rows = bound
            table, done_in = done.reserve(step, counts, rows, cap, exact=False)
        real, index, child_layer, node_parent, node_meas, step_counts = fused.step_compact(
            xp, res, ends, cap, k_max, out_rows, child_rows, nodes.count, table, done_in
        )
        nodes.append(node_parent, node_meas)
        # the step's tables are done with: free them before the overlap search allocates its own (the
        # memory pool keeps the peak of a batch, and this was it)
        del res, ends
        counts.append(HostCopy(step_counts))
        done.written(step_counts)
        rows.append(out_rows)
        if child_rows:
            with section("finding.overlap_search"):
                # the children that find a second measurement on their layer take it in place
                ov = fused.layer_search(
                    xp, det, geo, geo.nav, real[:child_rows], index[:child_rows], child_layer, 1, ctx.mkey,
                    meas, ctx.mv0, ctx.mv1, cfg, 1, NEWTON_STEPS, node_base=nodes.count,
                    n_limit=step_counts[1:2],
                )  # fmt: skip
            nodes.append(ov["node_parent"], ov["meas"])
        with section("finding.prune"):
            active = fused_prune.prune(
                xp, real, index, meas.size, n_seeds, cfg.max_branches_per_seed, cfg.merge_duplicates,
                step_counts[0:1],
            )  # fmt: skip
    # the rows the prune kept past the last step are finished too (none when the loop ran dry)
    finished = done.candidates(counts)
    last = xp.nonzero(active)[0]
    if last.shape[0]:
        finished.append(Candidates(real, index).take(last))
    return finished


class _DoneTables:
    """The finished rows of the GPU's CKF steps, in step order. Each step's compaction appends them to
    the open table at the count the previous step left on the device. For a step that waited for its
    sizes the host knows that count and the step's rows exactly, and a step that does not fit gets a
    table of its own (as the array code's list of steps, no copy: large batches). Otherwise the host
    bounds the rows of the steps whose counts have not reached it by their input rows, and grows the
    open table by a copy when the bound does not fit (small batches: small tables)."""

    def __init__(self, xp: ModuleType, rows: int) -> None:
        self.xp = xp
        self.closed: list[tuple[Array, Array, int]] = []  # (real, index, last step that wrote it)
        self._open(rows, 0)

    def _open(self, rows: int, first_step: int) -> None:
        self.real = self.xp.empty((rows, 32), self.xp.float64)
        self.index = self.xp.empty((rows, 8), self.xp.int64)
        self.first = first_step
        self.count: Array = self.xp.zeros(1, self.xp.int64)  # rows in the open table (device)

    def reserve(
        self, step: int, counts: list[HostCopy], rows: list[int], step_rows: int, exact: bool
    ) -> tuple[tuple[Array, Array], Array]:
        """The table step ``step`` appends to and the device count it starts at. ``step_rows``: its
        finished rows (``exact``: the step waited, and so are the earlier steps' counts known) or a
        bound on them (the counts reach the host one step late)."""
        known_step = step - 1 if exact else step - 2
        if known_step >= self.first:
            known = int(counts[known_step].value()[2])
            pending = sum(rows[known_step + 1 : step])
        else:
            known, pending = 0, sum(rows[self.first : step])
        need = known + pending + step_rows
        if need > self.real.shape[0]:
            if exact:
                self.closed.append((self.real, self.index, step - 1))
                self._open(max(step_rows, 1), step)
            else:
                rows_now = max(need, 2 * self.real.shape[0])
                self.real, self.index = (_grown(self.xp, t, rows_now) for t in (self.real, self.index))
        return (self.real, self.index), self.count

    def written(self, step_counts: Array) -> None:
        """The step's compaction has queued its rows: the open table's count is now its counts[2]."""
        self.count = step_counts[2:3]

    def candidates(self, counts: list[HostCopy]) -> list[Candidates]:
        """The finished rows, table by table (waits for the last step's counts)."""
        out = []
        last_step = len(counts) - 1
        for real, index, last in [*self.closed, (self.real, self.index, last_step)]:
            n = int(counts[last].value()[2]) if last >= 0 else 0
            if n > real.shape[0]:
                raise RuntimeError(f"CKF: {n} finished candidates overflowed a table of {real.shape[0]}")
            if n:
                out.append(Candidates(real[:n], index[:n]))
        return out


def _grown(xp: ModuleType, table: Array, rows: int) -> Array:
    """``table`` with room for ``rows`` rows (its rows copied in stream order, after those queued)."""
    out = xp.empty((rows, *table.shape[1:]), table.dtype)
    out[: table.shape[0]] = table
    return out


def _children(
    xp: ModuleType, st: Candidates, cand: Array, params: Array, cov: Array, chi2: Array, module: Array, meas: Array,
    nodes: _Nodes,
) -> Candidates:  # fmt: skip
    """Candidates ``cand`` extended by measurements ``meas`` (updated states on ``module``)."""
    children = st.take(cand)
    children.real[:, S_DONE] = 0.0
    _extend(children, slice(None), params, cov, chi2, module, meas, nodes)
    return children


def _continue_without_measurement(
    xp: ModuleType,
    st: Candidates,
    lost: Array,
    cov: Array,
    moved: Array,
    pred: tuple[Array, Array, Array],
    crossed: Array,
    s_layer: Array,
    max_holes: int,
    done: list[Candidates],
) -> Candidates:
    """Candidates ``lost`` found nothing on the layer: they continue on their prediction on the nearest
    module crossed (``moved``; a hole when inside its bounds) or stay put past a gap. ``cov``,
    ``crossed`` and ``s_layer`` are per lost candidate (``cov`` with this layer's scattering). Those
    over ``max_holes`` holes are appended to ``done``; the others are returned."""
    lone = st.take(lost)
    n = int(lost.shape[0])
    real, index = lone.real, lone.index
    real[:, PARAMS] = xp.where(moved[:, None], pred[0], real[:, PARAMS])
    real[:, COV] = xp.where(moved[:, None], pred[1].reshape(n, 25), cov.reshape(n, 25))
    real[:, S_DONE] = xp.where(moved, 0.0, s_layer)
    index[:, MODULE] = xp.where(moved, pred[2], index[:, MODULE])
    index[:, HOLES] += crossed.astype(xp.int64)
    ok = index[:, HOLES] <= max_holes
    keep = xp.nonzero(ok)[0]
    if keep.shape[0] < n:
        done.append(lone.take(xp.nonzero(~ok)[0]))
        return lone.take(keep)
    return lone


def _collect(
    xp: ModuleType, nodes: _Nodes, finished: list[Candidates], cfg: FindingConfig
) -> TrackCandidates:
    fin = Candidates.concat(xp, finished) if finished else None
    if fin is None or fin.size == 0:
        z = xp.zeros(0, dtype=xp.int64)
        return TrackCandidates(
            xp.zeros(1, dtype=xp.int64),
            z,
            z,
            z.astype(xp.int32),
            z.astype(xp.float64),
            z.astype(xp.int32),
            xp.zeros((0, 5)),
            xp.zeros((0, 5, 5)),
            z.astype(xp.int32),
        )
    fin = fin.take(xp.nonzero(fin.n_meas >= cfg.min_measurements)[0])
    parent, node_meas = nodes.arrays()
    length = fin.n_meas
    offsets = xp.zeros(length.shape[0] + 1, dtype=xp.int64)
    offsets[1:] = xp.cumsum(length)
    total = int(offsets[-1])
    if fused.enabled(xp):
        out = fused.collect_measurements(xp, parent, node_meas, fin.node, offsets, total)
    else:
        out = xp.zeros(total, dtype=xp.int64)
        cur = fin.node.copy()
        pos = offsets[1:] - 1
        # walk the links back from the last state; lengths are bounded by 3 + 2 max_steps (overlaps)
        for _ in range(3 + 2 * cfg.max_steps):
            live = cur >= 0
            if not bool(live.any()):
                break
            idx = xp.nonzero(live)[0]
            out[pos[idx]] = node_meas[cur[idx]]
            pos = pos - 1
            cur = xp.where(live, parent[xp.maximum(cur, 0)], -1)
    c = xp.ascontiguousarray
    return TrackCandidates(
        offsets=offsets,
        measurements=out,
        seed=c(fin.seed),
        event=fin.event.astype(xp.int32),
        chi2=c(fin.chi2),
        n_holes=fin.holes.astype(xp.int32),
        params=c(fin.params),
        cov=c(fin.cov),
        module=c(fin.module),
    )
