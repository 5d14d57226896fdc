"""The broker's socket loop: poll, decode, call :class:`~broker.state.BrokerState`, send.

Two ROUTER sockets: the *frontend* (producers, ``TFP1`` messages) and the *backend* (workers, ``TFW1``).
Payload frames are received with ``copy=False`` and forwarded as the same ``zmq.Frame`` objects, so an
event crosses the broker without being copied in user space.

Robustness rules:

- Every received message goes through :func:`~broker.protocol.decode_producer` /
  :func:`~broker.protocol.decode_worker`; a :class:`~broker.errors.ProtocolError` becomes a typed error
  reply (producers) or a log line and a counter (workers), never an exception out of the loop.
- Both ROUTERs are ``ROUTER_MANDATORY`` so that an unroutable message is an error we see (a vanished
  worker is expired at once), and ``ROUTER_HANDOVER`` so that a peer reconnecting with the same routing id
  takes over its old route (producers keep their routing id across reconnects).
- In "block" mode the frontend is not polled while the queue is full; the frontend's receive high-water
  mark then makes the producers' sends block, which bounds the broker's memory.
- ``MAXMSGSIZE`` is a hard backstop far above the configured event limit; events between the two get a
  proper ``oversized`` error reply.

Shutdown (:meth:`BrokerServer.stop`, also from SIGTERM): stop reading producers, answer queued events with
a retryable ``shutting_down`` error, wait up to ``drain_timeout_s`` for in-flight events to come back and
be delivered, then close the sockets with a short linger.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

from broker.config import BrokerConfig
from broker.errors import OversizedError, ProtocolError, VersionError
from broker.observer import ObserverSet
from broker.protocol import (
    MAX_HEADER_BYTES,
    Disconnect,
    ErrorCode,
    Frame,
    Limits,
    WorkFailed,
    decode_producer,
    decode_worker,
    encode,
    frame_bytes,
    frame_nbytes,
    request_id_of,
)
from broker.state import Action, BrokerState, ToClient, ToWorker

log = logging.getLogger(__name__)

#: Messages handled per socket per poll round, so that neither side starves the other.
_BATCH = 256
_LINGER_MS = 500


# plain ints: combining pyzmq's flag enums costs more than the send itself for small frames
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)


def _recv_frames(sock: zmq.Socket[bytes]) -> list[zmq.Frame]:
    """One whole multipart message without waiting (``zmq.Again`` when none is there); the parts of a
    message arrive together, so only the first can be missing."""
    frames = [sock.recv(_NOBLOCK, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(_NOBLOCK, copy=False))
    return frames


def _send_frames(sock: zmq.Socket[bytes], frames: list[Any]) -> None:
    """``send_multipart(frames, NOBLOCK, copy=False)`` with int flags."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        sock.send(f, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, copy=False)


class RateLimitedLog:
    """Log a warning per key at most once per ``interval_s``, counting what was suppressed.

    Args:
        logger: where to log.
        interval_s: minimum time between two lines of one key [s].
        clock: time source.
    """

    def __init__(
        self, logger: logging.Logger, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ):
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last.get(key, -1e18) < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        if len(self._last) > 1024:  # bounded memory under a flood of distinct keys
            self._last.clear()
        self._log.warning(msg + (f" ({n} similar suppressed)" if n else ""), *args)


def _job_of(frames: Sequence[Frame]) -> tuple[int, str] | None:
    """(job, epoch) named in a worker message's header, for messages refused for their size."""
    try:
        if len(frames) >= 3 and frame_nbytes(frames[2]) <= MAX_HEADER_BYTES:
            h = msgpack.unpackb(frame_bytes(frames[2]), raw=False)
            if isinstance(h, dict) and isinstance(h.get("job"), int) and isinstance(h.get("epoch"), str):
                return int(h["job"]), str(h["epoch"])
    except Exception:
        return None
    return None


