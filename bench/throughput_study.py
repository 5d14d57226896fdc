"""Throughput of the whole fleet on GPUs: broker + N CuPy workers per GPU + a closed-loop producer.

For every (instances per GPU, dynamic batch) pair: bring up a local fleet (broker and workers as
processes, workers spread over ``--gpus``), warm it up, then keep ``2 x workers x batch`` events in
flight for ``--seconds`` and measure events/s, latency percentiles, GPU utilization (NVML, sampled),
GPU memory per worker process and host memory per process. The best pair is then measured at low
load (one event in flight: p50 latency) and its tracks are validated against the simulation truth.

The pairs are the whole ``--instances`` x ``--batch`` grid, or exactly those listed with
``--pairs 8x8 4x16`` (instances per GPU x batch).

``--mps`` runs the workers under the NVIDIA CUDA Multi-Process Service, so that kernels of several
workers on one GPU run concurrently instead of time-slicing. For every pair a private MPS control
daemon is started (``nvidia-cuda-mps-control -d``, pipe and log directories under that pair's run
directory, ``CUDA_VISIBLE_DEVICES`` = ``--gpus``) and stopped after the fleet (``echo quit |
nvidia-cuda-mps-control``). MPS remaps the daemon's visible devices, so the workers get the same
``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``, no ``CUDA_VISIBLE_DEVICES`` and
``--device`` = the GPU's position in ``--gpus``. Without the binary, if the daemon does not start,
or if no MPS server serves the workers once they are up, the study stops with an error (exit 2)
rather than measuring without MPS. Every grid row and the result carry ``"mps"``.

Writes ``throughput-<card>-<gpus>gpu-mu<mu>[-mps][-broker-per-gpu].json`` (keys: card, gpus, mu, mps,
events_per_s, instances_per_gpu, batch, latency_ms_p50, latency_ms_p99, gpu_utilization, commit, date,
command, plus the whole grid, memory and physics) into ``--out``. ``latency_parts_ms_low_load`` splits
the low-load latency (one event in flight) into medians of the broker queue, the worker's own parts
(queue, decode, each stage, packing, ``worker``) and ``outside_worker`` (latency minus the worker's
time: the hops producer -> broker -> worker and back).

    python bench/throughput_study.py --input .devdata/mu200 --mu 200 --gpus 0 --instances 4 8 --batch 2 4
    python bench/throughput_study.py --input .devdata/mu200 --mu 200 --gpus 0 --pairs 8x8 4x16 --mps
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.client import ClientConfig, FleetClient, ProducerRun, RunConfig, TracksWriter, load_inputs  # noqa: E402
from producer.launch import LocalFleet  # noqa: E402
from producer.sharded import ShardedClient  # noqa: E402


class GpuSampler(threading.Thread):
    """Samples NVML utilization and per-process memory every ``interval_s`` while running."""

    def __init__(self, gpus: list[int], interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.gpus, self.interval_s = gpus, interval_s
        self.util: list[float] = []
        self.proc_mem: dict[int, int] = {}
        self.card = "cpu"
        self._halt = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(g) for g in gpus]
            name = pynvml.nvmlDeviceGetName(self.handles[0])
            self.card = (name.decode() if isinstance(name, bytes) else name).replace("NVIDIA ", "").split()[0]
        except Exception:
            self.nvml = None
            self.handles = []

    def run(self) -> None:
        while not self._halt.is_set() and self.nvml is not None:
            vals = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0 for h in self.handles]
            self.util.append(statistics.fmean(vals))
            for h in self.handles:
                procs = list(self.nvml.nvmlDeviceGetComputeRunningProcesses(h))
                with contextlib.suppress(Exception):  # under MPS the clients (workers) are listed here
                    procs += list(self.nvml.nvmlDeviceGetMPSComputeRunningProcesses(h))
                for p in procs:
                    self.proc_mem[p.pid] = max(self.proc_mem.get(p.pid, 0), int(p.usedGpuMemory or 0))
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def connect(endpoint: str | list[str]) -> FleetClient | ShardedClient:
    """A client of one broker, or one sharing its events among several."""
    if isinstance(endpoint, str):
        return FleetClient(ClientConfig(endpoint=endpoint))
    return ShardedClient(ClientConfig(), endpoint)


class LatencyParts:
    """Where the time of each event of a run went (an ``on_reply`` hook): the reply's end-to-end
    latency, its time in the broker's queue and the worker's own timings (queue, decode, each stage,
    packing, all of the worker); ``outside_worker`` is latency minus the worker's time: the hops
    producer -> broker -> worker and back."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def __call__(self, reply: Any) -> None:
        if reply.ok and reply.timings:
            self.rows.append({"latency_s": reply.latency_s, "broker_queue_s": reply.queue_s, **reply.timings})

    def medians_ms(self) -> dict[str, float]:
        """Median of every part over the run [ms] (keys without the ``_s``)."""
        keys = sorted({k for r in self.rows for k in r})
        out = {
            k.removesuffix("_s") + "_ms": round(
                float(np.median([r[k] for r in self.rows if k in r])) * 1e3, 3
            )
            for k in keys
        }
        outside = [r["latency_s"] - r["worker_s"] for r in self.rows if "worker_s" in r]
        if outside:
            out["outside_worker_ms"] = round(float(np.median(outside)) * 1e3, 3)
        return out


