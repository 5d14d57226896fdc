"""The gateway's link to the broker: many request threads, one ZeroMQ socket.

A :class:`~producer.client.FleetClient` (retries, duplicate suppression, broker-restart recovery) is not
thread-safe, so one thread owns it. Request threads call :meth:`BrokerBridge.submit`, which queues the
packed event, wakes that thread through a socket pair and returns a :class:`~concurrent.futures.Future`
that is always resolved exactly once: with the fleet's final :class:`~producer.client.Reply` (tracks or a
typed error, including the client's own ``timeout`` after its retries), or with an :class:`InferError`
when the gateway stops. A second thread asks the broker for STATS on its own socket to tell whether the
fleet is ready (broker answering, at least one worker registered).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from broker.protocol import Frame, payload_nbytes
from producer.client import ClientConfig, FleetClient, Reply
from producer.gateway.model import InferError, Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BridgeConfig:
    """Limits of the bridge.

    Attributes:
        client: connection and retry settings of the producer socket (``deadline_s`` bounds a request).
        max_in_flight: requests accepted and not yet answered; more get UNAVAILABLE at once.
        max_in_flight_bytes: the same bound on their packed size [bytes].
        health_interval_s: how often the broker is asked for STATS [s].
        ready_grace_s: a result from the fleet within this long also counts as ready [s].
    """

    client: ClientConfig
    max_in_flight: int = 1024
    max_in_flight_bytes: int = 4 * 2**30
    health_interval_s: float = 1.0
    ready_grace_s: float = 5.0


class BrokerBridge:
    """Submit packed events to the broker from any thread.

    Args:
        config: limits and the broker's producer endpoint.
        context: ZeroMQ context (a new one when None).
    """

    def __init__(self, config: BridgeConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        self._inbox: queue.SimpleQueue[tuple[int, int, tuple[Frame, ...], Future[Reply]]] = (
            queue.SimpleQueue()
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._accepting = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_result = -1e9
        self._stats: dict[str, Any] | None = None
        self._stats_at = -1e9

    # --- public ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the socket thread and the health thread."""
        self._accepting = True
        for target, name in ((self._run, "gateway-bridge"), (self._health, "gateway-health")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, event_id: int, payload: Sequence[Frame]) -> Future[Reply]:
        """Queue one packed event for the broker.

        Raises:
            InferError: UNAVAILABLE when the gateway is stopping or its in-flight bounds are reached.
        """
        nbytes = payload_nbytes(payload)
        fut: Future[Reply] = Future()
        with self._lock:
            if not self._accepting:
                raise InferError("the gateway is shutting down", Status.UNAVAILABLE)
            if self._in_flight >= self.config.max_in_flight or (
                self._in_flight and self._in_flight_bytes + nbytes > self.config.max_in_flight_bytes
            ):
                raise InferError(
                    f"the gateway holds {self._in_flight} requests ({self._in_flight_bytes / 2**20:.0f} MiB); "
                    "retry later",
                    Status.UNAVAILABLE,
                )
            self._in_flight += 1
            self._in_flight_bytes += nbytes
            rid = next(self._ids)
            fut.add_done_callback(lambda _f: self._release(nbytes))
            # queued under the lock: stop() either refuses this request or finds it in the queue
            self._inbox.put((rid, event_id, tuple(payload), fut))
        # BlockingIOError: a wake-up is already pending; OSError: closing (stop() drains the queue)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")
        return fut

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def ready(self) -> bool:
        """The broker answered lately with at least one worker registered, or a result came back lately."""
        now = time.monotonic()
        if now - self._last_result < self.config.ready_grace_s:
            return True
        s = self._stats
        return (
            s is not None
            and now - self._stats_at < 3 * self.config.health_interval_s + 2.0
            and int(s.get("n_workers", 0) or 0) > 0
        )

    @property
    def broker_stats(self) -> dict[str, Any] | None:
        """The broker's last STATS (None before the first answer)."""
        return self._stats

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting; fail what is still unanswered with UNAVAILABLE; close the sockets."""
        with self._lock:
            self._accepting = False
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        for t in self._threads:
            t.join(timeout_s)
        self._fail_queued("the gateway stopped before the fleet answered")
        self._wake_r.close()
        self._wake_w.close()
        if self._own_context and not any(t.is_alive() for t in self._threads):
            self.context.term()  # would block on a socket still open in a stuck thread

    # --- internals ------------------------------------------------------------------------------------

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._in_flight_bytes -= nbytes

    def _fail_queued(self, message: str) -> None:
        while True:
            try:
                _, _, _, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not fut.done():
                fut.set_exception(InferError(message, Status.UNAVAILABLE))

    def _run(self) -> None:
        pending: dict[int, Future[Reply]] = {}
        client = FleetClient(self.config.client, context=self.context)
        poller = zmq.Poller()
        poller.register(client.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    poller.poll(50)
                    self._drain_wake()
                    while True:
                        try:
                            rid, event_id, payload, fut = self._inbox.get_nowait()
                        except queue.Empty:
                            break
                        if not fut.set_running_or_notify_cancel():
                            continue
                        pending[rid] = fut
                        client.submit(rid, event_id, payload)
                    for reply in client.poll(0):
                        fut = pending.pop(reply.id, None)
                        if fut is None:
                            continue
                        if reply.ok:
                            self._last_result = time.monotonic()
                        fut.set_result(reply)
                except Exception:  # one bad turn must not take every waiting request down with it
                    log.exception("gateway bridge: unexpected error; carrying on")
                    time.sleep(0.05)
        finally:
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(
                        InferError("the gateway stopped before the fleet answered", Status.UNAVAILABLE)
                    )
            client.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _health(self) -> None:
        cfg = self.config
        client_cfg = ClientConfig(endpoint=cfg.client.endpoint, keys=cfg.client.keys)
        with FleetClient(client_cfg, context=self.context) as client:
            while not self._stop.is_set():
                try:
                    stats = client.stats(timeout_s=max(0.2, cfg.health_interval_s))
                except Exception as exc:  # a broken socket must not stop the readiness probe
                    log.warning("gateway health: STATS failed: %s", exc)
                    stats = None
                if stats is not None:
                    self._stats, self._stats_at = stats, time.monotonic()
                self._stop.wait(cfg.health_interval_s)
