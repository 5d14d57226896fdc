"""``trackfleet perf``: throughput, latency and GPU utilization sweeps, measured the way Triton's perf_analyzer
measures a model.

    trackfleet perf --input DIR --concurrency 1,2,4,8,16 --instances 1,2,4,8 --backend cupy --gpus 0 \\
        --output OUT [--batch B] [--window-s 5] [--stability 0.1] [--max-windows 10]
    trackfleet perf --input DIR --request-rate 2:20:2 --broker tcp://head:5555 --output OUT
    trackfleet perf --plot-only OUT          # redraw the PNGs of an earlier sweep (needs matplotlib)

For every instance count (worker processes per GPU; Triton's model instances) the sweep grows a local fleet
(:class:`~producer.launch.LocalFleet`: one broker, workers as subprocesses; counts are visited in increasing
order and workers are only ever added, so each CuPy worker compiles its kernels once), warms it up, then for
every load level — a closed loop keeping N events in flight (``--concurrency``) or an open loop sending at a
fixed rate (``--request-rate``) — measures consecutive windows until ``--stable-windows`` (3) in a row agree
within ``--stability`` (10%) in throughput and mean latency, as perf_analyzer does, or ``--max-windows`` is
reached (the row is then marked ``stable = False``). The stable windows are merged into one row:

- throughput [events/s] and client-side latency p50 / p90 / p95 / p99 / mean [ms];
- the server-side split from the timings every reply carries: broker queue, worker queue, compute input
  (decode), compute infer (the chain), compute output (pack), and the rest (network, client) [ms];
- GPU utilization, memory and power sampled with NVML every 0.2 s during the windows (empty without a GPU).

A window ends at the first completion after ``--window-s`` has passed (with at least ``--min-window-events``
in it), so that a window always spans whole inter-completion intervals: at a few events per second a plain
time window would be off by one event in ten. Rows go to ``perf.csv`` and ``perf.json`` (with the command
line, configuration and machine) after every level, so that an interrupted sweep keeps what it measured;
PNG plots are drawn at the end when matplotlib is installed (:mod:`metrics.perf_plots`). ``--max-duration-s``
bounds the whole sweep: levels beyond it are skipped, and the outputs are still written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import ConfigError
from metrics.nvml import GpuSampler

log = logging.getLogger(__name__)

#: Columns of ``perf.csv``, in order.
COLUMNS: tuple[str, ...] = (
    "mode",
    "instances",
    "workers",
    "backend",
    "batch",
    "concurrency",
    "request_rate",
    "stable",
    "windows",
    "window_s",
    "events",
    "failed",
    "throughput_eps",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_mean_ms",
    "broker_queue_ms",
    "worker_queue_ms",
    "compute_input_ms",
    "compute_infer_ms",
    "compute_output_ms",
    "compute_ms",
    "other_ms",
    "gpu_utilization",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
    "gpu_power_w",
)


def parse_levels(text: str, kind: type = int) -> tuple[Any, ...]:
    """Load levels from ``"1,2,4"``, ``"1:16"`` (step 1), ``"2:20:2"`` or ``"1:16:x2"`` (doubling).

    Raises:
        ConfigError: not one of these forms, or a level <= 0.
    """
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ValueError(text)
            start, stop = kind(parts[0]), kind(parts[1])
            step = parts[2] if len(parts) == 3 else "1"
            levels: list[Any] = []
            x = start
            if step.startswith("x"):
                factor = float(step[1:])
                if factor <= 1:
                    raise ValueError(text)
                while x <= stop * (1 + 1e-9):
                    levels.append(kind(x))
                    x = kind(x * factor) if kind is float else max(int(x) + 1, round(x * factor))
            else:
                inc = kind(step)
                if inc <= 0:
                    raise ValueError(text)
                n = math.floor((stop - start) / inc + 1e-9) + 1
                levels = [kind(start + i * inc) for i in range(max(n, 0))]
        else:
            levels = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"cannot read load levels {text!r} (use 1,2,4 or 1:16 or 2:20:2 or 1:16:x2)"
        ) from None
    if not levels or any(v <= 0 for v in levels):
        raise ConfigError(f"load levels must be > 0 (got {text!r})")
    return tuple(levels)


@dataclass(frozen=True)
class PerfConfig:
    """One sweep.

    Attributes:
        input: events (directory, cells file, multi-event CSV or .tfev); cycled.
        output: where perf.csv, perf.json, perf.log and the plots go.
        concurrency: closed-loop levels [events in flight] (exclusive with ``request_rates``).
        request_rates: open-loop levels [events/s].
        poisson: open loop: exponential inter-arrival times instead of constant ones.
        instances: worker processes per GPU (per node without GPUs), visited in increasing order.
        gpus: CUDA device ordinals the workers use (empty: no GPU pinning; numpy workers use the CPU).
        backend: worker array backend, "numpy" or "cupy".
        batch / batch_wait_us: worker dynamic batching.
        worker_args / broker_args: extra options for the fleet's processes.
        detector: detector directory (default: beside the input).
        broker: measure an existing fleet at this producer endpoint instead of starting one.
        window_s: nominal measurement window [s].
        stability: allowed spread of the last ``stable_windows`` windows (max/min - 1) [fraction].
        stable_windows: consecutive windows that must agree.
        max_windows: windows per level before giving up on stability.
        min_window_events: completions a window needs before it may end.
        warmup_s: per instance count, closed-loop load before measuring [s] (at least one event per worker).
        ready_timeout_s: wait this long for workers to register (CuPy workers compile kernels first) [s].
        max_duration_s: bound on the whole sweep [s] (None: none).
        max_in_flight: open loop: cap on outstanding events.
        gpu_interval_s: GPU sampling period [s].
    """

    input: Path
    output: Path
    concurrency: tuple[int, ...] = ()
    request_rates: tuple[float, ...] = ()
    poisson: bool = False
    instances: tuple[int, ...] = (1,)
    gpus: tuple[int, ...] = ()
    backend: str = "numpy"
    batch: int = 1
    batch_wait_us: int = 0
    worker_args: tuple[str, ...] = ()
    broker_args: tuple[str, ...] = ()
    detector: Path | None = None
    broker: str | None = None
    window_s: float = 5.0
    stability: float = 0.10
    stable_windows: int = 3
    max_windows: int = 10
    min_window_events: int = 3
    warmup_s: float = 2.0
    ready_timeout_s: float = 600.0
    max_duration_s: float | None = None
    max_in_flight: int = 1024
    gpu_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if bool(self.concurrency) == bool(self.request_rates):
            raise ConfigError("give exactly one of --concurrency and --request-rate")
        if not self.instances or any(n < 1 for n in self.instances):
            raise ConfigError("--instances must list counts >= 1")
        if self.broker is not None and len(self.instances) > 1:
            raise ConfigError(
                "with --broker the fleet is yours: --instances only labels the rows (one value)"
            )
        if self.backend not in ("numpy", "cupy"):
            raise ConfigError(f"--backend must be numpy or cupy, got {self.backend!r}")
        if self.stable_windows < 1 or self.max_windows < self.stable_windows:
            raise ConfigError("need 1 <= --stable-windows <= --max-windows")
        if not (self.window_s > 0 and self.stability > 0 and self.batch >= 1 and self.min_window_events >= 1):
            raise ConfigError("--window-s, --stability, --batch and --min-window-events must be positive")

    @property
    def mode(self) -> str:
        return "concurrency" if self.concurrency else "request_rate"

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(self.concurrency) if self.concurrency else tuple(self.request_rates)


# --- load generation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One final reply: when it arrived [s, monotonic] and what it said."""

    t: float
    ok: bool
    latency_s: float
    broker_queue_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    code: str = ""


