"""What the KServe gateway costs: perf_analyzer through the gateway against the fleet measured directly.

One fleet (a broker and ``--workers`` workers, CuPy on GPU 0 by default) serves both measurements, in turn:

1. **direct**: closed loops of N events in flight straight into the broker, for every N in
   ``--concurrency``: ``trackfleet perf --broker`` when that subcommand exists, else the producer client
   (a window of ``--window-s`` after a ramp; throughput = events completed in the window / its length);
2. **gateway**: Triton's perf_analyzer over gRPC (or HTTP, ``--protocol``) against ``trackfleet gateway`` on the same broker, one
   run per N (``--concurrency-range N:N``), fed the same events (``--input-data``, made by
   ``trackfleet gateway --export-perf-data``), with ``--collect-metrics`` from the gateway's metrics port.
   ``--shared-memory system`` has perf_analyzer pass the tensors through system shared memory
   (``/dev/shm``, the KServe extension the gateway implements): inputs are written there once and
   outputs come back there (``--output-shm-bytes`` per output), so no tensor crosses the socket.

The cost of the gateway at each N is ``1 - gateway / direct`` throughput; the verdict uses the saturated
throughput (the best N of each). The two sides take turns level by level (direct N, gateway N, direct
N', gateway N', ...), ``--rounds R`` times, and the medians over the rounds are compared per N: a host's
drift during the run then weighs on both sides alike (single runs at concurrency 1-2 moved by ~10%
between calls). Everything is warmed up first (CuPy compiles kernels per shape, and
batches of every size appear only under load).

``--gateway-timings`` runs the gateway under ``bench/gateway_latency.py --serve`` (the same gateway with
that script's phase timers wrapped around its functions) and reports, per N, the median of each phase of
the gateway's requests (``gateway_phases_ms`` in the summary): parse, decode, pack, ``to_reply`` (the
request handed to the broker thread until that thread holds the reply), ``wake`` (until the request's
thread goes on), output, ``write_shm``, respond, and the handler's total.

Writes to ``--out`` (at most 9 files): ``perf_analyzer.csv`` (perf_analyzer's rows, all N),
``trackfleet_perf.csv`` (``trackfleet perf``'s rows, when it ran), ``direct.csv`` (the direct side as
compared), ``summary.json``, ``summary.md``, ``perf_analyzer.log``, ``fleet.log``, and with
``--gateway-timings`` the raw ``gateway_timings.json``.

    python bench/gateway_perf.py --input .devdata/mu200-cells --workers 4 --batch 3 \\
        --perf-analyzer /tmp/site/perf_analyzer/bin/perf_analyzer --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.client import ClientConfig, FleetClient, PackedInput, load_inputs  # noqa: E402
from producer.launch import LocalFleet  # noqa: E402

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, required=True, help="events with their detector (e.g. mu=200)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default %(default)s)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="cupy")
    p.add_argument("--gpu", default="0", help="CUDA_VISIBLE_DEVICES of the workers (default %(default)s)")
    p.add_argument("--batch", type=int, default=3, help="worker dynamic batching (default %(default)s)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="events in flight, comma-separated")
    p.add_argument(
        "--rounds", type=int, default=1, help="measure every level this often, direct and gateway in turn"
    )
    p.add_argument("--perf-analyzer", default="/tmp/site/perf_analyzer/bin/perf_analyzer")
    p.add_argument("--window-s", type=float, default=5.0, help="measurement window [s] (both sides)")
    p.add_argument("--ramp-s", type=float, default=2.0, help="direct: settle time before each window [s]")
    p.add_argument("--warmup-s", type=float, default=25.0, help="warm-up at the highest concurrency [s]")
    p.add_argument("--stability", type=float, default=25.0, help="perf_analyzer --stability-percentage")
    p.add_argument(
        "--max-trials", type=int, default=4, help="perf_analyzer --max-trials (and perf's windows)"
    )
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="worker start-up limit [s]")
    p.add_argument("--ports", default="8000,8001,8002", help="gateway HTTP, gRPC, metrics ports")
    p.add_argument(
        "--protocol",
        choices=("grpc", "http"),
        default="grpc",
        help="perf_analyzer's protocol (default %(default)s)",
    )
    p.add_argument(
        "--shared-memory",
        choices=("none", "system"),
        default="none",
        help="perf_analyzer --shared-memory: 'system' passes inputs and outputs through /dev/shm "
        "(client and gateway on one host; default %(default)s)",
    )
    p.add_argument(
        "--output-shm-bytes",
        type=int,
        default=8 * 2**20,
        help="with --shared-memory system: perf_analyzer --output-shared-memory-size, bytes per output "
        "(a mu=200 event's largest output is a few MB; default %(default)s)",
    )
    p.add_argument(
        "--gateway-timings",
        action="store_true",
        help="run the gateway with bench/gateway_latency.py's phase timers and report the median of every "
        "phase of its requests per concurrency (summary's gateway_phases_ms)",
    )
    p.add_argument(
        "--direct",
        choices=("auto", "perf", "client"),
        default="auto",
        help="direct measurement: trackfleet perf, the producer client, or perf when it exists",
    )
    return p.parse_args(argv)


# --- direct measurement -----------------------------------------------------------------------------


def closed_loop(
    endpoint: str, events: list[PackedInput], concurrency: int, window_s: float, ramp_s: float
) -> dict[str, Any]:
    """N in flight for ramp + window; count the events that complete inside the window (as perf_analyzer)."""
    done: list[tuple[float, float]] = []  # (completion time, latency)
    failed = 0
    with FleetClient(ClientConfig(endpoint=endpoint, timeout_s=120.0)) as client:
        seq = 0
        start = time.monotonic()
        w0, w1 = start + ramp_s, start + ramp_s + window_s
        while True:
            now = time.monotonic()
            while now < w1 and client.in_flight < concurrency:
                ev = events[seq % len(events)]
                client.submit(seq, ev.event_id, ev.payload)
                seq += 1
            if now >= w1 and client.in_flight == 0:
                break
            if now > w1 + 180:
                break
            for r in client.poll(0.02):
                if r.ok:
                    done.append((time.monotonic(), r.latency_s))
                else:
                    failed += 1
    inside = sorted(lat for t, lat in done if w0 <= t <= w1)

    def pct(q: float) -> float | None:
        return round(inside[min(len(inside) - 1, int(q / 100 * len(inside)))] * 1e3, 2) if inside else None

    return {
        "concurrency": concurrency,
        "throughput_eps": round(len(inside) / window_s, 3),
        "events": len(inside),
        "failed": failed,
        "latency_p50_ms": pct(50),
        "latency_p99_ms": pct(99),
        "method": "producer client",
    }


def direct_with_trackfleet_perf(
    args: argparse.Namespace, frontend: str, levels: list[int], run: Path, name: str = "perf"
) -> list[dict[str, Any]] | None:
    """`trackfleet perf --broker` on the running fleet (its files under ``run / name``); None when it is
    not there or fails."""
    from producer.cli import SUBCOMMANDS

    if "perf" not in SUBCOMMANDS:
        return None
    out = run / name
    cmd = [
        sys.executable,
        "-m",
        "producer.cli",
        "perf",
        "--input",
        str(args.input),
        "--broker",
        frontend,
        "--concurrency",
        ",".join(map(str, levels)),
        "--output",
        str(out),
        "--window-s",
        str(args.window_s),
        "--stability",
        str(args.stability / 100),
        "--max-windows",
        str(args.max_trials),
        "--no-plots",
        "--max-duration-s",
        "200",
    ]
    say("direct: " + " ".join(cmd[2:]))
    try:
        with (run / "perf.stderr").open("w") as err:
            subprocess.run(cmd, cwd=ROOT, check=True, timeout=260, stdout=subprocess.DEVNULL, stderr=err)
        rows = list(csv.DictReader((out / "perf.csv").open()))
        # its own rows, beside perf_analyzer's: every run's, in order
        own = args.out / "trackfleet_perf.csv"
        earlier = list(csv.DictReader(own.open())) if own.exists() else []
        write_csv(own, earlier + [{**r, "run": name} for r in rows])
        return [
            {
                "concurrency": int(r["concurrency"]),
                "throughput_eps": float(r["throughput_eps"]),
                "events": int(r.get("events") or 0),
                "failed": int(r.get("failed") or 0),
                "latency_p50_ms": float(r["latency_p50_ms"]) if r.get("latency_p50_ms") else None,
                "latency_p99_ms": float(r["latency_p99_ms"]) if r.get("latency_p99_ms") else None,
                "stable": r.get("stable"),
                "method": "trackfleet perf",
            }
            for r in rows
            if r.get("mode", "concurrency") == "concurrency"
        ]
    except Exception as exc:  # an unfinished `trackfleet perf` must not lose the gateway measurement
        say(f"trackfleet perf unusable ({type(exc).__name__}: {exc}); using the producer client")
        return None


# --- gateway measurement ----------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_gateway(args: argparse.Namespace, frontend: str, run: Path) -> tuple[subprocess.Popen[bytes], dict]:
    http_port, grpc_port, metrics_port = (int(x) for x in args.ports.split(","))
    ep = run / "gateway.json"
    log = (run / "gateway.log").open("wb")
    # --gateway-timings: the gateway with gateway_latency.py's phase timers (bench code, not the product's)
    if args.gateway_timings:
        cmd = [sys.executable, str(ROOT / "bench" / "gateway_latency.py"), "--serve", "--root", str(ROOT)]
        cmd += ["--timings-file", str(args.out / "gateway_timings.json"), "--grpc-threads", "64"]
        cmd += ["--ports", args.ports, "--detector", str(args.input)]
    else:
        cmd = [sys.executable, "-m", "producer.gateway", "-v", "--detector", str(args.input)]
        cmd += [
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
        ]
    proc = subprocess.Popen(
        [*cmd, "--broker", frontend, "--endpoints-file", str(ep)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}; see {run}/gateway.log")
        if ep.exists():
            ports = json.loads(ep.read_text())
            try:
                if http_get(ports["http"], "/v2/health/ready")[0] == 200:
                    return proc, ports
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not become ready")
        time.sleep(0.2)


def _executable(path: str) -> None:
    """pip may unpack perf_analyzer's binary without its execute bit."""
    p = Path(path)
    if p.is_file() and not os.access(p, os.X_OK):
        p.chmod(p.stat().st_mode | 0o111)


