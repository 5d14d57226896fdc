"""``trackfleet perf``: load levels, perf_analyzer's stability rule, windows on a simulated server with a fake
clock, the CSV / JSON / plots, and one small sweep through a real local fleet that grows from 1 to 2 workers."""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from metrics_helpers import BUNDLED, cache_env, small_events  # noqa: F401 - a fixture

from broker.errors import ConfigError
from metrics.perf import (
    COLUMNS,
    Completion,
    LoadGenerator,
    PerfConfig,
    Sweep,
    Window,
    is_stable,
    measure_level,
    parse_levels,
    write_plots,
)
from producer.cli import build_parser


def test_parse_levels():
    assert parse_levels("1:16") == tuple(range(1, 17))
    assert parse_levels("1:16:x2") == (1, 2, 4, 8, 16)
    assert parse_levels("1,2,4,8,16") == (1, 2, 4, 8, 16)
    assert parse_levels("2:10:4", float) == (2.0, 6.0, 10.0)
    for bad in ("", "0:4", "a,b", "1:4:0", "1:4:x1", "4:1:2:3"):
        with pytest.raises(ConfigError):
            parse_levels(bad)


def _window(t0: float, t1: float, n: int, latency_s: float) -> Window:
    return Window(t0, t1, tuple(Completion(t1, True, latency_s) for _ in range(n)))


def test_stability_is_perf_analyzers_rule():
    steady = [_window(i, i + 1, 10, 0.1) for i in range(3)]
    assert is_stable(steady, 3, 0.10)
    assert not is_stable(steady[:2], 3, 0.10)  # too few windows
    drift = [*steady[:2], _window(2, 3, 12, 0.1)]  # throughput 20% off
    assert not is_stable(drift, 3, 0.10)
    slow = [*steady[:2], _window(2, 3, 10, 0.115)]  # latency 15% off
    assert not is_stable(slow, 3, 0.10)
    assert not is_stable([_window(i, i + 1, 0, 0.1) for i in range(3)], 3, 0.10)  # nothing completed


@dataclass
class _Reply:
    id: int
    ok: bool
    latency_s: float
    queue_s: float = 0.0
    timings: dict = field(default_factory=dict)
    code: str = ""


class SimulatedServer:
    """A client whose events each take ``service_s`` on one of ``servers`` servers, on a fake clock."""

    def __init__(self, service_s: float, servers: int = 1) -> None:
        self.t = 0.0
        self.service_s = service_s
        self.free_at = [0.0] * servers
        self.pending: dict[int, tuple[float, float]] = {}  # id -> (submitted, done)

    def clock(self) -> float:
        return self.t

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def submit(self, rid: int, event_id: int, payload) -> None:
        k = min(range(len(self.free_at)), key=self.free_at.__getitem__)
        start = max(self.t, self.free_at[k])
        self.free_at[k] = start + self.service_s
        self.pending[rid] = (self.t, start + self.service_s)

    def poll(self, timeout_s: float) -> list[_Reply]:
        nxt = min((d for _, d in self.pending.values()), default=self.t + timeout_s)
        self.t = max(self.t, min(nxt, self.t + timeout_s))
        done = [(rid, s, d) for rid, (s, d) in self.pending.items() if d <= self.t + 1e-12]
        for rid, _, _ in done:
            del self.pending[rid]
        timings = {"worker_queue_s": 0.0, "decode_s": 0.001, "chain_s": self.service_s - 0.002}
        timings |= {"pack_s": 0.001, "worker_s": self.service_s}
        return [
            _Reply(rid, True, self.t - s, max(0.0, d - s - self.service_s), timings) for rid, s, d in done
        ]


@dataclass(frozen=True)
class _Ev:
    event_id: int = 0
    payload: tuple = ()


@pytest.mark.parametrize(("concurrency", "servers"), [(1, 1), (4, 1), (4, 2)])
def test_windows_on_a_simulated_server_measure_exact_throughput_and_split(concurrency, servers):
    # Given a server with 1 or 2 slots of 0.3 s each (about 3 events/s per slot: a slow mu=200 event)
    sim = SimulatedServer(0.3, servers)
    gen = LoadGenerator(sim, [_Ev()], clock=sim.clock)
    cfg = PerfConfig(input=Path("."), output=Path("."), concurrency=(concurrency,), window_s=1.0)
    # When a level is measured (windows end on a completion, so none is off by one event)
    row = measure_level(gen, cfg, concurrency, None, deadline=1e9)
    # Then throughput is exactly what the server gives and latency follows Little's law, stable after
    # 3 windows (4 when the first one holds the ramp-up of a deeper queue)
    expected = min(concurrency, servers) / 0.3
    assert row["stable"] and row["windows"] == (3 if concurrency == 1 else 4)
    assert row["throughput_eps"] == pytest.approx(expected, rel=1e-4)
    assert row["latency_mean_ms"] == pytest.approx(1e3 * concurrency / expected, rel=1e-4)
    assert row["compute_ms"] == pytest.approx(300.0)
    assert row["compute_infer_ms"] == pytest.approx(298.0) and row["compute_input_ms"] == pytest.approx(1.0)
    # waiting for a free slot shows up as queue time, the rest (network) is zero here
    assert row["broker_queue_ms"] == pytest.approx(row["latency_mean_ms"] - 300.0, abs=1e-6)
    assert row["other_ms"] == pytest.approx(0.0, abs=1e-6)


