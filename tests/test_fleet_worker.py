"""Worker internals without sockets: dynamic batching in the inbox, and the engine's typed failures."""

from __future__ import annotations

import threading
import time
import types
from dataclasses import replace

import numpy as np
import pytest

from broker.protocol import ErrorCode, WorkFailed, WorkResult
from kernels.edm.cells import Cells, merge_duplicate_cells
from kernels.edm.packed import pack_event
from kernels.edm.packed_tracks import unpack_tracks
from kernels.edm.tracks import Tracks
from kernels.errors import DetectorMismatchError, EventFormatError
from worker.compute import Engine, dummy_event
from worker.config import WorkerConfig
from worker.inbox import Inbox, JobItem

pytestmark = pytest.mark.timeout(30)


def item(job: int, payload=(b"",)) -> JobItem:
    return JobItem(job=job, epoch="E", attempt=1, payload=tuple(payload), received_at=time.monotonic())


def test_inbox_takes_what_is_queued_up_to_the_batch_size():
    box = Inbox()
    for j in range(5):
        box.put(item(j))
    assert [i.job for i in box.get_batch(2, 0.0, 1.0)] == [0, 1]
    assert [i.job for i in box.get_batch(8, 0.0, 1.0)] == [2, 3, 4]
    assert box.get_batch(8, 0.0, 0.05) == []


def test_inbox_waits_for_a_batch_to_fill_at_most_the_configured_time():
    box = Inbox()
    box.put(item(1))
    threading.Timer(0.05, box.put, args=(item(2),)).start()
    t0 = time.monotonic()
    batch = box.get_batch(4, wait_s=0.3, timeout_s=1.0)
    waited = time.monotonic() - t0
    assert [i.job for i in batch] == [1, 2] and 0.25 < waited < 1.0  # filled to 2, then the delay ran out
    box.put(item(3))
    box.put(item(4))
    t0 = time.monotonic()
    assert (
        len(box.get_batch(2, wait_s=5.0, timeout_s=1.0)) == 2 and time.monotonic() - t0 < 0.5
    )  # full: no wait


def test_inbox_close_wakes_the_consumer_and_drain_returns_the_rest():
    box = Inbox()
    threading.Timer(0.05, box.close).start()
    assert box.get_batch(1, 0.0, 5.0) == []
    box2 = Inbox()
    box2.put(item(7))
    assert [i.job for i in box2.drain()] == [7] and len(box2) == 0


class FakeChain:
    """Stands in for kernels.pipeline.Chain: one track per event; raises on event 13."""

    fingerprint = "abcdef0123456789"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def reconstruct(self, cells: Cells):
        return self.reconstruct_batch([cells])[0]

    def reconstruct_batch(self, events):
        self.batches.append(len(events))
        if any(e.event_id == 13 for e in events):
            raise RuntimeError("boom on event 13")
        if any(e.event_id == 21 for e in events):  # as the chain's own checks of the cells
            raise DetectorMismatchError("event 21: cell with geometry_id 5 does not fit detector")
        if any(e.event_id == 22 for e in events):
            raise EventFormatError("event 22: cell with geometry_id 6 has a value that is not finite")
        out = []
        for e in events:
            t = Tracks.empty(e.event_id)
            t = replace(
                t,
                params=np.full((1, 5), float(e.size)),
                cov=np.zeros((1, 5, 5)),
                chi2=np.ones(1),
                ndf=np.ones(1, np.int32),
                n_holes=np.zeros(1, np.int32),
                meas_offsets=np.zeros(2, np.int64),
            )
            out.append((t, {"clusterization": 0.001, "total": 0.002}))
        return out


def small_cells(event_id: int, n: int = 50) -> Cells:
    rng = np.random.default_rng(event_id)
    cells = Cells(
        geometry_id=(np.uint64(1) << np.uint64(56)) + rng.integers(1, 20, n).astype(np.uint64),
        channel0=rng.integers(0, 100, n).astype(np.int32),
        channel1=rng.integers(0, 100, n).astype(np.int32),
        activation=rng.random(n).astype(np.float32),
        time=np.zeros(n, np.float32),
        event_id=event_id,
    )
    return merge_duplicate_cells(cells)[0]