def perf_analyzer(
    args: argparse.Namespace, ports: dict, data: Path, c: int, run: Path, log: Any, tag: str = ""
) -> list[dict[str, str]]:
    _executable(args.perf_analyzer)
    csv_path = run / f"pa_c{c}{tag}.csv"
    cmd = [
        args.perf_analyzer,
        "-m",
        "trackfleet",
        "-u",
        f"127.0.0.1:{ports[args.protocol]}",
        "-i",
        args.protocol,
        "--concurrency-range",
        f"{c}:{c}",
        "--input-data",
        str(data),
        "--measurement-interval",
        str(int(args.window_s * 1000)),
        "--stability-percentage",
        str(args.stability),
        "--max-trials",
        str(args.max_trials),
        "--collect-metrics",
        "--metrics-url",
        f"http://127.0.0.1:{ports['metrics']}/metrics",
        "--metrics-interval",
        "1000",
        "-f",
        str(csv_path),
        "--verbose-csv",  # the GPU metrics' columns are only in the verbose CSV
    ]
    if args.shared_memory != "none":
        cmd += [
            "--shared-memory",
            args.shared_memory,
            "--output-shared-memory-size",
            str(args.output_shm_bytes),
        ]
    say("perf_analyzer " + " ".join(cmd[1:]))
    log.write(f"\n$ {' '.join(cmd)}\n".encode())
    log.flush()
    budget = (args.max_trials + 2) * args.window_s * 1.3 + 60
    try:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=budget).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    log.write(f"[exit {rc}]\n".encode())
    if not csv_path.exists():
        say(f"perf_analyzer at concurrency {c}: no CSV (exit {rc})")
        return []
    return list(csv.DictReader(csv_path.open()))


