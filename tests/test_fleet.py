"""The fleet end to end on loopback with the numpy backend: broker and workers run as real subprocesses
(``python -m broker`` / ``python -m worker``), producers are in-process :class:`FleetClient` objects.

Every fleet is started through the ``make_fleet`` fixture, which always stops it (SIGTERM, then SIGKILL
after a timeout); every wait is bounded.
"""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from broker.errors import ConfigError
from broker.protocol import (
    PRODUCER_SIGNATURE,
    WORKER_SIGNATURE,
    Error,
    ErrorCode,
    PCmd,
    Result,
    Submit,
    WCmd,
    decode_producer,
    decode_worker,
    encode,
)
from kernels.edm.packed import pack_event
from kernels.pipeline import Chain
from producer.client import (
    ClientConfig,
    FleetClient,
    PackedInput,
    ProducerRun,
    Reply,
    RunConfig,
    TracksWriter,
    load_inputs,
)
from producer.launch import LocalFleet

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "generic-mu20"
FAST = ["--heartbeat-ms", "200", "--log-level", "INFO"]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A private detector cache, built once, inherited by every worker subprocess."""
    from producer.io.detector import load_detector

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACKFLEET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        load_detector(BUNDLED)
        yield


SMALL_CELLS = 100  # plumbing tests use the first cells of each event, so compute stays cheap


def bundled_cells(n_cells: int | None = None) -> list:
    """The bundled events' cells (sorted as read), optionally cut to their first ``n_cells`` cells."""
    from dataclasses import replace

    from producer.io.detector import load_detector
    from producer.io.events import iter_cells

    out = []
    for c in iter_cells(BUNDLED, load_detector(BUNDLED)):
        if n_cells is not None:
            cols = ("geometry_id", "channel0", "channel1", "activation", "time", "measurement_id")
            c = replace(c, **{k: getattr(c, k)[:n_cells] for k in cols})
        out.append(c)
    return out


N_FULL = 2  # full mu=20 events cost about a second each on a CPU: the identity check uses two


@pytest.fixture(scope="module")
def full_events(cache_env) -> list[PackedInput]:
    """The first bundled mu=20 events, as a producer packs them."""
    return load_inputs(BUNDLED, limit=N_FULL)


@pytest.fixture(scope="module")
def chain(cache_env) -> Chain:
    from producer.io.detector import load_detector

    return Chain(np, load_detector(BUNDLED))