def measure(
    endpoint: str | list[str],
    events: list,
    concurrency: int,
    seconds: float,
    tracks_dir: str | None = None,
    on_reply: Any = None,
) -> dict:
    writer = TracksWriter(tracks_dir) if tracks_dir else None
    with connect(endpoint) as client:
        run = ProducerRun(
            client,
            events,
            RunConfig(
                concurrency=concurrency,
                duration_s=None if tracks_dir else seconds,
                count=len(events) if tracks_dir else None,
                progress=False,
            ),
            on_reply=writer if writer is not None else on_reply,
        )
        summary = run.run()
    if writer is not None:
        writer.close()
    return summary.to_dict()


def _producer_process(endpoint: str | list[str], inputs: str, concurrency: int, seconds: float) -> dict:
    """One closed-loop producer process of :func:`measure_parallel` (spawned: loads its own events)."""
    cpu0 = time.process_time()
    events = load_inputs(inputs)
    with connect(endpoint) as client:
        summary = ProducerRun(
            client, events, RunConfig(concurrency=concurrency, duration_s=seconds, progress=False)
        ).run()
    return {**summary.to_dict(), "latencies_s": summary.latencies_s, "cpu_s": time.process_time() - cpu0}


def measure_parallel(
    endpoint: str | list[str], inputs: str, concurrency: int, seconds: float, producers: int
) -> dict:
    """Like :func:`measure` with ``producers`` processes sharing ``concurrency``: one Python producer
    tops out near one core (~750 small events/s), which would cap the fleet it measures."""
    ctx = multiprocessing.get_context("spawn")
    share = [concurrency // producers + (1 if i < concurrency % producers else 0) for i in range(producers)]
    with ctx.Pool(producers) as pool:
        parts = pool.starmap(_producer_process, [(endpoint, inputs, c, seconds) for c in share if c > 0])
    lat = np.asarray([x for p in parts for x in p["latencies_s"]]) * 1e3
    elapsed = max(p["elapsed_s"] for p in parts)
    ok = sum(p["events_ok"] for p in parts)
    return {
        "events_ok": ok,
        "events_failed": sum(p["events_failed"] for p in parts),
        "events_lost": sum(p["events_lost"] for p in parts),
        "events_per_s": round(ok / elapsed, 3) if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
            "p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        },
        "cpu_s": sum(p["cpu_s"] for p in parts),
    }


MPS_CONTROL = "nvidia-cuda-mps-control"


class MpsError(RuntimeError):
    """MPS was asked for but is not available or not in use."""

    @staticmethod
    def missing() -> str:
        return f"--mps: {MPS_CONTROL} is not on PATH (NVIDIA driver utilities); refusing to run without MPS"


class Mps:
    """A private MPS control daemon for one fleet: pipe and log directories under ``run_dir``."""

    def __init__(self, run_dir: Path, gpus: list[int]) -> None:
        self.binary = shutil.which(MPS_CONTROL)
        if self.binary is None:
            raise MpsError(MpsError.missing())
        self.pipe_dir, self.log_dir = run_dir / "mps-pipe", run_dir / "mps-log"
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.client_env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }
        self.env = {**os.environ, **self.client_env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        self.started = False

    def _control(self, command: str | None, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        args = [self.binary, "-d"] if command is None else [self.binary]
        stdin = None if command is None else command + "\n"  # as `echo quit | nvidia-cuda-mps-control`
        return subprocess.run(
            args, input=stdin, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def start(self, timeout_s: float = 10.0) -> None:
        r = self._control(None)
        self.started = True  # quit in any case from here on
        if r.returncode != 0:
            raise MpsError(
                f"--mps: '{MPS_CONTROL} -d' failed ({r.returncode}): {(r.stderr or r.stdout).strip()}"
            )
        deadline = time.monotonic() + timeout_s
        while not (self.pipe_dir / "control").exists():  # the daemon's socket
            if time.monotonic() > deadline:
                raise MpsError(
                    f"--mps: the MPS control daemon did not come up; see {self.log_dir}/control.log"
                )
            time.sleep(0.05)

    def check_serving(self) -> None:
        """Raise unless an MPS server runs (spawned when the first worker initialized CUDA)."""
        r = self._control("get_server_list")
        if r.returncode != 0 or not r.stdout.split():
            raise MpsError(
                f"--mps: no MPS server is running once the workers are up (the workers did not use MPS; "
                f"GPU backend? see {self.log_dir}/control.log and server.log)"
            )

    def quit(self) -> None:
        if self.started:
            self.started = False
            try:
                r = self._control("quit")
                if r.returncode != 0:
                    print(f"warning: MPS quit failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
            except subprocess.TimeoutExpired:
                print("warning: MPS quit timed out", file=sys.stderr)


@contextlib.contextmanager
def worker_environment(mps: Mps | None) -> Iterator[None]:
    """Give the workers (LocalFleet passes ``os.environ`` on) the MPS client environment."""
    if mps is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.update(mps.client_env)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # MPS remaps the daemon's devices to 0..n-1
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_pair(text: str) -> tuple[int, int]:
    """``8x16`` -> (8 instances per GPU, batch 16)."""
    try:
        n, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INSTANCESxBATCH such as 8x8, got {text!r}") from None
    if n < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"instances and batch must be >= 1, got {text!r}")
    return n, b


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (from /proc; None where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="events (CSV directory with detector files)")
    ap.add_argument("--mu", type=int, required=True, help="pile-up of the input (for the file name)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--instances", type=int, nargs="+", default=None, help="worker processes per GPU (default 4)"
    )
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="dynamic batch sizes (default 2)")
    ap.add_argument(
        "--pairs",
        type=parse_pair,
        nargs="+",
        default=None,
        metavar="NxB",
        help="measure exactly these (instances per GPU x batch) pairs instead of the --instances x --batch grid",
    )
    ap.add_argument("--mps", action="store_true", help="run the workers under the CUDA Multi-Process Service")
    ap.add_argument(
        "--broker-per-gpu",
        action="store_true",
        help="one broker per GPU (each GPU's workers behind their own broker; the producers share events "
        "among them, producer/sharded.py)",
    )
    ap.add_argument(
        "--ipc",
        action="store_true",
        help="brokers bind ipc:// endpoints (Unix sockets) instead of tcp://127.0.0.1: everything runs on "
        "one host, and large events cross faster",
    )
    ap.add_argument("--seconds", type=float, default=12.0, help="measurement window [s]")
    ap.add_argument(
        "--producers", type=int, default=1, help="closed-loop producer processes sharing the load (default 1)"
    )
    ap.add_argument("--warmup-s", type=float, default=4.0)
    ap.add_argument("--backend", default="cupy")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if args.pairs is not None and (args.instances is not None or args.batch is not None):
        ap.error("--pairs replaces --instances/--batch; give one or the other")
    pairs = args.pairs or [(n, b) for n in args.instances or [4] for b in args.batch or [2]]
    if args.mps and shutil.which(MPS_CONTROL) is None:
        print(f"error: {MpsError.missing()}", file=sys.stderr)
        return 2
    try:
        return study(args, pairs)
    except MpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def study(args: argparse.Namespace, pairs: list[tuple[int, int]]) -> int:
    events = load_inputs(args.input)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    grid: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    # GPU groups behind one broker each: all GPUs, or one per GPU
    groups = [[i] for i in range(len(args.gpus))] if args.broker_per_gpu else [list(range(len(args.gpus)))]
    for n, b in pairs:
        run_dir = Path(tempfile.mkdtemp(prefix="tf-study-"))
        fleets = [
            LocalFleet(
                run_dir / f"fleet{k}",
                detector=Path(args.input),
                worker_args=["--backend", args.backend, "--batch", str(b), "--capacity", str(2 * b)],
                name_prefix=f"fleet{k}",
            )
            for k in range(len(groups))
        ]
        mps = Mps(run_dir, args.gpus) if args.mps else None
        try:
            for k, fleet in enumerate(fleets):
                if args.ipc:
                    fleet.start_broker(f"ipc://{run_dir}/front{k}.ipc", f"ipc://{run_dir}/back{k}.ipc")
                else:
                    fleet.start_broker()
            if mps is not None:
                mps.start()
            with worker_environment(mps):
                for fleet, group in zip(fleets, groups, strict=True):
                    for i in group:
                        # under MPS the workers see the daemon's devices (--gpus) renumbered 0..n-1
                        fleet.start_workers(n, extra_args=["--device", str(i if mps else args.gpus[i])])
            for fleet, group in zip(fleets, groups, strict=True):
                fleet.wait_ready(n * len(group), timeout_s=600)
            frontends = [f.frontend for f in fleets]
            endpoint = frontends[0] if len(frontends) == 1 else frontends
            brokers = [f.broker.pid for f in fleets if f.broker is not None]
            total = n * len(args.gpus)
            conc = 2 * total * b
            measure(endpoint, events, conc, args.warmup_s)
            if mps is not None:
                mps.check_serving()  # after the warm-up every worker has used its GPU
            sampler = GpuSampler(args.gpus)
            sampler.start()
            # CPU use of the broker and of this producer over the window: where scaling with GPUs
            # stops, one of them shows a whole core busy.
            broker_cpu0, producer_cpu0, wall0 = (
                [cpu_seconds(pid) for pid in brokers],
                time.process_time(),
                time.monotonic(),
            )
            if args.producers > 1:
                s = measure_parallel(endpoint, args.input, conc, args.seconds, args.producers)
            else:
                s = measure(endpoint, events, conc, args.seconds)
            wall = time.monotonic() - wall0
            broker_cpu1 = [cpu_seconds(pid) for pid in brokers]
            producer_cpu = (s["cpu_s"] if args.producers > 1 else time.process_time() - producer_cpu0) / wall
            sampler.stop()
            sampler.join(2)
            pids = [p.pid for f in fleets for p in f.workers]
            row = {
                "instances_per_gpu": n,
                "batch": b,
                "mps": args.mps,
                "concurrency": conc,
                "producers": args.producers,
                "events_per_s": s["events_per_s"],
                "latency_ms_p50": s["latency_ms"]["p50"],
                "latency_ms_p99": s["latency_ms"]["p99"],
                "events_ok": s["events_ok"],
                "events_failed": s["events_failed"],
                "events_lost": s["events_lost"],
                "gpu_utilization": statistics.median(sampler.util) if sampler.util else None,
                "gpu_memory_per_worker_bytes": max((sampler.proc_mem.get(p, 0) for p in pids), default=None),
                "host_rss_per_worker_bytes": max((rss_bytes(p) or 0 for p in pids), default=None),
                "brokers": len(fleets),
                "host_rss_broker_bytes": max((rss_bytes(pid) or 0 for pid in brokers), default=None),
                # all brokers together (each one's share is about this / brokers)
                "broker_cpu_cores": None
                if None in broker_cpu0 or None in broker_cpu1
                else round(sum(b1 - b0 for b0, b1 in zip(broker_cpu0, broker_cpu1, strict=True)) / wall, 3),
                "producer_cpu_cores": round(producer_cpu, 3),
                "card": sampler.card,
            }
            grid.append(row)
            print(json.dumps(row), flush=True)
            if best is None or row["events_per_s"] > best["row"]["events_per_s"]:
                parts = LatencyParts()
                low = measure(endpoint, events, 1, max(4.0, args.seconds / 2), on_reply=parts)
                tracks = str(run_dir / "tracks")
                measure(endpoint, events, conc, 0, tracks_dir=tracks)
                best = {
                    "row": row,
                    "low_load_p50_ms": low["latency_ms"]["p50"],
                    "low_load_parts_ms": parts.medians_ms(),
                    "tracks": tracks,
                }
        finally:
            try:
                for fleet in fleets:
                    fleet.stop()
            finally:
                if mps is not None:
                    mps.quit()
    assert best is not None
    from producer.validate import validate

    physics = validate(args.input, best["tracks"])
    r = best["row"]
    result = {
        "card": r["card"],
        "gpus": len(args.gpus),
        "mu": args.mu,
        "mps": args.mps,
        "transport": "ipc" if args.ipc else "tcp",
        "brokers": r["brokers"],
        "events_per_s": r["events_per_s"],
        "instances_per_gpu": r["instances_per_gpu"],
        "batch": r["batch"],
        "latency_ms_p50": best["low_load_p50_ms"],
        "latency_ms_p50_saturated": r["latency_ms_p50"],
        "latency_parts_ms_low_load": best["low_load_parts_ms"],
        "latency_ms_p99": r["latency_ms_p99"],
        "gpu_utilization": r["gpu_utilization"],
        "gpu_memory_per_worker_bytes": r["gpu_memory_per_worker_bytes"],
        "host_rss_per_worker_bytes": r["host_rss_per_worker_bytes"],
        "broker_cpu_cores": r["broker_cpu_cores"],
        "producer_cpu_cores": r["producer_cpu_cores"],
        "efficiency": physics["efficiency"],
        "fake_rate": physics["fake_rate"],
        "duplicate_rate": physics["duplicate_rate"],
        "commit": commit.stdout.strip() or None,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "grid": grid,
    }
    suffix = (
        ("-mps" if args.mps else "")
        + ("-broker-per-gpu" if len(groups) > 1 else "")
        + ("-ipc" if args.ipc else "")
    )
    name = f"throughput-{r['card'].lower()}-{len(args.gpus)}gpu-mu{args.mu}{suffix}.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print("BEST", json.dumps({k: v for k, v in result.items() if k != "grid"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