# --- the run ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trackfleet_perf.csv").unlink(missing_ok=True)  # appended to by every direct run
    # SIGTERM (a time limit) still stops the fleet and writes the summary, through the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(x) for x in args.concurrency.split(",")]
    run = Path(tempfile.mkdtemp(prefix="gateway-perf-"))
    if args.backend == "cupy":
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    worker_args = ["--backend", args.backend, "--batch", str(args.batch)]
    fleet = LocalFleet(run / "fleet", worker_args=worker_args, detector=args.input)
    gateway = None
    summary: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "protocol": args.protocol,
        "shared_memory": args.shared_memory,
    }
    try:
        fleet.start_broker()
        fleet.start_workers(args.workers)
        say(f"fleet: broker {fleet.frontend}, {args.workers} {args.backend} workers (batch {args.batch})")
        events = load_inputs(args.input)
        from producer.gateway.perf_data import export_perf_data

        data = run / "perf_data.json"
        say(
            f"perf_analyzer data: {export_perf_data(args.input, data)} events, {data.stat().st_size / 2**20:.1f} MiB"
        )
        fleet.wait_ready(args.workers, timeout_s=args.ready_timeout_s)
        say("workers ready")
        gateway, ports = start_gateway(args, fleet.frontend, run)
        say(f"gateway ready: {ports}")
        warm = closed_loop(fleet.frontend, events, max(levels), args.warmup_s, 0.0)
        say(f"warm-up: {warm['throughput_eps']} events/s at concurrency {max(levels)}")

        direct, pa_rows = interleaved(args, fleet.frontend, events, levels, ports, data, run, summary)

        _, stats = http_get(ports["http"], "/v2/models/trackfleet/stats")
        summary["gateway_stats"] = json.loads(stats)
        summary["broker_stats"] = fleet.stats()
        summary.update(compare(direct, pa_rows))
        return 0 if summary.get("pass") else 1
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(20)
            except subprocess.TimeoutExpired:
                gateway.kill()
        fleet.stop(timeout_s=20)
        if args.gateway_timings:
            summary["gateway_phases_ms"] = phases_by_level(
                args.out / "gateway_timings.json", summary.get("gateway_windows", [])
            )
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        (args.out / "summary.md").write_text(markdown(summary))
        with (args.out / "fleet.log").open("w") as f:
            for log_path in sorted(run.rglob("*.log")) + sorted(run.rglob("*.stderr")):
                lines = log_path.read_text(errors="replace").splitlines()
                f.write(f"==> {log_path.relative_to(run)} ({len(lines)} lines, last 200) <==\n")
                f.write("\n".join(lines[-200:]) + "\n")
        say(f"wrote {sorted(p.name for p in args.out.iterdir())}")