class LoadGenerator:
    """Closed- or open-loop load over one producer client, recording every completion.

    Args:
        client: a :class:`~producer.client.FleetClient`.
        events: packed events, cycled.
        clock: monotonic time source [s].
        max_in_flight: open loop: arrivals beyond this many outstanding events wait.
        poisson: open loop: exponential inter-arrival times.
    """

    def __init__(
        self,
        client: Any,
        events: Sequence[Any],
        clock: Callable[[], float] = time.monotonic,
        max_in_flight: int = 1024,
        poisson: bool = False,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.events = list(events)
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.poisson = poisson
        self._rng = np.random.default_rng(seed)
        self.concurrency = 0
        self.rate_hz: float | None = None
        self._next_arrival = 0.0
        self._seq = 0
        self.completed: list[Completion] = []
        self.late_arrivals = 0

    def set_concurrency(self, n: int) -> None:
        """Closed loop with ``n`` events in flight (0: send nothing more)."""
        self.rate_hz, self.concurrency = None, n

    def set_rate(self, hz: float) -> None:
        """Open loop at ``hz`` events per second."""
        self.concurrency, self.rate_hz = 0, hz
        self._next_arrival = self.clock()

    def _submit(self) -> None:
        ev = self.events[self._seq % len(self.events)]
        self.client.submit(self._seq, ev.event_id, ev.payload)
        self._seq += 1

    def _interval(self) -> float:
        assert self.rate_hz is not None
        return float(self._rng.exponential(1.0 / self.rate_hz)) if self.poisson else 1.0 / self.rate_hz

    def step(self, max_wait_s: float = 0.05) -> int:
        """Send what the loop allows, wait up to ``max_wait_s`` for replies; returns the completions added."""
        now = self.clock()
        if self.rate_hz is None:
            while self.client.in_flight < self.concurrency:
                self._submit()
            wait = max_wait_s
        else:
            while now >= self._next_arrival:
                if self.client.in_flight >= self.max_in_flight:
                    self.late_arrivals += 1
                    self._next_arrival = now + self._interval()
                    break
                self._submit()
                self._next_arrival += self._interval()
            wait = max(0.0, min(max_wait_s, self._next_arrival - self.clock()))
        replies = self.client.poll(wait)
        t = self.clock()
        for r in replies:
            self.completed.append(
                Completion(t, r.ok, r.latency_s, r.queue_s, dict(r.timings) if r.ok else {}, r.code)
            )
        return len(replies)

    def run_until(self, t_end: float) -> None:
        while self.clock() < t_end:
            self.step(min(0.05, max(0.0, t_end - self.clock())))

    def drain(self, timeout_s: float) -> bool:
        """Stop sending and wait for what is in flight; False on timeout."""
        self.set_concurrency(0)
        deadline = self.clock() + timeout_s
        while self.client.in_flight and self.clock() < deadline:
            self.step(0.05)
        return self.client.in_flight == 0


# --- windows and stability --------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Completions in ``(t0, t1]``."""

    t0: float
    t1: float
    done: tuple[Completion, ...]

    @property
    def ok(self) -> list[Completion]:
        return [c for c in self.done if c.ok]

    @property
    def throughput(self) -> float:
        return len(self.ok) / (self.t1 - self.t0) if self.t1 > self.t0 else 0.0

    @property
    def mean_latency_s(self) -> float:
        ok = self.ok
        return sum(c.latency_s for c in ok) / len(ok) if ok else math.inf


def is_stable(windows: Sequence[Window], n: int, stability: float) -> bool:
    """perf_analyzer's rule: the last ``n`` windows' throughputs and mean latencies each lie within
    ``stability`` of one another (max / min <= 1 + stability)."""
    if len(windows) < n:
        return False
    last = windows[-n:]
    for values in ([w.throughput for w in last], [w.mean_latency_s for w in last]):
        lo, hi = min(values), max(values)
        if not (lo > 0 and math.isfinite(hi) and hi / lo <= 1 + stability):
            return False
    return True


def next_window(gen: LoadGenerator, t0: float, window_s: float, min_events: int, hard_s: float) -> Window:
    """Drive the load from ``t0`` until ``window_s`` has passed and a completion arrives (with at least
    ``min_events`` in the window), or until ``hard_s``; the window ends at that completion."""
    first = len(gen.completed)
    while gen.completed and first > 0 and gen.completed[first - 1].t > t0:
        first -= 1  # completions that arrived after t0 while the previous window was being closed
    nominal, hard = t0 + window_s, t0 + hard_s
    while True:
        added = gen.step(min(0.05, max(0.0, hard - gen.clock())))
        now = gen.clock()
        in_window = len(gen.completed) - first
        if added and now >= nominal and in_window >= min_events:
            t1 = gen.completed[-1].t
            break
        if now >= hard:
            t1 = now
            break
    return Window(t0, t1, tuple(c for c in gen.completed[first:] if t0 < c.t <= t1))


def _pct(values_ms: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values_ms, q)), 3) if len(values_ms) else None


