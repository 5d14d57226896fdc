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


def test_ckf_steps_with_or_without_waiting_find_the_same_tracks(bundled, detector, request):
    """The CKF's tables sized from a bound (no wait for the host per step) or from each step's exact
    counts (max_rows_without_wait 0: one wait per step) give the same tracks."""
    import dataclasses

    request.getfixturevalue("host_fused")
    events = [load_cells(s, detector) for s in discover(bundled)[:2]]
    base = ChainConfig()
    waiting = dataclasses.replace(base, finding=dataclasses.replace(base.finding, max_rows_without_wait=0))
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
