"""The Prometheus exporters in process: broker hooks driven by the state machine and a fake clock, worker
hooks, the NVML collector with a fake NVML, the HTTP server, the supervisord wiring and docs/metrics.md."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from fake_nvml import FakeNvml
from metrics_helpers import exported_names

from broker.config import BrokerConfig
from broker.observer import ObserverSet
from broker.protocol import Disconnect, Job, Ready, Submit, WorkerHeartbeat, WorkFailed, WorkResult
from broker.state import BrokerState
from metrics.broker import REQUEUE_REASONS, BrokerMetrics, requeue_reason
from metrics.exposition import MetricsServer, family_names, free_ports, new_registry, sample_values
from metrics.gpu import GpuCollector, Nvml, worker_name_of
from metrics.worker import WorkerMetrics
from producer.launch import FleetSpec, metrics_ports, metrics_targets, supervisord_config

ROOT = Path(__file__).resolve().parent.parent
P1 = b"producer-1"
TIMINGS = {
    "worker_queue_s": 0.004,
    "decode_s": 0.002,
    "clusterization_s": 0.05,
    "finding_s": 0.2,
    "chain_s": 0.25,
    "pack_s": 0.001,
    "worker_s": 0.26,
}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Fleet:
    """A broker state with the metrics observer, and helpers speaking for producers and workers."""

    def __init__(self, **cfg) -> None:
        self.clock = Clock()
        self.metrics = BrokerMetrics(clock=self.clock)
        self.state = BrokerState(
            BrokerConfig(heartbeat_interval_s=1.0, **cfg), self.clock(), ObserverSet([self.metrics]), "E1"
        )
        self.metrics.attach(self.state)
        self.jobs: list[tuple[bytes, Job]] = []

    def _take(self, actions) -> None:
        self.jobs += [(a.identity, a.message) for a in actions if isinstance(a.message, Job)]

    def submit(self, rid: int, payload=(b"hdr", b"12345678")) -> None:
        self._take(self.state.on_client_message(P1, Submit(rid, rid, payload), self.clock()))

    def worker(self, identity: bytes, msg) -> None:
        self._take(self.state.on_worker_message(identity, msg, self.clock()))

    def ready(self, identity: bytes, name: str, capacity: int = 1) -> None:
        self.worker(identity, Ready(capacity, {"name": name}))

    def pop(self) -> tuple[bytes, Job]:
        return self.jobs.pop(0)

    def finish(self, identity: bytes, job: Job, payload=(b"tracks!",)) -> None:
        self.worker(identity, WorkResult(job.job, job.epoch, TIMINGS, payload))

    def tick(self, dt: float = 0.0) -> None:
        self.clock.t += dt
        self._take(self.state.tick(self.clock()))

    def value(self, name: str, **labels: str) -> float:
        return sample_values(self.metrics.registry, name).get(tuple(sorted(labels.items())), float("nan"))

    def labels_of(self, name: str, key: str) -> set[str]:
        return {dict(k)[key] for k in sample_values(self.metrics.registry, name)}


def test_a_worker_restart_neither_loses_nor_double_counts_events():
    # Given a worker "node-gpu0-0" that completed two events and holds a third, reported as started
    f = Fleet()
    f.ready(b"w-a", "node-gpu0-0")
    for rid in (1, 2, 3):
        f.submit(rid)
    for _ in range(2):
        w, job = f.pop()
        f.clock.t += 0.5
        f.finish(w, job)
    w, third = f.pop()
    f.worker(b"w-a", WorkerHeartbeat(active=(third.job,)))
    # When the process is killed (silent), expired, and supervisord restarts it under the same name
    for _ in range(4):
        f.tick(1.0)
    f.ready(b"w-b", "node-gpu0-0")
    w2, again = f.pop()
    assert w2 == b"w-b" and again.job == third.job and again.attempt == 2
    f.finish(w2, again)
    # and the old process's late answer for the same event arrives after all
    f.worker(b"w-a", WorkResult(third.job, "E1", TIMINGS, (b"late",)))
    # Then every event is counted once, in the same per-worker series
    assert f.value("trackfleet_events_received_total") == 3
    assert f.value("trackfleet_events_total", status="succeeded") == 3
    assert f.value("trackfleet_compute_duration_seconds_count", worker="node-gpu0-0") == 3
    assert f.labels_of("trackfleet_compute_duration_seconds_count", "worker") == {"node-gpu0-0"}
    assert f.value("trackfleet_retries_total") == 1 and f.value("trackfleet_dispatches_total") == 4
    assert f.value("trackfleet_requeues_total", reason="worker_silent") == 1
    assert f.value("trackfleet_deregistrations_total", reason="expired") == 1
    assert f.value("trackfleet_registrations_total") == 2
    assert f.value("trackfleet_sent_bytes_total") == 3 * len(b"tracks!")
    assert f.value("trackfleet_received_bytes_total") == 3 * 11
    assert f.value("trackfleet_dispatched_bytes_total") == 4 * 11
    # and the timings land in the right histograms: stages, the two queues, compute
    assert f.labels_of("trackfleet_stage_duration_seconds_count", "stage") == {
        "decode",
        "clusterization",
        "finding",
        "pack",
    }
    assert f.value("trackfleet_stage_duration_seconds_sum", stage="finding") == pytest.approx(0.6)
    assert f.value("trackfleet_queue_duration_seconds_count", queue="worker") == 3
    assert f.value("trackfleet_queue_duration_seconds_count", queue="broker") == 3
    assert f.value("trackfleet_request_duration_seconds_count") == 3
    # the second event waited 0.5 s in the queue, and both took 0.5 s from arrival to result
    assert f.value("trackfleet_request_duration_seconds_bucket", le="0.3") == 0
    assert f.value("trackfleet_request_duration_seconds_bucket", le="0.5") == 1


def test_failures_rejections_busy_and_zero_initialised_series():
    f = Fleet(max_queue_events=1)
    # Given known series exported before anything happened
    assert f.value("trackfleet_event_failures_total", reason="worker_lost") == 0
    assert f.value("trackfleet_events_total", status="failed") == 0
    assert {dict(k)["reason"] for k in sample_values(f.metrics.registry, "trackfleet_requeues_total")} == set(
        REQUEUE_REASONS
    )
    # When events fail with known and unknown codes, a message is refused, and the queue overflows
    f.ready(b"w", "cpu-0")
    f.submit(1)
    f.submit(2)  # queued behind the leased one: the queue is full now
    f.submit(3)  # BUSY
    _, j1 = f.pop()
    f.worker(b"w", WorkFailed(j1.job, "E1", "bad_event", "cannot unpack"))
    _, j2 = f.pop()
    f.worker(b"w", WorkFailed(j2.job, "E1", "cosmic_ray", "new code from a newer worker"))
    f.state.reject_client(P1, 9, "malformed", "bad frames")
    # Then each is counted under its reason, unknown codes as "other"
    assert f.value("trackfleet_busy_replies_total") == 1
    assert f.value("trackfleet_events_total", status="failed") == 2
    assert f.value("trackfleet_event_failures_total", reason="bad_event") == 1
    assert f.value("trackfleet_event_failures_total", reason="other") == 1
    assert f.value("trackfleet_rejected_messages_total", reason="malformed") == 1
    assert "cosmic_ray" not in f.labels_of("trackfleet_event_failures_total", "reason")


def test_gauges_follow_the_queue_and_the_workers():
    f = Fleet()
    f.ready(b"a", "gpu0-0", capacity=2)
    f.ready(b"b", "gpu0-1", capacity=2)
    for rid in range(6):
        f.submit(rid)
    f.tick()
    assert f.value("trackfleet_live_workers") == 2
    assert f.value("trackfleet_queue_depth") == 2 and f.value("trackfleet_queue_bytes") == 2 * 11
    assert f.value("trackfleet_events_in_flight") == 4 and f.value("trackfleet_events_pending") == 6
    assert (
        f.value("trackfleet_capacity", worker="gpu0-0") == 2
        and f.value("trackfleet_leases", worker="gpu0-1") == 2
    )
    # When a worker leaves, its gauges go (its counters and histograms stay)
    f.worker(b"b", Disconnect("bye", ()))
    f.tick()
    assert f.labels_of("trackfleet_capacity", "worker") == {"gpu0-0"}
    assert f.value("trackfleet_deregistrations_total", reason="disconnected") == 1
    assert f.value("trackfleet_requeues_total", reason="worker_disconnected") == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("silent for 3.2 s", "worker_silent"),
        ("held job(s) [4] past the 300.0 s lease", "lease_timeout"),
        ("unreachable", "worker_unreachable"),
        ("worker disconnected: worker shutting down", "worker_disconnected"),
        ("worker re-registered", "worker_reregistered"),
        ("retryable shutting_down", "retryable_failure"),
        ("something new", "other"),
    ],
)
def test_requeue_reasons_are_a_closed_set(text, reason):
    assert requeue_reason(text) == reason


def test_worker_metrics_busy_time_batches_and_labels():
    clock = Clock()
    m = WorkerMetrics("host-gpu0-3", clock=clock)
    m.on_registered({"backend": "cupy", "device": 0, "host": "host", "batch_max": 2, "pid": 4242})
    m.on_job_received(1, 1000)
    m.on_job_received(2, 500)
    m.on_batch(2, 0.01)
    clock.t += 0.5
    v = sample_values(m.registry, "trackfleet_worker_busy_seconds_total")
    assert v == {(("worker", "host-gpu0-3"),): 0.5}  # a running batch counts up to the scrape
    clock.t += 0.5
    m.on_job_done(1, {})
    m.on_job_failed(2, "reconstruction_failed")
    clock.t += 5.0  # idle time is not busy time
    reg = m.registry
    assert sample_values(reg, "trackfleet_worker_busy_seconds_total")[(("worker", "host-gpu0-3"),)] == 1.0
    assert sample_values(reg, "trackfleet_worker_batches_total")[(("worker", "host-gpu0-3"),)] == 1
    assert sample_values(reg, "trackfleet_worker_batch_size_sum")[(("worker", "host-gpu0-3"),)] == 2
    assert sample_values(reg, "trackfleet_worker_received_bytes_total")[(("worker", "host-gpu0-3"),)] == 1500
    events = {dict(k)["status"]: v for k, v in sample_values(reg, "trackfleet_worker_events_total").items()}
    assert events == {"received": 2, "succeeded": 1, "failed": 1}
    failures = sample_values(reg, "trackfleet_worker_failures_total")
    assert failures[(("reason", "reconstruction_failed"), ("worker", "host-gpu0-3"))] == 1
    (info,) = sample_values(reg, "trackfleet_worker_info")
    assert dict(info)["backend"] == "cupy" and dict(info)["device"] == "0"
    over = "trackfleet_worker_gpu_pool_over_limit_total"
    assert sample_values(reg, over)[(("worker", "host-gpu0-3"),)] == 0  # exported before the first
    m.on_gpu_pool_over_limit(8)
    assert sample_values(reg, over)[(("worker", "host-gpu0-3"),)] == 1
    # no series is labelled by pid: a restarted process under the same name continues the same series
    for family in reg.collect():
        for s in family.samples:
            assert "pid" not in s.labels and "4242" not in s.labels.values()


def test_gpu_collector_reads_nvml_and_names_processes_by_worker():
    names = {101: "node-gpu0-0", 102: "node-gpu0-1"}
    fake = FakeNvml(pids=[[101, 102], [103]], no_power=[1])
    reg = new_registry()
    reg.register(GpuCollector(Nvml(fake), name_of=lambda pid: names.get(pid, f"pid-{pid}")))
    assert sample_values(reg, "trackfleet_gpu_available") == {(): 1.0}
    util = sample_values(reg, "trackfleet_gpu_utilization")
    assert util[(("gpu", "1"), ("gpu_uuid", "GPU-00000001-fake"), ("name", "Fake H100"))] == pytest.approx(
        0.6
    )
    assert len(sample_values(reg, "trackfleet_gpu_memory_total_bytes")) == 2
    # GPU 1 does not report power: that series is left out, the others stay
    assert {dict(k)["gpu"] for k in sample_values(reg, "trackfleet_gpu_power_watts")} == {"0"}
    assert {dict(k)["gpu"] for k in sample_values(reg, "trackfleet_gpu_energy_joules_total")} == {"0"}
    procs = {
        dict(k)["worker"]: v
        for k, v in sample_values(reg, "trackfleet_gpu_process_memory_used_bytes").items()
    }
    assert procs == {"node-gpu0-0": 2**30, "node-gpu0-1": 2**30, "pid-103": 2**30}


@pytest.mark.parametrize("fake", [None, FakeNvml(fail_init=True), FakeNvml(pids=[])])
def test_gpu_collector_without_pynvml_driver_or_gpu_exports_only_availability(fake, caplog, monkeypatch):
    if fake is None:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    reg = new_registry()
    reg.register(GpuCollector(Nvml(fake)))
    with caplog.at_level(logging.WARNING, logger="metrics.gpu"):
        for _ in range(3):
            assert [n for n in family_names(reg) if n.startswith("trackfleet_")] == [
                "trackfleet_gpu_available"
            ]
    assert sample_values(reg, "trackfleet_gpu_available") == {(): 0.0}
    assert len([r for r in caplog.records if "no GPU metrics" in r.message]) == 1  # logged once


def test_worker_name_of_reads_the_command_line(tmp_path):
    for pid, argv in {
        1: ["python", "-m", "worker", "--connect", "tcp://x:1", "--name", "n-gpu0-2"],
        2: ["/venv/bin/worker", "--name=n-cpu-0"],
        3: ["/venv/bin/worker", "--backend", "cupy"],
        4: ["python", "train.py"],
    }.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    names = [worker_name_of(pid, "node", proc=tmp_path) for pid in (1, 2, 3, 4, 5)]
    assert names == ["n-gpu0-2", "n-cpu-0", "node-3", "pid-4", "pid-5"]


def test_metrics_server_serves_and_survives_a_taken_port():
    m = WorkerMetrics("w")
    (port,) = free_ports(1)
    first = MetricsServer(m.registry, port).start()
    second = MetricsServer(m.registry, port, retry_s=0.05).start()  # taken: no exception, retries
    try:
        assert first.port == port and second.port is None
        text = urllib.request.urlopen(first.url, timeout=5).read().decode()
        assert 'trackfleet_worker_events_total{status="received",worker="w"} 0.0' in text
        assert "_created" not in text
        first.stop()
        for _ in range(100):  # the retrying server takes the port once it is free
            if second.port is not None:
                break
            import time

            time.sleep(0.05)
        assert second.port == port
    finally:
        first.stop()
        second.stop()


def test_supervisord_config_gives_every_program_its_metrics_port(tmp_path):
    spec = FleetSpec(run_dir=tmp_path, gpus=(0, 1), instances_per_gpu=3, cpu_workers=2, detector=ROOT)
    text = supervisord_config(spec)
    assert metrics_ports(spec) == {
        "exporter": 9501,
        "broker": 9500,
        "worker-gpu0": 9510,
        "worker-gpu1": 9513,
        "worker-cpu": 9516,
    }
    assert "--endpoints-file" in text and "--metrics-port 9500" in text
    assert "[program:exporter]" in text and "-m metrics --port 9501" in text
    # each instance: port base + supervisord's process number, so a restart reuses its port and name
    assert "--metrics-port 9513 --metrics-port-offset '%(process_num)d'" in text
    targets = metrics_targets(spec)
    assert sum(len(g["targets"]) for g in targets) == 2 + 6 + 2
    assert json.dumps(targets).count("127.0.0.1:9517") == 1
    off = supervisord_config(FleetSpec(run_dir=tmp_path, cpu_workers=1, detector=ROOT, metrics_port=0))
    assert "--metrics-port" not in off and "-m metrics" not in off
    assert metrics_targets(FleetSpec(run_dir=tmp_path, metrics_port=0)) == []


def test_docs_list_every_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    names = exported_names()
    assert len(names) > 40
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/metrics.md does not list {missing}"
    for n in names:  # the naming rule: counters end in _total, durations are seconds
        assert not n.endswith("_ms") and ("duration" not in n or n.endswith("_seconds"))


def test_exporters_never_import_kernels():
    code = (
        "import sys, metrics.broker, metrics.worker, metrics.gpu, metrics.__main__, broker.__main__, "
        "worker.observer\n"
        "bad = sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
