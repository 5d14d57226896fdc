"""The whole chain on the bundled events: physics against truth, numpy and CuPy agreement, and the
reconstruct/validate commands."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from kernels.pipeline import Chain, ChainConfig
from kernels.xp import to_numpy
from producer.cli import main
from producer.io.events import discover, load_cells


@pytest.fixture(scope="module")
def reco_dir(tmp_path_factory, bundled):
    out = tmp_path_factory.mktemp("reco")
    assert main(["reconstruct", "--input", str(bundled), "--output", str(out), "--events", "2"]) == 0
    return out


def test_reconstruct_then_validate(reco_dir, bundled, capsys):
    capsys.readouterr()
    assert (
        main(["validate", "--input", str(bundled), "--tracks", str(reco_dir), "--events", "2", "--json"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["n_events"] == 2 and r["n_tracks"] > 300
    assert r["efficiency"] >= 0.98
    assert r["fake_rate"] <= 0.02
    assert r["duplicate_rate"] <= 0.02
    timing = json.loads((reco_dir / "timing.json").read_text())
    assert set(timing["stages"]) >= {"clusterization", "seeding", "finding", "fitting", "total"}


def test_seeding_stage_only(tmp_path, bundled, capsys):
    assert (
        main(
            [
                "reconstruct",
                "--input",
                str(bundled),
                "--output",
                str(tmp_path),
                "--events",
                "1",
                "--stages",
                "seeding",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["validate", "--input", str(bundled), "--tracks", str(tmp_path), "--events", "1", "--json"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["seeding_efficiency"] >= 0.99
    assert r["n_seeds"] > 0 and r["efficiency"] is None


def test_batch_equals_single_events(bundled, detector):
    events = [load_cells(s, detector) for s in discover(bundled)[:2]]
    chain = Chain(np, detector, ChainConfig())
    batch = chain.reconstruct_batch(events)
    for e, (tracks, _) in zip(events, batch, strict=True):
        single, _ = chain.reconstruct(e)
        assert tracks.event_id == e.event_id
        np.testing.assert_allclose(tracks.params, single.params, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(tracks.meas_truth_id, single.meas_truth_id)


@pytest.mark.gpu
def test_cupy_matches_numpy(xp, bundled, detector):
    if xp is np:
        pytest.skip("compares CuPy against numpy")
    event = load_cells(discover(bundled)[0], detector)
    ref = Chain(np, detector, ChainConfig()).run_front([event], {})
    got = Chain(xp, detector, ChainConfig()).run_front([event], {})
    for name in ("module", "truth_id", "n_cells"):
        np.testing.assert_array_equal(
            to_numpy(getattr(got.measurements, name)), getattr(ref.measurements, name)
        )
    for name in ("local0", "local1"):
        np.testing.assert_allclose(
            to_numpy(getattr(got.measurements, name)), getattr(ref.measurements, name), rtol=0, atol=1e-9
        )
    # variances come from E[x^2] - E[x]^2 with atomically summed (unordered) sums: rounding differs
    for name in ("var0", "var1"):
        np.testing.assert_allclose(
            to_numpy(getattr(got.measurements, name)), getattr(ref.measurements, name), rtol=1e-6, atol=1e-9
        )

    def triplets(front):
        s = front.seeds
        return {
            tuple(v) for v in np.stack([to_numpy(s.bottom), to_numpy(s.middle), to_numpy(s.top)], 1).tolist()
        }

    a, b = triplets(ref), triplets(got)
    assert len(a ^ b) <= 0.001 * len(a)  # the same seeds up to float rounding at cut edges
    t_ref, _ = Chain(np, detector, ChainConfig()).reconstruct(event)
    t_gpu, _ = Chain(xp, detector, ChainConfig()).reconstruct(event)
    assert abs(t_ref.size - t_gpu.size) <= 0.01 * t_ref.size


def test_cuda_allocator_choice(monkeypatch):
    """TRACKFLEET_CUDA_ALLOCATOR: "pool" leaves CuPy's pool, "async" keeps freed memory in every
    device's stream-ordered pool and installs it once, anything else is an error naming the variable."""
    import types

    from kernels import xp as xp_module

    calls: list[tuple] = []
    runtime = types.SimpleNamespace(
        cudaMemPoolAttrReleaseThreshold=4,
        deviceGetDefaultMemPool=lambda d: 100 + d,
        memPoolSetAttribute=lambda pool, attr, value: calls.append(("threshold", pool, attr, value)),
    )
    cuda = types.SimpleNamespace(
        runtime=runtime,
        MemoryAsyncPool=lambda handles: types.SimpleNamespace(malloc=("malloc", handles)),
        set_allocator=lambda malloc: calls.append(("allocator", malloc)),
    )
    fake = types.SimpleNamespace(cuda=cuda)
    monkeypatch.setattr(xp_module, "_ALLOCATOR_SET", [])
    monkeypatch.setenv(xp_module.ALLOCATOR_ENV, "pool")
    xp_module._configure_allocator(fake, 2)
    assert calls == []
    monkeypatch.setenv(xp_module.ALLOCATOR_ENV, "async")
    xp_module._configure_allocator(fake, 2)
    xp_module._configure_allocator(fake, 2)  # once per process
    assert calls == [
        ("threshold", 100, 4, 2**64 - 1),
        ("threshold", 101, 4, 2**64 - 1),
        ("allocator", ("malloc", "default")),
    ]
    monkeypatch.setenv(xp_module.ALLOCATOR_ENV, "managed")
    with pytest.raises(ValueError, match="TRACKFLEET_CUDA_ALLOCATOR"):
        xp_module._configure_allocator(fake, 2)


