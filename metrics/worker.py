"""A worker process's Prometheus exporter: what only the worker sees.

Each worker process serves its own ``/metrics`` (``worker --metrics-port P [--metrics-port-offset N]``;
``trackfleet up`` gives worker ``N`` of a GPU program the port base + N through supervisord's
``%(process_num)d``). Every series carries the worker's *name* as the ``worker`` label — stable across
restarts under supervisord, never the pid — so a restarted worker resumes its own series on the same port:
Prometheus sees a counter reset, which ``rate()`` and ``increase()`` handle, and never a second series.

The fleet's event accounting and per-event timings come from the broker (:mod:`metrics.broker`), which
loses nothing when a worker dies. The worker exports the rest: batch formation (Triton's execution count and
batch sizes), the compute thread's busy time (instance utilization), bytes received, registrations and
broker losses, and what the worker is (backend, device). Counts a worker made since its last scrape are lost
if it is killed — acceptable for these diagnostics, and the reason event totals are taken at the broker.

Hooks run on the worker's I/O and compute threads; prometheus_client metrics are thread-safe and the busy
clock has its own lock. Imports prometheus_client and the worker's hook definitions, never ``kernels``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from metrics.broker import REASONS
from metrics.exposition import BATCH_BUCKETS, DEFAULT_ADDR, MetricsServer, new_registry
from worker.observer import WorkerObserver, WorkerObservers

_INFO_KEYS = ("backend", "device", "host", "batch_max", "capacity", "fingerprint", "protocol")


class _BusyClock(Collector):
    """Seconds the compute thread spent on batches, including the batch running at scrape time."""

    def __init__(self, worker: str, clock: Callable[[], float]) -> None:
        self.worker = worker
        self.clock = clock
        self._lock = threading.Lock()
        self._total_s = 0.0
        self._since: float | None = None
        self._remaining = 0

    def begin(self, n_events: int) -> None:
        with self._lock:
            now = self.clock()
            self._close(now)  # a batch whose end we missed (it should not happen) counts up to here
            self._since = now
            self._remaining = n_events

    def one_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining <= 0:
                self._close(self.clock())

    def _close(self, now: float) -> None:
        if self._since is not None:
            self._total_s += max(0.0, now - self._since)
            self._since = None

    def total_s(self) -> float:
        with self._lock:
            running = 0.0 if self._since is None else max(0.0, self.clock() - self._since)
            return self._total_s + running

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily(
            "trackfleet_worker_busy_seconds",
            "Time the compute thread spent reconstructing batches (rate: fraction of time busy).",
            labels=["worker"],
        )
        c.add_metric([self.worker], self.total_s())
        yield c


class WorkerMetrics(WorkerObserver):
    """Prometheus metrics of one worker process (see ``docs/metrics.md``).

    Args:
        worker: the worker's name (the ``worker`` label of every series).
        registry: where to register (a private one when None).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        worker: str,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        w = ["worker"]
        self.events = Counter(
            "trackfleet_worker_events",
            "Events this worker received, reconstructed (succeeded) or failed.",
            [*w, "status"],
            registry=r,
        )
        self.failures = Counter(
            "trackfleet_worker_failures", "Events this worker failed, by reason.", [*w, "reason"], registry=r
        )
        self.batches = Counter(
            "trackfleet_worker_batches", "Batches the compute thread ran (Triton: executions).", w, registry=r
        )
        self.batch_size = Histogram(
            "trackfleet_worker_batch_size", "Events per batch.", w, buckets=BATCH_BUCKETS, registry=r
        )
        self.received_bytes = Counter(
            "trackfleet_worker_received_bytes", "Event payload bytes this worker received.", w, registry=r
        )
        self.registrations = Counter(
            "trackfleet_worker_registrations",
            "READY messages sent (first registration and every re-registration).",
            w,
            registry=r,
        )
        self.broker_lost = Counter(
            "trackfleet_worker_broker_lost",
            "Times the broker fell silent and the worker reconnected.",
            w,
            registry=r,
        )
        self.disconnects = Counter(
            "trackfleet_worker_disconnects",
            "DISCONNECT messages from the broker (it expired this worker or did not know it).",
            w,
            registry=r,
        )
        self.pool_over_limit = Counter(
            "trackfleet_worker_gpu_pool_over_limit",
            "Batches that needed more device memory than the GPU pool's limit and ran again without it.",
            w,
            registry=r,
        )
        self.info = Info("trackfleet_worker", "What the worker runs on.", w, registry=r)
        self._busy = _BusyClock(worker, clock)
        r.register(self._busy)
        for status in ("received", "succeeded", "failed"):
            self.events.labels(worker, status)
        for reason in REASONS:
            self.failures.labels(worker, reason)
        for metric in (self.batches, self.received_bytes, self.registrations, self.broker_lost):
            metric.labels(worker)
        self.disconnects.labels(worker)
        self.pool_over_limit.labels(worker)
        self.batch_size.labels(worker)

    # --- hooks ----------------------------------------------------------------------------------------

    def on_registered(self, info: dict[str, Any]) -> None:
        self.registrations.labels(self.worker).inc()
        self.info.labels(self.worker).info(
            {k: "" if info.get(k) is None else str(info[k]) for k in _INFO_KEYS}
        )

    def on_job_received(self, job: int, nbytes: int) -> None:
        self.events.labels(self.worker, "received").inc()
        self.received_bytes.labels(self.worker).inc(nbytes)

    def on_batch(self, n_events: int, wait_s: float) -> None:
        self.batches.labels(self.worker).inc()
        self.batch_size.labels(self.worker).observe(n_events)
        self._busy.begin(n_events)

    def on_job_done(self, job: int, timings: dict[str, float]) -> None:
        self.events.labels(self.worker, "succeeded").inc()
        self._busy.one_done()

    def on_job_failed(self, job: int, code: str) -> None:
        self.events.labels(self.worker, "failed").inc()
        self.failures.labels(self.worker, code if code in REASONS else "other").inc()
        self._busy.one_done()

    def on_broker_lost(self, silent_s: float) -> None:
        self.broker_lost.labels(self.worker).inc()

    def on_gpu_pool_over_limit(self, n_events: int) -> None:
        self.pool_over_limit.labels(self.worker).inc()

    def on_disconnected(self, reason: str) -> None:
        self.disconnects.labels(self.worker).inc()


def serve_worker_metrics(
    observers: WorkerObservers, worker: str, port: int, addr: str = DEFAULT_ADDR
) -> MetricsServer:
    """Subscribe a :class:`WorkerMetrics` for ``worker`` to ``observers`` and serve it over HTTP.

    Returns:
        The started HTTP server (a taken port is retried in the background).
    """
    metrics = WorkerMetrics(worker)
    observers.add(metrics)
    ProcessCollector(registry=metrics.registry)  # process_start_time_seconds shows restarts
    return MetricsServer(metrics.registry, port, addr).start()
