"""``trackfleet demo``: bring up a local fleet, stream events through it, summarize, shut it down.

The fleet is a broker and ``--workers`` numpy workers started as subprocesses on loopback (random free
ports), so the demo works on a fresh machine after ``pip install -e .`` without a GPU or supervisord.
Tracks are written as CSV (to ``--output`` or a temporary directory) and, when the input carries
simulation truth, scored with :func:`producer.validate.validate`.

``--json`` prints one object with at least ``events_sent``, ``events_ok``, ``events_failed``,
``events_lost``, ``events_per_s``, ``latency_ms`` (``p50``, ``p99`` ...) and, with truth, ``efficiency``,
``fake_rate`` and ``duplicate_rate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=Path, default=None, help="event directory (default: the bundled events)")
    p.add_argument("--workers", type=int, default=2, help="numpy worker processes (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=None, help="events in flight (default 2 per worker)")
    p.add_argument("--count", type=int, default=None, help="events to send (default: each input event once)")
    p.add_argument("--output", type=Path, default=None, help="write tracks here (default: a temporary dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout-s", type=float, default=120.0, help="give up on the fleet after this long")


def _physics(input_dir: Path, tracks_dir: Path) -> dict[str, Any]:
    from producer.io.events import discover

    if not any(s.has_truth for s in discover(input_dir)):
        return {"note": "no simulation truth in the input: efficiency / fake / duplicate rates not computed"}
    try:
        from producer.validate import validate
    except ImportError as exc:
        return {"note": f"physics validation unavailable (producer.validate cannot be imported: {exc})"}
    try:
        r = validate(input_dir, tracks_dir)
    except Exception as exc:  # validation is a report, not a reason to fail the fleet demo
        log.warning("validation failed: %s", exc)
        return {"note": f"validation failed: {exc}"}
    return {k: r.get(k) for k in ("efficiency", "fake_rate", "duplicate_rate")}


def demo(
    input_dir: Path,
    n_workers: int,
    output: Path,
    run_dir: Path,
    concurrency: int | None = None,
    count: int | None = None,
    timeout_s: float = 120.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns the summary dict.

    Raises:
        RuntimeError: the fleet did not come up.
        InputError: unreadable input.
    """
    from producer.client import ClientConfig, FleetClient, ProducerRun, RunConfig, TracksWriter, load_inputs
    from producer.launch import LocalFleet

    t0 = time.monotonic()
    fleet = LocalFleet(run_dir, detector=input_dir)
    try:
        fleet.start_broker()
        fleet.start_workers(n_workers)
        events = load_inputs(input_dir, limit=count)  # parse and pack while the workers warm up
        fleet.wait_ready(n_workers, timeout_s=min(timeout_s, 60.0))
        t_up = time.monotonic() - t0
        writer = TracksWriter(output)
        run_cfg = RunConfig(
            concurrency=concurrency or 2 * n_workers,
            count=count if count is not None else len(events),
            drain_timeout_s=timeout_s,
            progress=progress,
        )
        with FleetClient(ClientConfig(endpoint=fleet.frontend)) as client:
            summary = ProducerRun(client, events, run_cfg, on_reply=writer).run()
        writer.close()
        stats = fleet.stats() or {}
    finally:
        fleet.stop()
    result: dict[str, Any] = {
        **summary.to_dict(),
        "workers": n_workers,
        "fleet_startup_s": round(t_up, 3),
        "tracks_dir": str(output),
        "broker": {
            k: stats.get("counters", {}).get(k) for k in ("received", "completed", "requeued", "failed")
        },
    }
    if writer.errors:
        result["write_errors"] = writer.errors[:10]
    result.update(_physics(input_dir, output))
    return result


def _format(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]

    def pct(x: Any) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"trackfleet demo: {r['workers']} workers (up in {r['fleet_startup_s']:.2f} s)",
        f"  events: sent {r['events_sent']}, ok {r['events_ok']}, failed {r['events_failed']}, lost {r['events_lost']}",
        f"  throughput: {r['events_per_s']:.1f} events/s",
        "  latency: "
        + ("n/a" if lat["p50"] is None else f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"),
    ]
    if "efficiency" in r:
        lines.append(
            f"  physics: efficiency {pct(r['efficiency'])}, fake rate {pct(r['fake_rate'])}, "
            f"duplicate rate {pct(r['duplicate_rate'])}"
        )
    if "note" in r:
        lines.append(f"  note: {r['note']}")
    lines.append(f"  tracks: {r['tracks_dir'] or '(temporary directory, removed)'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from producer.launch import bundled_data_dir

    input_dir = (args.input or bundled_data_dir()).resolve()
    if args.workers < 1:
        sys.stderr.write("trackfleet demo: error: --workers must be >= 1\n")
        return 2
    with tempfile.TemporaryDirectory(prefix="trackfleet-demo-") as tmp:
        output = args.output or Path(tmp) / "tracks"
        try:
            r = demo(
                input_dir,
                args.workers,
                output,
                Path(tmp) / "run",
                args.concurrency,
                args.count,
                args.timeout_s,
                progress=not args.json,
            )
        except RuntimeError as exc:
            sys.stderr.write(f"trackfleet demo: error: {exc}\n")
            return 1
        if args.output is None:
            r["tracks_dir"] = None  # removed with the temporary directory
        if args.json:
            sys.stdout.write(json.dumps(r) + "\n")
        else:
            sys.stdout.write(_format(r) + "\n")
    return 0 if r["events_failed"] == 0 and r["events_lost"] == 0 else 1
