"""``python -m metrics``: the node exporter: every GPU of this machine over Prometheus' HTTP, from NVML.

    python -m metrics [--port 9501] [--addr 127.0.0.1] [--once]

One per node (``trackfleet up`` supervises it as ``[program:exporter]``). Without pynvml, a driver or a GPU it
still serves ``trackfleet_gpu_available 0`` (and the process metrics), so a CPU node's target stays up.
``--once`` prints the exposition text to stdout and exits (a quick check on a new machine).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from prometheus_client import ProcessCollector, generate_latest

from metrics.exposition import DEFAULT_ADDR, MetricsServer, new_registry
from metrics.gpu import GpuCollector

log = logging.getLogger("metrics")

DEFAULT_PORT = 9501


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    p.add_argument("--addr", default=DEFAULT_ADDR, help="bind address (default %(default)s)")
    p.add_argument("--once", action="store_true", help="print the metrics once to stdout and exit")
    p.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s exporter[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    registry = new_registry()
    registry.register(GpuCollector())
    ProcessCollector(registry=registry)
    if args.once:
        sys.stdout.write(generate_latest(registry).decode())
        return 0
    server = MetricsServer(registry, args.port, args.addr).start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
