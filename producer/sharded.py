"""One producer over several brokers.

One broker forwards a few hundred MB-sized events per second (about 760 mu=50 events/s on an H200
host, bench/RESULTS.md). Past that, run one fleet per GPU or group of GPUs, each with its own broker,
and let the producer share its events among them: ``producer --connect tcp://a:5555,tcp://b:5555``.
Each event goes to the broker with the fewest events in flight and stays with it for its retries, so
every broker keeps its exactly-once bookkeeping for the events it was given.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import zmq

from broker.errors import ConfigError
from broker.protocol import Frame
from producer.client import ClientConfig, FleetClient, Reply


def endpoints_of(connect: str) -> list[str]:
    """The endpoints of a ``--connect`` value: one, or several separated by commas.

    Raises:
        ConfigError: empty, or an endpoint listed twice.
    """
    eps = [e.strip() for e in connect.split(",") if e.strip()]
    if not eps:
        raise ConfigError(f"--connect needs at least one endpoint, got {connect!r}")
    if len(set(eps)) != len(eps):
        raise ConfigError(f"--connect lists an endpoint twice: {connect!r}")
    return eps


class ShardedClient:
    """The :class:`~producer.client.FleetClient` interface over several brokers.

    Args:
        config: settings shared by every connection (its ``endpoint`` is ignored).
        endpoints: the brokers' producer endpoints.
        context: ZeroMQ context (a new one when None).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        config: ClientConfig,
        endpoints: Sequence[str],
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ConfigError("ShardedClient needs at least one endpoint")
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        self.clients = [FleetClient(replace(config, endpoint=e), self.context, clock) for e in endpoints]
        self._poller = zmq.Poller()
        for c in self.clients:
            self._poller.register(c.sock, zmq.POLLIN)

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.clients)

    @property
    def counters(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.clients:
            total.update(c.counters)
        return total

    @property
    def retried_ids(self) -> set[int]:
        return set().union(*(c.retried_ids for c in self.clients))

    @property
    def busy_ids(self) -> set[int]:
        return set().union(*(c.busy_ids for c in self.clients))

    def submit(self, request_id: int, event_id: int, payload: Sequence[Frame]) -> None:
        """Queue one event on the least loaded broker (the first listed on ties).

        Raises:
            ValueError: ``request_id`` is already pending on any broker.
        """
        if any(c.is_pending(request_id) for c in self.clients):
            raise ValueError(f"request {request_id} is already pending")
        min(self.clients, key=lambda c: c.in_flight).submit(request_id, event_id, payload)

    def poll(self, timeout_s: float) -> list[Reply]:
        """Wait up to ``timeout_s`` for replies from any broker; handle every connection's retries and
        heartbeats. Returns final outcomes."""
        out = [r for c in self.clients for r in c.poll(0.0)]
        if out:
            return out
        self._poller.poll(max(0.0, timeout_s) * 1000.0)
        return [r for c in self.clients for r in c.poll(0.0)]

    def stats(self, timeout_s: float = 2.0) -> list[dict[str, Any] | None]:
        """Every broker's STATS, in the order of the endpoints (None where one did not answer)."""
        return [c.stats(timeout_s) for c in self.clients]

    def close(self) -> None:
        for c in self.clients:
            c.close()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
