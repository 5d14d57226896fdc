"""Configuration of the broker: one frozen dataclass, units in the field names (style guide pattern 7)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.protocol import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PAYLOAD_BYTES, MAX_CAPACITY, Limits

POLICIES = ("least_loaded", "round_robin")
WHEN_FULL = ("busy", "block")


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the broker's state machine and socket loop need.

    Attributes:
        frontend: endpoint producers connect to (bound by the broker). Loopback unless told otherwise.
        backend: endpoint workers connect to (bound by the broker).
        policy: "least_loaded" (lowest in-flight/capacity, ties to the least recently used) or
            "round_robin" (next worker with credit, in registration order).
        max_queue_events: events waiting for a worker before the queue counts as full [events].
        max_queue_bytes: payload bytes waiting for a worker before the queue counts as full [bytes].
        when_full: "busy" (answer BUSY at once) or "block" (stop reading producers, so that ZeroMQ's
            high-water marks push back on their sends).
        max_event_bytes: largest event payload accepted; larger ones get an ``oversized`` error [bytes].
        max_frames: largest number of payload frames of one message.
        heartbeat_interval_s: period of heartbeats to workers and producers [s].
        heartbeat_liveness: missed heartbeat periods after which a silent worker is expired.
        job_timeout_s: lease length: a worker that holds an event longer than this (from dispatch) is
            considered stalled, expired, and its events re-queued [s].
        max_attempts: dispatches of one event whose worker died or stalled before the event gets a
            ``worker_lost`` error instead of another try (bounds the damage of an event that kills workers).
        busy_retry_after_s: back-off suggested in BUSY replies [s].
        client_expiry_s: forget a producer with nothing pending after this much silence [s].
        drain_timeout_s: on shutdown, wait at most this long for in-flight events to finish [s].
        frontend_rcvhwm: ZeroMQ receive high-water mark per producer connection [messages]; in "block"
            mode it bounds what producers can push before their sends block.
        sndhwm: ZeroMQ send high-water mark per peer [messages].
        hard_frame_limit_bytes: ZeroMQ MAXMSGSIZE: a single frame larger than this makes ZeroMQ drop the
            peer's connection (no reply is possible then); 0 derives 2 x ``max_event_bytes`` + 1 MiB, -1 disables.
        curve_secret_file: the broker's CURVE secret-key file (``zmq.auth`` format); enables encryption.
        curve_authorized_dir: directory of public-key files of authorized clients and workers; without it,
            any CURVE client is accepted (encryption only).
        endpoints_file: where to write the bound endpoints as JSON (useful with ``tcp://127.0.0.1:0``).
        io_threads: ZeroMQ I/O threads of the broker's context (2): they move the event bytes between
            the kernel's sockets and the broker's queues; with one, a few hundred MB-sized events per
            second fill a core.
    """

    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    policy: str = "least_loaded"
    max_queue_events: int = 1000
    max_queue_bytes: int = 2 * 1024**3
    when_full: str = "busy"
    max_event_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_frames: int = DEFAULT_MAX_FRAMES
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    job_timeout_s: float = 300.0
    max_attempts: int = 3
    busy_retry_after_s: float = 0.05
    client_expiry_s: float = 60.0
    drain_timeout_s: float = 5.0
    frontend_rcvhwm: int = 16
    sndhwm: int = 1000
    hard_frame_limit_bytes: int = 0
    curve_secret_file: Path | None = None
    curve_authorized_dir: Path | None = None
    endpoints_file: Path | None = None
    io_threads: int = 2

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.when_full not in WHEN_FULL:
            raise ConfigError(f"when_full must be one of {WHEN_FULL}, got {self.when_full!r}")
        for name in ("max_queue_events", "max_queue_bytes", "max_event_bytes", "max_frames", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.io_threads <= 16:
            raise ConfigError(f"io_threads must be in 1..16, got {self.io_threads}")
        if self.heartbeat_liveness < 1:
            raise ConfigError("heartbeat_liveness must be >= 1")
        for name in ("heartbeat_interval_s", "job_timeout_s", "client_expiry_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.busy_retry_after_s < 0 or self.drain_timeout_s < 0:
            raise ConfigError("busy_retry_after_s and drain_timeout_s must be >= 0")
        if self.frontend_rcvhwm < 1 or self.sndhwm < 1:
            raise ConfigError("high-water marks must be >= 1")
        if self.curve_authorized_dir is not None and self.curve_secret_file is None:
            raise ConfigError("curve_authorized_dir needs curve_secret_file")

    @property
    def worker_expiry_s(self) -> float:
        """Silence after which a worker is expired [s]."""
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def limits(self) -> Limits:
        """Decoding limits for producer messages."""
        return Limits(max_payload_bytes=self.max_event_bytes, max_frames=self.max_frames)

    @property
    def maxmsgsize_bytes(self) -> int:
        """The ZeroMQ MAXMSGSIZE to set on both sockets (-1: unlimited)."""
        if self.hard_frame_limit_bytes != 0:
            return self.hard_frame_limit_bytes
        return 2 * self.max_event_bytes + 1024 * 1024

    @property
    def max_worker_capacity(self) -> int:
        return MAX_CAPACITY
