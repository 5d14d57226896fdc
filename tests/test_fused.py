"""The fused CUDA kernels compute what the array code computes (GPU only)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import fused
from kernels.kalman import chi2_gather, update
from kernels.navigation import next_layer
from kernels.pipeline import Chain, ChainConfig
from kernels.propagation import bound_to_global, intersect_plane, transport, turn_rate
from kernels.xp import cupy_available, get_namespace, to_numpy
from producer.io.events import discover, load_cells

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_available(), reason="CuPy or a CUDA device is not available"),
]


@pytest.fixture(scope="module")
def states(bundled, detector):
    """Seed states, their bottom/top modules and measurements on the GPU."""
    cp = get_namespace("cupy")
    chain = Chain(cp, detector, ChainConfig())
    front = chain.run_front([load_cells(discover(bundled)[0], detector)], {})
    return cp, chain, front


def both(func):
    """Run ``func`` with the fused kernels off and on; host copies of both results."""
    fused.set_enabled(False)
    try:
        ref = func()
    finally:
        fused.set_enabled(True)
    got = func()
    return [to_numpy(a) for a in ref], [to_numpy(a) for a in got]


def close(ref, got, rtol=1e-9, atol=1e-12):
    """Outputs agree; [n, 5, 5] outputs whose diagonal is positive are covariances, compared in units of
    sqrt(C_ii C_jj); other matrices (Jacobians) relative to their largest entry per row."""
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        nan = np.isnan(a) | np.isnan(b)
        assert np.mean(np.isnan(a) != np.isnan(b)) < 1e-3, f"output {k}: NaN patterns differ"
        if a.ndim == 3 and not np.all(np.diagonal(a, axis1=1, axis2=2)[~nan.any(axis=(1, 2))] > 0):
            ok = ~nan.any(axis=(1, 2))
            scale = np.abs(a[ok]).max(axis=2, keepdims=True) + 1e-300
            err = np.abs(b[ok] - a[ok]) / scale
            assert err.max(initial=0) < rtol, f"output {k}: max relative difference {err.max():.3g}"
            continue
        if a.ndim == 3:  # covariances: compare in units of sqrt(C_ii C_jj)
            d = np.sqrt(np.abs(np.diagonal(a, axis1=1, axis2=2)))
            scale = d[:, :, None] * d[:, None, :] + 1e-300
            err = np.abs(b - a) / scale
            err = err[~nan.any(axis=(1, 2))]
            assert err.max(initial=0) < rtol, f"output {k}: max normalized difference {err.max():.3g}"
            continue
        np.testing.assert_allclose(b[~nan], a[~nan], rtol=rtol, atol=atol, err_msg=f"output {k}")


def test_transport_and_intersection(states):
    cp, chain, front = states
    det, prm, sp, seeds, meas = (
        chain.detector,
        front.params,
        front.spacepoints,
        front.seeds,
        front.measurements,
    )
    dst = meas.module[sp.measurement[seeds.top]]
    close(
        *both(lambda: transport(cp, det, prm.module, dst, prm.params, prm.cov, det.bfield_t)),
        # finite-difference Jacobians turn last-bit differences of the two compilations into ~1e-9
        rtol=1e-6,
        atol=1e-12,
    )
    x, y, z, phi, th, qop = bound_to_global(cp, det, prm.module, prm.params)
    h = turn_rate(qop, det.bfield_t)
    close(*both(lambda: intersect_plane(cp, det, dst, x, y, z, phi, th, h)))
    nav = chain.finding_geometry.nav
    exclude = det.layer_index[prm.module].astype(cp.int64)
    ref, got = both(lambda: next_layer(cp, nav, x, y, z, phi, th, h, exclude, cp.zeros(x.shape[0]), 10.0))
    np.testing.assert_array_equal(ref[0], got[0])
    close(ref[1:], got[1:])


def test_kalman_update_and_chi2(states):
    cp, _chain, front = states
    prm, sp, seeds, meas = front.params, front.spacepoints, front.seeds, front.measurements
    mi = sp.measurement[seeds.bottom]
    dim = meas.dimension[mi].copy()
    dim[::3] = 1
    close(
        *both(
            lambda: update(
                cp, prm.params, prm.cov, meas.local0[mi], meas.local1[mi], meas.var0[mi], meas.var1[mi], dim
            )
        )
    )
    row = cp.arange(mi.shape[0], dtype=cp.int64)
    close(
        *both(
            lambda: [
                chi2_gather(
                    cp,
                    prm.params,
                    prm.cov,
                    row,
                    meas.local0,
                    meas.local1,
                    meas.var0,
                    meas.var1,
                    meas.dimension,
                    mi,
                )
            ]
        )
    )


def test_chain_physics_same_with_and_without_fused(states, bundled, detector):
    _cp, chain, _ = states
    event = load_cells(discover(bundled)[1], detector)
    fused.set_enabled(False)
    try:
        ref, _ = chain.reconstruct(event)
    finally:
        fused.set_enabled(True)
    got, _ = chain.reconstruct(event)
    assert abs(ref.size - got.size) <= max(2, 0.005 * ref.size)
    common = min(ref.size, got.size)
    assert common > 100


def test_seeding_kernels_match_array_code(states):
    cp, chain, front = states
    from kernels.seeding import find_seeds

    det = chain.detector

    def seeds():
        s = find_seeds(cp, front.spacepoints, chain.seeding_geometry, chain.config.seeding, det.bfield_t)
        return [s.bottom, s.middle, s.top, s.weight]

    ref, got = both(seeds)
    a = set(map(tuple, np.stack(ref[:3], axis=1).tolist()))
    b = set(map(tuple, np.stack(got[:3], axis=1).tolist()))
    assert len(a) > 1000
    assert len(a ^ b) <= 0.001 * len(a)


def test_fit_kernel_matches_array_code(states, bundled, detector):
    _cp, chain, _ = states
    import kernels.pipeline as pipeline

    captured = {}
    original = pipeline.fit_tracks

    def capture(*args):
        captured["args"] = args
        return original(*args)

    pipeline.fit_tracks = capture
    try:
        chain.reconstruct(load_cells(discover(bundled)[2], detector))
    finally:
        pipeline.fit_tracks = original
    args = captured["args"]

    def run():
        r = original(*args)
        return [r.params, r.cov, r.chi2, r.ndf.astype(np.float64), r.ok.astype(np.float64)]

    ref, got = both(run)
    np.testing.assert_array_equal(ref[4], got[4])
    ok = ref[4] > 0
    close([ref[0][ok], ref[1][ok], ref[2][ok]], [got[0][ok], got[1][ok], got[2][ok]], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(ref[3], got[3])


def test_clusters_measurements_and_ambiguity_kernels_match_array_code(states, bundled, detector):
    cp, _, _ = states
    from kernels.ambiguity import AmbiguityConfig, resolve
    from kernels.clusterization import ClusteringConfig, clusterize
    from kernels.measurement_creation import create_measurements

    cells = load_cells(discover(bundled)[0], detector)
    det = detector.to(cp)
    module = det.module_index(cp, cp.asarray(cells.geometry_id))
    c0, c1 = cp.asarray(cells.channel0), cp.asarray(cells.channel1)
    act = cp.asarray(cells.activation)
    ref, got = both(lambda: clusterize(cp, module.astype(cp.int64), c0, c1, ClusteringConfig())[:1])
    np.testing.assert_array_equal(got[0], ref[0])
    cluster = cp.asarray(ref[0])
    n_clusters = int(ref[0].max()) + 1
    event = cp.zeros(module.shape[0], dtype=cp.int32)

    def measure():
        m = create_measurements(cp, det, module, event, c0, c1, act, cluster, n_clusters)
        return [
            m.module,
            m.event,
            m.dimension,
            m.n_cells,
            m.extent0,
            m.extent1,
            m.local0,
            m.local1,
            m.var0,
            m.var1,
        ]

    ref, got = both(measure)
    for a, b in zip(ref[:6], got[:6], strict=True):
        np.testing.assert_array_equal(b, a)
    close(ref[6:], got[6:])
    for a, b in zip(got, [to_numpy(v) for v in measure()], strict=True):  # the same bits every run
        np.testing.assert_array_equal(b, a)
    rng = np.random.default_rng(7)
    length = rng.integers(3, 12, 4000)
    offsets = cp.asarray(np.r_[0, np.cumsum(length)])
    meas = cp.asarray(rng.integers(0, 9000, int(length.sum())))
    chi2 = cp.asarray(rng.integers(0, 5, 4000).astype(float) * length)
    ref, got = both(lambda: [resolve(cp, offsets, meas, chi2, 9000, AmbiguityConfig(min_measurements=5))])
    np.testing.assert_array_equal(got[0], ref[0])


def test_spacepoint_and_track_parameter_kernels_match_array_code(states):
    cp, chain, front = states
    from kernels.spacepoint_formation import form_spacepoints
    from kernels.track_params import estimate_parameters

    names = ("measurement", "module", "event", "x", "y", "z", "r", "phi", "var_r", "var_z")
    ref, got = both(
        lambda: [getattr(form_spacepoints(cp, chain.detector, front.measurements), k) for k in names]
    )
    for k, a, b in zip(names, ref, got, strict=True):
        assert a.dtype == b.dtype, k
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-12, err_msg=k)
    cfg, bfield = chain.config.track_params, chain.detector.bfield_t

    def params():
        p = estimate_parameters(cp, front.spacepoints, front.measurements, front.seeds, cfg, bfield)
        return [p.params, p.cov, p.module]

    ref, got = both(params)
    assert ref[0].shape[0] > 1000
    np.testing.assert_array_equal(got[2], ref[2])
    close(ref[:2], got[:2], rtol=1e-12)


def test_majority_truth_and_variance_kernels_match_array_code(states):
    cp, chain, front = states
    from kernels.measurement_errors import MeasurementErrorConfig, measurement_variances

    rng = np.random.default_rng(11)
    cluster = cp.asarray(rng.integers(0, 3000, 25000).astype(np.int32))
    truth = cp.asarray(rng.integers(-1, 4, 25000).astype(np.int64) * 1_000_003)
    from kernels import fused_measurements
    from kernels.measurement_creation import majority_truth

    ref = to_numpy(majority_truth(cp, cluster, truth, 3000))
    got = to_numpy(fused_measurements.majority_truth(cp, cluster, truth, 3000))
    np.testing.assert_array_equal(got, ref)
    cfg = MeasurementErrorConfig()
    ref, got = both(lambda: list(measurement_variances(cp, chain.detector, front.measurements, cfg)))
    close(ref, got, rtol=1e-14)


def _mixed_lengths(xp, offsets, measurements, n):
    """The first ``n`` tracks, most cut short to 1 to 13 measurements: neighbours differ in length."""
    offsets = to_numpy(offsets)
    length = np.diff(offsets[: n + 1])
    keep = np.minimum(length, 1 + (np.arange(n) * 5) % 13)
    new = np.r_[0, np.cumsum(keep)]
    rows = np.repeat(offsets[:n], keep) + np.arange(new[-1]) - np.repeat(new[:-1], keep)
    return xp.asarray(new), measurements[xp.asarray(rows)]


def test_fit_on_lanes_has_the_one_thread_fits_bits(states, bundled, detector, monkeypatch):
    """The fit with ``fused_fit._LANES`` lanes per track (the Jacobians' maps side by side, exchanged
    by shuffles) against the same source built for one thread per track, bit for bit, and against the
    array code: an event's tracks, and tracks cut to 1 to 13 measurements, 1, 3 and 4k + 3 of them
    (lanes of one warp on tracks of different lengths, partial warps and blocks)."""
    cp, chain, _ = states
    import kernels.pipeline as pipeline
    from kernels import fused_fit

    assert fused_fit._LANES > 1
    captured = []
    original = pipeline.fit_tracks
    with monkeypatch.context() as m:
        m.setattr(pipeline, "fit_tracks", lambda *a: captured.append(a) or original(*a))
        chain.reconstruct(load_cells(discover(bundled)[2], detector))
    xp, det, material, meas, offsets, measurements, start_p, start_c, variances, cfg = captured[0]
    total = int(offsets.shape[0]) - 1
    assert total > 100
    assert total <= fused_fit._LANES_UP_TO
    cases = [(offsets, measurements, total)]
    cases += [(*_mixed_lengths(cp, offsets, measurements, n), n) for n in (1, 3, 4 * ((total - 3) // 4) + 3)]
    for off, mi, n in cases:
        args = (xp, det, material, meas, off, mi, start_p[:n], start_c[:n], variances, cfg)

        def run(args=args):
            r = original(*args)
            return [r.params, r.cov, r.chi2, r.ndf.astype(np.float64), r.ok.astype(np.float64)]

        ref, got = both(run)
        with monkeypatch.context() as m:
            m.setattr(fused_fit, "_LANES_UP_TO", 0)  # one thread per track
            one = [to_numpy(a) for a in run()]
        for k, (a, b) in enumerate(zip(one, got, strict=True)):
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            rel = np.abs(b - a)[differ] / np.maximum(np.abs(a[differ]), 1e-300)
            assert not differ.any(), (
                f"{n} tracks, output {k}: {differ.sum()} entries differ from the one-thread fit's "
                f"(relative difference up to {rel.max():.3g})"
            )
        np.testing.assert_array_equal(ref[4], got[4])
        np.testing.assert_array_equal(ref[3], got[3])
        ok = ref[4] > 0
        # tracks cut short are loosely constrained: the finite differences' noise shows more (host: 2e-6)
        rtol = 1e-5 if n == total else 1e-4
        close([r[ok] for r in ref[:3]], [g[ok] for g in got[:3]], rtol=rtol, atol=1e-9)
