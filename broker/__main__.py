"""``broker`` (or ``python -m broker``): run the trackfleet broker until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import zmq

from broker.config import POLICIES, WHEN_FULL, BrokerConfig
from broker.errors import ConfigError
from broker.server import BrokerServer

log = logging.getLogger("broker")


def build_parser() -> argparse.ArgumentParser:
    d = BrokerConfig()
    p = argparse.ArgumentParser(
        prog="broker",
        description="Load-balance events from producers over reconstruction workers (trackfleet protocol v1).",
    )
    p.add_argument("--frontend", default=d.frontend, help="endpoint for producers (default %(default)s)")
    p.add_argument("--backend", default=d.backend, help="endpoint for workers (default %(default)s)")
    p.add_argument(
        "--policy", choices=POLICIES, default=d.policy, help="dispatch policy (default %(default)s)"
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue_events, help="queued events before 'full'")
    p.add_argument(
        "--max-queue-mb", type=float, default=d.max_queue_bytes / 2**20, help="queued MiB before 'full'"
    )
    p.add_argument(
        "--when-full", choices=WHEN_FULL, default=d.when_full, help="busy: answer BUSY; block: stop reading"
    )
    p.add_argument(
        "--max-event-mb", type=float, default=d.max_event_bytes / 2**20, help="largest event accepted [MiB]"
    )
    p.add_argument(
        "--heartbeat-ms", type=float, default=d.heartbeat_interval_s * 1e3, help="heartbeat period"
    )
    p.add_argument(
        "--liveness", type=int, default=d.heartbeat_liveness, help="missed heartbeats before expiry"
    )
    p.add_argument("--job-timeout-s", type=float, default=d.job_timeout_s, help="lease length per event [s]")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=d.max_attempts,
        help="worker deaths an event may cause before failing",
    )
    p.add_argument(
        "--drain-timeout-s", type=float, default=d.drain_timeout_s, help="shutdown drain limit [s]"
    )
    p.add_argument("--curve-secret", type=Path, help="broker CURVE secret key file (enables encryption)")
    p.add_argument("--curve-authorized", type=Path, help="directory of authorized client public keys")
    p.add_argument("--endpoints-file", type=Path, help="write the bound endpoints here as JSON")
    p.add_argument(
        "--io-threads", type=int, default=d.io_threads, help="ZeroMQ I/O threads (default %(default)s)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (0: any free port; default off)",
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="metrics bind address (default %(default)s)")
    p.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """The :class:`BrokerConfig` described by parsed arguments.

    Raises:
        ConfigError: invalid values.
    """
    return BrokerConfig(
        frontend=args.frontend,
        backend=args.backend,
        policy=args.policy,
        max_queue_events=args.max_queue,
        max_queue_bytes=int(args.max_queue_mb * 2**20),
        when_full=args.when_full,
        max_event_bytes=int(args.max_event_mb * 2**20),
        heartbeat_interval_s=args.heartbeat_ms / 1e3,
        heartbeat_liveness=args.liveness,
        job_timeout_s=args.job_timeout_s,
        max_attempts=args.max_attempts,
        drain_timeout_s=args.drain_timeout_s,
        curve_secret_file=args.curve_secret,
        curve_authorized_dir=args.curve_authorized,
        endpoints_file=args.endpoints_file,
        io_threads=args.io_threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``broker`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s broker[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
        server = BrokerServer(config)
        server.bind()
    except (ConfigError, zmq.ZMQError) as exc:
        log.error("cannot start: %s", exc)
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = None
    if args.metrics_port is not None:
        from metrics.broker import serve_broker_metrics

        metrics = serve_broker_metrics(server, args.metrics_port, args.metrics_addr)
    try:
        server.run()
    finally:
        server.close()
        if metrics is not None:
            metrics.stop()
    log.info("broker stopped: %s", server.state.counters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
