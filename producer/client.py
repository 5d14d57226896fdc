"""The producer side of the fleet: a pipelining Lazy Pirate client and the open/closed-loop driver.

:class:`FleetClient` keeps many requests outstanding on one DEALER socket (the producer's routing id is
stable, so the broker can route replies to it across reconnects) and makes each event's outcome final
exactly once:

- every request has an id; a reply whose id is not pending (a late copy after a retry) is dropped and
  counted as a duplicate, so an event is never reported twice;
- no reply within ``timeout_s`` -> resend (Lazy Pirate); after ``max_retries`` resends without hearing
  from the broker the event fails with ``timeout`` (a broker that keeps talking holds the event and
  ignores the copies, so those resends are free); ``deadline_s`` optionally bounds the total time;
- broker silent for ``broker_timeout_s`` while requests are pending (it heartbeats producers that have
  events with it) -> it probably restarted: resend everything outstanding;
- BUSY -> resend after the suggested back-off (exponential, capped); retryable errors likewise;
- sends use ``IMMEDIATE`` and never block: while no broker is connected requests wait in the client
  (bounded by the caller's in-flight window) instead of piling up in ZeroMQ.

:class:`ProducerRun` streams packed events at a constant or Poisson rate (open loop) or with N in flight
(closed loop), shows a live progress line and returns a :class:`RunSummary` with throughput, latency
percentiles and ok / failed / busy / retried / lost counts.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zmq

from broker.errors import ConfigError, ProtocolError
from broker.protocol import (
    Busy,
    Error,
    ErrorCode,
    Frame,
    Heartbeat,
    Limits,
    Result,
    Stats,
    StatsRequest,
    Submit,
    decode_producer,
    encode,
    payload_nbytes,
)
from broker.security import ClientKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Producer connection and retry settings.

    Attributes:
        endpoint: the broker's producer endpoint.
        timeout_s: resend a request with no reply after this long [s].
        max_retries: resends while the broker is silent (or answers with a retryable error) before an
            event fails with ``timeout``; resends while the broker keeps talking do not count, since it
            ignores copies of events it holds.
        deadline_s: give up on an event after this long in total (None: no limit) [s].
        heartbeat_interval_s: heartbeat period while requests are pending [s].
        broker_timeout_s: broker silence that counts as a broker restart [s].
        busy_backoff_s / busy_backoff_max_s: back-off after BUSY, doubled per BUSY of the event [s].
        max_busy: BUSY replies one event may get before it fails with ``busy`` (0: unlimited).
        sndhwm: ZeroMQ send high-water mark [messages].
        keys: CURVE keys (None: plain TCP).
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    timeout_s: float = 30.0
    max_retries: int = 3
    deadline_s: float | None = None
    heartbeat_interval_s: float = 1.0
    broker_timeout_s: float = 3.5
    busy_backoff_s: float = 0.02
    busy_backoff_max_s: float = 1.0
    max_busy: int = 0
    sndhwm: int = 64
    keys: ClientKeys | None = None

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and self.broker_timeout_s > 0 and self.heartbeat_interval_s > 0):
            raise ConfigError("timeouts and the heartbeat interval must be > 0")
        if self.max_retries < 0 or self.max_busy < 0:
            raise ConfigError("max_retries and max_busy must be >= 0")


@dataclass(frozen=True)
class Reply:
    """The final outcome of one event.

    Attributes:
        id: request id. event_id: event number. ok: tracks came back.
        payload: packed tracks frames (ok only). timings: worker stage times [s]. worker: who ran it.
        queue_s: time in the broker queue [s]. code / message: error (not ok).
        latency_s: from submit to this reply [s]. sends: transmissions (1 = no retry). busy: BUSY replies.
    """

    id: int
    event_id: int
    ok: bool
    payload: tuple[Frame, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    queue_s: float = 0.0
    code: str = ""
    message: str = ""
    latency_s: float = 0.0
    sends: int = 1
    busy: int = 0


@dataclass(eq=False)
class _Request:
    id: int
    event_id: int
    payload: tuple[Frame, ...]
    submitted_at: float
    sent_at: float = -1.0  # < 0: waiting to be (re)sent
    not_before: float = 0.0
    sends: int = 0
    retries: int = 0  # resends while the broker was silent (these count against max_retries)
    busy: int = 0
    epoch: str | None = None  # the broker instance it was last sent to, when known


class FleetClient:
    """Many outstanding requests over one DEALER socket, with retries and duplicate suppression.

    Args:
        config: connection and retry settings.
        context: ZeroMQ context (a new one when None).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        config: ClientConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        self.identity = b"P" + secrets.token_bytes(8)
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, self.identity)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, config.sndhwm)
        if config.keys is not None:
            config.keys.apply(self.sock)
        self.sock.connect(config.endpoint)
        self._pending: dict[int, _Request] = {}
        self._order: list[int] = []  # ids waiting to be (re)sent, oldest first
        now = clock()
        self._last_recv = now
        self._last_send = now
        self._last_resend_all = now
        self._epoch: str | None = None  # the broker instance we talk to, learnt from its heartbeats
        self._limits = Limits(max_payload_bytes=2**40, max_frames=4096)
        self.counters: Counter[str] = Counter()
        self.retried_ids: set[int] = set()
        self.busy_ids: set[int] = set()

    # --- public ---------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet final."""
        return len(self._pending)

    def is_pending(self, request_id: int) -> bool:
        """Whether ``request_id`` was submitted and is not final yet."""
        return request_id in self._pending

    def submit(self, request_id: int, event_id: int, payload: Sequence[Frame]) -> None:
        """Queue one event for sending (sent at once when the broker is connected).

        Raises:
            ValueError: ``request_id`` is already pending.
        """
        if request_id in self._pending:
            raise ValueError(f"request {request_id} is already pending")
        now = self.clock()
        self._pending[request_id] = _Request(request_id, event_id, tuple(payload), submitted_at=now)
        self._order.append(request_id)
        self._flush(now)

    def poll(self, timeout_s: float) -> list[Reply]:
        """Wait up to ``timeout_s`` for replies; handle retries and heartbeats. Returns final outcomes."""
        out: list[Reply] = []
        now = self.clock()
        self._flush(now)
        if self.sock.poll(max(0.0, timeout_s) * 1000.0, zmq.POLLIN):
            for _ in range(1024):
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._last_recv = self.clock()
                r = self._on_message(frames)
                if r is not None:
                    out.append(r)
        out += self._timers(self.clock())
        return out

    def stats(self, timeout_s: float = 2.0) -> dict[str, Any] | None:
        """Ask the broker for its STATS (None when it does not answer in time). Use with nothing pending."""
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            try:
                self.sock.send_multipart(encode(StatsRequest()), zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.01)
        else:
            return None
        while (left := deadline - self.clock()) > 0:
            if not self.sock.poll(left * 1000.0, zmq.POLLIN):
                return None
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg = decode_producer(frames, self._limits)
            except ProtocolError:
                continue
            if isinstance(msg, Stats):
                return msg.stats
        return None

    def close(self) -> None:
        """Close the socket (and the context if owned)."""
        self.sock.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------------

    def _send(self, frames: list[Frame]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False  # no broker connected, or its pipe is full: back-pressure
        except zmq.ZMQError as exc:
            log.warning("send failed: %s", exc)
            return False
        self._last_send = self.clock()
        return True

    def _flush(self, now: float) -> None:
        """Send requests waiting to be (re)sent, oldest first, until ZeroMQ pushes back."""
        if not self._order:
            return
        keep: list[int] = []
        blocked = False
        for rid in self._order:
            req = self._pending.get(rid)
            if req is None or req.sent_at >= 0:
                continue
            if blocked or req.not_before > now:
                keep.append(rid)
                continue
            if self._send(encode(Submit(req.id, req.event_id, req.payload))):
                req.sent_at = now
                req.epoch = self._epoch
                req.sends += 1
                if req.sends > 1:
                    self.retried_ids.add(req.id)
                    self.counters["resends"] += 1
            else:
                blocked = True
                keep.append(rid)
        self._order = keep

    def _final(self, req: _Request, ok: bool, **kw: Any) -> Reply:
        del self._pending[req.id]
        return Reply(
            id=req.id,
            event_id=req.event_id,
            ok=ok,
            latency_s=self.clock() - req.submitted_at,
            sends=max(req.sends, 1),
            busy=req.busy,
            **kw,
        )

    def _requeue(self, req: _Request, delay_s: float) -> None:
        req.sent_at = -1.0
        req.not_before = self.clock() + delay_s
        self._order.append(req.id)

    def _on_message(self, frames: list[zmq.Frame]) -> Reply | None:
        try:
            msg = decode_producer(frames, self._limits)
        except ProtocolError as exc:
            self.counters["malformed_replies"] += 1
            log.warning("ignoring a malformed reply (%s): %s", exc.code, exc)
            return None
        if isinstance(msg, Heartbeat):
            self._on_epoch(msg.epoch)
            return None
        if isinstance(msg, Stats):
            return None
        rid = getattr(msg, "id", None)
        req = self._pending.get(rid) if rid is not None else None
        if req is None:
            if isinstance(msg, Error) and rid is None:
                log.warning("broker error without request id: %s: %s", msg.code, msg.message)
                self.counters["errors_without_id"] += 1
            else:
                self.counters["duplicates"] += 1  # a late copy of an answered (or resent) request
            return None
        if req.sent_at < 0:
            # we already decided to resend it (timeout/busy) but an answer came: still valid
            self._order = [i for i in self._order if i != req.id]
        if isinstance(msg, Result | Busy):
            self._on_epoch(msg.epoch)
        if isinstance(msg, Result):
            return self._final(
                req, True, payload=msg.payload, timings=msg.timings, worker=msg.worker, queue_s=msg.queue_s
            )
        if isinstance(msg, Busy):
            req.busy += 1
            self.busy_ids.add(req.id)
            self.counters["busy_replies"] += 1
            if self.config.max_busy and req.busy >= self.config.max_busy:
                return self._final(req, False, code="busy", message=f"broker busy {req.busy} times")
            backoff = min(
                self.config.busy_backoff_max_s, self.config.busy_backoff_s * 2 ** min(req.busy - 1, 10)
            )
            self._requeue(req, max(msg.retry_after_s, backoff) * (0.5 + random.random()))
            return None
        if isinstance(msg, Error):
            if msg.retryable and req.retries < self.config.max_retries:
                req.retries += 1
                self._requeue(req, self.config.busy_backoff_max_s * random.random())
                return None
            return self._final(req, False, code=msg.code, message=msg.message)
        return None

    def _on_epoch(self, epoch: str) -> None:
        """A broker heartbeat names its instance: a new one means a restart, so resend what the old one held."""
        if not epoch or epoch == self._epoch:
            return
        if self._epoch is None:
            # first contact: what we sent so far went to this broker (or is covered by the timeout)
            self._epoch = epoch
            for req in self._pending.values():
                if req.sent_at >= 0 and req.epoch is None:
                    req.epoch = epoch
            return
        self._epoch = epoch
        lost = [r for r in self._pending.values() if r.sent_at >= 0 and r.epoch != epoch]
        self.counters["broker_restarts"] += 1
        if lost:
            log.warning("broker restarted (epoch %s); resending %d events", epoch, len(lost))
        for req in lost:
            self._requeue(req, 0.0)

    def _timers(self, now: float) -> list[Reply]:
        out: list[Reply] = []
        cfg = self.config
        if not self._pending:
            return out
        broker_lost = (
            now - self._last_recv > cfg.broker_timeout_s
            and now - self._last_resend_all > cfg.broker_timeout_s
        )
        if broker_lost:
            self._last_resend_all = now
            n = sum(1 for r in self._pending.values() if r.sent_at >= 0)
            if n:
                log.warning("broker silent for %.1f s; resending %d events", now - self._last_recv, n)
                self.counters["broker_lost"] += 1
        for req in list(self._pending.values()):
            if cfg.deadline_s is not None and now - req.submitted_at > cfg.deadline_s:
                out.append(
                    self._final(req, False, code=ErrorCode.TIMEOUT, message=f"no reply in {cfg.deadline_s} s")
                )
                continue
            if req.sent_at < 0:
                continue
            if broker_lost or now - req.sent_at > cfg.timeout_s:
                # A broker that answered since this send is alive and still holds the event (it ignores
                # the copy) or lost our reply (it redoes it): resend without using up a retry.
                if broker_lost or self._last_recv <= req.sent_at:
                    req.retries += 1
                if req.retries > cfg.max_retries:
                    out.append(
                        self._final(
                            req, False, code=ErrorCode.TIMEOUT, message=f"no reply after {req.sends} sends"
                        )
                    )
                else:
                    self._requeue(req, 0.0)
        self._flush(now)
        if self._pending and now - self._last_send >= cfg.heartbeat_interval_s:
            self._send(encode(Heartbeat()))
        return out


# --- open / closed loop driver ----------------------------------------------------------------------


@dataclass(frozen=True)
class PackedInput:
    """One event ready to send: its id and packed frames (msgpack header + column buffers)."""

    event_id: int
    payload: tuple[Frame, ...]

    @property
    def nbytes(self) -> int:
        return payload_nbytes(self.payload)


def load_inputs(
    path: str | Path, detector_dir: str | Path | None = None, limit: int | None = None
) -> list[PackedInput]:
    """Read and pack the events of an input once (CSV parsing happens here, never in a worker).

    Args:
        path: event directory, cells file, multi-event CSV or .tfev file(s).
        detector_dir: detector to validate cells against and to stamp its fingerprint on each event
            (default: found beside the input, if present).
        limit: pack at most this many events.

    Raises:
        InputError: unreadable input.
    """
    from kernels.edm.packed import pack_event
    from producer.io.detector import find_detector_files, load_detector
    from producer.io.errors import InputError
    from producer.io.events import discover, load_cells

    sources = discover(path)[:limit]
    det = None
    if detector_dir is None:
        try:
            find_detector_files(sources[0].cells.parent)
            detector_dir = sources[0].cells.parent
        except InputError:
            detector_dir = None
    if detector_dir is not None:
        det = load_detector(detector_dir)
    fingerprint = det.fingerprint() if det is not None else ""
    out = []
    for s in sources:
        header, buffers = pack_event(load_cells(s, det), fingerprint)
        out.append(PackedInput(s.event_id, (header, *buffers)))
    return out


@dataclass(frozen=True)
class RunConfig:
    """How to stream events.

    Attributes:
        rate_hz: open loop: arrivals per second (None: closed loop).
        poisson: open loop: exponential inter-arrival times instead of constant ones.
        concurrency: closed loop: events kept in flight.
        count: events to send (None: one pass over the input, or unlimited with ``duration_s``).
        duration_s: stop sending after this long [s].
        drain_timeout_s: after the last send, wait at most this long for outstanding replies [s].
        max_in_flight: open loop: cap on outstanding events (arrivals beyond it are delayed) [events].
        progress: draw a live progress line on stderr.
        seed: random seed for Poisson arrivals.
    """

    rate_hz: float | None = None
    poisson: bool = False
    concurrency: int = 4
    count: int | None = None
    duration_s: float | None = None
    drain_timeout_s: float = 60.0
    max_in_flight: int = 1024
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise ConfigError("rate_hz must be > 0")
        if self.concurrency < 1 or self.max_in_flight < 1:
            raise ConfigError("concurrency and max_in_flight must be >= 1")
        if self.count is not None and self.count < 0:
            raise ConfigError("count must be >= 0")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError("duration_s must be > 0")


@dataclass
class RunSummary:
    """What a run did. Latencies in ms, rates per second."""

    events_sent: int = 0
    events_ok: int = 0
    events_failed: int = 0
    events_lost: int = 0
    events_busy: int = 0
    events_retried: int = 0
    busy_replies: int = 0
    duplicates_dropped: int = 0
    late_arrivals: int = 0
    elapsed_s: float = 0.0
    bytes_sent: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list, repr=False)
    stage_means_s: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events_ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        if not self.latencies_s:
            return dict.fromkeys(("mean", "p50", "p90", "p95", "p99", "max"))
        a = np.asarray(self.latencies_s) * 1e3
        q = np.percentile(a, [50, 90, 95, 99])
        return {
            "mean": round(float(a.mean()), 3),
            "p50": round(float(q[0]), 3),
            "p90": round(float(q[1]), 3),
            "p95": round(float(q[2]), 3),
            "p99": round(float(q[3]), 3),
            "max": round(float(a.max()), 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "events_sent": self.events_sent,
            "events_ok": self.events_ok,
            "events_failed": self.events_failed,
            "events_lost": self.events_lost,
            "events_busy": self.events_busy,
            "events_retried": self.events_retried,
            "busy_replies": self.busy_replies,
            "duplicates_dropped": self.duplicates_dropped,
            "late_arrivals": self.late_arrivals,
            "elapsed_s": round(self.elapsed_s, 4),
            "events_per_s": round(self.events_per_s, 3),
            "mb_per_s": round(self.bytes_sent / 2**20 / self.elapsed_s, 3) if self.elapsed_s > 0 else 0.0,
            "latency_ms": self.latency_ms(),
            "failures": dict(self.failures),
            "stage_means_ms": {k: round(v * 1e3, 4) for k, v in self.stage_means_s.items()},
        }

    def format(self) -> str:
        """A short human-readable report."""
        lat = self.latency_ms()
        lines = [
            f"events: sent {self.events_sent}, ok {self.events_ok}, failed {self.events_failed}, "
            f"lost {self.events_lost}, busy {self.events_busy}, retried {self.events_retried}",
            f"throughput: {self.events_per_s:.2f} events/s over {self.elapsed_s:.2f} s",
        ]
        if lat["p50"] is not None:
            lines.append(
                "latency [ms]: " + ", ".join(f"{k} {v:.2f}" for k, v in lat.items() if v is not None)
            )
        if self.failures:
            lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())))
        return "\n".join(lines)


