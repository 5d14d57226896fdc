"""``producer`` (or ``python -m producer``): stream events through a trackfleet broker.

Open loop: ``producer --events DIR --rate 50 [--poisson]``; closed loop: ``producer --events DIR
--concurrency 8``. ``--count`` / ``--duration`` bound the run, ``--output DIR`` writes the returned tracks
as CSV (the format of ``trackfleet reconstruct``). Prints throughput, latency percentiles and the
ok / failed / busy / retried / lost counts (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from broker.errors import ConfigError
from broker.security import client_keys
from producer.client import ClientConfig, FleetClient, ProducerRun, RunConfig, TracksWriter, load_inputs
from producer.io.errors import InputError
from producer.sharded import ShardedClient, endpoints_of

log = logging.getLogger("producer")


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """Connection and retry options shared by ``producer`` and ``trackfleet demo``."""
    d = ClientConfig()
    p.add_argument(
        "--connect",
        default=d.endpoint,
        help="the broker's producer endpoint, or several separated by commas: events are shared among "
        "those brokers (default %(default)s)",
    )
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="resend after this long [s]")
    p.add_argument(
        "--retries", type=int, default=d.max_retries, help="resends to a silent broker before an event fails"
    )
    p.add_argument("--deadline-s", type=float, default=None, help="give up on an event after this long [s]")
    p.add_argument("--max-busy", type=int, default=0, help="BUSY replies before an event fails (0: never)")
    p.add_argument("--curve-secret", type=Path, help="this producer's CURVE secret key file")
    p.add_argument("--curve-server-key", type=Path, help="the broker's CURVE public key file")


def client_config_from_args(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(
        endpoint=args.connect,
        timeout_s=args.timeout_s,
        max_retries=args.retries,
        deadline_s=args.deadline_s,
        max_busy=args.max_busy,
        keys=client_keys(args.curve_secret, args.curve_server_key),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="producer", description="Stream events through a trackfleet broker.")
    p.add_argument("--events", required=True, help="event directory, cells file, multi-event CSV or .tfev")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: events per second")
    mode.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: events in flight (default 4)"
    )
    p.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    p.add_argument("--count", type=int, help="events to send (default: each input event once)")
    p.add_argument("--duration", type=float, help="send for this many seconds, cycling the input")
    p.add_argument("--output", type=Path, help="write returned tracks here (CSV)")
    p.add_argument("--detector", type=Path, help="detector directory (default: beside the events)")
    p.add_argument("--max-in-flight", type=int, default=1024, help="open loop: outstanding events cap")
    p.add_argument("--drain-timeout-s", type=float, default=60.0, help="wait for replies after the last send")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    add_client_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``producer`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s producer %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        run_cfg = RunConfig(
            rate_hz=args.rate,
            poisson=args.poisson,
            concurrency=args.concurrency or 4,
            count=args.count,
            duration_s=args.duration,
            drain_timeout_s=args.drain_timeout_s,
            max_in_flight=args.max_in_flight,
            progress=not args.no_progress and not args.json,
        )
        client_cfg = client_config_from_args(args)
        endpoints = endpoints_of(args.connect)
        events = load_inputs(args.events, args.detector, limit=args.count if args.duration is None else None)
    except (ConfigError, InputError) as exc:
        sys.stderr.write(f"producer: error: {exc}\n")
        return 2
    writer = TracksWriter(args.output) if args.output else None
    client = (
        FleetClient(replace(client_cfg, endpoint=endpoints[0]))
        if len(endpoints) == 1
        else ShardedClient(client_cfg, endpoints)
    )
    with client:
        summary = ProducerRun(client, events, run_cfg, on_reply=writer).run()
    if writer is not None:
        writer.close()
    if args.json:
        sys.stdout.write(json.dumps(summary.to_dict()) + "\n")
    else:
        sys.stdout.write(summary.format() + "\n")
    return 0 if summary.events_failed == 0 and summary.events_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
