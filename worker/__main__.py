"""``worker`` (or ``python -m worker``): serve reconstruction to a broker until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from broker.errors import ConfigError
from broker.security import client_keys
from worker.config import BACKENDS, WorkerConfig, default_name
from worker.observer import WorkerObservers
from worker.service import WorkerService

log = logging.getLogger("worker")


def build_parser() -> argparse.ArgumentParser:
    d = WorkerConfig()
    p = argparse.ArgumentParser(prog="worker", description="trackfleet reconstruction worker (protocol v1).")
    p.add_argument("--connect", default=d.connect, help="the broker's worker endpoint (default %(default)s)")
    p.add_argument(
        "--detector", type=Path, default=None, help="detector directory (default: the bundled data set)"
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default=d.backend, help="array backend (default %(default)s)"
    )
    p.add_argument(
        "--device",
        type=int,
        default=d.device,
        help="CUDA device among the visible ones (default %(default)s)",
    )
    p.add_argument("--capacity", type=int, default=d.capacity, help="events held at once (0: 2 x batch)")
    p.add_argument("--batch", type=int, default=d.batch_max, help="dynamic batching: events per pass")
    p.add_argument(
        "--batch-wait-us", type=int, default=d.batch_wait_us, help="dynamic batching: max wait [us]"
    )
    p.add_argument("--preload", type=Path, help="keep this input's first event on the device, reuse it")
    p.add_argument(
        "--heartbeat-ms", type=float, default=d.heartbeat_interval_s * 1e3, help="heartbeat period"
    )
    p.add_argument(
        "--liveness", type=int, default=d.heartbeat_liveness, help="missed heartbeats before reconnect"
    )
    p.add_argument("--shutdown-timeout-s", type=float, default=d.shutdown_timeout_s, help="SIGTERM grace [s]")
    p.add_argument(
        "--simulate-compute-ms", type=float, default=0.0, help="extra sleep per event (tests) [ms]"
    )
    p.add_argument(
        "--warmup",
        default=d.warmup,
        help="auto (cupy: events beside the detector; numpy: synthetic), synthetic, none, or an event path",
    )
    p.add_argument("--no-warmup", action="store_true", help="same as --warmup none")
    p.add_argument(
        "--gpu-pool-limit-mb",
        type=int,
        default=d.gpu_pool_limit_mb,
        help="cupy: CuPy's pool (in use + cached) above which it releases its cache before growing; "
        "a batch needing more runs again without it and raises it [MiB] (0: none; default %(default)s)",
    )
    p.add_argument("--name", default=None, help="worker name (default host-pid)")
    p.add_argument("--curve-secret", type=Path, help="this worker's CURVE secret key file")
    p.add_argument("--curve-server-key", type=Path, help="the broker's CURVE public key file")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (0: any free port; default off)",
    )
    p.add_argument(
        "--metrics-port-offset",
        type=int,
        default=0,
        help="added to --metrics-port (under supervisord: %%(process_num)d, one port per instance)",
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="metrics bind address (default %(default)s)")
    p.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return p


def default_detector() -> Path:
    """The bundled data set, next to the package (source checkout) or in the current directory."""
    here = Path(__file__).resolve().parent.parent / "data" / "generic-mu20"
    return here if here.is_dir() else Path("data/generic-mu20")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The :class:`WorkerConfig` described by parsed arguments.

    Raises:
        ConfigError: invalid values.
    """
    return WorkerConfig(
        connect=args.connect,
        detector=args.detector or default_detector(),
        backend=args.backend,
        device=args.device,
        capacity=args.capacity,
        batch_max=args.batch,
        batch_wait_us=args.batch_wait_us,
        preload=args.preload,
        heartbeat_interval_s=args.heartbeat_ms / 1e3,
        heartbeat_liveness=args.liveness,
        shutdown_timeout_s=args.shutdown_timeout_s,
        simulate_compute_ms=args.simulate_compute_ms,
        warmup="none" if args.no_warmup else args.warmup,
        gpu_pool_limit_mb=args.gpu_pool_limit_mb,
        name=args.name or default_name(),
        keys=client_keys(args.curve_secret, args.curve_server_key),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``worker`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s worker[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    observers = WorkerObservers()
    if args.metrics_port is not None:
        from metrics.worker import serve_worker_metrics

        port = args.metrics_port + args.metrics_port_offset if args.metrics_port else 0
        serve_worker_metrics(observers, config.name, port, args.metrics_addr)
    service = WorkerService(config, observers=observers)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d: finishing in-flight events and leaving", signum)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.start()
    except Exception as exc:
        log.error("%s", exc)
        service.stop()
        logging.shutdown()
        os._exit(3)  # the compute thread may hold the device; do not wait for it
    clean = service.wait()
    if not clean:
        logging.shutdown()
        os._exit(1)  # a stuck compute thread cannot be joined; leave without terminating the context
    service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
