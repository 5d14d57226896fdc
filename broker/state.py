"""The broker's state machine, apart from any socket (style guide pattern 9).

:class:`BrokerState` consumes decoded messages and clock ticks and returns the messages to send, as
:class:`ToClient` / :class:`ToWorker` actions; time always comes in as an argument (``now``, seconds of
``time.monotonic()`` in production, a fake clock in tests). The socket loop (:mod:`broker.server`) only
polls, decodes, calls the state and sends.

Model:

- **Jobs.** Each accepted event becomes a job keyed by (producer routing id, request id); a resubmission
  of a job that is still pending (queued or leased) is ignored, so producer retries never duplicate work
  inside one broker. Jobs wait in one bounded FIFO queue (re-queued jobs go to the front).
- **Workers** are one authoritative table keyed by routing id (anti-pattern 3: no hand-synced indices).
  A worker announces its *capacity* (events it can hold: computing + prefetched) in READY; its credit is
  capacity minus its leases. Dispatch hands queued jobs to workers with credit, least-loaded first or
  round-robin, so a worker always has the next event local before it finishes the current one.
- **Leases** (pattern 10). Every dispatched job is a lease on one worker with a deadline. A worker that
  stops heartbeating, or holds a lease past its deadline, is expired: its leases are re-queued. The
  jobs it reported as started are charged one failed attempt (all of its jobs, when it reported none);
  a job charged ``max_attempts`` times gets a ``worker_lost`` error instead, so an event that kills
  workers cannot take the fleet down. Jobs a worker hands back unstarted (DISCONNECT) are re-queued free.
- **Epoch.** Job ids are unique within one broker instance, whose random ``epoch`` travels in JOB and
  comes back in RESULT; results from an earlier broker instance are recognised and dropped.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from broker.config import BrokerConfig
from broker.observer import BrokerObserver, ObserverSet
from broker.protocol import (
    Busy,
    Disconnect,
    Error,
    ErrorCode,
    Frame,
    Heartbeat,
    Job,
    ProducerMessage,
    Ready,
    Result,
    Stats,
    StatsRequest,
    Submit,
    WorkerHeartbeat,
    WorkerMessage,
    WorkFailed,
    WorkResult,
    payload_nbytes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToClient:
    """Send ``message`` to the producer with routing id ``identity``."""

    identity: bytes
    message: ProducerMessage


@dataclass(frozen=True)
class ToWorker:
    """Send ``message`` to the worker with routing id ``identity``."""

    identity: bytes
    message: WorkerMessage


Action: TypeAlias = ToClient | ToWorker


@dataclass(frozen=True)
class JobInfo:
    """Read-only view of a job for observers.

    Attributes:
        job_id: broker job id. request_id / event_id / client: as submitted.
        nbytes: payload size [bytes]. attempt: dispatches so far. received_at: arrival time [s, monotonic].
    """

    job_id: int
    request_id: int
    event_id: int
    client: bytes
    nbytes: int
    attempt: int
    received_at: float


@dataclass(frozen=True)
class WorkerInfo:
    """Read-only view of a worker for observers.

    Attributes:
        identity: routing id. name: human-readable name. capacity: announced credit [events].
        in_flight: leases held now [events]. info: what the worker announced in READY.
    """

    identity: bytes
    name: str
    capacity: int
    in_flight: int
    info: dict[str, Any]


@dataclass(eq=False)
class _Job:
    job_id: int
    client: bytes
    request_id: int
    event_id: int
    payload: tuple[Frame, ...]
    nbytes: int
    received_at: float
    enqueued_at: float
    attempts: int = 0  # dispatches
    penalties: int = 0  # dispatches charged as failed (worker died / stalled / retryable failure)
    holder: bytes | None = None  # worker holding the current lease
    dispatched_at: float = 0.0
    done: bool = False

    def info(self) -> JobInfo:
        return JobInfo(
            self.job_id,
            self.request_id,
            self.event_id,
            self.client,
            self.nbytes,
            self.attempts,
            self.received_at,
        )


@dataclass(eq=False)
class _Lease:
    job: _Job
    deadline: float


@dataclass(eq=False)
class _Worker:
    identity: bytes
    name: str
    capacity: int
    info: dict[str, Any]
    registered_at: float
    last_seen: float
    last_sent: float
    order: int  # registration sequence, for round robin
    leases: dict[int, _Lease] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)  # jobs the worker reported as started
    dispatched: int = 0
    completed: int = 0
    last_dispatch: int = 0  # dispatch sequence number of the latest lease, for tie breaking

    @property
    def credit(self) -> int:
        return self.capacity - len(self.leases)

    def view(self) -> WorkerInfo:
        return WorkerInfo(self.identity, self.name, self.capacity, len(self.leases), self.info)


@dataclass(eq=False)
class _Client:
    last_seen: float
    last_sent: float
    pending: int = 0


_COUNTERS = (
    "received",
    "dispatched",
    "completed",
    "failed",
    "requeued",
    "busy",
    "malformed",
    "duplicates",
    "stale_results",
    "workers_ready",
    "workers_expired",
    "workers_disconnected",
)


class BrokerState:
    """Queue, workers, leases and producers of one broker instance.

    Args:
        config: broker configuration.
        now: current time [s] (monotonic clock).
        observers: lifecycle hook subscribers.
        epoch: broker instance id (random when None).
    """

    def __init__(
        self,
        config: BrokerConfig,
        now: float,
        observers: ObserverSet | None = None,
        epoch: str | None = None,
    ) -> None:
        self.config = config
        self.epoch = epoch or secrets.token_hex(6)
        self.observers = observers if observers is not None else ObserverSet()
        self.started_at = now
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.draining = False
        self._queue: deque[_Job] = deque()
        self._queue_bytes = 0
        self._pending: dict[tuple[bytes, int], _Job] = {}
        self._jobs: dict[int, _Job] = {}
        self._workers: dict[bytes, _Worker] = {}
        self._clients: dict[bytes, _Client] = {}
        self._next_job = 1
        self._dispatch_seq = 0
        self._worker_seq = 0
        self._rr_last = -1

    # --- accessors (for the socket loop and for metrics) ----------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Events waiting for a worker [events]."""
        return len(self._queue)

    @property
    def queue_bytes(self) -> int:
        """Payload bytes waiting for a worker [bytes]."""
        return self._queue_bytes

    @property
    def in_flight(self) -> int:
        """Events leased to workers [events]."""
        return sum(len(w.leases) for w in self._workers.values())

    @property
    def pending(self) -> int:
        """Events accepted and not yet answered [events]."""
        return len(self._pending)

    @property
    def n_workers(self) -> int:
        return len(self._workers)

    @property
    def accepting(self) -> bool:
        """False while the queue is full (in "block" mode the loop then stops reading producers)."""
        return (
            len(self._queue) < self.config.max_queue_events
            and self._queue_bytes < self.config.max_queue_bytes
            and not self.draining
        )

    def workers(self) -> list[WorkerInfo]:
        """Snapshot of every registered worker."""
        return [w.view() for w in self._workers.values()]

    def stats(self, now: float) -> dict[str, Any]:
        """Snapshot of queue, workers and counters (the STATS reply)."""
        return {
            "epoch": self.epoch,
            "uptime_s": round(now - self.started_at, 3),
            "policy": self.config.policy,
            "when_full": self.config.when_full,
            "queue_depth": self.queue_depth,
            "queue_bytes": self.queue_bytes,
            "max_queue_events": self.config.max_queue_events,
            "in_flight": self.in_flight,
            "pending": self.pending,
            "n_workers": self.n_workers,
            "capacity": sum(w.capacity for w in self._workers.values()),
            "draining": self.draining,
            "workers": [
                {
                    "name": w.name,
                    "capacity": w.capacity,
                    "in_flight": len(w.leases),
                    "dispatched": w.dispatched,
                    "completed": w.completed,
                    "idle_s": round(now - w.last_seen, 3),
                    "info": w.info,
                }
                for w in self._workers.values()
            ],
            "counters": dict(self.counters),
        }

    def next_deadline(self, now: float) -> float:
        """Time [s] by which :meth:`tick` should run next."""
        return now + min(self.config.heartbeat_interval_s / 2, 0.25)

    # --- producer side --------------------------------------------------------------------------------

    def on_client_message(self, identity: bytes, msg: ProducerMessage, now: float) -> list[Action]:
        """Handle one decoded message from a producer."""
        client = self._clients.get(identity)
        if client is None:
            client = self._clients[identity] = _Client(last_seen=now, last_sent=now)
        client.last_seen = now
        if isinstance(msg, Submit):
            return self._submit(identity, client, msg, now)
        if isinstance(msg, Heartbeat):
            client.last_sent = now
            return [ToClient(identity, Heartbeat(self.epoch))]
        if isinstance(msg, StatsRequest):
            client.last_sent = now
            return [ToClient(identity, Stats(self.stats(now)))]
        # RESULT/ERROR/BUSY/STATS travel broker -> producer only
        return self.reject_client(
            identity, None, ErrorCode.UNKNOWN_COMMAND, f"{msg.cmd.name} is not a request"
        )

    def reject_client(self, identity: bytes, request_id: int | None, code: str, message: str) -> list[Action]:
        """Error reply to a producer message that could not be accepted (malformed, oversized, version)."""
        self.counters["malformed"] += 1
        self.observers.emit("on_failed", None, str(code))
        return [ToClient(identity, Error(request_id, code, message))]

    def _submit(self, identity: bytes, client: _Client, msg: Submit, now: float) -> list[Action]:
        key = (identity, msg.id)
        if key in self._pending:
            # a producer retry of an event we still hold: the pending copy will answer it
            self.counters["duplicates"] += 1
            return []
        if self.draining:
            client.last_sent = now
            return [
                ToClient(identity, Error(msg.id, ErrorCode.SHUTTING_DOWN, "broker is shutting down", True))
            ]
        if not self.accepting:
            self.counters["busy"] += 1
            self.observers.emit("on_busy", identity, msg.id, len(self._queue))
            client.last_sent = now
            return [
                ToClient(identity, Busy(msg.id, len(self._queue), self.config.busy_retry_after_s, self.epoch))
            ]
        job = _Job(
            job_id=self._next_job,
            client=identity,
            request_id=msg.id,
            event_id=msg.event_id,
            payload=msg.payload,
            nbytes=payload_nbytes(msg.payload),
            received_at=now,
            enqueued_at=now,
        )
        self._next_job += 1
        self._pending[key] = job
        self._jobs[job.job_id] = job
        self._queue.append(job)
        self._queue_bytes += job.nbytes
        client.pending += 1
        self.counters["received"] += 1
        if self.observers:
            self.observers.emit("on_event_received", job.info())
        return self._dispatch(now)

    # --- worker side ----------------------------------------------------------------------------------

    def on_worker_message(self, identity: bytes, msg: WorkerMessage, now: float) -> list[Action]:
        """Handle one decoded message from a worker."""
        if isinstance(msg, Ready):
            return self._ready(identity, msg, now)
        w = self._workers.get(identity)
        if w is not None:
            w.last_seen = now
        if isinstance(msg, WorkResult):
            return self._result(identity, w, msg, now)
        if isinstance(msg, WorkFailed):
            return self._failed(identity, w, msg, now)
        if isinstance(msg, Disconnect):
            return self._worker_leaves(identity, w, msg, now)
        if isinstance(msg, WorkerHeartbeat):
            if w is None:
                return [ToWorker(identity, Disconnect("not registered (broker restarted?); send READY"))]
            w.active = {j for j in msg.active if j in w.leases}
            return []
        # JOB travels broker -> worker only
        log.warning("worker %r sent %s, which only the broker sends; ignored", identity, msg.cmd.name)
        self.counters["malformed"] += 1
        return []

    def _ready(self, identity: bytes, msg: Ready, now: float) -> list[Action]:
        actions: list[Action] = []
        old = self._workers.pop(identity, None)
        if old is not None:
            # READY means "I hold none of your events": take back whatever it had, free of charge
            log.info("worker %s registered again; re-queueing its %d events", old.name, len(old.leases))
            actions += self._release_leases(old, now, charge=(), reason="worker re-registered")
        name = msg.info.get("name")
        self._worker_seq += 1
        w = _Worker(
            identity=identity,
            name=name if isinstance(name, str) and name else identity.hex(),
            capacity=msg.capacity,
            info=msg.info,
            registered_at=now,
            last_seen=now,
            last_sent=now,
            order=self._worker_seq,
        )
        self._workers[identity] = w
        self.counters["workers_ready"] += 1
        log.info("worker %s ready with capacity %d (%s)", w.name, w.capacity, _describe(msg.info))
        self.observers.emit("on_worker_ready", w.view())
        return actions + self._dispatch(now)

    def _finish(self, w: _Worker | None, identity: bytes, job_id: int, epoch: str) -> _Job | None:
        """Close the lease of ``job_id`` on the sending worker and return the job if it still wants an answer."""
        if epoch != self.epoch:
            self.counters["stale_results"] += 1
            log.debug("dropping a result of job %d from an earlier broker (epoch %s)", job_id, epoch)
            return None
        if w is not None:
            w.leases.pop(job_id, None)
            w.active.discard(job_id)
        job = self._jobs.get(job_id)
        if job is None or job.done:
            self.counters["stale_results"] += 1
            return None
        return job

    def _orphan_other_lease(self, job: _Job, identity: bytes) -> None:
        """``job`` was answered by ``identity``: drop it from the queue or neutralise another worker's lease."""
        if job.holder is None:
            self._remove_queued(job)
        elif job.holder != identity:
            # answered by a worker we had given up on; the current holder's answer will be dropped
            holder = self._workers.get(job.holder)
            lease = holder.leases.get(job.job_id) if holder is not None else None
            if lease is not None:
                lease.deadline = float("inf")  # keeps its credit until that worker answers or leaves

    def _complete(self, job: _Job) -> None:
        job.done = True
        self._jobs.pop(job.job_id, None)
        self._pending.pop((job.client, job.request_id), None)
        client = self._clients.get(job.client)
        if client is not None:
            client.pending = max(0, client.pending - 1)

    def _result(self, identity: bytes, w: _Worker | None, msg: WorkResult, now: float) -> list[Action]:
        job = self._finish(w, identity, msg.job, msg.epoch)
        actions: list[Action] = []
        if w is None:
            actions.append(ToWorker(identity, Disconnect("not registered (expired?); send READY")))
        if job is not None:
            self._orphan_other_lease(job, identity)
            queue_s = max(0.0, job.dispatched_at - job.enqueued_at)
            self._complete(job)
            self.counters["completed"] += 1
            if w is not None:
                w.completed += 1
            actions.append(
                ToClient(
                    job.client,
                    Result(
                        id=job.request_id,
                        event_id=job.event_id,
                        worker=w.name if w is not None else identity.hex(),
                        timings=msg.timings,
                        queue_s=queue_s,
                        attempts=job.attempts,
                        epoch=self.epoch,
                        payload=msg.payload,
                    ),
                )
            )
            self._touch_client(job.client, now)
            if self.observers:
                view = w.view() if w is not None else WorkerInfo(identity, identity.hex(), 0, 0, {})
                self.observers.emit("on_result", job.info(), view, msg.timings, queue_s)
                self.observers.emit("on_result_sent", job.info(), payload_nbytes(msg.payload))
        return actions + self._dispatch(now)

    def _failed(self, identity: bytes, w: _Worker | None, msg: WorkFailed, now: float) -> list[Action]:
        job = self._finish(w, identity, msg.job, msg.epoch)
        actions: list[Action] = []
        if w is None:
            actions.append(ToWorker(identity, Disconnect("not registered (expired?); send READY")))
        if job is not None and job.holder not in (None, identity):
            job = None  # another worker holds it now; its answer decides
        if job is not None:
            self._orphan_other_lease(job, identity)  # out of the queue if it was re-queued meanwhile
            job.holder = None
            if msg.retryable and job.penalties + 1 < self.config.max_attempts:
                job.penalties += 1
                self._requeue(job, now)
                self.counters["requeued"] += 1
                self.observers.emit(
                    "on_requeue", job.info(), w.view() if w else None, f"retryable {msg.code}"
                )
            else:
                actions += self._fail_job(job, msg.code, msg.message, now)
        return actions + self._dispatch(now)

    def _worker_leaves(self, identity: bytes, w: _Worker | None, msg: Disconnect, now: float) -> list[Action]:
        if w is None:
            return []
        del self._workers[identity]
        self.counters["workers_disconnected"] += 1
        log.info("worker %s disconnected (%s), handing back %d events", w.name, msg.reason, len(w.leases))
        self.observers.emit("on_worker_disconnected", w.view(), msg.reason)
        # A graceful leave is no fault of the events: re-queue them all free of charge.
        actions = self._release_leases(w, now, charge=(), reason=f"worker disconnected: {msg.reason}")
        return actions + self._dispatch(now)

    def on_worker_unreachable(self, identity: bytes, now: float) -> list[Action]:
        """The socket could not deliver to this worker (it is gone): expire it."""
        w = self._workers.get(identity)
        if w is None:
            return []
        return self._expire(w, now, "unreachable") + self._dispatch(now)

    # --- time -----------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Housekeeping: expire silent or stalled workers, heartbeat workers and producers."""
        actions: list[Action] = []
        cfg = self.config
        for w in list(self._workers.values()):
            if now - w.last_seen > cfg.worker_expiry_s:
                actions += self._expire(w, now, f"silent for {now - w.last_seen:.1f} s")
                continue
            late = [jid for jid, lease in w.leases.items() if lease.deadline < now]
            if late:
                actions += self._expire(
                    w, now, f"held job(s) {late} past the {cfg.job_timeout_s} s lease", late
                )
                continue
            if now - w.last_sent >= cfg.heartbeat_interval_s:
                w.last_sent = now
                actions.append(ToWorker(w.identity, WorkerHeartbeat()))
        for identity, c in list(self._clients.items()):
            if c.pending == 0 and now - c.last_seen > cfg.client_expiry_s:
                del self._clients[identity]
            elif c.pending and now - c.last_sent >= cfg.heartbeat_interval_s:
                c.last_sent = now
                actions.append(ToClient(identity, Heartbeat(self.epoch)))
        if self.observers:
            self.observers.emit("on_tick", self.queue_depth, self.in_flight, self.n_workers)
        return actions + self._dispatch(now)

    def begin_drain(self, now: float) -> list[Action]:
        """Stop accepting events; queued (not yet dispatched) events get a retryable ``shutting_down`` error.

        In-flight events keep their leases so that their results can still be delivered.
        """
        self.draining = True
        actions: list[Action] = []
        while self._queue:
            job = self._queue.popleft()
            self._queue_bytes -= job.nbytes
            actions += self._fail_job(
                job, ErrorCode.SHUTTING_DOWN, "broker is shutting down", now, retryable=True
            )
        return actions

    # --- internals ------------------------------------------------------------------------------------

    def _touch_client(self, identity: bytes, now: float) -> None:
        c = self._clients.get(identity)
        if c is not None:
            c.last_sent = now

    def _fail_job(
        self, job: _Job, code: str, message: str, now: float, retryable: bool = False
    ) -> list[Action]:
        self._complete(job)
        self.counters["failed"] += 1
        self._touch_client(job.client, now)
        self.observers.emit("on_failed", job.info(), str(code))
        return [ToClient(job.client, Error(job.request_id, code, message, retryable))]

    def _remove_queued(self, job: _Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            return
        self._queue_bytes -= job.nbytes

    def _requeue(self, job: _Job, now: float) -> None:
        job.holder = None
        job.enqueued_at = now
        # to the front: it has waited already, and the queue bound does not apply to accepted events
        self._queue.appendleft(job)
        self._queue_bytes += job.nbytes

    def _release_leases(
        self, w: _Worker, now: float, charge: tuple[int, ...] | set[int], reason: str
    ) -> list[Action]:
        """Re-queue every lease of ``w``; jobs in ``charge`` count one failed attempt."""
        actions: list[Action] = []
        for jid, lease in list(w.leases.items()):
            job = lease.job
            if job.done or job.holder != w.identity:
                continue
            if jid in charge:
                job.penalties += 1
                if job.penalties >= self.config.max_attempts:
                    actions += self._fail_job(
                        job,
                        ErrorCode.WORKER_LOST,
                        f"event {job.event_id} was in flight on {job.penalties} workers that died or stalled "
                        f"({reason}); giving up",
                        now,
                    )
                    continue
            self._requeue(job, now)
            self.counters["requeued"] += 1
            self.observers.emit("on_requeue", job.info(), w.view(), reason)
        w.leases.clear()
        w.active.clear()
        return actions

    def _expire(self, w: _Worker, now: float, reason: str, late: list[int] | None = None) -> list[Action]:
        self._workers.pop(w.identity, None)
        self.counters["workers_expired"] += 1
        log.warning("expiring worker %s: %s; re-queueing %d events", w.name, reason, len(w.leases))
        self.observers.emit("on_worker_expired", w.view(), reason)
        if late is not None:
            charge: set[int] = set(late)
        elif w.active & set(w.leases):
            charge = w.active & set(w.leases)
        else:
            # it never said which event it was on: any of them may be the culprit
            charge = set(w.leases)
        actions = self._release_leases(w, now, charge, reason)
        # if it is alive but stalled, make it drop what it holds and register again once it recovers
        actions.append(ToWorker(w.identity, Disconnect(f"expired: {reason}")))
        return actions

    def _pick_worker(self) -> _Worker | None:
        best: _Worker | None = None
        if self.config.policy == "round_robin":
            ring = sorted((w for w in self._workers.values() if w.credit > 0), key=lambda w: w.order)
            if not ring:
                return None
            for w in ring:
                if w.order > self._rr_last:
                    best = w
                    break
            best = best or ring[0]
            self._rr_last = best.order
            return best
        best_key: tuple[float, int] | None = None
        for w in self._workers.values():
            if w.credit <= 0:
                continue
            key = (len(w.leases) / w.capacity, w.last_dispatch)
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def _dispatch(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._queue:
            w = self._pick_worker()
            if w is None:
                break
            job = self._queue.popleft()
            self._queue_bytes -= job.nbytes
            job.attempts += 1
            job.holder = w.identity
            job.dispatched_at = now
            w.leases[job.job_id] = _Lease(job, now + self.config.job_timeout_s)
            self._dispatch_seq += 1
            w.last_dispatch = self._dispatch_seq
            w.dispatched += 1
            w.last_sent = now
            self.counters["dispatched"] += 1
            actions.append(ToWorker(w.identity, Job(job.job_id, self.epoch, job.attempts, job.payload)))
            if self.observers:
                self.observers.emit("on_dispatched", job.info(), w.view())
        return actions


def _describe(info: dict[str, Any]) -> str:
    keys = ("backend", "device", "host", "pid", "batch_max")
    return ", ".join(f"{k}={info[k]}" for k in keys if k in info) or "no info"


__all__ = ["Action", "BrokerObserver", "BrokerState", "JobInfo", "ToClient", "ToWorker", "WorkerInfo"]
