"""The running gateway: the HTTP, gRPC and metrics servers around one :class:`~producer.gateway.service.Gateway`.

:class:`GatewayApp` is what ``trackfleet gateway`` runs and what tests start in-process. Shutdown order
(:meth:`GatewayApp.stop`): stop accepting connections, give requests in progress ``grace_s`` to get
their answers from the fleet, then fail whatever is still unanswered with UNAVAILABLE; an accepted
request always gets a response.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.gateway.gpu_metrics import MetricsServer, NvmlSampler, render
from producer.gateway.service import Gateway, GatewayConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ports:
    """Where the servers listen (Triton's defaults). A port of 0 picks a free one; -1 turns it off."""

    host: str = "127.0.0.1"
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


class GatewayApp:
    """HTTP + gRPC + metrics servers for one gateway.

    Args:
        config: the gateway's configuration.
        ports: host and ports to bind.
        grpc_threads: gRPC requests served at once.
        sampler: GPU sampler for the metrics port (default NVML).
    """

    def __init__(
        self, config: GatewayConfig, ports: Ports | None = None, grpc_threads: int = 64, sampler: Any = None
    ) -> None:
        self.gateway = Gateway(config)
        self.ports = ports or Ports()
        self.grpc_threads = grpc_threads
        self.sampler = sampler if sampler is not None else NvmlSampler()
        self.http: Any = None
        self.grpc: Any = None
        self.metrics: Any = None
        self._threads: list[threading.Thread] = []
        self.bound: dict[str, int] = {}

    def start(self) -> dict[str, int]:
        """Connect to the broker and start the servers; returns the bound ports by name.

        Raises:
            OSError: a port cannot be bound. RuntimeError: gRPC without the ``triton`` extra.
        """
        from producer.gateway.http_server import GatewayHTTPServer

        self.gateway.start()
        try:
            p = self.ports
            if p.grpc >= 0:
                from producer.gateway.grpc_server import GatewayGRPCServer

                self.grpc = GatewayGRPCServer(
                    f"{_grpc_host(p.host)}:{p.grpc}", self.gateway, self.grpc_threads
                )
                self.grpc.start()
                self.bound["grpc"] = self.grpc.port
            if p.http >= 0:
                self.http = GatewayHTTPServer((p.host, p.http), self.gateway)
                self._serve(self.http, "gateway-http")
                self.bound["http"] = self.http.port
            if p.metrics >= 0:
                self.metrics = MetricsServer((p.host, p.metrics), self.collect_metrics)
                self._serve(self.metrics, "gateway-metrics")
                self.bound["metrics"] = self.metrics.port
        except BaseException:
            self.stop(grace_s=0.0)
            raise
        log.info(
            "gateway for model %r on %s: %s", self.gateway.config.model_name, self.ports.host, self.bound
        )
        return dict(self.bound)

    def collect_metrics(self) -> str:
        return render(self.sampler.sample(), self.gateway.model_statistics()["model_stats"])

    def _serve(self, server: Any, name: str) -> None:
        t = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True
        )
        t.start()
        self._threads.append(t)

    def write_endpoints(self, path: Path) -> None:
        """Record the bound ports (JSON: host, http, grpc, metrics, pid), written atomically."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"host": self.ports.host, **self.bound, "pid": os.getpid()}))
        tmp.replace(path)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish for ``grace_s``, then fail the rest."""
        if self.grpc is not None:
            self.grpc.server.stop(grace_s)  # refuses new RPCs at once; in-progress ones run on
        for server in (self.http, self.metrics):
            if server is not None:
                server.shutdown()  # stops the accept loop; handler threads keep running
                server.server_close()
        if grace_s > 0:
            _wait_idle(self.gateway, grace_s)
        self.gateway.stop()
        if self.grpc is not None:
            self.grpc.stop(1.0)
        for t in self._threads:
            t.join(2.0)


def _wait_idle(gateway: Gateway, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while gateway.bridge.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