@pytest.fixture
def engine() -> Engine:
    e = Engine(WorkerConfig(batch_max=8))
    e.chain = FakeChain()  # type: ignore[assignment]
    e.xp = np
    return e


def packed(cells: Cells, detector: str = FakeChain.fingerprint) -> tuple:
    header, buffers = pack_event(cells, detector)
    return (header, *buffers)


def test_engine_turns_a_batch_into_results_and_typed_failures(engine):
    good = small_cells(1)
    truncated = list(packed(small_cells(2)))
    truncated[-1] = truncated[-1][:-1]
    items = [
        item(1, packed(good)),
        item(2, truncated),
        item(3, (b"\xc1 not msgpack", b"x")),
        item(4, packed(small_cells(4), detector="0000000000000000")),
        item(5, packed(small_cells(5), detector="")),  # no fingerprint: accepted
        item(6, ()),
    ]
    out = {m.job: m for m in engine.process(items)}
    assert isinstance(out[1], WorkResult) and isinstance(out[5], WorkResult)
    tracks = unpack_tracks(out[1].payload[0], out[1].payload[1:])
    assert tracks.event_id == 1 and tracks.params[0, 0] == good.size
    assert {"worker_queue_s", "decode_s", "clusterization_s", "chain_s", "pack_s", "worker_s"} <= set(
        out[1].timings
    )
    assert (
        isinstance(out[2], WorkFailed)
        and out[2].code == ErrorCode.BAD_EVENT
        and "truncated" in out[2].message
    )
    assert out[3].code == ErrorCode.BAD_EVENT and out[6].code == ErrorCode.BAD_EVENT
    assert out[4].code == ErrorCode.DETECTOR_MISMATCH
    assert engine.chain.batches == [2]  # only the two good events reached the chain, in one pass


def test_an_event_that_breaks_the_batch_fails_alone(engine):
    out = {m.job: m for m in engine.process([item(j, packed(small_cells(j))) for j in (11, 12, 13, 14)])}
    assert [type(out[j]).__name__ for j in (11, 12, 13, 14)] == [
        "WorkResult",
        "WorkResult",
        "WorkFailed",
        "WorkResult",
    ]
    assert out[13].code == ErrorCode.RECONSTRUCTION_FAILED and "boom" in out[13].message


def test_cells_the_chain_refuses_fail_with_the_codes_of_bad_input(engine):
    out = {m.job: m for m in engine.process([item(j, packed(small_cells(j))) for j in (20, 21, 22)])}
    assert isinstance(out[20], WorkResult)
    assert out[21].code == ErrorCode.DETECTOR_MISMATCH and out[21].message.startswith("event 21: cell")
    assert out[22].code == ErrorCode.BAD_EVENT and "not finite" in out[22].message


class FakePool:
    """CuPy's default memory pool as the worker's limit handling sees it."""

    def __init__(self) -> None:
        self.limit = 0
        self.freed = 0
        self.limits: list[int] = []
        self.held = 1500 * 2**20  # what a batch past the limit made the pool hold

    def total_bytes(self) -> int:
        return self.held

    def set_limit(self, size: int) -> None:
        self.limit = size
        self.limits.append(size)

    def get_limit(self) -> int:
        return self.limit

    def free_all_blocks(self) -> None:
        self.freed += 1