def _mean(values: Sequence[float]) -> float | None:
    return round(float(sum(values) / len(values)) * 1e3, 3) if values else None


def summarize(windows: Sequence[Window]) -> dict[str, Any]:
    """One row's measurements from merged windows (throughput, latency percentiles, server-side split)."""
    done = [c for w in windows for c in w.done]
    ok = [c for c in done if c.ok]
    span = sum(w.t1 - w.t0 for w in windows)
    lat_ms = [c.latency_s * 1e3 for c in ok]

    def timing(key: str) -> list[float]:
        return [c.timings.get(key, 0.0) for c in ok]

    broker_q = [c.broker_queue_s for c in ok]
    worker_q, compute = timing("worker_queue_s"), timing("worker_s")
    row: dict[str, Any] = {
        "events": len(ok),
        "failed": len(done) - len(ok),
        "throughput_eps": round(len(ok) / span, 4) if span > 0 else 0.0,
        "latency_p50_ms": _pct(lat_ms, 50),
        "latency_p90_ms": _pct(lat_ms, 90),
        "latency_p95_ms": _pct(lat_ms, 95),
        "latency_p99_ms": _pct(lat_ms, 99),
        "latency_mean_ms": round(sum(lat_ms) / len(lat_ms), 3) if lat_ms else None,
        "broker_queue_ms": _mean(broker_q),
        "worker_queue_ms": _mean(worker_q),
        "compute_input_ms": _mean(timing("decode_s")),
        "compute_infer_ms": _mean(timing("chain_s")),
        "compute_output_ms": _mean(timing("pack_s")),
        "compute_ms": _mean(compute),
        "other_ms": _mean(
            [c.latency_s - c.broker_queue_s - q - s for c, q, s in zip(ok, worker_q, compute, strict=True)]
        ),
    }
    return row


