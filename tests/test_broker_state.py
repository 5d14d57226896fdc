"""The broker's state machine without sockets, driven by a fake clock (style guide pattern 9)."""

from __future__ import annotations

import pytest

from broker.config import BrokerConfig
from broker.errors import ConfigError
from broker.observer import BrokerObserver, ObserverSet
from broker.protocol import (
    Busy,
    Disconnect,
    Error,
    ErrorCode,
    Heartbeat,
    Job,
    Ready,
    Result,
    Stats,
    StatsRequest,
    Submit,
    WorkerHeartbeat,
    WorkFailed,
    WorkResult,
)
from broker.state import BrokerState, ToClient, ToWorker

P1, P2 = b"producer-1", b"producer-2"
W1, W2, W3 = b"worker-1", b"worker-2", b"worker-3"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


class Recorder(BrokerObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattribute__(self, name: str):
        if name.startswith("on_"):
            return lambda *args: object.__getattribute__(self, "calls").append((name, args))
        return object.__getattribute__(self, name)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class Harness:
    """A BrokerState plus helpers that feed it messages and collect what it sends."""

    def __init__(self, **cfg) -> None:
        self.clock = Clock()
        self.rec = Recorder()
        cfg.setdefault("heartbeat_interval_s", 1.0)
        cfg.setdefault("heartbeat_liveness", 3)
        self.state = BrokerState(BrokerConfig(**cfg), self.clock(), ObserverSet([self.rec]), epoch="E1")
        self.to_client: list[ToClient] = []
        self.to_worker: list[ToWorker] = []

    def _collect(self, actions):
        for a in actions:
            (self.to_client if isinstance(a, ToClient) else self.to_worker).append(a)
        return actions

    def submit(self, rid: int, client: bytes = P1, event_id: int | None = None, payload=(b"hdr", b"col")):
        return self._collect(
            self.state.on_client_message(
                client, Submit(rid, rid if event_id is None else event_id, payload), self.clock()
            )
        )

    def ready(self, w: bytes, capacity: int = 1):
        return self._collect(
            self.state.on_worker_message(w, Ready(capacity, {"name": w.decode()}), self.clock())
        )

    def worker(self, w: bytes, msg):
        return self._collect(self.state.on_worker_message(w, msg, self.clock()))

    def tick(self, dt: float = 0.0):
        self.clock.advance(dt)
        return self._collect(self.state.tick(self.clock()))

    def jobs_for(self, w: bytes) -> list[Job]:
        return [a.message for a in self.to_worker if a.identity == w and isinstance(a.message, Job)]

    def pop_jobs(self) -> list[tuple[bytes, Job]]:
        out = [(a.identity, a.message) for a in self.to_worker if isinstance(a.message, Job)]
        self.to_worker = [a for a in self.to_worker if not isinstance(a.message, Job)]
        return out

    def finish(self, w: bytes, job: Job, payload=(b"tracks",)):
        return self.worker(w, WorkResult(job.job, job.epoch, {"chain_s": 0.1}, payload))

    def replies(self, kind=None, client: bytes | None = None):
        return [
            a.message
            for a in self.to_client
            if (kind is None or isinstance(a.message, kind)) and (client is None or a.identity == client)
        ]


def test_submit_dispatch_result_round_trip():
    # Given a broker with a queued event and no worker
    h = Harness()
    h.submit(1, payload=(b"h", b"c1", b"c2"))
    assert h.state.queue_depth == 1 and not h.to_worker
    # When a worker registers, the event is leased to it, payload untouched
    h.ready(W1)
    ((w, job),) = h.pop_jobs()
    assert w == W1 and job.epoch == "E1" and job.attempt == 1 and job.payload == (b"h", b"c1", b"c2")
    assert h.state.queue_depth == 0 and h.state.in_flight == 1
    # When the result comes back, the producer gets it under its request id
    h.clock.advance(0.5)
    h.finish(W1, job, payload=(b"T", b"cols"))
    (res,) = h.replies(Result)
    assert res.id == 1 and res.event_id == 1 and res.worker == "worker-1" and res.payload == (b"T", b"cols")
    assert res.timings == {"chain_s": 0.1} and res.attempts == 1
    assert h.state.in_flight == 0 and h.state.pending == 0
    assert h.rec.names()[:4] == ["on_event_received", "on_worker_ready", "on_dispatched", "on_result"]


def test_credit_limits_leases_per_worker():
    h = Harness()
    h.ready(W1, capacity=2)
    for i in range(5):
        h.submit(i)
    jobs = h.pop_jobs()
    assert [j.job for _, j in jobs] == [1, 2]  # FIFO, two credits
    assert h.state.queue_depth == 3
    h.finish(W1, jobs[0][1])
    assert [j.job for _, j in h.pop_jobs()] == [3]  # one credit returned, one more lease


def test_least_loaded_spreads_and_prefers_idle_workers():
    h = Harness(policy="least_loaded")
    h.ready(W1, capacity=4)
    h.ready(W2, capacity=4)
    for i in range(4):
        h.submit(i)
    owners = [w for w, _ in h.pop_jobs()]
    assert owners.count(W1) == 2 and owners.count(W2) == 2
    h.ready(W3, capacity=4)  # a fresh worker gets the next events first
    h.submit(10)
    h.submit(11)
    assert [w for w, _ in h.pop_jobs()] == [W3, W3]


def test_round_robin_cycles_in_registration_order():
    h = Harness(policy="round_robin")
    for w in (W1, W2, W3):
        h.ready(w, capacity=10)
    for i in range(7):
        h.submit(i)
    assert [w for w, _ in h.pop_jobs()] == [W1, W2, W3, W1, W2, W3, W1]


def test_resubmitted_pending_event_is_not_duplicated():
    h = Harness()
    h.submit(1)
    h.submit(1)  # producer retry while the broker still holds it
    h.submit(1, client=P2)  # same id from another producer is another event
    assert h.state.pending == 2 and h.state.counters["duplicates"] == 1
    h.ready(W1, capacity=4)
    jobs = h.pop_jobs()
    assert len(jobs) == 2
    h.finish(W1, jobs[0][1])
    h.submit(1)  # after the answer, a resubmission is new work again (the producer dedups replies)
    assert h.state.pending == 2


def test_busy_when_queue_full():
    h = Harness(max_queue_events=2)
    for i in range(3):
        h.submit(i)
    (busy,) = h.replies(Busy)
    assert busy.id == 2 and busy.queue_depth == 2
    assert not h.state.accepting and h.state.queue_depth == 2
    assert "on_busy" in h.rec.names()


def test_queue_bytes_bound():
    h = Harness(max_queue_bytes=10)
    h.submit(1, payload=(b"x" * 8,))
    h.submit(2, payload=(b"x" * 8,))  # 16 bytes queued: full from now on
    h.submit(3, payload=(b"x",))
    assert [b.id for b in h.replies(Busy)] == [3]
    assert h.state.queue_bytes == 16


def test_silent_worker_expires_and_its_events_move():
    # Given two workers, one holding an event it reported as started
    h = Harness()
    h.ready(W1)
    h.submit(1)
    h.submit(2)
    ((_, j1),) = h.pop_jobs()
    h.worker(W1, WorkerHeartbeat(active=(j1.job,)))
    h.ready(W2)
    ((_, j2),) = h.pop_jobs()
    # When W1 goes silent past 3 heartbeat periods while W2 keeps heartbeating
    for _ in range(4):
        h.tick(1.0)
        h.worker(W2, WorkerHeartbeat())
    # Then W1 is expired and told so; its event waits for W2 (which is busy) with one failed attempt
    assert h.state.n_workers == 1
    assert any(isinstance(a.message, Disconnect) and a.identity == W1 for a in h.to_worker)
    assert "on_worker_expired" in h.rec.names() and "on_requeue" in h.rec.names()
    h.finish(W2, j2)
    ((w, again),) = h.pop_jobs()
    assert w == W2 and again.job == j1.job and again.attempt == 2
    h.finish(W2, again)
    assert sorted(r.id for r in h.replies(Result)) == [1, 2]
    assert h.replies(Result)[-1].attempts == 2


def test_heartbeats_keep_a_busy_worker_alive_and_are_sent_to_workers_and_producers():
    h = Harness()
    h.ready(W1)
    h.submit(1)
    h.pop_jobs()
    for _ in range(10):  # a long event: heartbeats keep flowing both ways
        h.tick(1.0)
        h.worker(W1, WorkerHeartbeat())
    assert h.state.n_workers == 1
    assert sum(isinstance(a.message, WorkerHeartbeat) for a in h.to_worker) >= 9
    assert len(h.replies(Heartbeat, P1)) >= 9  # producer with pending work hears from the broker


def test_event_that_kills_workers_gets_worker_lost_and_fleet_continues():
    h = Harness(max_attempts=3)
    h.submit(1)  # the poison event
    h.submit(2)
    workers = [b"w%d" % i for i in range(10)]
    killed = 0
    for w in workers:
        h.ready(w)
        jobs = h.pop_jobs()
        for wid, job in jobs:
            if job.job == 1:  # the event crashes whoever runs it, right after it starts
                h.worker(wid, WorkerHeartbeat(active=(job.job,)))
                h.tick(3.5)
                killed += 1
            else:
                h.finish(wid, job)
        if h.replies(Error):
            break
    (err,) = h.replies(Error)
    assert err.id == 1 and err.code == ErrorCode.WORKER_LOST and not err.retryable
    assert killed == 3
    h.ready(b"survivor")  # the fleet keeps going with the other events
    for wid, job in h.pop_jobs():
        h.finish(wid, job)
    assert [r.id for r in h.replies(Result)] == [2]
    assert h.state.pending == 0


def test_only_started_events_are_charged_when_a_worker_dies():
    h = Harness(max_attempts=1)
    h.ready(W1, capacity=3)
    for i in range(3):
        h.submit(i)
    jobs = h.pop_jobs()
    h.worker(W1, WorkerHeartbeat(active=(jobs[0][1].job,)))  # only the first had started
    h.tick(3.5)
    # max_attempts=1: the started one fails at once, the two prefetched ones are re-queued free
    (err,) = h.replies(Error)
    assert err.id == 0 and err.code == ErrorCode.WORKER_LOST
    assert h.state.queue_depth == 2


def test_lease_timeout_expires_a_stalled_worker():
    h = Harness(job_timeout_s=5.0)
    h.ready(W1)
    h.submit(1)
    h.pop_jobs()
    for _ in range(6):  # heartbeats continue (I/O thread alive) but compute is stuck
        h.tick(1.0)
        h.worker(W1, WorkerHeartbeat())
    assert h.state.n_workers == 0
    assert any(isinstance(a.message, Disconnect) for a in h.to_worker)
    assert h.state.queue_depth == 1
    # the stalled worker recovers and answers after all: first answer wins, nothing duplicated
    h.ready(W2)
    ((_, again),) = h.pop_jobs()
    late = WorkResult(again.job, "E1", {}, (b"late",))
    h.worker(W1, late)
    assert [r.payload for r in h.replies(Result)] == [(b"late",)]
    h.finish(W2, again)
    assert len(h.replies(Result)) == 1 and h.state.counters["stale_results"] == 1
    assert h.state.in_flight == 0


def test_disconnect_returns_unstarted_events_free_of_charge():
    h = Harness(max_attempts=1)
    h.ready(W1, capacity=2)
    h.submit(1)
    h.submit(2)
    jobs = h.pop_jobs()
    h.worker(W1, Disconnect("shutting down", returned=tuple(j.job for _, j in jobs)))
    assert h.state.n_workers == 0 and h.state.queue_depth == 2 and not h.replies(Error)
    h.ready(W2, capacity=2)
    assert len(h.pop_jobs()) == 2


def test_unknown_worker_is_told_to_register():
    h = Harness()
    (a,) = h.worker(W1, WorkerHeartbeat())
    assert isinstance(a.message, Disconnect) and a.identity == W1


def test_ready_again_requeues_without_charge():
    h = Harness(max_attempts=1)
    h.ready(W1)
    h.submit(1)
    h.pop_jobs()
    h.ready(W1)  # reconnected: it holds nothing of ours any more
    ((w, job),) = h.pop_jobs()
    assert w == W1 and job.attempt == 2 and not h.replies(Error)


def test_results_from_an_earlier_broker_are_dropped():
    h = Harness()
    h.ready(W1)
    h.submit(1)
    ((_, job),) = h.pop_jobs()
    h.worker(W1, WorkResult(job.job, "OLD-EPOCH", {}, (b"x",)))
    assert not h.replies(Result) and h.state.in_flight == 1
    h.finish(W1, job)
    assert len(h.replies(Result)) == 1


def test_worker_failures_forward_typed_errors_or_retry():
    h = Harness(max_attempts=2)
    h.ready(W1, capacity=2)
    h.submit(1)
    h.submit(2)
    (_, j1), (_, j2) = h.pop_jobs()
    h.worker(W1, WorkFailed(j1.job, "E1", ErrorCode.BAD_EVENT, "cannot unpack", retryable=False))
    h.worker(W1, WorkFailed(j2.job, "E1", ErrorCode.INTERNAL, "oops", retryable=True))
    (err,) = h.replies(Error)
    assert err.id == 1 and err.code == ErrorCode.BAD_EVENT and err.message == "cannot unpack"
    ((_, again),) = h.pop_jobs()  # the retryable one goes out again
    assert again.job == j2.job and again.attempt == 2
    h.worker(W1, WorkFailed(again.job, "E1", ErrorCode.INTERNAL, "oops", retryable=True))
    assert [e.id for e in h.replies(Error)] == [1, 2]  # attempts exhausted


def test_drain_answers_queued_events_and_keeps_leases():
    h = Harness()
    h.ready(W1)
    h.submit(1)
    h.submit(2)
    ((_, job),) = h.pop_jobs()
    h._collect(h.state.begin_drain(h.clock()))
    (err,) = h.replies(Error)
    assert err.id == 2 and err.code == ErrorCode.SHUTTING_DOWN and err.retryable
    h.submit(3)
    assert h.replies(Error)[-1].code == ErrorCode.SHUTTING_DOWN
    h.finish(W1, job)
    assert [r.id for r in h.replies(Result)] == [1] and h.state.in_flight == 0


def test_stats_and_client_heartbeat_replies():
    h = Harness()
    h.ready(W1, capacity=3)
    h.submit(1)
    h._collect(h.state.on_client_message(P2, StatsRequest(), h.clock()))
    h._collect(h.state.on_client_message(P2, Heartbeat(), h.clock()))
    (stats,) = h.replies(Stats, P2)
    s = stats.stats
    assert s["n_workers"] == 1 and s["capacity"] == 3 and s["in_flight"] == 1 and s["epoch"] == "E1"
    assert s["workers"][0]["name"] == "worker-1" and s["counters"]["received"] == 1
    assert h.replies(Heartbeat, P2)


def test_reply_only_commands_from_producers_are_rejected():
    h = Harness()
    h._collect(h.state.on_client_message(P1, Busy(1), h.clock()))
    (err,) = h.replies(Error)
    assert err.code == ErrorCode.UNKNOWN_COMMAND


def test_a_failing_observer_never_breaks_dispatch():
    class Broken(BrokerObserver):
        def on_dispatched(self, job, worker):
            raise RuntimeError("exporter bug")

    h = Harness()
    h.state.observers.add(Broken())
    h.ready(W1)
    h.submit(1)
    ((_, job),) = h.pop_jobs()
    h.finish(W1, job)
    assert len(h.replies(Result)) == 1


def test_idle_producers_are_forgotten():
    h = Harness(client_expiry_s=10.0)
    h.submit(1)
    h.ready(W1)
    ((_, job),) = h.pop_jobs()
    h.finish(W1, job)
    h.tick(11.0)
    assert not h.state._clients


@pytest.mark.parametrize(
    "bad",
    [
        {"policy": "random"},
        {"when_full": "drop"},
        {"max_queue_events": 0},
        {"heartbeat_interval_s": 0},
        {"max_attempts": 0},
        {"curve_authorized_dir": "/tmp"},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        BrokerConfig(**bad)
