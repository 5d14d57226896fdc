"""The worker's I/O thread: owns the broker socket, so that liveness never depends on compute (pattern 13).

It registers (READY with capacity), turns JOB messages into :class:`~worker.inbox.JobItem` for the compute
thread, forwards the compute thread's RESULT/FAILED messages (received over an ``inproc`` PAIR socket,
without copying), heartbeats every ``heartbeat_interval_s`` listing the jobs being computed, and
reconnects with exponential back-off when the broker falls silent (Paranoid Pirate).

On DISCONNECT from the broker (it expired us, or restarted and does not know us) it drops the queued
jobs (the broker has re-queued them already) and sends READY again once the compute thread is idle.

Shutdown (:meth:`IOThread.request_stop`, pattern 14): stop taking jobs, hand every unstarted job back,
let the compute thread finish its batch (up to ``shutdown_timeout_s``) while still forwarding its results
and heartbeating, send DISCONNECT listing the returned jobs, close with a short linger.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from broker.errors import ProtocolError
from broker.protocol import (
    Disconnect,
    Job,
    Limits,
    Ready,
    WorkerHeartbeat,
    WorkerMessage,
    decode_worker,
    encode,
    payload_nbytes,
)
from worker.compute import DONE, STARTED
from worker.config import WorkerConfig
from worker.inbox import Inbox, JobItem
from worker.observer import WorkerObservers

log = logging.getLogger(__name__)

_LINGER_MS = 500
_BATCH = 256


class IOThread(threading.Thread):
    """Socket owner of one worker.

    Args:
        config: worker configuration.
        context: ZeroMQ context (shared with the compute thread).
        inbox: queue to the compute thread.
        computing: set while the compute thread runs a batch.
        compute_alive: returns False once the compute thread has ended.
        info: READY description (engine info plus name, host, pid).
        observers: worker hooks.
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        config: WorkerConfig,
        context: zmq.Context[zmq.Socket[bytes]],
        inbox: Inbox,
        computing: threading.Event,
        compute_alive: Callable[[], bool],
        info: dict[str, Any],
        observers: WorkerObservers,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.config = config
        self.context = context
        self.inbox = inbox
        self.computing = computing
        self.compute_alive = compute_alive
        self.info = info
        self.observers = observers
        self.clock = clock
        self.identity = f"{config.name}-{secrets.token_hex(3)}".encode()
        self.outbox_endpoint = f"inproc://worker-outbox-{secrets.token_hex(6)}"
        self.outbox = context.socket(zmq.PAIR)  # bound here so the compute thread may connect at once
        self.outbox.bind(self.outbox_endpoint)
        self._stop_event = threading.Event()
        self._sock: zmq.Socket[bytes] | None = None
        self._active: set[int] = set()  # started by the compute thread, not yet answered
        self._held: set[int] = set()  # received and not yet answered (queued or active)
        self._last_recv = 0.0
        self._next_hb = 0.0
        self._backoff_s = config.reconnect_min_s
        self._reconnect_at: float | None = None
        self._need_ready = False
        self._limits = Limits(max_payload_bytes=2**40, max_frames=1024)  # the broker enforces event limits
        self.registrations = 0
        self._dropped = 0  # messages dropped because the broker connection was full
        self._poller: zmq.Poller | None = None

    # --- control --------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin the graceful shutdown (thread-safe; safe from a signal handler)."""
        self._stop_event.set()

    # --- socket ---------------------------------------------------------------------------------------

    def _connect(self) -> None:
        s = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, self.identity)
        s.setsockopt(zmq.LINGER, 0)
        if self.config.keys is not None:
            self.config.keys.apply(s)
        s.connect(self.config.connect)
        self._sock = s
        self._poller = zmq.Poller()
        self._poller.register(self.outbox, zmq.POLLIN)
        self._poller.register(s, zmq.POLLIN)
        now = self.clock()
        self._last_recv = now
        self._send(Ready(self.config.effective_capacity, self.info))
        self.registrations += 1
        self._next_hb = now + self.config.heartbeat_interval_s
        self.observers.emit("on_registered", self.info)
        log.info(
            "worker %s connected to %s with capacity %d",
            self.config.name,
            self.config.connect,
            self.config.effective_capacity,
        )

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._sock is not None:
            self._sock.close(linger=linger_ms)
            self._sock = None
            self._poller = None

    def _send(self, msg: WorkerMessage) -> None:
        self._send_frames(encode(msg))

    def _send_frames(self, frames: list[Any]) -> None:
        if self._sock is None:
            return
        try:
            # never block the I/O thread: with the broker away the queue fills up; whatever is dropped here
            # (heartbeats, results) the broker recovers by expiring us and re-queueing our events
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._dropped += 1
        except zmq.ZMQError as exc:
            log.warning("send to broker failed: %s", exc)

    def _heartbeat(self, now: float) -> None:
        self._send(WorkerHeartbeat(tuple(sorted(self._active))))
        self._next_hb = now + self.config.heartbeat_interval_s

    # --- message handling -----------------------------------------------------------------------------

    def _on_broker(self, frames: list[zmq.Frame], accepting: bool) -> list[int]:
        """Handle one broker message; returns jobs to hand back (received while not accepting)."""
        self._last_recv = self.clock()
        self._backoff_s = self.config.reconnect_min_s
        try:
            msg = decode_worker(frames, self._limits)
        except ProtocolError as exc:
            log.warning("ignoring a malformed message from the broker (%s): %s", exc.code, exc)
            return []
        if isinstance(msg, Job):
            if not accepting:
                return [msg.job]
            self._held.add(msg.job)
            self.observers.emit("on_job_received", msg.job, payload_nbytes(msg.payload))
            self.inbox.put(JobItem(msg.job, msg.epoch, msg.attempt, msg.payload, self._last_recv))
        elif isinstance(msg, Disconnect):
            dropped = self.inbox.drain()
            for it in dropped:
                self._held.discard(it.job)
            log.warning(
                "broker disconnected this worker (%s); dropped %d queued events, registering again",
                msg.reason,
                len(dropped),
            )
            self.observers.emit("on_disconnected", msg.reason)
            self._need_ready = accepting
        elif not isinstance(msg, WorkerHeartbeat):
            log.warning("ignoring %s from the broker", msg.cmd.name)
        return []

    def _on_outbox(self, frames: list[zmq.Frame], now: float) -> None:
        kind = frames[0].bytes
        if kind == STARTED:
            self._active.update(msgpack.unpackb(frames[1].bytes))
            self._heartbeat(now)  # tell the broker at once which events are being computed
        elif kind == DONE:
            job = msgpack.unpackb(frames[1].bytes)
            self._active.discard(job)
            self._held.discard(job)
            self._send_frames(frames[2:])

    def _pump(self, poller: zmq.Poller, timeout_ms: float, accepting: bool) -> list[int]:
        returned: list[int] = []
        ready = dict(poller.poll(timeout_ms))
        now = self.clock()
        if self.outbox in ready:
            for _ in range(_BATCH):
                try:
                    frames = self.outbox.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_outbox(frames, now)
        if self._sock is not None and self._sock in ready:
            for _ in range(_BATCH):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                returned += self._on_broker(frames, accepting)
        return returned

    # --- main loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
            self._shutdown()
        except Exception:
            log.exception("worker I/O thread failed")
        finally:
            self._close_socket(_LINGER_MS)
            self.outbox.close(linger=0)

    def _serve(self) -> None:
        cfg = self.config
        self._connect()
        while not self._stop_event.is_set():
            if not self.compute_alive():
                log.error("compute thread ended unexpectedly; worker stops")
                return
            now = self.clock()
            if self._reconnect_at is not None:
                if now < self._reconnect_at:
                    self._wait_outbox_only(self._reconnect_at - now)
                    continue
                self._reconnect_at = None
                self._connect()
                continue
            if self._poller is None:
                self._connect()
                continue
            timeout_ms = max(0.0, min(self._next_hb - now, 0.1) * 1000.0)
            self._pump(self._poller, timeout_ms, accepting=True)
            now = self.clock()
            if self._need_ready and not self.computing.is_set() and not self._active:
                self._need_ready = False
                self._send(Ready(cfg.effective_capacity, self.info))
                self.registrations += 1
                self.observers.emit("on_registered", self.info)
            if now >= self._next_hb:
                self._heartbeat(now)
            silent = now - self._last_recv
            if silent > cfg.broker_timeout_s:
                log.warning("broker silent for %.1f s; reconnecting in %.2f s", silent, self._backoff_s)
                self.observers.emit("on_broker_lost", silent)
                self._close_socket()
                for it in self.inbox.drain():  # the broker re-queues them when it expires us
                    self._held.discard(it.job)
                self._reconnect_at = now + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, cfg.reconnect_max_s)

    def _wait_outbox_only(self, wait_s: float) -> None:
        poller = zmq.Poller()
        poller.register(self.outbox, zmq.POLLIN)
        self._pump(poller, min(wait_s, 0.1) * 1000.0, accepting=True)

    def _shutdown(self) -> None:
        """Pattern 14: stop taking jobs, hand back unstarted ones, finish the current batch, say goodbye."""
        cfg = self.config
        self.inbox.close()
        unstarted = self.inbox.drain()
        log.info(
            "worker stopping: handing back %d queued events, finishing the current batch", len(unstarted)
        )
        late: list[int] = []
        deadline = self.clock() + cfg.shutdown_timeout_s
        poller = zmq.Poller()
        poller.register(self.outbox, zmq.POLLIN)
        if self._sock is not None:
            poller.register(self._sock, zmq.POLLIN)
        # the compute thread exits once its batch is done and it sees the closed, empty inbox
        while self.compute_alive() and self.clock() < deadline:
            late += self._pump(poller, 50.0, accepting=False)
            now = self.clock()
            if now >= self._next_hb and self._sock is not None:
                self._heartbeat(now)
        # results produced just before the compute thread ended are still in the outbox: forward them
        late += self._pump(poller, 0.0, accepting=False)
        if self._active:
            log.warning(
                "compute did not finish within %.1f s; handing back %s",
                cfg.shutdown_timeout_s,
                sorted(self._active),
            )
        returned = tuple(sorted(self._held | set(late)))  # everything received and not answered
        self._send(Disconnect("worker shutting down", returned))
        log.info("worker %s left the broker, handing back %d events", cfg.name, len(returned))