def measure_level(
    gen: LoadGenerator, cfg: PerfConfig, level: float, sampler: GpuSampler | None, deadline: float
) -> dict[str, Any]:
    """Set the load to ``level`` and measure windows until stable; returns the row's measurements."""
    if cfg.mode == "concurrency":
        gen.set_concurrency(int(level))
    else:
        gen.set_rate(float(level))
    windows: list[Window] = []
    t0 = gen.clock()
    # a window may stretch to let slow events finish: at most 10 nominal windows or 4 x the slowest latency
    while len(windows) < cfg.max_windows and gen.clock() < deadline:
        slow = max((c.latency_s for c in gen.completed[-50:]), default=0.0)
        w = next_window(gen, t0, cfg.window_s, cfg.min_window_events, max(10 * cfg.window_s, 4 * slow))
        windows.append(w)
        t0 = w.t1
        if is_stable(windows, cfg.stable_windows, cfg.stability):
            break
    used = windows[-cfg.stable_windows :]
    row = summarize(used)
    row.update(
        stable=is_stable(windows, cfg.stable_windows, cfg.stability),
        windows=len(windows),
        window_s=round(sum(w.t1 - w.t0 for w in used) / max(len(used), 1), 3),
    )
    if sampler is not None and used:
        g = sampler.summary(used[0].t0, used[-1].t1)
        row.update({k: g[k] for k in ("gpu_utilization", "gpu_memory_used_bytes", "gpu_memory_total_bytes")})
        row["gpu_power_w"] = g["gpu_power_w"]
        if row["gpu_utilization"] is not None:
            row["gpu_utilization"] = round(float(row["gpu_utilization"]), 4)
    return row


