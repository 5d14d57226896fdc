"""Lifecycle hooks of the broker (style guide pattern 11).

Cross-cutting concerns (Prometheus exporters, tracing, audit logs) subclass :class:`BrokerObserver` and
override the hooks they need; the broker state calls every registered observer through
:class:`ObserverSet`, which logs and skips an observer that raises, because an exporter must never break
dispatch. Hooks run on the broker's thread, in the middle of dispatch: keep them cheap (increment a
counter, observe a histogram) and never block.

The objects passed in (:class:`~broker.state.JobInfo`, :class:`~broker.state.WorkerInfo`) are read-only
snapshots of the broker's records; queue depth, in-flight count and per-worker load are available any
time from :class:`~broker.state.BrokerState` accessors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.state import JobInfo, WorkerInfo

log = logging.getLogger(__name__)


class BrokerObserver:
    """No-op base class; override any subset of the hooks. All times are seconds."""

    def on_event_received(self, job: JobInfo) -> None:
        """An event was accepted into the queue."""

    def on_busy(self, client: bytes, request_id: int, queue_depth: int) -> None:
        """An event was refused because the queue is full."""

    def on_dispatched(self, job: JobInfo, worker: WorkerInfo) -> None:
        """An event was leased to a worker (``job.attempt`` counts dispatches)."""

    def on_result(
        self, job: JobInfo, worker: WorkerInfo, timings: dict[str, float], queue_time_s: float
    ) -> None:
        """Tracks of an event came back and were forwarded to its producer."""

    def on_result_sent(self, job: JobInfo, nbytes: int) -> None:
        """Right after :meth:`on_result`: the forwarded tracks payload was ``nbytes`` bytes."""

    def on_failed(self, job: JobInfo | None, reason: str) -> None:
        """An event got an error reply (``reason`` is the :class:`~broker.protocol.ErrorCode`), or, with
        ``job`` None, a message was refused as malformed / oversized / wrong version."""

    def on_requeue(self, job: JobInfo, worker: WorkerInfo | None, reason: str) -> None:
        """A leased event went back to the queue (worker expired, disconnected, lease timed out ...)."""

    def on_worker_ready(self, worker: WorkerInfo) -> None:
        """A worker registered."""

    def on_worker_expired(self, worker: WorkerInfo, reason: str) -> None:
        """A worker was dropped: heartbeats stopped, a lease timed out, or it could not be reached."""

    def on_worker_disconnected(self, worker: WorkerInfo, reason: str) -> None:
        """A worker left gracefully (DISCONNECT)."""

    def on_tick(self, queue_depth: int, in_flight: int, n_workers: int) -> None:
        """Called once per housekeeping tick (about every heartbeat interval) with the current gauges."""


class ObserverSet:
    """Calls every observer's hook, isolating failures (also used by the worker for its hooks).

    Args:
        observers: initial observers.
        label: who the observers belong to, for the log line of a failing observer.
    """

    def __init__(self, observers: Iterable[Any] = (), label: str = "broker") -> None:
        self._observers: list[Any] = list(observers)
        self._label = label

    def add(self, observer: Any) -> None:
        """Subscribe ``observer`` to every hook."""
        self._observers.append(observer)

    def remove(self, observer: Any) -> None:
        """Unsubscribe ``observer``."""
        self._observers.remove(observer)

    def __len__(self) -> int:
        return len(self._observers)

    def emit(self, hook: str, *args: Any) -> None:
        """Call ``hook(*args)`` on every observer; an observer that raises is logged and skipped."""
        for obs in self._observers:
            try:
                getattr(obs, hook)(*args)
            except Exception:
                log.exception("%s observer %r failed in %s; continuing", self._label, obs, hook)
