"""Lifecycle hooks of a worker (style guide pattern 11); metrics exporters subclass :class:`WorkerObserver`.

Hooks are called from the worker's I/O thread (``on_registered``, ``on_job_received``, ``on_broker_lost``,
``on_disconnected``) or its compute thread (``on_batch``, ``on_job_done``, ``on_job_failed``); an
implementation must be thread-safe (``prometheus_client`` metrics are) and cheap. An observer that raises
is logged and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from broker.observer import ObserverSet

log = logging.getLogger(__name__)


class WorkerObserver:
    """No-op base class; override any subset. Times are seconds."""

    def on_registered(self, info: dict[str, Any]) -> None:
        """READY was sent with this description (also after every reconnect)."""

    def on_job_received(self, job: int, nbytes: int) -> None:
        """A JOB arrived (``nbytes``: payload size)."""

    def on_batch(self, n_events: int, wait_s: float) -> None:
        """The compute thread took a batch; ``wait_s`` is the oldest event's wait in the worker."""

    def on_job_done(self, job: int, timings: dict[str, float]) -> None:
        """Tracks of a job are on their way back."""

    def on_job_failed(self, job: int, code: str) -> None:
        """A job failed with an :class:`~broker.protocol.ErrorCode`."""

    def on_gpu_pool_over_limit(self, n_events: int) -> None:
        """A batch of ``n_events`` needed more device memory than the GPU pool's limit and ran again
        without it (:attr:`~worker.config.WorkerConfig.gpu_pool_limit_mb`)."""

    def on_broker_lost(self, silent_s: float) -> None:
        """The broker was silent too long; the worker reconnects."""

    def on_disconnected(self, reason: str) -> None:
        """The broker sent DISCONNECT (it expired or does not know this worker)."""


class WorkerObservers(ObserverSet):
    """Fan-out to several worker observers, isolating failures."""

    def __init__(self, observers: Iterable[WorkerObserver] = ()) -> None:
        super().__init__(observers, label="worker")