def test_open_loop_rate_below_capacity_is_met():
    sim = SimulatedServer(0.1, 1)
    gen = LoadGenerator(sim, [_Ev()], clock=sim.clock)
    cfg = PerfConfig(input=Path("."), output=Path("."), request_rates=(5.0,), window_s=2.0)
    row = measure_level(gen, cfg, 5.0, None, deadline=1e9)
    assert row["stable"] and row["throughput_eps"] == pytest.approx(5.0, rel=0.02)
    assert row["latency_p99_ms"] == pytest.approx(100.0, abs=1e-6)


def _rows() -> list[dict]:
    rows = []
    for n in (1, 2, 4):
        for c in (1, 2, 4, 8):
            eps = min(c, n) * 3.0
            rows.append(
                {
                    "mode": "concurrency",
                    "instances": n,
                    "concurrency": c,
                    "request_rate": None,
                    "stable": c != 8,
                    "throughput_eps": eps,
                    "latency_p50_ms": 1e3 * c / eps,
                    "latency_p99_ms": 1.2e3 * c / eps,
                    "broker_queue_ms": 10.0,
                    "worker_queue_ms": 1.0,
                    "compute_input_ms": 1.0,
                    "compute_infer_ms": 300.0,
                    "compute_output_ms": 1.0,
                    "other_ms": 2.0,
                    "gpu_utilization": min(1.0, 0.3 * n),
                    "gpu_memory_used_bytes": 2e9 * n,
                    "gpu_memory_total_bytes": 80e9,
                }
            )
    return rows


def test_plots_without_matplotlib_warn_and_skip(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "metrics.perf_plots", raising=False)
    with caplog.at_level(logging.WARNING, logger="metrics.perf"):
        assert write_plots(tmp_path, _rows(), {}) == []
    assert "matplotlib is not installed" in caplog.text and not list(tmp_path.iterdir())


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    meta = {"config": {"backend": "cupy", "batch": 1}, "gpu": {"devices": [{"name": "NVIDIA H100"}]}}
    written = write_plots(tmp_path, _rows(), meta)
    assert sorted(p.name for p in written) == [
        "gpu_utilization_vs_instances.png",
        "latency_breakdown.png",
        "latency_vs_throughput.png",
        "throughput_vs_concurrency.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_cli_options_become_a_config():
    args = build_parser().parse_args(
        [
            "perf",
            "--input",
            "ev",
            "--output",
            "out",
            "--concurrency",
            "1:16:x2",
            "--instances",
            "1,2,4,8",
            "--gpus",
            "0",
            "--window-s",
            "2",
        ]
    )
    from metrics.perf import config_from_args

    cfg = config_from_args(args)
    assert cfg.concurrency == (1, 2, 4, 8, 16) and cfg.instances == (1, 2, 4, 8)
    assert cfg.gpus == (0,) and cfg.backend == "cupy" and cfg.window_s == 2.0 and cfg.mode == "concurrency"
    with pytest.raises(ConfigError):
        PerfConfig(input=Path("."), output=Path("."))  # no load given
    with pytest.raises(ConfigError):
        PerfConfig(input=Path("."), output=Path("."), concurrency=(1,), broker="tcp://x:1", instances=(1, 2))


@pytest.mark.timeout(90)
def test_sweep_through_a_local_fleet_growing_from_one_to_two_workers(tmp_path, cache_env):  # noqa: F811
    # Given small events and a sweep of 1 then 2 numpy workers at two concurrency levels
    cfg = PerfConfig(
        input=BUNDLED,
        output=tmp_path / "out",
        concurrency=(1, 4),
        instances=(1, 2),
        detector=BUNDLED,
        worker_args=("--heartbeat-ms", "200", "--simulate-compute-ms", "20"),
        window_s=0.2,
        stable_windows=2,
        max_windows=3,
        warmup_s=0.1,
        ready_timeout_s=60,
    )
    sweep = Sweep(cfg, events=small_events(), argv=["trackfleet", "perf", "..."])
    # When it runs
    rows = sweep.run()
    # Then there is one row per (instances, concurrency), with throughput, percentiles and the split
    assert [(r["instances"], r["concurrency"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for r in rows:
        assert r["events"] >= 3 and r["failed"] == 0 and r["throughput_eps"] > 0
        assert r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
        assert r["compute_ms"] >= 20.0 and r["gpu_utilization"] is None
    assert rows[2]["workers"] == 2
    # two workers serve four events in flight faster than one does
    assert rows[3]["throughput_eps"] > 1.3 * rows[1]["throughput_eps"]
    with (cfg.output / "perf.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == 4
    data = json.loads((cfg.output / "perf.json").read_text())
    assert data["meta"]["command"] == "trackfleet perf ..." and len(data["rows"]) == 4
    assert data["meta"]["config"]["instances"] == [1, 2] and data["meta"]["duration_s"] > 0


def test_perf_needs_neither_prometheus_client_nor_matplotlib_nor_pynvml():
    # a GPU machine may have only the fleet's own dependencies: the sweep must import and parse there
    import subprocess

    code = (
        "import sys\n"
        "for m in ('prometheus_client', 'matplotlib', 'pynvml'): sys.modules[m] = None\n"
        "import metrics.perf, producer.launch, producer.client\n"
        "try:\n"
        "    metrics.perf.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--concurrency" in out.stdout