class BrokerServer:
    """Sockets and loop of one broker.

    Args:
        config: broker configuration.
        observers: lifecycle hook subscribers (metrics exporters subscribe here).
        context: ZeroMQ context (a new one when None).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        config: BrokerConfig,
        observers: ObserverSet | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.observers = observers if observers is not None else ObserverSet()
        self.state = BrokerState(config, clock(), self.observers)
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(io_threads=config.io_threads)
        self.frontend: zmq.Socket[bytes] | None = None
        self.backend: zmq.Socket[bytes] | None = None
        self.endpoints: dict[str, str] = {}
        self._stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self._auth: Any = None
        self._rlog = RateLimitedLog(log, clock=clock)
        self._backend_limits = Limits(
            max_payload_bytes=2 * config.max_event_bytes, max_frames=max(config.max_frames, 64)
        )

    # --- setup / teardown -----------------------------------------------------------------------------

    def _socket(self) -> zmq.Socket[bytes]:
        s = self.context.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        s.setsockopt(zmq.SNDHWM, self.config.sndhwm)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.maxmsgsize_bytes)
        s.setsockopt(zmq.LINGER, _LINGER_MS)
        if self.config.curve_secret_file is not None:
            from broker.security import setup_server

            setup_server(s, self.config.curve_secret_file)
        return s

    def bind(self) -> dict[str, str]:
        """Create and bind both sockets; returns (and optionally writes) the bound endpoints.

        Raises:
            zmq.ZMQError: an endpoint cannot be bound.
        """
        if self.config.curve_secret_file is not None:
            from broker.security import start_authenticator

            self._auth = start_authenticator(self.context, self.config.curve_authorized_dir)
        self.frontend = self._socket()
        self.frontend.setsockopt(zmq.RCVHWM, self.config.frontend_rcvhwm)
        self.frontend.bind(self.config.frontend)
        self.backend = self._socket()
        self.backend.bind(self.config.backend)
        self.endpoints = {
            "frontend": self.frontend.getsockopt_string(zmq.LAST_ENDPOINT),
            "backend": self.backend.getsockopt_string(zmq.LAST_ENDPOINT),
        }
        log.info(
            "broker %s: producers on %s, workers on %s (policy %s, queue %d events, when full: %s)",
            self.state.epoch,
            self.endpoints["frontend"],
            self.endpoints["backend"],
            self.config.policy,
            self.config.max_queue_events,
            self.config.when_full,
        )
        if self.config.endpoints_file is not None:
            self._write_endpoints(self.config.endpoints_file)
        return self.endpoints

    def _write_endpoints(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**self.endpoints, "pid": os.getpid(), "epoch": self.state.epoch}))
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def start(self) -> dict[str, str]:
        """Bind, then run the loop (and close afterwards) in a background thread (tests, embedding).

        Returns:
            The bound endpoints. Stop with :meth:`stop`, then join :attr:`thread`.
        """
        endpoints = self.bind()
        self.thread = threading.Thread(target=_run_and_close, args=(self,), name="broker", daemon=True)
        self.thread.start()
        return endpoints

    def stop(self) -> None:
        """Ask the loop to drain and return (thread-safe; safe from a signal handler)."""
        self._stop_event.set()

    def close(self) -> None:
        """Close sockets, authenticator and (if owned) the context."""
        for s in (self.frontend, self.backend):
            if s is not None:
                s.close(linger=_LINGER_MS)
        self.frontend = self.backend = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self.context.term()

    # --- loop -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; then drain and return. Binds first if :meth:`bind` was not called."""
        if self.frontend is None or self.backend is None:
            self.bind()
        front, back = self._sockets()
        poller = zmq.Poller()
        poller.register(back, zmq.POLLIN)
        poller.register(front, zmq.POLLIN)
        front_polled = True
        next_tick = self.clock()
        drain_deadline: float | None = None
        while True:
            now = self.clock()
            if self._stop_event.is_set() and drain_deadline is None:
                log.info("broker stopping: draining %d in-flight events", self.state.in_flight)
                self._send(self.state.begin_drain(now))
                drain_deadline = now + self.config.drain_timeout_s
            if drain_deadline is not None and (self.state.in_flight == 0 or now >= drain_deadline):
                if self.state.in_flight:
                    log.warning("broker stopping with %d events still in flight", self.state.in_flight)
                break
            want_front = drain_deadline is None and (self.config.when_full == "busy" or self.state.accepting)
            if want_front != front_polled:
                poller.modify(front, zmq.POLLIN if want_front else 0)
                front_polled = want_front
            timeout_ms = max(0.0, (next_tick - now) * 1000.0)
            try:
                ready = dict(poller.poll(timeout_ms))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    break
                raise
            if back in ready:
                self._drain_socket(back, self._on_backend)
            if front in ready and front_polled:
                self._drain_socket(front, self._on_frontend)
            now = self.clock()
            if now >= next_tick:
                self._send(self.state.tick(now))
                next_tick = self.state.next_deadline(now)

    def _drain_socket(self, sock: zmq.Socket[bytes], handler: Callable[[list[zmq.Frame]], None]) -> None:
        for _ in range(_BATCH):
            if sock is self.frontend and self.config.when_full == "block" and not self.state.accepting:
                return  # leave the rest in ZeroMQ's buffers: that is the back-pressure
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:
                # last line of defence: a bug in handling one message must not take the broker down
                log.exception("broker failed handling a message; dropped")

    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        body = frames[1:]
        now = self.clock()
        try:
            msg = decode_producer(body, self.config.limits)
        except ProtocolError as exc:
            rid = request_id_of(body)
            self._rlog.warning(f"front-{exc.code}", "refusing a producer message (%s): %s", exc.code, exc)
            self._send(self.state.reject_client(identity, rid, exc.code, str(exc)))
            return
        self._send(self.state.on_client_message(identity, msg, now))

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        body = frames[1:]
        now = self.clock()
        try:
            msg = decode_worker(body, self._backend_limits)
        except ProtocolError as exc:
            self._rlog.warning(f"back-{exc.code}", "refusing a worker message (%s): %s", exc.code, exc)
            self.state.counters["malformed"] += 1
            self.observers.emit("on_failed", None, str(exc.code))
            if isinstance(exc, VersionError):
                self._send([ToWorker(identity, Disconnect(f"{ErrorCode.VERSION}: {exc}"))])
            elif isinstance(exc, OversizedError) and (job := _job_of(body)) is not None:
                failed = WorkFailed(job[0], job[1], ErrorCode.OVERSIZED, f"result too large: {exc}")
                self._send(self.state.on_worker_message(identity, failed, now))
            return
        self._send(self.state.on_worker_message(identity, msg, now))

    def _sockets(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        if self.frontend is None or self.backend is None:
            raise RuntimeError("broker sockets are not bound")
        return self.frontend, self.backend

    def _send(self, actions: list[Action], depth: int = 0) -> None:
        front, back = self._sockets()
        for a in actions:
            sock = back if isinstance(a, ToWorker) else front
            try:
                _send_frames(sock, [a.identity, *encode(a.message)])
            except zmq.ZMQError as exc:
                unreachable = exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN)
                if isinstance(a, ToWorker) and unreachable and depth < 2:
                    self._rlog.warning(
                        "unreachable-worker", "worker %r unreachable (%s); expiring it", a.identity, exc
                    )
                    self._send(self.state.on_worker_unreachable(a.identity, self.clock()), depth + 1)
                elif isinstance(a, ToClient):
                    # the producer is gone or not reading; it will retry whatever it misses
                    self._rlog.warning(
                        "unreachable-client", "cannot reach producer %r (%s); reply dropped", a.identity, exc
                    )
                else:
                    log.warning("send to %r failed: %s", a.identity, exc)


def _run_and_close(server: BrokerServer) -> None:
    try:
        server.run()
    finally:
        server.close()