# --- the sweep --------------------------------------------------------------------------------------


def nvml_indices(gpus: Sequence[int]) -> list[int] | None:
    """NVML indices of CUDA device ordinals (through ``CUDA_VISIBLE_DEVICES`` when it lists integers);
    None (sample every GPU) when no GPU is pinned or the mapping is unknown."""
    if not gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus)
    try:
        ids = [int(x) for x in visible.split(",") if x.strip()]
        return [ids[g] for g in gpus]
    except (ValueError, IndexError):
        return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    for mod in ("numpy", "cupy", "zmq", "pynvml", "matplotlib"):
        try:
            m = __import__(mod)
            env[mod] = str(getattr(m, "__version__", "yes"))
        except Exception:
            env[mod] = None
    return env


class Sweep:
    """Runs a :class:`PerfConfig`, writing rows as they come.

    Args:
        cfg: the sweep.
        events: packed events (default: read and pack ``cfg.input``).
        argv: the command line, recorded in perf.json.
    """

    def __init__(
        self, cfg: PerfConfig, events: Sequence[Any] | None = None, argv: Sequence[str] = ()
    ) -> None:
        self.cfg = cfg
        self._events = events
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {
            "command": " ".join(argv) if argv else None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": _git_commit(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "environment": _environment(),
            "notes": [],
        }
        self.clock: Callable[[], float] = time.monotonic
        self._per_gpu: dict[int | None, int] = {}  # workers started per GPU (None: CPU)
        self._failed_fleet = False  # keep the fleet's log tails when it failed to come up

    def _write(self) -> None:
        out = self.cfg.output
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "perf.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
            w.writeheader()
            for row in self.rows:
                w.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
        os.replace(tmp, out / "perf.csv")
        tmp = out / "perf.json.tmp"
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")
        os.replace(tmp, out / "perf.json")

    def run(self) -> list[dict[str, Any]]:
        """Measure every (instance count, level); returns the rows (also in perf.csv / perf.json)."""
        from producer.client import ClientConfig, FleetClient, load_inputs

        cfg = self.cfg
        t_start = self.clock()
        deadline = t_start + cfg.max_duration_s if cfg.max_duration_s else math.inf
        self._write()
        events = list(self._events) if self._events is not None else load_inputs(cfg.input, cfg.detector)
        self.meta["events"] = {
            "input": str(cfg.input),
            "count": len(events),
            "mean_bytes": int(sum(e.nbytes for e in events) / max(len(events), 1)),
        }
        sampler = GpuSampler(nvml_indices(cfg.gpus), cfg.gpu_interval_s, clock=self.clock).start()
        self.meta["gpu"] = {
            "source": sampler.source,
            "devices": [{"index": d.index, "name": d.name, "uuid": d.uuid} for d in sampler.devices()],
        }
        with contextlib.ExitStack() as stack:
            stack.callback(sampler.stop)
            fleet = None
            if cfg.broker is None:
                fleet = self._start_fleet(stack)
                endpoint = fleet.frontend
            else:
                endpoint = cfg.broker
            client = stack.enter_context(
                FleetClient(ClientConfig(endpoint=endpoint, timeout_s=600.0, broker_timeout_s=10.0))
            )
            gen = LoadGenerator(client, events, self.clock, cfg.max_in_flight, cfg.poisson)
            n_gpus = max(len(cfg.gpus), 1)
            for n in sorted(set(cfg.instances)):
                if self.clock() >= deadline:
                    self._note(f"time budget spent before {n} instances; stopped")
                    break
                if fleet is not None:
                    self._grow(fleet, n, min(cfg.ready_timeout_s, max(1.0, deadline - self.clock())))
                self._warm_up(gen, n * n_gpus, deadline)
                for level in cfg.levels:
                    if self.clock() >= deadline:
                        self._note(f"time budget spent at {n} instances, level {level}; stopped")
                        break
                    gen.completed.clear()
                    row: dict[str, Any] = {
                        "mode": cfg.mode,
                        "instances": n,
                        "workers": n * n_gpus if fleet is not None else None,
                        "backend": cfg.backend,
                        "batch": cfg.batch,
                        "concurrency": int(level) if cfg.mode == "concurrency" else None,
                        "request_rate": float(level) if cfg.mode == "request_rate" else None,
                    }
                    row.update(measure_level(gen, cfg, level, sampler, deadline))
                    self.rows.append(row)
                    self._write()
                    self._report(row)
                if not gen.drain(min(120.0, max(5.0, deadline - self.clock()))):
                    self._note(f"{client.in_flight} events still in flight after the {n}-instance levels")
                gen.completed.clear()
        self.meta["duration_s"] = round(self.clock() - t_start, 1)
        self._write()
        return self.rows

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        self.meta["notes"].append(text)

    def _report(self, row: dict[str, Any]) -> None:
        level = f"concurrency {row['concurrency']}" if row["concurrency"] else f"rate {row['request_rate']}/s"
        gpu = "" if row.get("gpu_utilization") is None else f", GPU {100 * row['gpu_utilization']:.0f}%"
        line = (
            f"instances {row['instances']}, {level}: {row['throughput_eps']:.2f} events/s, "
            f"p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, queue "
            f"{(row['broker_queue_ms'] or 0) + (row['worker_queue_ms'] or 0):.1f} ms, compute "
            f"{row['compute_ms']} ms{gpu} ({'stable' if row['stable'] else 'NOT stable'} after "
            f"{row['windows']} windows)"
        )
        log.info("%s", line)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _start_fleet(self, stack: contextlib.ExitStack) -> Any:
        from producer.launch import LocalFleet

        cfg = self.cfg
        run_dir = Path(tempfile.mkdtemp(prefix="trackfleet-perf-"))
        detector = cfg.detector
        if detector is None:
            from producer.io.detector import find_detector_files
            from producer.io.events import discover

            detector = find_detector_files(discover(cfg.input)[0].cells.parent)[0].parent
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA ordinals in NVML's order
        fleet = LocalFleet(
            run_dir,
            broker_args=["--job-timeout-s", "900", *cfg.broker_args],
            worker_args=[
                "--backend",
                cfg.backend,
                "--batch",
                str(cfg.batch),
                "--batch-wait-us",
                str(cfg.batch_wait_us),
                *cfg.worker_args,
            ],
            detector=Path(detector).resolve(),
        )

        def stop() -> None:
            fleet.stop(timeout_s=30.0)
            if self._failed_fleet:
                self._save_fleet_logs(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)

        stack.callback(stop)
        fleet.start_broker()
        log.info("broker up on %s (logs in %s)", fleet.frontend, run_dir)
        return fleet

    def _grow(self, fleet: Any, n: int, timeout_s: float) -> None:
        """Start workers until every GPU (or the CPU) has ``n``, then wait for them to register."""
        targets: list[int | None] = list(self.cfg.gpus) or [None]
        for g in targets:
            have = self._per_gpu.get(g, 0)
            for _ in range(n - have):
                fleet.start_workers(1, [] if g is None else ["--device", str(g)])
            self._per_gpu[g] = max(have, n)
        total = sum(self._per_gpu.values())
        t0 = self.clock()
        log.info("waiting for %d workers (up to %.0f s)", total, timeout_s)
        while True:  # fleet.wait_ready, but a worker that exits (no GPU, bad option) fails the sweep at once
            stats = fleet.stats(1.0) or {}
            if stats.get("n_workers", 0) >= total:
                break
            dead = [p for p in fleet.workers if p.poll() is not None]
            if dead or self.clock() - t0 > timeout_s:
                self._failed_fleet = True
                why = (
                    f"worker exited with code {dead[0].returncode}"
                    if dead
                    else f"not all up in {timeout_s:.0f} s"
                )
                raise RuntimeError(
                    f"{stats.get('n_workers', 0)} of {total} workers registered ({why}); "
                    f"see {self.cfg.output / 'fleet-logs.txt'}"
                )
            time.sleep(0.5)
        log.info("%d workers ready after %.1f s", total, self.clock() - t0)

    def _warm_up(self, gen: LoadGenerator, n_workers: int, deadline: float) -> None:
        """Closed loop at 2 events per worker for ``warmup_s`` and until every worker did 2 events."""
        gen.completed.clear()
        gen.set_concurrency(2 * n_workers)
        t_end = self.clock() + self.cfg.warmup_s
        limit = min(deadline, self.clock() + 300.0)
        while self.clock() < limit and (self.clock() < t_end or len(gen.completed) < 2 * n_workers):
            gen.step(0.05)
        gen.drain(min(120.0, max(5.0, deadline - self.clock())))
        failed = [c.code for c in gen.completed if not c.ok]
        if failed:
            self._note(f"{len(failed)} warm-up events failed ({sorted(set(failed))})")
        gen.completed.clear()

    def _save_fleet_logs(self, run_dir: Path) -> None:
        """On failure: the tail of every fleet log, in one file of the output."""
        parts = []
        for p in sorted(run_dir.glob("*.log")):
            lines = p.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"==> {p.name} <==\n" + "\n".join(lines))
        (self.cfg.output / "fleet-logs.txt").write_text("\n\n".join(parts) + "\n")


