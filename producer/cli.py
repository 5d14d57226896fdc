"""The ``trackfleet`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``trackfleet --help`` stays fast and a
missing optional extra only breaks the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from producer.io.errors import InputError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("producer.sim.simulate", "generate events with ACTS (needs the 'sim' extra)"),
    "inspect": ("producer.inspect", "summarize the events of an input"),
    "reconstruct": ("worker.standalone", "run the reconstruction chain over an input in one process"),
    "demo": ("producer.demo", "bring up a local fleet, stream events through it, summarize, shut it down"),
    "up": ("producer.launch", "start a fleet under supervisord (broker, workers per GPU or CPU)"),
    "status": ("producer.launch", "show the fleet's programs and the broker's queue and workers"),
    "down": ("producer.launch", "stop the fleet started by 'trackfleet up'"),
    "perf": ("metrics.perf", "throughput / latency / GPU utilization sweeps, like Triton's perf_analyzer"),
    "gateway": ("producer.gateway.cli", "serve the fleet over KServe v2 (HTTP, gRPC) to Triton's clients"),
    "validate": (
        "producer.validate",
        "measure efficiency, fake and duplicate rates against simulation truth",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trackfleet", description="GPU track reconstruction served by a fleet of workers."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        importlib.import_module(module).add_arguments(p)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except InputError as exc:
        print(f"trackfleet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trackfleet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