class EventClient(Protocol):
    """What :class:`ProducerRun` needs of a client: :class:`FleetClient`, or
    :class:`~producer.sharded.ShardedClient` over several brokers."""

    @property
    def in_flight(self) -> int: ...

    @property
    def counters(self) -> Counter[str]: ...

    @property
    def retried_ids(self) -> set[int]: ...

    @property
    def busy_ids(self) -> set[int]: ...

    def submit(self, request_id: int, event_id: int, payload: Sequence[Frame]) -> None: ...

    def poll(self, timeout_s: float) -> list[Reply]: ...


class ProducerRun:
    """Stream events through a :class:`FleetClient` (or any :class:`EventClient`).

    Args:
        client: a connected client.
        events: packed events; cycled when ``count`` exceeds their number.
        config: rate / concurrency / stopping rules.
        on_reply: called with every final :class:`Reply` (e.g. to write tracks).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        client: EventClient,
        events: Sequence[PackedInput],
        config: RunConfig,
        on_reply: Callable[[Reply], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not events:
            raise ConfigError("no events to send")
        self.client = client
        self.events = list(events)
        self.config = config
        self.on_reply = on_reply
        self.clock = clock
        self._rng = random.Random(config.seed)
        self._stage_sums: Counter[str] = Counter()

    def _interval(self) -> float:
        rate = self.config.rate_hz or 1.0
        return self._rng.expovariate(rate) if self.config.poisson else 1.0 / rate

    def run(self) -> RunSummary:
        """Send, collect, and summarize. Returns when everything was answered or the drain timed out."""
        from producer.progress import Progress

        cfg = self.config
        count = cfg.count if cfg.count is not None else (None if cfg.duration_s else len(self.events))
        s = RunSummary()
        progress = Progress("producer", count) if cfg.progress else None
        start = self.clock()
        next_arrival = start
        drain_deadline: float | None = None
        seq = 0
        while True:
            now = self.clock()
            done_sending = (count is not None and seq >= count) or (
                cfg.duration_s is not None and now - start >= cfg.duration_s
            )
            if not done_sending:
                if cfg.rate_hz is None:
                    while self.client.in_flight < cfg.concurrency and (count is None or seq < count):
                        seq = self._send_one(seq, s)
                else:
                    while now >= next_arrival and (count is None or seq < count):
                        if self.client.in_flight >= cfg.max_in_flight:
                            s.late_arrivals += 1
                            break
                        seq = self._send_one(seq, s)
                        next_arrival += self._interval()
            elif drain_deadline is None:
                drain_deadline = now + cfg.drain_timeout_s
            if done_sending and (self.client.in_flight == 0 or now >= (drain_deadline or now)):
                break
            wait = 0.05 if cfg.rate_hz is None or done_sending else max(0.0, min(0.05, next_arrival - now))
            for r in self.client.poll(wait):
                self._record(r, s)
                if progress is not None:
                    progress.step(
                        1, note=f"ok {s.events_ok} failed {s.events_failed} in flight {self.client.in_flight}"
                    )
        s.elapsed_s = self.clock() - start
        s.events_lost = self.client.in_flight
        s.events_retried = len(self.client.retried_ids)
        s.events_busy = len(self.client.busy_ids)
        s.busy_replies = self.client.counters["busy_replies"]
        s.duplicates_dropped = self.client.counters["duplicates"]
        if s.events_ok:
            s.stage_means_s = {k: v / s.events_ok for k, v in self._stage_sums.items()}
        if progress is not None:
            progress.done()
        return s

    def _send_one(self, seq: int, s: RunSummary) -> int:
        ev = self.events[seq % len(self.events)]
        self.client.submit(seq, ev.event_id, ev.payload)
        s.events_sent += 1
        s.bytes_sent += ev.nbytes
        return seq + 1

    def _record(self, r: Reply, s: RunSummary) -> None:
        if r.ok:
            s.events_ok += 1
            s.latencies_s.append(r.latency_s)
            self._stage_sums.update({**r.timings, "broker_queue_s": r.queue_s})
        else:
            s.events_failed += 1
            s.failures[r.code] = s.failures.get(r.code, 0) + 1
            log.debug("event %d failed: %s %s", r.event_id, r.code, r.message)
        if self.on_reply is not None:
            self.on_reply(r)


class TracksWriter:
    """Write returned tracks as CSV (``trackfleet reconstruct``'s format) on a background thread, so that
    file I/O never delays the receive loop; the queue is bounded.

    Args:
        out_dir: output directory.
        max_queued: replies waiting to be written before :meth:`__call__` blocks.
    """

    def __init__(self, out_dir: str | Path, max_queued: int = 256) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._q: queue.Queue[Reply | None] = queue.Queue(max_queued)
        self.errors: list[str] = []
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="tracks-writer", daemon=True)
        self._thread.start()

    def __call__(self, reply: Reply) -> None:
        if reply.ok:
            self._q.put(reply)

    def _run(self) -> None:
        from kernels.edm.packed_tracks import unpack_tracks
        from kernels.errors import EventFormatError
        from producer.io.tracks_csv import write_tracks

        while (r := self._q.get()) is not None:
            try:
                header = r.payload[0].bytes if isinstance(r.payload[0], zmq.Frame) else bytes(r.payload[0])
                write_tracks(self.out_dir, unpack_tracks(header, r.payload[1:]))
                self.written += 1
            except (EventFormatError, IndexError, OSError) as exc:
                self.errors.append(f"event {r.event_id}: {exc}")
                log.error("cannot write tracks of event %d: %s", r.event_id, exc)

    def close(self) -> None:
        """Write what is queued and stop."""
        self._q.put(None)
        self._thread.join()


def percentile_ms(values_s: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100) of durations given in seconds, in milliseconds (nan when empty)."""
    return float(np.percentile(np.asarray(values_s) * 1e3, q)) if len(values_s) else math.nan
