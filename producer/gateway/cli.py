"""``trackfleet gateway`` (or ``python -m producer.gateway``): KServe v2 over HTTP and gRPC in front of a broker.

    trackfleet gateway --broker tcp://127.0.0.1:5555 [--host 127.0.0.1] [--http-port 8000]
                       [--grpc-port 8001] [--metrics-port 8002] [--model-name trackfleet]
                       [--detector DIR] [--max-request-mb 256] [--request-timeout-s 300]
    trackfleet gateway --export-perf-data INPUT OUT.json [--events N]

Runs until SIGTERM / SIGINT, then stops accepting, lets requests in progress finish (``--grace-s``) and
exits. ``--export-perf-data`` only writes perf_analyzer's ``--input-data`` file for the events of INPUT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger("producer.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from producer.launch import DEFAULT_FRONTEND

    p.add_argument(
        "--broker", default=DEFAULT_FRONTEND, help="the broker's producer endpoint (default %(default)s)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; 0.0.0.0: all)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe HTTP port (0: any free, -1: off)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe gRPC port (0: any free, -1: off)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (0: any free, -1: off)")
    p.add_argument("--model-name", default="trackfleet", help="the model's name (default %(default)s)")
    p.add_argument(
        "--detector",
        type=Path,
        help="stamp events with this detector's fingerprint (workers of another detector refuse them)",
    )
    p.add_argument("--max-request-mb", type=float, default=256.0, help="largest request [MiB]")
    p.add_argument(
        "--request-timeout-s", type=float, default=300.0, help="fail a request after this long [s]"
    )
    p.add_argument("--max-in-flight", type=int, default=1024, help="requests held at once; more get 503")
    p.add_argument("--grpc-threads", type=int, default=64, help="gRPC requests served at once")
    p.add_argument(
        "--pack-threads",
        type=int,
        help="threads that check and pack a request while it is the only one being packed (default: "
        "3 with 4 or more usable cores, 2 with 2-3, else 1)",
    )
    p.add_argument(
        "--grace-s", type=float, default=10.0, help="on SIGTERM, time for requests in progress [s]"
    )
    p.add_argument("--endpoints-file", type=Path, help="write the bound ports here (JSON)")
    p.add_argument("--curve-secret", type=Path, help="the gateway's CURVE secret key file")
    p.add_argument("--curve-server-key", type=Path, help="the broker's CURVE public key file")
    p.add_argument(
        "--export-perf-data",
        nargs=2,
        metavar=("INPUT", "OUT"),
        help="write perf_analyzer --input-data JSON for the events of INPUT to OUT, then exit",
    )
    p.add_argument("--events", type=int, help="with --export-perf-data: at most N events")


def run(args: argparse.Namespace) -> int:
    if args.export_perf_data:
        from producer.gateway.perf_data import export_perf_data

        src, out = args.export_perf_data
        n = export_perf_data(src, out, args.events)
        print(f"wrote {n} events to {out}")
        return 0
    from broker.security import client_keys
    from producer.client import ClientConfig
    from producer.gateway.app import GatewayApp, Ports
    from producer.gateway.service import GatewayConfig

    try:
        config = GatewayConfig(
            broker=args.broker,
            model_name=args.model_name,
            detector=args.detector,
            max_request_bytes=int(args.max_request_mb * 2**20),
            request_timeout_s=args.request_timeout_s,
            max_in_flight=args.max_in_flight,
            pack_threads=args.pack_threads,
            client=ClientConfig(keys=client_keys(args.curve_secret, args.curve_server_key)),
        )
    except ValueError as exc:
        print(f"trackfleet gateway: error: {exc}", file=sys.stderr)
        return 2
    app = GatewayApp(
        config,
        Ports(args.host, args.http_port, args.grpc_port, args.metrics_port),
        grpc_threads=args.grpc_threads,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        bound = app.start()
    except (OSError, RuntimeError) as exc:
        print(f"trackfleet gateway: error: {exc}", file=sys.stderr)
        return 1
    if args.endpoints_file:
        app.write_endpoints(args.endpoints_file)
    log.warning(
        "serving model %r (broker %s) on %s: %s",
        config.model_name,
        config.broker,
        args.host,
        ", ".join(f"{k} {v}" for k, v in bound.items()),
    )
    while not stop.wait(0.5):
        pass
    app.stop(grace_s=args.grace_s)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m producer.gateway``."""
    from producer.cli import setup_logging

    p = argparse.ArgumentParser(prog="python -m producer.gateway", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    add_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return run(args)
