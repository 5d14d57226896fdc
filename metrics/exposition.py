"""Serving a Prometheus registry over HTTP, and the histogram buckets every trackfleet exporter shares.

Each exporter (broker, worker, node GPU exporter) owns a private :class:`~prometheus_client.CollectorRegistry`
and serves it with :class:`MetricsServer` on its own port, bound to 127.0.0.1 unless told otherwise. A port
that is taken never stops the process being observed: the server logs a warning and retries in the
background, because an exporter must never break dispatch (style guide pattern 11).

Importing this module switches off prometheus_client's ``*_created`` series (one extra gauge per counter and
histogram child, which no trackfleet dashboard uses).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()

#: Buckets of every duration histogram [s]: 0.1 ms to 60 s, 1-2-5 steps, denser between 0.1 s and 3 s
#: where reconstruction times sit (mu=200 on a GPU: 0.1-0.7 s per event; mu=20 on a CPU core: ~1.3 s).
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Buckets of batch-size histograms [events].
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

#: Default bind address of every exporter: loopback (put a reverse proxy or Prometheus agent on the node).
DEFAULT_ADDR = "127.0.0.1"


class MetricsServer:
    """``/metrics`` of one registry over HTTP, on a daemon thread.

    Args:
        registry: what to serve.
        port: TCP port (0: any free port, see :attr:`port` once started).
        addr: bind address.
        retry_s: when the port is taken, retry this often in the background (0: give up at once).
    """

    def __init__(
        self, registry: Collector, port: int, addr: str = DEFAULT_ADDR, retry_s: float = 5.0
    ) -> None:
        self.registry = registry
        self.requested_port = port
        self.addr = addr
        self.retry_s = retry_s
        self.port: int | None = None
        self._httpd: Any = None
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        """``http://addr:port/metrics`` once serving, else None."""
        return None if self.port is None else f"http://{self.addr}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Bind and serve; never raises (a busy port is retried in the background)."""
        if not self._try_bind() and self.retry_s > 0:
            self._retry = threading.Thread(target=self._retry_loop, name="metrics-bind", daemon=True)
            self._retry.start()
        return self

    def _try_bind(self) -> bool:
        try:
            httpd, _thread = prometheus_client.start_http_server(
                self.requested_port, addr=self.addr, registry=self.registry
            )
        except OSError as exc:
            log.warning(
                "metrics: cannot serve on %s:%d (%s)%s",
                self.addr,
                self.requested_port,
                exc,
                f"; retrying every {self.retry_s:g} s" if self.retry_s > 0 else "",
            )
            return False
        self._httpd = httpd
        self.port = int(httpd.server_port)
        log.info("metrics: serving %s", self.url)
        return True

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self._try_bind():
                return

    def stop(self) -> None:
        """Stop serving (and retrying)."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def new_registry() -> CollectorRegistry:
    """A private registry (never the process-global one, so several exporters can live in one process)."""
    return CollectorRegistry(auto_describe=True)


def free_ports(n: int, addr: str = DEFAULT_ADDR) -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (for tests and local fleets).

    The sockets are held together while choosing, so the ports are distinct; another process may still take
    one before it is used.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((addr, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def sample_values(registry: Collector, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` in ``registry``, keyed by its sorted labels (tests, perf reports)."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = float(s.value)
    return out


def family_names(registry: Collector) -> Sequence[str]:
    """Names of the sample series a registry exposes (``_total`` / ``_bucket`` forms included)."""
    return sorted({s.name for family in registry.collect() for s in family.samples})
