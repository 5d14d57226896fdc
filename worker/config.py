"""Configuration of one worker process: one frozen dataclass, units in the field names."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ConfigError
from broker.protocol import MAX_CAPACITY
from broker.security import ClientKeys

BACKENDS = ("numpy", "cupy")


def default_name() -> str:
    """``host-pid``: unique per process on one machine, readable in logs and broker stats."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs.

    Attributes:
        connect: the broker's backend endpoint.
        detector: directory with detectors.csv[.gz] + digitization-config.json (or a cached .npz).
        backend: "numpy" (CPU) or "cupy" (GPU).
        device: CUDA device ordinal among the visible ones (cupy backend only).
        capacity: events the worker holds at once, computing + prefetched [events]; 0 derives
            ``2 * batch_max`` so that the next event is already local when the current one finishes.
        batch_max: dynamic batching: reconstruct up to this many queued events in one pass [events].
        batch_wait_us: dynamic batching: after the first event of a batch, wait at most this long for
            more to arrive [us] (0: take only what is already queued).
        preload: an event file or directory; its first event stays on the device and is reconstructed
            in place of every received event (separates transfer cost from compute).
        heartbeat_interval_s: heartbeat period [s].
        heartbeat_liveness: missed broker heartbeats after which the worker reconnects.
        reconnect_min_s / reconnect_max_s: exponential back-off bounds between reconnects [s].
        shutdown_timeout_s: on SIGTERM, wait at most this long for the current batch [s].
        simulate_compute_ms: extra sleep per event, a stand-in for compute time in tests and benchmarks [ms].
        warmup: what to run through the chain before announcing READY: "auto" (with cupy, the first
            ``warmup_events`` events found beside the detector, so that kernels are compiled for real
            shapes; otherwise, or when there are none, a small synthetic event), "synthetic", "none", or
            the path of an event file or directory.
        warmup_events: events used by "auto" or a path [events].
        gpu_pool_limit_mb: cupy backend: CuPy's memory pool, in use and cached, above which it hands
            its cached blocks back before growing [MiB]; a batch that needs more than that runs again
            without the limit, which then rises to what that batch held plus a tenth (0: no limit). The default sits above the live peak of nearly every mu=200
            batch of 8: such a worker holds 1.9 GB instead of 3.7 GB at the same speed (bench/RESULTS.md).
        name: worker name in logs and broker stats.
        keys: CURVE keys (None: plain TCP).
    """

    connect: str = "tcp://127.0.0.1:5556"
    detector: Path = Path("data/generic-mu20")
    backend: str = "numpy"
    device: int = 0
    capacity: int = 0
    batch_max: int = 1
    batch_wait_us: int = 0
    preload: Path | None = None
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 8.0
    shutdown_timeout_s: float = 10.0
    simulate_compute_ms: float = 0.0
    warmup: str = "auto"
    warmup_events: int = 2
    gpu_pool_limit_mb: int = 1152
    name: str = field(default_factory=default_name)
    keys: ClientKeys | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.device < 0:
            raise ConfigError("device must be >= 0")
        if not 1 <= self.batch_max <= MAX_CAPACITY:
            raise ConfigError(f"batch_max must be in [1, {MAX_CAPACITY}]")
        if not 0 <= self.capacity <= MAX_CAPACITY:
            raise ConfigError(f"capacity must be in [0, {MAX_CAPACITY}] (0: automatic)")
        if self.batch_wait_us < 0 or self.simulate_compute_ms < 0:
            raise ConfigError("batch_wait_us and simulate_compute_ms must be >= 0")
        if not self.heartbeat_interval_s > 0 or self.heartbeat_liveness < 1:
            raise ConfigError("heartbeat_interval_s must be > 0 and heartbeat_liveness >= 1")
        if self.warmup_events < 1:
            raise ConfigError("warmup_events must be >= 1")
        if self.gpu_pool_limit_mb < 0:
            raise ConfigError("gpu_pool_limit_mb must be >= 0 (0: no limit)")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("need 0 < reconnect_min_s <= reconnect_max_s")

    @property
    def effective_capacity(self) -> int:
        """Announced capacity [events]."""
        return self.capacity or min(MAX_CAPACITY, 2 * self.batch_max)

    @property
    def broker_timeout_s(self) -> float:
        """Broker silence after which the worker reconnects [s]."""
        return self.heartbeat_interval_s * self.heartbeat_liveness
