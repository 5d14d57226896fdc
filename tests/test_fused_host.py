"""The fused CUDA kernels, compiled for the host, give the same results as the array code.

This runs everywhere a C++ compiler is present, so CI checks the kernels' arithmetic without a GPU;
tests/test_fused.py repeats the comparison on a real GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_kernels import compiler, install

from kernels.pipeline import Chain, ChainConfig
from producer.io.events import discover, load_cells

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")


@pytest.fixture
def host_fused(monkeypatch):
    """Route every fused launch to the host build and switch the fused paths on for numpy."""
    install(monkeypatch.setattr)


def _reconstruct(detector, events):
    chain = Chain(np, detector, ChainConfig())
    return [chain.reconstruct(e)[0] for e in events]


def test_whole_chain_same_tracks(bundled, detector, monkeypatch, request):
    events = [load_cells(s, detector) for s in discover(bundled)[:1]]
    ref = _reconstruct(detector, events)
    request.getfixturevalue("host_fused")
    got = _reconstruct(detector, events)
    for a, b in zip(ref, got, strict=True):
        assert a.size == b.size and a.size > 200
        np.testing.assert_array_equal(a.meas_truth_id, b.meas_truth_id)
        np.testing.assert_allclose(b.params, a.params, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(b.chi2, a.chi2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("rows_without_wait", "first_table_rows"), [(0, None), (6000, None), (0, 1), (131072, 1)]
)
def test_ckf_steps_with_or_without_waiting_find_the_same_tracks(
    bundled, detector, request, monkeypatch, rows_without_wait, first_table_rows
):
    """The CKF's tables sized from a bound (no wait for the host per step) or from each step's exact
    counts (max_rows_without_wait 0: one wait per step; 6000: the bundled events' steps of both kinds)
    give the same tracks; also with a one-row first table of finished rows, so that steps that waited
    open tables of their own and the others grow theirs."""
    import dataclasses

    from kernels import ckf

    request.getfixturevalue("host_fused")
    if first_table_rows is not None:
        init = ckf._DoneTables.__init__
        monkeypatch.setattr(
            ckf._DoneTables, "__init__", lambda self, xp, rows: init(self, xp, first_table_rows)
        )
    events = [load_cells(s, detector) for s in discover(bundled)[:2]]
    base = ChainConfig()
    finding = dataclasses.replace(base.finding, max_rows_without_wait=rows_without_wait)
    waiting = dataclasses.replace(base, finding=finding)
    for a, b in zip(
        [Chain(np, detector, base).reconstruct(e)[0] for e in events],
        [Chain(np, detector, waiting).reconstruct(e)[0] for e in events],
        strict=True,
    ):
        assert a.size > 200
        np.testing.assert_array_equal(a.meas_truth_id, b.meas_truth_id)
        np.testing.assert_array_equal(a.params, b.params)
        np.testing.assert_array_equal(a.chi2, b.chi2)


def test_seeding_in_small_blocks_and_chunks_gives_the_same_seeds(bundled, detector, request):
    """Middles in blocks and doublets in chunks (bounded memory) are an implementation detail: the
    smallest allowed bound, which splits the bundled events into hundreds of blocks, changes no seed."""
    import dataclasses

    request.getfixturevalue("host_fused")
    events = [load_cells(s, detector) for s in discover(bundled)[:2]]
    base = ChainConfig()
    small = dataclasses.replace(
        base, seeding=dataclasses.replace(base.seeding, max_candidates_per_chunk=1000)
    )
    ref = Chain(np, detector, base).run_front(events, {}).seeds
    got = Chain(np, detector, small).run_front(events, {}).seeds
    assert ref is not None and got is not None and ref.size > 1000
    for name in ("bottom", "middle", "top", "weight", "z_vertex", "event"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)


@pytest.mark.parametrize("max_shared", [0, 2])
def test_ambiguity_rounds_decide_as_the_array_code(request, max_shared):
    """Random candidates competing for few measurements: long chains of conflicts, many rounds."""
    from kernels.ambiguity import AmbiguityConfig, resolve

    rng = np.random.default_rng(7)
    length = rng.integers(3, 12, 400)
    offsets = np.r_[0, np.cumsum(length)]
    meas = rng.integers(0, 900, int(offsets[-1]))
    chi2 = rng.integers(0, 5, 400).astype(float) * length  # ties on purpose
    cfg = AmbiguityConfig(max_shared=max_shared, min_measurements=5)
    ref = resolve(np, offsets, meas, chi2, 900, cfg)
    request.getfixturevalue("host_fused")
    got = resolve(np, offsets, meas, chi2, 900, cfg)
    assert 0 < int(ref.sum()) < 400
    np.testing.assert_array_equal(got, ref)


def test_cluster_labels_are_the_array_codes(request):
    """Random dense cells on a few modules: large, snaking clusters and single cells alike."""
    from kernels.clusterization import ClusteringConfig, clusterize

    rng = np.random.default_rng(3)
    cells = {(int(m), int(c1), int(c0)) for m, c1, c0 in rng.integers(0, [4, 40, 40], (3000, 3))}
    # and one fully lit module (a single 200 x 200 cluster) and a 5000-cell line: deep trees if hooked naively
    cells |= {(4, c1, c0) for c1 in range(200) for c0 in range(200)} | {(5, 7, c0) for c0 in range(5000)}
    module, c1, c0 = (np.array(col, dtype=np.int64) for col in zip(*sorted(cells), strict=True))
    ref, n_ref = clusterize(np, module, c0.astype(np.int32), c1.astype(np.int32), ClusteringConfig())
    request.getfixturevalue("host_fused")
    got, n_got = clusterize(np, module, c0.astype(np.int32), c1.astype(np.int32), ClusteringConfig())
    assert n_got == n_ref and 50 < n_ref < 2000
    np.testing.assert_array_equal(got, ref)


def test_measurements_are_the_array_codes(detector, request):
    """Random clusters on real modules, some with zero total activation (the plain-mean fallback)."""
    from kernels.clusterization import ClusteringConfig, clusterize
    from kernels.measurement_creation import create_measurements

    rng = np.random.default_rng(5)
    det = detector.to(np)
    mods = rng.choice(det.n_modules, 6, replace=False)
    top = np.asarray(det.seg_bins)[mods].min(axis=0)
    cells = {(int(m), int(c1), int(c0)) for m, c1, c0 in zip(
        rng.choice(mods, 2000), rng.integers(0, min(40, top[1]), 2000), rng.integers(0, min(40, top[0]), 2000),
        strict=True)}  # fmt: skip
    module, c1, c0 = (np.array(col, dtype=np.int64) for col in zip(*sorted(cells), strict=True))
    cluster, n_clusters = clusterize(np, module, c0, c1, ClusteringConfig())
    act = rng.uniform(0.1, 2.0, module.shape[0]).astype(np.float32)
    act[np.isin(cluster, np.arange(0, n_clusters, 7))] = 0.0
    event = np.zeros(module.shape[0], np.int32)
    args = (np, det, module.astype(np.int32), event, c0, c1, act, cluster, n_clusters, cluster * 3)
    ref = create_measurements(*args)
    request.getfixturevalue("host_fused")
    got = create_measurements(*args)
    for name in ("module", "event", "dimension", "n_cells", "extent0", "extent1", "truth_id"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
        assert getattr(got, name).dtype == getattr(ref, name).dtype, name
    for name in ("local0", "local1", "var0", "var1"):
        np.testing.assert_allclose(
            getattr(got, name), getattr(ref, name), rtol=1e-12, atol=1e-12, err_msg=name
        )


def test_spacepoints_and_track_parameters_are_the_array_codes(bundled, detector, request):
    """The per-row kernels (kernels/fused_rows.py) against the array code on a bundled event."""
    from kernels.spacepoint_formation import form_spacepoints
    from kernels.track_params import estimate_parameters

    chain = Chain(np, detector, ChainConfig())
    front = chain.run_front([load_cells(discover(bundled)[0], detector)], {})
    det, cfg = chain.detector, chain.config.track_params
    ref_sp = form_spacepoints(np, det, front.measurements)
    ref_p = estimate_parameters(np, front.spacepoints, front.measurements, front.seeds, cfg, det.bfield_t)
    request.getfixturevalue("host_fused")
    got_sp = form_spacepoints(np, det, front.measurements)
    got_p = estimate_parameters(np, front.spacepoints, front.measurements, front.seeds, cfg, det.bfield_t)
    assert ref_sp.size > 1000 and ref_p.params.shape[0] > 1000
    for name in ("measurement", "module", "event", "x", "y", "z", "r", "phi", "var_r", "var_z"):
        a, b = getattr(ref_sp, name), getattr(got_sp, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(b, a, rtol=1e-14, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(got_p.module, ref_p.module)
    assert got_p.module.dtype == ref_p.module.dtype
    np.testing.assert_allclose(got_p.params, ref_p.params, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(got_p.cov, ref_p.cov, rtol=1e-13, atol=1e-16)


def test_ckf_start_kernel_is_the_array_start(bundled, detector, request):
    """seed_start: every seed's three measurements filtered in one kernel, the same rows and nodes."""
    from kernels import ckf, fused
    from kernels.candidates import Candidates
    from kernels.measurement_errors import measurement_variances

    chain = Chain(np, detector, ChainConfig())
    front = chain.run_front([load_cells(discover(bundled)[0], detector)], {})
    det, geo = chain.detector, chain.finding_geometry
    mv0, mv1 = measurement_variances(np, det, front.measurements, chain.config.measurement_errors)
    args = (np, det, geo, front.measurements, front.spacepoints, front.seeds, front.params, mv0, mv1)
    ref_nodes, got_nodes = ckf._Nodes(np), ckf._Nodes(np)
    ref = ckf._start(*args, ref_nodes)
    request.getfixturevalue("host_fused")
    real, index, alive, node_parent, node_meas = fused.seed_start(*args, got_nodes.count, ckf.NEWTON_STEPS)
    got_nodes.append(node_parent, node_meas)
    got = Candidates(real, index).take(np.nonzero(alive)[0])
    assert ref.size > 1000 and got.size == ref.size
    np.testing.assert_array_equal(got.index, ref.index)
    # the array start's transport takes the array code's finite differences: ~1e-8 apart in a few entries
    np.testing.assert_allclose(got.real, ref.real, rtol=1e-6, atol=1e-10)
    for a, b in zip(ref_nodes.arrays(), got_nodes.arrays(), strict=True):
        np.testing.assert_array_equal(b, a)


def test_majority_truth_and_variances_are_the_array_codes(bundled, detector, request):
    """Clusters of mixed truth with ties (smallest id wins), one huge cluster, negative ids; and the
    fit's measurement variances of a bundled event."""
    from kernels.measurement_creation import majority_truth
    from kernels.measurement_errors import MeasurementErrorConfig, measurement_variances

    rng = np.random.default_rng(11)
    cluster = np.sort(rng.integers(0, 3000, 20000)).astype(np.int32)
    cluster = np.r_[cluster, np.full(5000, 3000, np.int32)]  # one cluster of 5000 cells
    truth = rng.integers(-1, 4, cluster.shape[0]).astype(np.int64) * 1_000_003
    perm = rng.permutation(cluster.shape[0])
    cluster, truth = cluster[perm], truth[perm]
    ref = majority_truth(np, cluster, truth, 3001)
    chain = Chain(np, detector, ChainConfig())
    meas = chain.run_front([load_cells(discover(bundled)[0], detector)], {}).measurements
    cfg = MeasurementErrorConfig()
    ref_var = measurement_variances(np, chain.detector, meas, cfg)
    request.getfixturevalue("host_fused")
    from kernels import fused_measurements

    got = fused_measurements.majority_truth(np, cluster, truth, 3001)
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.int64 and len(set(ref.tolist())) == 6  # five ids and -1 (empty clusters)
    got_var = measurement_variances(np, chain.detector, meas, cfg)
    for a, b in zip(ref_var, got_var, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-15, atol=0)


# The GPU fit runs a track on 8 lanes of a warp (kernels/fused_fit.py, FIT_LANES). Here each lane is a
# host thread, and a shuffle or __syncwarp is a barrier of the track's lanes that also checks the mask
# (the track's lanes, the kernel's group_mask_) and flags a lane that never arrives
_LANE_SHIM = r"""
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#define FIT_LANES 8
static std::mutex lane_mutex_;
static std::condition_variable lane_cv_;
static int lane_waiting_ = 0, lane_errors_ = 0;
static long lane_generation_ = 0;
static double lane_slot_[FIT_LANES];
static thread_local int lane_ = 0;
static void lane_barrier_() {
    std::unique_lock<std::mutex> lock(lane_mutex_);
    if (lane_errors_ & 1) return;
    long gen = lane_generation_;
    if (++lane_waiting_ == FIT_LANES) { lane_waiting_ = 0; ++lane_generation_; lane_cv_.notify_all(); return; }
    if (!lane_cv_.wait_for(lock, std::chrono::seconds(10), [&] { return lane_generation_ != gen; })) lane_errors_ |= 1;
}
static void lane_check_(unsigned mask, int src, int width) {
    unsigned track = 0xffu << (8 * ((threadIdx.x % 32) / 8));
    if (mask != track || width != FIT_LANES || src < 0 || src >= width) {
        std::lock_guard<std::mutex> lock(lane_mutex_);
        lane_errors_ |= 2;
    }
}
inline double __shfl_sync(unsigned mask, double v, int src, int width) {
    lane_check_(mask, src, width);
    lane_slot_[lane_] = v;
    lane_barrier_();
    double r = lane_slot_[src];
    lane_barrier_();
    return r;
}
inline void __syncwarp(unsigned mask) { lane_check_(mask, 0, FIT_LANES); lane_barrier_(); }
"""


def _lane_fit_library():
    """The fit built for 8 lanes per track: ``fit_lanes(args..., n_tracks_launched)`` runs every lane of
    tracks 0, 1, ... as a thread (blocks of 64 lanes) and returns the error bits (1: a lane missed a
    shuffle, 2: a wrong mask or source lane)."""
    import ctypes
    import hashlib
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from host_kernels import SHIM

    from kernels import fused_fit

    code = fused_fit.full_source().replace('extern "C" __global__ void ', "void k_")
    m = re.search(r"void k_fit_tracks\((.*?)\)\s*\{", code, re.S)
    assert m is not None
    names = [re.split(r"[\s\*]+", p.strip())[-1] for p in m.group(1).split(",")]
    driver = f"""
extern "C" int fit_lanes({m.group(1)}, int n_launched) {{
    std::thread lanes[FIT_LANES];
    for (int l = 0; l < FIT_LANES; ++l)
        lanes[l] = std::thread([=] {{
            lane_ = l;
            blockDim.x = 64;
            for (int t = 0; t < n_launched; ++t) {{
                blockIdx.x = (t * FIT_LANES + l) / 64;
                threadIdx.x = (t * FIT_LANES + l) % 64;
                k_fit_tracks({", ".join(names)});
            }}
        }});
    for (auto& lane : lanes) lane.join();
    return lane_errors_;
}}
"""
    text = SHIM + _LANE_SHIM + code + driver
    out = Path(tempfile.gettempdir()) / f"trackfleet-lanes-{hashlib.sha1(text.encode()).hexdigest()[:16]}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(text)
        subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(out), str(src)], check=True)
    return ctypes.CDLL(str(out))


