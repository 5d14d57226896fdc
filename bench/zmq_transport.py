"""Round trip of one large message over ZeroMQ tcp:// loopback and ipc:// (Unix sockets), one host.

What a fleet on one host pays per hop for an event of a given size: an echoing ROUTER in a thread and
a DEALER sending the message and waiting for it back, zero-copy on both sides, median over
``--rounds`` after ``--warmup`` rounds, the transports taking turns ``--repeat`` times.

    python bench/zmq_transport.py --size-mb 5.3 1.6 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import zmq


def round_trips(ctx: zmq.Context, endpoint: str, payload: bytes, rounds: int, warmup: int) -> list[float]:
    ready = threading.Event()
    bound: list[str] = []

    def echo() -> None:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(endpoint)  # tcp://127.0.0.1:* picks a free port
        bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        ready.set()
        try:
            for _ in range(rounds + warmup):
                sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
        finally:
            sock.close(linger=2000)  # the last echo must still leave

    server = threading.Thread(target=echo, daemon=True)
    server.start()
    if not ready.wait(10):
        raise RuntimeError(f"the echo socket did not bind {endpoint}")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.RCVTIMEO, 10_000)  # a lost message fails the run instead of hanging it
    client.connect(bound[0])
    times = []
    try:
        for i in range(rounds + warmup):
            t0 = time.perf_counter()
            client.send(payload, copy=False)
            client.recv(copy=False)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        client.close(linger=0)
        server.join(10)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, nargs="+", default=[5.3], help="message sizes [MB]")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="turns per transport, interleaved")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    ctx = zmq.Context(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="tf-zmq-") as tmp:
        for size in args.size_mb:
            payload = os.urandom(int(size * 1e6))
            for turn in range(args.repeat):
                for transport, endpoint in (
                    ("tcp", "tcp://127.0.0.1:*"),
                    ("ipc", f"ipc://{tmp}/echo{turn}.ipc"),
                ):
                    ms = (
                        statistics.median(round_trips(ctx, endpoint, payload, args.rounds, args.warmup)) * 1e3
                    )
                    results.append(
                        {"size_mb": size, "transport": transport, "turn": turn, "median_ms": round(ms, 3)}
                    )
                    print(f"{size:6.2f} MB  {transport}  turn {turn}: round trip {ms:7.3f} ms", flush=True)
    ctx.term()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
