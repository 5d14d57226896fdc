"""The broker's Prometheus exporter: the fleet's authoritative event accounting and per-event timing.

:class:`BrokerMetrics` is a :class:`~broker.observer.BrokerObserver` (style guide pattern 11): it counts
events as the broker's state machine accepts, dispatches, answers, re-queues or fails them, and observes the
per-event timings every RESULT carries (broker queue, worker queue, decode, each chain stage, pack, worker
total). Queue, in-flight and per-worker gauges are refreshed on every housekeeping tick (about 4 Hz), on the
broker's thread, so that a scrape never walks the broker's tables while they change.

Why the broker is the source of truth for events and timings: it sees every event exactly once, whatever
happens to workers. A worker killed mid-event loses nothing here (its events are re-queued and counted when
their result arrives), a late result of an expired lease is dropped by the state machine before any hook
fires (never counted twice), and per-worker series are labelled by the worker's *name* — stable across
restarts under supervisord (``host-gpu0-3``), never its pid — so a restarted worker continues its own series
instead of starting a new one. Worker processes export only what the broker cannot see (batching, compute
busy time, reconnects), see :mod:`metrics.worker`.

This module imports prometheus_client and the broker's hook and protocol definitions, never ``kernels``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from broker.observer import BrokerObserver
from broker.protocol import ErrorCode
from metrics.exposition import DEFAULT_ADDR, DURATION_BUCKETS_S, MetricsServer, new_registry

if TYPE_CHECKING:
    from broker.server import BrokerServer
    from broker.state import BrokerState, JobInfo, WorkerInfo

#: Timing keys of a RESULT that are not stages: the worker's own total and wait, and the chain's total.
_NOT_STAGES = {"worker_s": "compute", "worker_queue_s": "worker_queue", "chain_s": "chain"}

#: Failure / rejection reasons exported (anything else a peer sends is counted as "other").
REASONS: tuple[str, ...] = (*(str(c) for c in ErrorCode), "other")

#: Re-queue reasons, from the broker's free-text reasons (which name times and job ids: unbounded labels).
REQUEUE_REASONS = (
    "worker_silent",
    "lease_timeout",
    "worker_unreachable",
    "worker_disconnected",
    "worker_reregistered",
    "retryable_failure",
    "other",
)

#: Distinct worker names kept as label values; beyond this, "other" (bounds memory when workers are
#: started without ``--name`` and so get a pid-based name each time).
MAX_WORKER_LABELS = 256


def requeue_reason(text: str) -> str:
    """Map the broker's re-queue reason text to one of :data:`REQUEUE_REASONS`."""
    t = text.lower()
    for prefix, reason in (
        ("worker re-registered", "worker_reregistered"),
        ("worker disconnected", "worker_disconnected"),
        ("retryable", "retryable_failure"),
        ("held job", "lease_timeout"),
        ("silent", "worker_silent"),
        ("unreachable", "worker_unreachable"),
    ):
        if t.startswith(prefix):
            return reason
    return "other"


def _reason(code: str) -> str:
    return code if code in REASONS else "other"