@pytest.fixture(scope="module")
def reference_small(chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standalone-small")
    standalone_tracks(chain, out, SMALL_CELLS)
    return out


@pytest.fixture(scope="module")
def reference_full(chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standalone-full")
    standalone_tracks(chain, out, None, N_FULL)
    return out


@pytest.fixture(scope="module")
def events(cache_env) -> list[PackedInput]:
    """Small versions of the bundled events (same detector, same packing), for the many-event tests."""
    from producer.io.detector import load_detector

    fingerprint = load_detector(BUNDLED).fingerprint()
    return [
        PackedInput(c.event_id, tuple(_flat(pack_event(c, fingerprint)))) for c in bundled_cells(SMALL_CELLS)
    ]


def _flat(packed):
    header, buffers = packed
    return [header, *buffers]


@pytest.fixture
def make_fleet(tmp_path, cache_env):
    fleets: list[LocalFleet] = []

    def make(n_workers: int = 2, broker_args=(), worker_args=(), keys=None) -> LocalFleet:
        fleet = LocalFleet(
            tmp_path / f"fleet{len(fleets)}",
            broker_args=[*FAST, *broker_args],
            worker_args=[*FAST, *worker_args],
            detector=BUNDLED,
            keys=keys,
            name_prefix=f"fleet{len(fleets)}",
        )
        fleets.append(fleet)
        fleet.start_broker()
        if n_workers:
            fleet.start_workers(n_workers)
            fleet.wait_ready(n_workers, timeout_s=30)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop(timeout_s=10)


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory, cache_env):
    """One broker (1 MiB event limit) with 2 workers, for the tests that do not break or reconfigure it.

    Workers take about a second each to build their chain, so sharing them keeps the suite fast; tests
    call ``wait_ready`` themselves, so that other fixtures run while the workers warm up."""
    fleet = LocalFleet(
        tmp_path_factory.mktemp("shared-fleet"),
        broker_args=[*FAST, "--max-event-mb", "1"],
        worker_args=FAST,
        detector=BUNDLED,
    )
    try:
        fleet.start_broker()
        fleet.start_workers(2)
        yield fleet
    finally:
        fleet.stop(timeout_s=10)


def client_config(endpoint: str, **kw) -> ClientConfig:
    kw.setdefault("timeout_s", 15.0)
    kw.setdefault("heartbeat_interval_s", 0.2)
    kw.setdefault("broker_timeout_s", 1.0)
    return ClientConfig(endpoint=endpoint, **kw)


def stream(endpoint: str, events, count: int, concurrency: int = 4, on_reply=None, run_kw=None, **client_kw):
    """Closed-loop run; returns (summary, replies by request id)."""
    replies: dict[int, list[Reply]] = {}

    def record(r: Reply) -> None:
        replies.setdefault(r.id, []).append(r)
        if on_reply is not None:
            on_reply(r)

    cfg = RunConfig(
        concurrency=concurrency, count=count, progress=False, drain_timeout_s=30.0, **(run_kw or {})
    )
    with FleetClient(client_config(endpoint, **client_kw)) as client:
        summary = ProducerRun(client, events, cfg, on_reply=record).run()
    return summary, replies


def assert_exactly_once(summary, replies, count: int) -> None:
    assert sorted(replies) == list(range(count)), "some events got no reply"
    assert all(len(v) == 1 for v in replies.values()), "an event was reported twice"
    assert summary.events_ok == count and summary.events_failed == 0 and summary.events_lost == 0


def standalone_tracks(
    chain: Chain, out_dir: Path, n_cells: int | None = None, n_events: int | None = None
) -> None:
    """What ``trackfleet reconstruct`` does: Chain.reconstruct per event, then write_tracks."""
    from producer.io.tracks_csv import write_tracks

    for cells in bundled_cells(n_cells)[:n_events]:
        tracks, _ = chain.reconstruct(cells)
        write_tracks(out_dir, tracks)


def assert_same_dirs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and names
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch} {errors}"


def raw_socket(endpoint: str, kind: int = zmq.DEALER) -> zmq.Socket:
    s = zmq.Context.instance().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(endpoint)
    return s


# --- correctness ------------------------------------------------------------------------------------