def test_the_gpu_pool_limit_bounds_the_pool_and_can_be_lifted(xp, monkeypatch):
    from kernels.xp import pool_limit_lifted, set_pool_limit

    if xp is np:  # nothing to bound on the host
        set_pool_limit(np, 2**20)
        with pool_limit_lifted(np) as seen:
            pass
        assert seen == {"high_water": 0}
        return
    # a pool of its own: blocks other tests left cached or split in the default pool could serve these
    pool = xp.cuda.MemoryPool()
    monkeypatch.setattr(xp, "get_default_memory_pool", lambda: pool)
    allocator = xp.cuda.get_allocator()
    xp.cuda.set_allocator(pool.malloc)
    try:
        held = xp.ones(8 * 2**20, xp.uint8)
        limit = pool.used_bytes() + 2**20
        set_pool_limit(xp, limit)
        with pytest.raises(MemoryError):
            xp.zeros(16 * 2**20, xp.uint8)
        with pool_limit_lifted(xp) as seen:
            big = xp.zeros(16 * 2**20, xp.uint8)
            xp.ones(32 * 2**20, xp.uint8).sum()  # a temporary: cached past the limit, released after
            assert int(big.sum()) == 0 and int(held.sum()) == 8 * 2**20
        assert seen["high_water"] >= (8 + 16 + 32) * 2**20  # the most the pool held inside
        # the temporary's 32 MiB went back to the driver, not into the cache; with 24 MiB in use, past
        # the limit again, the next allocation raises
        assert pool.get_limit() == limit and pool.total_bytes() < pool.used_bytes() + 32 * 2**20
        with pytest.raises(MemoryError):
            xp.zeros(1, xp.uint8)
        del held, big
    finally:
        xp.cuda.set_allocator(allocator)
        pool.free_all_blocks()


def test_device_constant_is_made_once_per_key(monkeypatch):
    from kernels import xp as xp_module

    monkeypatch.setattr(xp_module, "_DEVICE_CONSTANTS", {})
    made = []

    def make(v):
        made.append(v)
        return np.full(3, v)

    a = xp_module.device_constant(np, ("k", 1.0), lambda: make(1.0))
    b = xp_module.device_constant(np, ("k", 1.0), lambda: make(1.0))
    c = xp_module.device_constant(np, ("k", 2.0), lambda: make(2.0))
    assert a is b and made == [1.0, 2.0] and float(c[0]) == 2.0
    for i in range(100):  # bounded: never grows past its limit
        xp_module.device_constant(np, ("n", i), lambda i=i: np.full(1, i))
    assert len(xp_module._DEVICE_CONSTANTS) <= 64


def test_cells_the_chain_cannot_use_are_refused_naming_the_first(xp, bundled, detector):
    from dataclasses import replace

    from kernels.errors import DetectorMismatchError, EventFormatError

    event = load_cells(discover(bundled)[0], detector)
    chain = Chain(xp, detector, ChainConfig(last_stage="measurements"))
    k = event.size // 2
    g = np.asarray(event.geometry_id)
    bins0 = int(np.asarray(detector.seg_bins)[detector.module_index(np, g[k : k + 1])[0], 0])

    def changed(**columns):
        return replace(
            event,
            **{
                name: np.where(np.arange(event.size) == k, v, getattr(event, name))
                for name, v in columns.items()
            },
        )

    cases = [
        (changed(geometry_id=np.uint64(12345)), DetectorMismatchError, "geometry_id 12345"),
        (changed(channel0=np.int32(bins0)), DetectorMismatchError, f"channels ({bins0}, "),
        (changed(activation=np.float32(np.nan)), EventFormatError, "not finite (value nan"),
        (changed(time=np.float32(-np.inf)), EventFormatError, "time -inf ns"),
    ]
    for bad, error, text in cases:
        with pytest.raises(error, match=re.escape(text)) as err:
            chain.run_front([bad], {})
        assert f"event {event.event_id}: cell with geometry_id {int(bad.geometry_id[k])}" in str(err.value)
    # in a batch, the event is named
    other = replace(cases[2][0], event_id=event.event_id + 7)
    with pytest.raises(EventFormatError, match=f"event {event.event_id + 7}: "):
        chain.run_front([event, other], {})
    assert chain.run_front([event], {}).measurements is not None  # and the chain still runs