def phases_by_level(timings: Path, windows: list[list[float]]) -> dict[str, dict[str, float]]:
    """Median [ms] of every phase the timed gateway recorded, over the requests of each concurrency (a
    request belongs to the perf_analyzer run whose span holds its start)."""
    if not timings.exists():
        return {}
    records = json.loads(timings.read_text())
    out: dict[str, dict[str, float]] = {}
    for c in sorted({int(w[0]) for w in windows}):
        spans = [(w[2], w[3]) for w in windows if int(w[0]) == c]
        mine = [r for r in records if any(a <= r.get("t0", -1.0) <= b for a, b in spans)]
        if not mine:  # perf_analyzer sent nothing at this level (it failed): no medians to give
            out[str(c)] = {"requests": 0}
            continue
        phases = sorted(
            {
                k
                for r in mine
                for k, v in r.items()
                if isinstance(v, float) and k not in ("t0", "t1") and not k.startswith(("_", "t0_"))
            }
        )
        out[str(c)] = {"requests": len(mine)} | {
            k: round(1e3 * statistics.median(r.get(k, 0.0) for r in mine), 3) for k in phases
        }
    return out


def direct_level(
    args: argparse.Namespace, frontend: str, events: list, levels: list[int], run: Path, name: str
) -> list[dict[str, Any]]:
    """The direct side at ``levels``: ``trackfleet perf`` where it can, else the producer client."""
    rows = (
        direct_with_trackfleet_perf(args, frontend, levels, run, name)
        if args.direct in ("auto", "perf")
        else None
    )
    if rows is None:
        rows = []
        for c in levels:
            rows.append(closed_loop(frontend, events, c, args.window_s * 2, args.ramp_s))
            say(f"direct c={c}: {rows[-1]['throughput_eps']} events/s, p50 {rows[-1]['latency_p50_ms']} ms")
    return rows