def write_plots(out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """The sweep's PNGs, or [] with a warning when matplotlib is not installed."""
    try:
        from metrics.perf_plots import plot_all
    except ImportError as exc:
        log.warning("no plots: matplotlib is not installed (%s); pip install -e '.[plot]'", exc)
        return []
    try:
        return plot_all(out_dir, rows, meta)
    except Exception:  # a plotting problem must not lose a sweep whose CSV is written
        log.exception("plotting failed; redraw with `trackfleet perf --plot-only %s`", out_dir)
        return []


# --- the subcommand ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PerfConfig(input=Path("."), output=Path("."), concurrency=(1,))
    p.add_argument("--input", type=Path, help="events to send (directory, cells file, .tfev), cycled")
    p.add_argument("--output", type=Path, help="directory for perf.csv, perf.json, perf.log and the plots")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="closed-loop levels: 1,2,4 or 1:16 or 1:16:x2 (events in flight)")
    load.add_argument("--request-rate", help="open-loop levels [events/s]: 2,5,10 or 2:20:2")
    p.add_argument("--request-distribution", choices=("constant", "poisson"), default="constant")
    p.add_argument("--instances", default="1", help="worker processes per GPU to sweep, e.g. 1,2,4,8")
    p.add_argument("--gpus", default="", help="CUDA devices for the workers, e.g. 0 or 0,1 (default: none)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None, help="default: cupy with --gpus")
    p.add_argument("--batch", type=int, default=d.batch, help="worker dynamic batching: events per pass")
    p.add_argument("--batch-wait-us", type=int, default=d.batch_wait_us, help="worker batching wait [us]")
    p.add_argument("--worker-args", default="", help="extra worker options, quoted")
    p.add_argument("--broker-args", default="", help="extra broker options, quoted")
    p.add_argument("--detector", type=Path, help="detector directory (default: beside the input)")
    p.add_argument("--broker", help="measure the existing fleet at this producer endpoint")
    p.add_argument("--window-s", type=float, default=d.window_s, help="measurement window [s]")
    p.add_argument("--stability", type=float, default=d.stability, help="allowed window spread (0.1: 10%%)")
    p.add_argument("--stable-windows", type=int, default=d.stable_windows, help="windows that must agree")
    p.add_argument("--max-windows", type=int, default=d.max_windows, help="windows per level at most")
    p.add_argument("--min-window-events", type=int, default=d.min_window_events, help="events per window")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="warm-up per instance count [s]")
    p.add_argument("--ready-timeout-s", type=float, default=d.ready_timeout_s, help="worker start limit [s]")
    p.add_argument("--max-duration-s", type=float, default=None, help="bound on the whole sweep [s]")
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight, help="open loop: outstanding cap")
    p.add_argument("--no-plots", action="store_true", help="CSV and JSON only")
    p.add_argument("--plot-only", type=Path, metavar="DIR", help="redraw the plots of DIR/perf.json and exit")