def _mixed_lengths(offsets, measurements, n):
    """The first ``n`` tracks, most cut short to 1 to 13 measurements: neighbours differ in length."""
    length = np.diff(offsets[: n + 1])
    keep = np.minimum(length, 1 + (np.arange(n) * 5) % 13)
    new = np.r_[0, np.cumsum(keep)]
    rows = np.repeat(offsets[:n], keep) + np.arange(new[-1]) - np.repeat(new[:-1], keep)
    return new, measurements[rows]


def test_fit_on_lanes_has_the_one_thread_fits_bits(bundled, detector, request, monkeypatch):
    """The GPU's fit (a track on 8 lanes, the Jacobians' maps side by side and exchanged by shuffles),
    run here with a thread per lane: every lane of a track reaches every shuffle with the track's mask,
    and the results are the one-thread fit's, bit for bit, for tracks of 1 to 13 measurements, 45 of
    them (no whole warp); both agree with the array code."""
    import ctypes

    from host_kernels import _arg

    from kernels import fitting, fused, fused_fit

    request.getfixturevalue("host_fused")
    captured = []
    original = fused_fit.fit_tracks
    monkeypatch.setattr(fused_fit, "fit_tracks", lambda *a: captured.append(a) or original(*a))
    chain = Chain(np, detector, ChainConfig())
    chain.reconstruct(load_cells(discover(bundled)[0], detector))
    xp, det, material, meas, offsets, measurements, start_p, start_c, variances, *rest = captured[0]
    n = 45
    offsets, measurements = _mixed_lengths(offsets, measurements, n)
    fit_args = (det, material, meas, offsets, measurements, start_p[:n], start_c[:n], variances)
    args = (xp, *fit_args, *rest)
    one = original(*args)
    lib, errors = _lane_fit_library(), []

    def lanes(grid, block, kernel_args):
        assert grid[0] * block[0] >= n * 8 and block[0] % 32 == 0
        launched = grid[0] * block[0] // 8
        errors.append(lib.fit_lanes(*[_arg(a) for a in kernel_args], ctypes.c_int(launched)))

    monkeypatch.setattr(fused_fit, "_kernel", lambda n_lanes=8: lanes)
    got = original(*args)
    assert errors == [0]
    for a, b in zip(one, got, strict=True):
        np.testing.assert_array_equal(b, a)
    monkeypatch.setattr(fused, "enabled", lambda xp: False)
    ref = fitting.fit_tracks(np, *fit_args, chain.config.fitting)
    assert np.diff(offsets).min() == 1 and ref.ok.sum() > 30
    np.testing.assert_array_equal(got[4], ref.ok)
    np.testing.assert_array_equal(got[3], ref.ndf)
    ok = ref.ok
    np.testing.assert_allclose(got[0][ok], ref.params[ok], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got[2][ok], ref.chi2[ok], rtol=1e-5, atol=1e-8)