def interleaved(
    args: argparse.Namespace,
    frontend: str,
    events: list,
    levels: list[int],
    ports: dict,
    data: Path,
    run: Path,
    summary: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``--rounds`` rounds of: for every level, the direct side, then the gateway (rows carry ``round``)."""
    direct: list[dict[str, Any]] = []
    pa_rows: list[dict[str, str]] = []
    with (args.out / "perf_analyzer.log").open("wb") as log:
        for k in range(args.rounds):
            for c in levels:
                for r in direct_level(args, frontend, events, [c], run, f"perf_r{k}_c{c}"):
                    direct.append({**r, "round": k})
                    say(
                        f"round {k} direct c={c}: {r['throughput_eps']} events/s, p50 {r.get('latency_p50_ms')} ms"
                    )
                t0 = time.perf_counter()
                found = perf_analyzer(args, ports, data, c, run, log, f"_r{k}")
                summary.setdefault("gateway_windows", []).append([c, k, t0, time.perf_counter()])
                for r in found:
                    pa_rows.append({**r, "round": str(k)})
                    say(
                        f"round {k} gateway c={c}: {r.get('Inferences/Second')} infer/s, p50 {r.get('p50 latency')} us"
                    )
                # after every level: a run cut short keeps what it measured
                write_csv(args.out / "direct.csv", direct)
                if pa_rows:
                    write_csv(args.out / "perf_analyzer.csv", pa_rows)
                summary.update(compare(direct, pa_rows))
    return direct, pa_rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def compare(direct: list[dict[str, Any]], pa_rows: list[dict[str, str]]) -> dict[str, Any]:
    """Gateway against direct per concurrency: medians over the rounds where a level was measured more
    than once (with ``rounds``, the number of rounds that measured it, and each round's own cost)."""
    pa: dict[int, list[dict[str, str]]] = {}
    for r in pa_rows:
        if r.get("Concurrency"):
            pa.setdefault(int(r["Concurrency"]), []).append(r)
    by_level: dict[int, list[dict[str, Any]]] = {}
    for d in direct:
        by_level.setdefault(d["concurrency"], []).append(d)
    rows = []
    for c, ds in by_level.items():
        gs = pa.get(c, [])
        d_eps = _median([d["throughput_eps"] for d in ds])
        g_eps = _median([float(g["Inferences/Second"]) for g in gs])
        per_round = [
            round(1 - float(g["Inferences/Second"]) / d["throughput_eps"], 4)
            for d, g in zip(ds, gs, strict=False)
            if d["throughput_eps"]
        ]
        rows.append(
            {
                "concurrency": c,
                "rounds": len(ds),
                "direct_eps": d_eps,
                "gateway_eps": g_eps,
                "cost": round(1 - g_eps / d_eps, 4) if g_eps and d_eps else None,
                "cost_per_round": per_round if len(ds) > 1 else None,
                "direct_p50_ms": _median([d["latency_p50_ms"] for d in ds if d.get("latency_p50_ms")]),
                "direct_p99_ms": _median([d["latency_p99_ms"] for d in ds if d.get("latency_p99_ms")]),
                "gateway_p50_ms": _median(
                    [float(g["p50 latency"]) / 1e3 for g in gs if g.get("p50 latency")]
                ),
                "gateway_p99_ms": _median(
                    [float(g["p99 latency"]) / 1e3 for g in gs if g.get("p99 latency")]
                ),
                "gateway_gpu_utilization": gs[-1].get("Avg GPU Utilization") if gs else None,
            }
        )
    best_direct = max((r["direct_eps"] or 0.0 for r in rows), default=0.0)
    best_gateway = max((r["gateway_eps"] or 0.0 for r in rows), default=0.0)
    cost = round(1 - best_gateway / best_direct, 4) if best_direct else None
    costs = [r["cost"] for r in rows if r["cost"] is not None]
    return {
        "rows": rows,
        "direct_method": direct[0].get("method") if direct else None,
        "saturated_direct_eps": best_direct,
        "saturated_gateway_eps": best_gateway,
        "saturated_cost": cost,
        "largest_cost": max(costs) if costs else None,
        "pass": cost is not None and cost <= 0.10 and len(pa) == len(by_level),
    }


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"# Gateway cost: perf_analyzer ({s.get('protocol', 'grpc')}, shared memory "
        f"{s.get('shared_memory', 'none')}, through the gateway) vs the fleet directly",
        "",
        f"direct measurement: {s.get('direct_method')}; saturated throughput direct {s.get('saturated_direct_eps')} "
        f"events/s, gateway {s.get('saturated_gateway_eps')} events/s, cost {s.get('saturated_cost')} "
        f"(limit 0.10): {'PASS' if s.get('pass') else 'FAIL'}; largest cost at any concurrency "
        f"{s.get('largest_cost')}",
        "",
        "| concurrency | rounds | direct ev/s | gateway ev/s | cost | cost per round | direct p50/p99 ms "
        "| gateway p50/p99 ms | GPU util |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s.get("rows", []):
        lines.append(
            f"| {r['concurrency']} | {r.get('rounds', 1)} | {r['direct_eps']} | {r['gateway_eps']} | {r['cost']} | "
            f"{r.get('cost_per_round') or ''} | "
            f"{r['direct_p50_ms']}/{r['direct_p99_ms']} | {r['gateway_p50_ms']}/{r['gateway_p99_ms']} | "
            f"{r['gateway_gpu_utilization']} |"
        )
    phases = s.get("gateway_phases_ms") or {}
    if phases:
        keys = sorted({k for p in phases.values() for k in p if k != "requests"})
        lines += [
            "",
            "Gateway phases, median per request [ms] (--gateway-timings):",
            "",
            "| concurrency | requests | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 2) + "|",
        ]
        for c, p in phases.items():
            lines.append(
                f"| {c} | {p.get('requests')} | " + " | ".join(str(p.get(k, "")) for k in keys) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
