"""Broker alone: how many bytes of event data per second it forwards on loopback.

A real broker (``python -m broker``, TCP on 127.0.0.1) sits between a fake producer process and a fake
worker process. The producer keeps ``--window`` SUBMITs of ``--size-mb`` in flight (one preallocated
buffer, sent without copying); the fake workers register with ``--capacity`` credit each and answer
every JOB at once with a tiny RESULT. So the broker does exactly its production job (decode, queue,
lease, forward the payload frames untouched, route the reply) with no compute behind it.

Reported: event payload forwarded per second through the broker (GB/s, 1 GB = 1e9 bytes), events/s and
the broker's CPU use. Every process shares the machine: on a 2-core box the producer and the workers
compete with the broker for CPU, so this is a lower bound for the broker itself.

    python bench/broker_throughput.py [--size-mb 4 0.6] [--io-threads 1 2] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.protocol import (  # noqa: E402
    Job,
    Ready,
    Result,
    Submit,
    WorkResult,
    decode_producer,
    decode_worker,
    encode,
)


def fake_workers(endpoint: str, n: int, capacity: int, stop: Any) -> None:
    """``n`` DEALER workers in one process, answering every JOB immediately with a small RESULT."""
    ctx = zmq.Context()
    socks = []
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, f"fake-{os.getpid()}-{i}".encode())
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(endpoint)
        s.send_multipart(encode(Ready(capacity, {"name": f"fake-{i}"})))
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    tiny = b"t" * 64
    while not stop.is_set():
        for s, _ in poller.poll(100):
            for _ in range(64):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                msg = decode_worker(frames)
                if isinstance(msg, Job):
                    s.send_multipart(encode(WorkResult(msg.job, msg.epoch, {}, (tiny,))), copy=False)
    for s in socks:
        s.close()
    ctx.term()


def fake_producer(endpoint: str, size_bytes: int, window: int, duration_s: float, out: Any) -> None:
    """Closed loop with ``window`` events in flight; reports (events, bytes, seconds) after warm-up."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    payload = (b"event-header", np.ones(size_bytes // 8, np.float64))
    nbytes = payload[1].nbytes + len(payload[0])
    seq = 0
    inflight = 0
    warm_until = time.monotonic() + 1.0
    t0 = None
    done = 0
    end = warm_until + duration_s
    while True:
        now = time.monotonic()
        if t0 is None and now >= warm_until:
            t0, done = now, 0
        if now >= end:
            break
        while inflight < window:
            s.send_multipart(encode(Submit(seq, seq, payload)), copy=False)
            seq += 1
            inflight += 1
        if s.poll(100, zmq.POLLIN):
            for _ in range(window):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if isinstance(decode_producer(frames), Result):
                    inflight -= 1
                    done += 1
    elapsed = time.monotonic() - (t0 or warm_until)
    out.put((done, done * nbytes, elapsed))
    s.close()
    ctx.term()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(
    size_mb: float, workers: int, capacity: int, window: int, duration_s: float, io_threads: int = 2
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ep_file = Path(tmp) / "ep.json"
        broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "--frontend",
                "tcp://127.0.0.1:0",
                "--backend",
                "tcp://127.0.0.1:0",
                "--endpoints-file",
                str(ep_file),
                "--max-queue",
                str(4 * window),
                "--log-level",
                "WARNING",
                "--io-threads",
                str(io_threads),
            ],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 20
            while not ep_file.exists():
                if time.monotonic() > deadline or broker.poll() is not None:
                    raise RuntimeError("broker did not start")
                time.sleep(0.02)
            ep = json.loads(ep_file.read_text())
            ctx = mp.get_context("fork")
            stop = ctx.Event()
            out = ctx.Queue()
            w = ctx.Process(target=fake_workers, args=(ep["backend"], workers, capacity, stop))
            w.start()
            time.sleep(0.3)
            cpu0, t0 = cpu_seconds(broker.pid), time.monotonic()
            p = ctx.Process(
                target=fake_producer, args=(ep["frontend"], int(size_mb * 2**20), window, duration_s, out)
            )
            p.start()
            events, nbytes, elapsed = out.get(timeout=duration_s + 60)
            broker_cpu = (cpu_seconds(broker.pid) - cpu0) / (time.monotonic() - t0)
            p.join(10)
            stop.set()
            w.join(10)
        finally:
            broker.terminate()
            broker.wait(10)
    return {
        "size_mb": size_mb,
        "io_threads": io_threads,
        "workers": workers,
        "window": window,
        "events": events,
        "events_per_s": round(events / elapsed, 1),
        "gb_per_s": round(nbytes / elapsed / 1e9, 3),
        "broker_cpu_cores": round(broker_cpu, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, nargs="+", default=[4.0, 0.6, 0.0625], help="event payload [MiB]")
    p.add_argument("--workers", type=int, default=2, help="fake workers")
    p.add_argument("--capacity", type=int, default=4, help="credit per fake worker")
    p.add_argument("--window", type=int, default=16, help="events in flight at the producer")
    p.add_argument("--duration-s", type=float, default=5.0, help="measured time per size (after 1 s warm-up)")
    p.add_argument(
        "--io-threads",
        type=int,
        nargs="+",
        default=[2],
        help="broker ZeroMQ I/O threads to compare (default 2)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per variant, interleaved (report each)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows = [
        run_one(s, args.workers, args.capacity, args.window, args.duration_s, t)
        for _ in range(args.repeat)
        for s in args.size_mb
        for t in args.io_threads
    ]
    sys.stdout.write(
        f"{'payload MiB':>12} {'io threads':>10} {'events/s':>10} {'GB/s':>8} {'broker CPU':>11}\n"
    )
    for r in rows:
        sys.stdout.write(
            f"{r['size_mb']:>12.4g} {r['io_threads']:>10} {r['events_per_s']:>10.1f} {r['gb_per_s']:>8.3f}"
            f" {r['broker_cpu_cores']:>11.2f}\n"
        )
    result = {"benchmark": "broker_throughput", "cpus": os.cpu_count(), "results": rows}
    sys.stdout.write(json.dumps(result) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