def test_a_batch_past_the_gpu_pool_limit_runs_again_without_it(engine, monkeypatch):
    import worker.compute
    from kernels.xp import pool_limit_lifted, set_pool_limit

    pool = FakePool()
    fake_xp = types.SimpleNamespace(get_default_memory_pool=lambda: pool)  # the events stay on numpy
    engine.config = replace(engine.config, backend="cupy")  # the limit is the GPU pool's
    monkeypatch.setattr(worker.compute, "pool_limit_lifted", lambda _xp: pool_limit_lifted(fake_xp))
    monkeypatch.setattr(worker.compute, "set_pool_limit", lambda _xp, size: set_pool_limit(fake_xp, size))
    set_pool_limit(fake_xp, engine.pool_limit_bytes)
    assert pool.limit == 1152 * 2**20
    chain_batch = engine.chain.reconstruct_batch

    def needs_more(events):  # the pool at its limit raises cupy's OutOfMemoryError, a MemoryError
        if pool.limit:
            raise MemoryError("Out of memory allocating 1,000,000,000 bytes (limit set to ...)")
        return chain_batch(events)

    monkeypatch.setattr(engine.chain, "reconstruct_batch", needs_more)
    out = {m.job: m for m in engine.process([item(j, packed(small_cells(j))) for j in (31, 32)])}
    assert all(isinstance(out[j], WorkResult) for j in (31, 32))
    assert engine.over_pool_limit == 1 and pool.freed == 2  # before and after
    # lifted for that batch, then raised to what it held plus a tenth: such batches run once from now on
    assert pool.limits == [1152 * 2**20, 0, 1152 * 2**20, 1650 * 2**20]
    assert engine.pool_limit_bytes == 1650 * 2**20
    # without a limit (or on the host) a MemoryError is a real shortage: the events fail (alone), the
    # worker goes on
    for config in (replace(engine.config, gpu_pool_limit_mb=0), replace(engine.config, backend="numpy")):
        engine.config = config
        pool.limit = 1
        out = {m.job: m for m in engine.process([item(33, packed(small_cells(33)))])}
        assert out[33].code == ErrorCode.RECONSTRUCTION_FAILED and "MemoryError" in out[33].message
    assert engine.over_pool_limit == 1


def test_the_compute_thread_reports_a_batch_past_the_gpu_pool_limit(engine, monkeypatch):
    import zmq

    import worker.compute
    from kernels.xp import pool_limit_lifted
    from worker.compute import ComputeThread
    from worker.observer import WorkerObserver, WorkerObservers

    pool = FakePool()
    fake_xp = types.SimpleNamespace(get_default_memory_pool=lambda: pool)
    monkeypatch.setattr(worker.compute, "pool_limit_lifted", lambda _xp: pool_limit_lifted(fake_xp))
    engine.config = replace(engine.config, backend="cupy")
    pool.limit = 1
    chain_batch = engine.chain.reconstruct_batch

    def needs_more(events):
        if pool.limit:
            raise MemoryError("limit")
        return chain_batch(events)

    monkeypatch.setattr(engine.chain, "reconstruct_batch", needs_more)
    seen: list[int] = []

    class Recorder(WorkerObserver):
        def on_gpu_pool_over_limit(self, n_events: int) -> None:
            seen.append(n_events)

    sent: list[list] = []
    out = types.SimpleNamespace(send_multipart=lambda frames, copy=True: sent.append(frames))
    ctx = zmq.Context.instance()
    thread = ComputeThread(engine, Inbox(), ctx, "inproc://unused", WorkerObservers([Recorder()]))
    thread._run_batch(out, [item(j, packed(small_cells(j))) for j in (41, 42)])
    assert seen == [2] and len(sent) == 3  # STARTED, then one DONE per event
    thread._run_batch(out, [item(43, packed(small_cells(43)))])
    assert seen == [2, 1]


def test_preload_mode_reconstructs_the_preloaded_event_under_the_requested_id(engine):
    engine.preloaded = small_cells(99, n=30)
    (res,) = engine.process([item(1, packed(small_cells(7, n=80)))])
    tracks = unpack_tracks(res.payload[0], res.payload[1:])
    assert tracks.event_id == 7 and tracks.params[0, 0] == engine.preloaded.size


def test_dummy_event_is_sorted_and_inside_the_modules(detector):
    ev = dummy_event(detector)
    assert ev.size > 0 and np.all(np.diff(ev.geometry_id.astype(np.float64)) >= 0)
    idx = np.searchsorted(np.asarray(detector.geometry_id), ev.geometry_id)
    bins = np.asarray(detector.seg_bins)[idx]
    assert np.all(ev.channel0 < np.maximum(bins[:, 0], 1)) and np.all(ev.channel1 < np.maximum(bins[:, 1], 1))


@pytest.mark.timeout(60)
def test_sigterm_during_initialization_exits(tmp_path):
    """A worker told to stop while it is still loading the detector and warming up leaves promptly
    (its never-started I/O thread's socket used to keep the ZeroMQ context from terminating)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--connect", "tcp://127.0.0.1:1", "--warmup", "none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