def test_many_producers_and_workers_exactly_once_and_identical_to_standalone(
    shared_fleet, events, full_events, reference_small, reference_full, tmp_path
):
    # Given 2 workers and 3 producers streaming concurrently
    fleet = shared_fleet
    completed_before = fleet.wait_ready(2, timeout_s=30)["counters"]["completed"]
    n_producers, count = 3, 40
    results: list = [None] * n_producers
    out_dirs = [tmp_path / f"out{i}" for i in range(n_producers)]

    def produce(i: int) -> None:
        writer = TracksWriter(out_dirs[i])
        results[i] = stream(fleet.frontend, events, count, concurrency=6, on_reply=writer)
        writer.close()

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(n_producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    # Then every event of every producer got exactly one reply, spread over all workers
    workers_used = set()
    for summary, replies in results:
        assert_exactly_once(summary, replies, count)
        workers_used |= {r[0].worker for r in replies.values()}
        assert all(r[0].event_id == events[r[0].id % len(events)].event_id for r in replies.values())
    assert len(workers_used) == 2
    # And the tracks are byte-identical to a standalone reconstruction
    for d in out_dirs:
        assert_same_dirs(d, reference_small)
    # Also for full events, which have hundreds of tracks each
    writer = TracksWriter(tmp_path / "full")
    summary, replies = stream(fleet.frontend, full_events, len(full_events), concurrency=3, on_reply=writer)
    writer.close()
    assert_exactly_once(summary, replies, len(full_events))
    assert_same_dirs(tmp_path / "full", reference_full)
    assert sum(1 for _ in (tmp_path / "full").glob("*-track-measurements.csv")) == N_FULL
    stats = fleet.stats()
    assert stats["counters"]["completed"] - completed_before == n_producers * count + len(full_events)
    assert stats["queue_depth"] == 0


def test_one_producer_over_two_brokers_exactly_once(make_fleet, events, reference_small, tmp_path):
    from producer.sharded import ShardedClient

    # Given two fleets, each with its own broker and worker (one per GPU, past one broker's rate)
    fleets = [make_fleet(n_workers=1) for _ in range(2)]
    count, replies = 30, {}
    writer = TracksWriter(tmp_path / "out")

    def record(r: Reply) -> None:
        replies.setdefault(r.id, []).append(r)
        writer(r)

    cfg = RunConfig(concurrency=6, count=count, progress=False, drain_timeout_s=30.0)
    # When one producer shares its events among both brokers
    with ShardedClient(client_config(fleets[0].frontend), [f.frontend for f in fleets]) as client:
        summary = ProducerRun(client, events, cfg, on_reply=record).run()
    writer.close()
    # Then every event got exactly one reply, both brokers served events, and the tracks are the
    # standalone reconstruction's
    assert_exactly_once(summary, replies, count)
    served = [f.stats()["counters"]["completed"] for f in fleets]
    assert min(served) > 0 and sum(served) == count
    # (the fleets name their workers apart: the replies say which fleet served them)
    assert {r.worker for rs in replies.values() for r in rs if r.ok} == {"fleet0-0", "fleet1-0"}
    assert_same_dirs(tmp_path / "out", reference_small)
    # And the producer command does the same when --connect lists both
    import json

    from kernels.edm.packed import event_to_bytes

    small = tmp_path / "small"
    small.mkdir()
    for c in bundled_cells(SMALL_CELLS):
        (small / f"event{c.event_id:09d}.tfev").write_bytes(event_to_bytes(*pack_event(c)))
    both = ",".join(f.frontend for f in fleets)
    proc = subprocess.run(
        [sys.executable, "-m", "producer", "--connect", both, "--events", str(small), "--detector", str(BUNDLED),
         "--concurrency", "4", "--count", "10", "--json"],
        capture_output=True, text=True, timeout=40, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["events_ok"] == 10
    assert sum(f.stats()["counters"]["completed"] for f in fleets) == count + 10


def test_connect_lists_endpoints():
    from producer.sharded import endpoints_of

    assert endpoints_of("tcp://a:1, tcp://b:2") == ["tcp://a:1", "tcp://b:2"]
    assert endpoints_of("ipc:///x") == ["ipc:///x"]
    for bad in ("", " , ", "tcp://a:1,tcp://a:1"):
        with pytest.raises(ConfigError):
            endpoints_of(bad)


def test_dynamic_batching(make_fleet, events, reference_small, tmp_path):
    # one worker taking up to 4 queued events per pass (waiting at most 20 ms for them)
    fleet = make_fleet(1, worker_args=["--batch", "4", "--batch-wait-us", "20000", "--capacity", "8"])
    writer = TracksWriter(tmp_path / "out")
    summary, replies = stream(fleet.frontend, events, 24, concurrency=12, on_reply=writer)
    writer.close()
    assert_exactly_once(summary, replies, 24)
    (w,) = fleet.stats()["workers"]
    assert w["info"]["batch_max"] == 4 and w["capacity"] == 8 and w["completed"] == 24
    assert_same_dirs(tmp_path / "out", reference_small)
    log_text = (fleet.run_dir / "worker-0.log").read_text()
    assert "warm-up" in log_text


def test_preload_mode_reuses_one_event(make_fleet, events, tmp_path):
    from kernels.edm.packed import event_to_bytes

    preload = tmp_path / "event000000042.tfev"
    preload.write_bytes(event_to_bytes(*pack_event(bundled_cells(SMALL_CELLS)[0])))
    fleet = make_fleet(1, worker_args=["--preload", str(preload)])
    summary, replies = stream(fleet.frontend, events, 10)
    assert_exactly_once(summary, replies, 10)
    (w,) = fleet.stats()["workers"]
    assert w["info"]["preload"] is True
    # tracks carry the requested event's id even though the preloaded event was reconstructed
    assert {r[0].event_id for r in replies.values()} == {e.event_id for e in events}


# --- failures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failure_fleet(tmp_path_factory, cache_env):
    """3 slowish workers shared by the worker-failure tests; each test takes one worker out."""
    fleet = LocalFleet(
        tmp_path_factory.mktemp("failure-fleet"),
        broker_args=FAST,
        worker_args=[*FAST, "--simulate-compute-ms", "20", "--capacity", "4"],
        detector=BUNDLED,
    )
    try:
        fleet.start_broker()
        fleet.start_workers(3)
        fleet.wait_ready(3, timeout_s=30)
        yield fleet
    finally:
        fleet.stop(timeout_s=10)


def _live_worker(fleet: LocalFleet):
    live = [(i, p) for i, p in enumerate(fleet.workers) if p.poll() is None]
    if len(live) < 2:
        pytest.skip("the shared failure fleet has no spare worker left")
    return live[0]


def test_kill_9_worker_mid_stream_loses_nothing(failure_fleet, events):
    # Given several slowish workers and a stream in flight
    fleet = failure_fleet
    before = fleet.stats()
    _, victim = _live_worker(fleet)
    count = 50
    done = Counter()

    def on_reply(r: Reply) -> None:
        done["n"] += 1
        if done["n"] == 20:
            os.kill(victim.pid, signal.SIGKILL)  # When one worker dies holding events

    summary, replies = stream(fleet.frontend, events, count, concurrency=10, on_reply=on_reply)
    # Then no event is lost or duplicated and the fleet kept going
    assert victim.wait(5) == -signal.SIGKILL
    assert_exactly_once(summary, replies, count)
    stats = fleet.stats()
    assert stats["n_workers"] == before["n_workers"] - 1
    assert stats["counters"]["workers_expired"] - before["counters"]["workers_expired"] == 1
    assert stats["counters"]["requeued"] > before["counters"]["requeued"]


def test_broker_restart_mid_stream_producers_recover(make_fleet, events):
    fleet = make_fleet(1, worker_args=["--simulate-compute-ms", "20"])
    count = 40
    done = Counter()
    restarted = threading.Event()

    def restart() -> None:
        fleet.restart_broker()
        restarted.set()

    def on_reply(r: Reply) -> None:
        done["n"] += 1
        if done["n"] == 15:
            threading.Thread(target=restart).start()

    summary, replies = stream(fleet.frontend, events, count, concurrency=6, on_reply=on_reply)
    assert restarted.wait(10)
    assert_exactly_once(summary, replies, count)
    assert summary.events_retried > 0  # the producer had to resend what the old broker held
    stats = fleet.wait_ready(1, timeout_s=10)  # the worker re-registered with the new broker
    assert stats["counters"]["completed"] >= count - 15 - 6


def test_sigterm_worker_hands_back_events(failure_fleet, events):
    fleet = failure_fleet
    before = fleet.stats()
    index, victim = _live_worker(fleet)
    count = 40
    done = Counter()

    def on_reply(r: Reply) -> None:
        done["n"] += 1
        if done["n"] == 10:
            victim.send_signal(signal.SIGTERM)

    summary, replies = stream(fleet.frontend, events, count, concurrency=10, on_reply=on_reply)
    assert victim.wait(10) == 0  # clean exit
    assert_exactly_once(summary, replies, count)
    # the worker's DISCONNECT and this STATS request reach the broker on different sockets: the
    # answer may come before the broker has read the DISCONNECT, so ask again for a bounded while.
    # The broker counts the worker once: disconnected, or expired as unreachable when a job it sent
    # in the same instant found the worker's socket already closed (the DISCONNECT then arrives from a
    # worker it no longer knows); either way the events were handed back exactly once (above)
    deadline = time.monotonic() + 5.0
    while True:
        stats = fleet.stats()
        left = stats["counters"]["workers_disconnected"] - before["counters"]["workers_disconnected"]
        expired = stats["counters"]["workers_expired"] - before["counters"]["workers_expired"]
        if left + expired >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left + expired == 1, (left, expired)
    broker_log = (fleet.run_dir / "broker.log").read_text()
    assert left == 1 or "unreachable" in broker_log
    log_text = (fleet.run_dir / f"worker-{index}.log").read_text()
    assert "left the broker" in log_text


def _request(sock: zmq.Socket, frames) -> list:
    sock.send_multipart(frames)
    return sock.recv_multipart()


def test_malformed_truncated_oversized_and_wrong_version_messages(shared_fleet, events):
    fleet = shared_fleet  # its broker accepts events up to 1 MiB
    fleet.wait_ready(2, timeout_s=30)
    front = raw_socket(fleet.frontend)
    good = events[0]

    def error_of(frames) -> Error:
        msg = decode_producer(_request(front, frames))
        assert isinstance(msg, Error), msg
        return msg

    # protocol-level garbage: answered by the broker itself
    assert error_of([b"hello"]).code == ErrorCode.MALFORMED
    assert error_of([PRODUCER_SIGNATURE, bytes([PCmd.SUBMIT])]).code == ErrorCode.MALFORMED  # truncated
    e = error_of([b"TFP7", bytes([PCmd.SUBMIT]), msgpack.packb({"id": 5, "event_id": 1}), b"x"])
    assert e.code == ErrorCode.VERSION and e.id == 5 and "TFP1" in e.message
    assert error_of([PRODUCER_SIGNATURE, b"\x42", msgpack.packb({})]).code == ErrorCode.UNKNOWN_COMMAND
    big = encode(Submit(6, 1, (b"h", b"x" * (1024 * 1024 + 1))))
    e = error_of(big)
    assert e.code == ErrorCode.OVERSIZED and e.id == 6
    # event-level garbage: valid protocol, bad packed event -> the worker answers with a typed error
    e = error_of(encode(Submit(7, 1, (b"\xc1not-msgpack", b"x"))))
    assert e.code == ErrorCode.BAD_EVENT and e.id == 7
    truncated = (good.payload[0], *good.payload[1:-1], bytes(memoryview(good.payload[-1]))[:-3])
    e = error_of(encode(Submit(8, 1, truncated)))
    assert e.code == ErrorCode.BAD_EVENT and "truncated" in e.message
    from producer.io.events import discover, load_cells

    cells = load_cells(discover(BUNDLED)[0])
    header, bufs = pack_event(cells, detector="0123456789abcdef")
    e = error_of(encode(Submit(9, 1, (header, *bufs))))
    assert e.code == ErrorCode.DETECTOR_MISMATCH
    # garbage on the worker side: logged, refused, a wrong version is told to go away
    back = raw_socket(fleet.backend)
    back.send_multipart([b"nonsense"])
    back.send_multipart([WORKER_SIGNATURE, bytes([WCmd.RESULT]), b"\xc1"])
    reply = _request(back, [b"TFW9", bytes([WCmd.READY]), msgpack.packb({"capacity": 1})])
    assert decode_worker(reply).cmd == WCmd.DISCONNECT
    # Then broker and worker are still up and serve a good event
    msg = decode_producer(_request(front, encode(Submit(10, good.event_id, good.payload))))
    assert isinstance(msg, Result) and msg.id == 10
    assert fleet.broker.poll() is None and all(w.poll() is None for w in fleet.workers)
    log_text = (fleet.run_dir / "broker.log").read_text()
    assert "refusing a producer message" in log_text and "refusing a worker message" in log_text
    front.close()
    back.close()


# --- overload ---------------------------------------------------------------------------------------


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_overload_busy_replies_and_bounded_memory(make_fleet, events):
    fleet = make_fleet(
        1,
        broker_args=["--max-queue", "4", "--when-full", "busy"],
        worker_args=["--simulate-compute-ms", "40"],
    )
    rss_before = _peak_rss_mb(fleet.broker.pid)
    # ~600 events of ~0.6 MB offered at 500/s to a fleet that does ~25/s: each event gives up at its first BUSY
    cfg = RunConfig(rate_hz=500.0, count=600, progress=False, drain_timeout_s=20.0)
    with FleetClient(client_config(fleet.frontend, max_busy=1)) as client:
        summary = ProducerRun(client, events, cfg).run()
    assert summary.events_busy > 400 and summary.busy_replies >= summary.events_busy
    assert summary.events_ok + summary.events_failed == 600 and summary.events_lost == 0
    assert set(summary.failures) == {"busy"}
    growth = _peak_rss_mb(fleet.broker.pid) - rss_before
    assert growth < 100, f"broker memory grew by {growth:.0f} MB under overload"
    stats = fleet.stats()
    assert stats["queue_depth"] == 0 and stats["counters"]["busy"] >= 400


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_overload_blocking_back_pressure(make_fleet, events):
    fleet = make_fleet(
        1,
        broker_args=["--max-queue", "4", "--when-full", "block"],
        worker_args=["--simulate-compute-ms", "10"],
    )
    rss_before = _peak_rss_mb(fleet.broker.pid)
    # open loop far above capacity; nothing is refused, the producer is slowed down instead
    cfg = RunConfig(rate_hz=1000.0, count=50, max_in_flight=200, progress=False, drain_timeout_s=30.0)
    with FleetClient(client_config(fleet.frontend, timeout_s=30.0)) as client:
        summary = ProducerRun(client, events, cfg).run()
    assert summary.events_ok == 50 and summary.busy_replies == 0 and summary.events_lost == 0
    growth = _peak_rss_mb(fleet.broker.pid) - rss_before
    assert growth < 100, f"broker memory grew by {growth:.0f} MB under overload"
    stats = fleet.stats()
    assert stats["counters"]["busy"] == 0 and stats["counters"]["completed"] == 50


# --- security ---------------------------------------------------------------------------------------


def test_curve_encryption_and_authentication(make_fleet, events, tmp_path):
    from broker.security import ClientKeys, generate_keys

    keys = tmp_path / "keys"
    generate_keys(keys, ["broker", "worker", "producer", "intruder"])
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in ("worker", "producer"):
        (authorized / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    ok_keys = ClientKeys(keys / "producer.key_secret", keys / "broker.key")
    fleet = make_fleet(
        1,
        broker_args=[
            "--curve-secret",
            str(keys / "broker.key_secret"),
            "--curve-authorized",
            str(authorized),
        ],
        worker_args=[
            "--curve-secret",
            str(keys / "worker.key_secret"),
            "--curve-server-key",
            str(keys / "broker.key"),
        ],
        keys=ok_keys,
    )
    summary, replies = stream(fleet.frontend, events, 5, keys=ok_keys)
    assert_exactly_once(summary, replies, 5)
    bad_keys = ClientKeys(keys / "intruder.key_secret", keys / "broker.key")
    with FleetClient(client_config(fleet.frontend, keys=bad_keys)) as intruder:
        assert intruder.stats(timeout_s=0.5) is None  # the handshake is refused: nothing gets through
    with FleetClient(client_config(fleet.frontend)) as plain:
        assert plain.stats(timeout_s=0.5) is None


# --- commands ---------------------------------------------------------------------------------------


def test_producer_command_and_demo_json(shared_fleet, events, tmp_path, cache_env):
    import json

    from kernels.edm.packed import event_to_bytes

    # the producer command on packed .tfev files (small events, checked against the bundled detector)
    small = tmp_path / "small"
    small.mkdir()
    for c in bundled_cells(SMALL_CELLS):
        (small / f"event{c.event_id:09d}.tfev").write_bytes(event_to_bytes(*pack_event(c)))
    fleet = shared_fleet
    fleet.wait_ready(2, timeout_s=30)
    out = tmp_path / "tracks"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer",
            "--connect",
            fleet.frontend,
            "--events",
            str(small),
            "--detector",
            str(BUNDLED),
            "--rate",
            "200",
            "--poisson",
            "--count",
            "12",
            "--output",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (
        r["events_ok"] == 12
        and r["events_lost"] == 0
        and set(r["latency_ms"]) >= {"p50", "p90", "p95", "p99"}
    )
    assert len(list(out.glob("*-tracks.csv"))) == 5
    # the demo on one full event with its truth (a copy of the bundled files)
    one = tmp_path / "one"
    one.mkdir()
    for f in [
        *BUNDLED.glob("event000000000-*"),
        BUNDLED / "detectors.csv.gz",
        BUNDLED / "digitization-config.json",
    ]:
        (one / f.name).symlink_to(f)
    demo = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "--json", "--workers", "1", "--input", str(one)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    d = json.loads(demo.stdout)
    for key in (
        "events_sent",
        "events_ok",
        "events_failed",
        "events_lost",
        "events_per_s",
        "latency_ms",
        "efficiency",
        "fake_rate",
        "duplicate_rate",
    ):
        assert key in d, key
    assert d["events_ok"] == d["events_sent"] == 1 and {"p50", "p99"} <= set(d["latency_ms"])


@pytest.mark.gpu
def test_gpu_worker(make_fleet, events):
    from kernels.xp import cupy_available

    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    fleet = make_fleet(0)
    fleet.start_workers(1, ["--backend", "cupy", "--device", "0"])
    fleet.wait_ready(1, timeout_s=120)
    summary, replies = stream(fleet.frontend, events, 10)
    assert_exactly_once(summary, replies, 10)
    assert fleet.stats()["workers"][0]["info"]["backend"] == "cupy"