def config_from_args(args: argparse.Namespace) -> PerfConfig:
    """Raises: ConfigError on bad options."""
    import shlex

    from producer.launch import parse_gpus

    if args.input is None or args.output is None:
        raise ConfigError("--input and --output are required (or --plot-only DIR)")
    gpus = parse_gpus(args.gpus)
    return PerfConfig(
        input=args.input,
        output=args.output,
        concurrency=parse_levels(args.concurrency, int) if args.concurrency else (),
        request_rates=parse_levels(args.request_rate, float) if args.request_rate else (),
        poisson=args.request_distribution == "poisson",
        instances=parse_levels(args.instances, int),
        gpus=gpus,
        backend=args.backend or ("cupy" if gpus else "numpy"),
        batch=args.batch,
        batch_wait_us=args.batch_wait_us,
        worker_args=tuple(shlex.split(args.worker_args)),
        broker_args=tuple(shlex.split(args.broker_args)),
        detector=args.detector,
        broker=args.broker,
        window_s=args.window_s,
        stability=args.stability,
        stable_windows=args.stable_windows,
        max_windows=args.max_windows,
        min_window_events=args.min_window_events,
        warmup_s=args.warmup_s,
        ready_timeout_s=args.ready_timeout_s,
        max_duration_s=args.max_duration_s,
        max_in_flight=args.max_in_flight,
    )