class BrokerMetrics(BrokerObserver):
    """Prometheus metrics of one broker (see ``docs/metrics.md`` for the full list).

    Args:
        registry: where to register (a private one when None).
        clock: the broker's monotonic clock [s] (``JobInfo.received_at`` is on it).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.clock = clock
        self._state: BrokerState | None = None
        self._workers_seen: set[str] = set()
        self._gauge_workers: set[str] = set()
        r = self.registry
        self.received = Counter(
            "trackfleet_events_received", "Events accepted into the broker's queue.", registry=r
        )
        self.events = Counter(
            "trackfleet_events", "Events answered, by status (succeeded, failed).", ["status"], registry=r
        )
        self.failures = Counter(
            "trackfleet_event_failures", "Events answered with an error, by reason.", ["reason"], registry=r
        )
        self.rejected = Counter(
            "trackfleet_rejected_messages",
            "Messages refused before they became events (malformed, oversized, wrong version ...).",
            ["reason"],
            registry=r,
        )
        self.busy = Counter(
            "trackfleet_busy_replies", "Events refused with BUSY because the queue was full.", registry=r
        )
        self.dispatches = Counter(
            "trackfleet_dispatches", "Events leased to a worker (every attempt).", registry=r
        )
        self.retries = Counter(
            "trackfleet_retries", "Dispatches of an event beyond its first (after a re-queue).", registry=r
        )
        self.requeues = Counter(
            "trackfleet_requeues", "Leased events put back into the queue, by reason.", ["reason"], registry=r
        )
        self.received_bytes = Counter(
            "trackfleet_received_bytes", "Event payload bytes accepted from producers.", registry=r
        )
        self.dispatched_bytes = Counter(
            "trackfleet_dispatched_bytes", "Event payload bytes sent to workers (every attempt).", registry=r
        )
        self.sent_bytes = Counter(
            "trackfleet_sent_bytes", "Track payload bytes forwarded to producers.", registry=r
        )
        self.registrations = Counter(
            "trackfleet_registrations", "Worker registrations (READY), reconnects included.", registry=r
        )
        self.deregistrations = Counter(
            "trackfleet_deregistrations",
            "Workers dropped by the broker, by reason (expired, disconnected).",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("trackfleet_queue_depth", "Events waiting for a worker.", registry=r)
        self.queue_bytes = Gauge(
            "trackfleet_queue_bytes", "Payload bytes of the events waiting for a worker.", registry=r
        )
        self.in_flight = Gauge("trackfleet_events_in_flight", "Events leased to workers.", registry=r)
        self.pending = Gauge(
            "trackfleet_events_pending", "Events accepted and not yet answered (queued + leased).", registry=r
        )
        self.live_workers = Gauge(
            "trackfleet_live_workers", "Workers registered with the broker.", registry=r
        )
        self.capacity = Gauge(
            "trackfleet_capacity", "Events a worker announced it can hold.", ["worker"], registry=r
        )
        self.leases = Gauge("trackfleet_leases", "Events leased to a worker now.", ["worker"], registry=r)
        b = DURATION_BUCKETS_S
        self.queue_duration = Histogram(
            "trackfleet_queue_duration_seconds",
            "Time an event waited before compute, by queue: broker (for a worker) and worker (inside it).",
            ["queue"],
            buckets=b,
            registry=r,
        )
        self.request_duration = Histogram(
            "trackfleet_request_duration_seconds",
            "Time from an event's arrival at the broker to its tracks leaving it.",
            buckets=b,
            registry=r,
        )
        self.compute_duration = Histogram(
            "trackfleet_compute_duration_seconds",
            "Time a worker spent on an event (decode + chain + pack), by worker.",
            ["worker"],
            buckets=b,
            registry=r,
        )
        self.stage_duration = Histogram(
            "trackfleet_stage_duration_seconds",
            "Time an event spent in one stage (decode, each chain stage, pack); batch stages count for "
            "every event of the batch.",
            ["stage"],
            buckets=b,
            registry=r,
        )
        # Pre-create the label values we know, so that rates and dashboards read 0 instead of "no data".
        for status in ("succeeded", "failed"):
            self.events.labels(status)
        for reason in REASONS:
            self.failures.labels(reason)
            self.rejected.labels(reason)
        for reason in REQUEUE_REASONS:
            self.requeues.labels(reason)
        for reason in ("expired", "disconnected"):
            self.deregistrations.labels(reason)
        for queue in ("broker", "worker"):
            self.queue_duration.labels(queue)

    def attach(self, state: BrokerState) -> None:
        """Read pending events, queue bytes and per-worker load from ``state`` on every tick."""
        self._state = state

    def _worker_label(self, name: str) -> str:
        if name in self._workers_seen:
            return name
        if len(self._workers_seen) >= MAX_WORKER_LABELS:
            return "other"
        self._workers_seen.add(name)
        return name

    # --- hooks (broker thread) ------------------------------------------------------------------------

    def on_event_received(self, job: JobInfo) -> None:
        self.received.inc()
        self.received_bytes.inc(job.nbytes)

    def on_busy(self, client: bytes, request_id: int, queue_depth: int) -> None:
        self.busy.inc()

    def on_dispatched(self, job: JobInfo, worker: WorkerInfo) -> None:
        self.dispatches.inc()
        self.dispatched_bytes.inc(job.nbytes)
        if job.attempt > 1:
            self.retries.inc()

    def on_result(
        self, job: JobInfo, worker: WorkerInfo, timings: dict[str, float], queue_time_s: float
    ) -> None:
        self.events.labels("succeeded").inc()
        self.queue_duration.labels("broker").observe(queue_time_s)
        self.request_duration.observe(max(0.0, self.clock() - job.received_at))
        for key, value in timings.items():
            if not isinstance(value, int | float) or not key.endswith("_s"):
                continue
            kind = _NOT_STAGES.get(key)
            if kind == "compute":
                self.compute_duration.labels(self._worker_label(worker.name)).observe(value)
            elif kind == "worker_queue":
                self.queue_duration.labels("worker").observe(value)
            elif kind is None:
                self.stage_duration.labels(key[:-2]).observe(value)

    def on_result_sent(self, job: JobInfo, nbytes: int) -> None:
        self.sent_bytes.inc(nbytes)

    def on_failed(self, job: JobInfo | None, reason: str) -> None:
        if job is None:
            self.rejected.labels(_reason(reason)).inc()
            return
        self.events.labels("failed").inc()
        self.failures.labels(_reason(reason)).inc()

    def on_requeue(self, job: JobInfo, worker: WorkerInfo | None, reason: str) -> None:
        self.requeues.labels(requeue_reason(reason)).inc()

    def on_worker_ready(self, worker: WorkerInfo) -> None:
        self.registrations.inc()

    def on_worker_expired(self, worker: WorkerInfo, reason: str) -> None:
        self.deregistrations.labels("expired").inc()

    def on_worker_disconnected(self, worker: WorkerInfo, reason: str) -> None:
        self.deregistrations.labels("disconnected").inc()

    def on_tick(self, queue_depth: int, in_flight: int, n_workers: int) -> None:
        self.queue_depth.set(queue_depth)
        self.in_flight.set(in_flight)
        self.live_workers.set(n_workers)
        state = self._state
        if state is None:
            return
        self.pending.set(state.pending)
        self.queue_bytes.set(state.queue_bytes)
        capacity: dict[str, int] = {}
        leases: dict[str, int] = {}
        for w in state.workers():
            name = self._worker_label(w.name)
            capacity[name] = capacity.get(name, 0) + w.capacity
            leases[name] = leases.get(name, 0) + w.in_flight
        for name, value in capacity.items():
            self.capacity.labels(name).set(value)
            self.leases.labels(name).set(leases[name])
        # gauges of workers that left go away (counters and histograms stay: their history is the point)
        for name in self._gauge_workers - capacity.keys():
            self.capacity.remove(name)
            self.leases.remove(name)
        self._gauge_workers = set(capacity)


def serve_broker_metrics(server: BrokerServer, port: int, addr: str = DEFAULT_ADDR) -> MetricsServer:
    """Subscribe a :class:`BrokerMetrics` to ``server``'s hooks and serve it over HTTP.

    Args:
        server: the broker (its observers and state).
        port: TCP port (0: any free port).
        addr: bind address (loopback by default).

    Returns:
        The started HTTP server (a taken port is retried in the background).
    """
    metrics = BrokerMetrics(clock=server.clock)
    metrics.attach(server.state)
    server.observers.add(metrics)
    ProcessCollector(registry=metrics.registry)  # process_start_time_seconds shows restarts
    return MetricsServer(metrics.registry, port, addr).start()