def _log_to_file(path: Path) -> logging.Handler:
    """Everything at INFO into ``path``, without making the console chattier than -v asked."""
    root = logging.getLogger()
    for h in root.handlers:
        if h.level == logging.NOTSET:
            h.setLevel(root.level)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))
    return handler


def run(args: argparse.Namespace) -> int:
    if args.plot_only is not None:
        data = json.loads((args.plot_only / "perf.json").read_text())
        written = write_plots(args.output or args.plot_only, data["rows"], data["meta"])
        for p in written:
            sys.stdout.write(f"wrote {p}\n")
        return 0 if written else 1
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        sys.stderr.write(f"trackfleet perf: error: {exc}\n")
        return 2
    cfg.output.mkdir(parents=True, exist_ok=True)
    handler = _log_to_file(cfg.output / "perf.log")
    argv = list(sys.argv)
    if argv and argv[0].endswith(("perf.py", "metrics.perf")):
        argv[0] = "python -m metrics.perf"
    elif argv:
        argv[0] = "trackfleet"
    sweep = Sweep(cfg, argv=argv)
    code = 0
    try:
        sweep.run()
    except (RuntimeError, OSError) as exc:
        log.error("sweep failed: %s", exc)
        sweep.meta["notes"].append(f"failed: {exc}")
        sweep._write()
        code = 1
    finally:
        if not args.no_plots and sweep.rows:
            for p in write_plots(cfg.output, sweep.rows, sweep.meta):
                log.info("wrote %s", p)
        logging.getLogger().removeHandler(handler)
        handler.close()
    sys.stdout.write(f"{len(sweep.rows)} rows in {cfg.output / 'perf.csv'}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metrics.perf``: the same as ``trackfleet perf``, without loading the other subcommands
    (a GPU machine may lack their optional dependencies)."""
    p = argparse.ArgumentParser(prog="python -m metrics.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    add_arguments(p)
    args = p.parse_args(argv)
    level = logging.WARNING if args.verbose <= 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        return run(args)
    except KeyboardInterrupt:
        sys.stderr.write("perf: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
