"""The exporters in real processes: a loopback fleet (broker + 2 numpy workers) serving /metrics, a worker
killed with SIGKILL mid-stream and restarted under the same name and port as supervisord would, and the node
GPU exporter program on a machine without a GPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from metrics_helpers import BUNDLED, FAST, cache_env, scrape, small_events, total  # noqa: F401 - a fixture

from metrics.exposition import free_ports
from producer.client import ClientConfig, FleetClient, ProducerRun, Reply, RunConfig
from producer.launch import LocalFleet

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def test_worker_killed_and_restarted_nothing_lost_or_counted_twice(tmp_path, cache_env):  # noqa: F811
    # Given a fleet whose broker and two workers serve metrics
    b_port, w0_port, w1_port = free_ports(3)
    fleet = LocalFleet(
        tmp_path,
        broker_args=[*FAST, "--metrics-port", str(b_port)],
        worker_args=[*FAST, "--simulate-compute-ms", "10"],
        detector=BUNDLED,
    )
    count = 30
    try:
        fleet.start_broker()
        fleet.start_workers(1, ["--metrics-port", str(w0_port)])  # named local-0
        fleet.start_workers(1, ["--metrics-port", str(w1_port)])  # named local-1
        events = small_events()
        fleet.wait_ready(2, timeout_s=30)
        killed = threading.Event()

        def on_reply(r: Reply) -> None:
            # When local-0 is killed mid-stream, and started again under its name and port
            if r.id == 8 and not killed.is_set():
                killed.set()
                fleet.workers[0].send_signal(signal.SIGKILL)
                fleet.workers[0].wait(10)
                fleet.start_workers(1, ["--name", "local-0", "--metrics-port", str(w0_port)])

        cfg = ClientConfig(endpoint=fleet.frontend, timeout_s=15.0, heartbeat_interval_s=0.2)
        with FleetClient(cfg) as client:
            summary = ProducerRun(
                client, events, RunConfig(concurrency=6, count=count, progress=False), on_reply=on_reply
            ).run()
        assert killed.is_set() and summary.events_ok == count and summary.events_lost == 0
        # Then the broker counted every event exactly once, in the two workers' stable series
        b = scrape(b_port)
        assert total(b, "trackfleet_events_received_total") == count
        assert total(b, "trackfleet_events_total", status="succeeded") == count
        assert total(b, "trackfleet_events_total", status="failed") == 0
        assert total(b, "trackfleet_compute_duration_seconds_count") == count
        workers = {lab["worker"] for lab, _ in b["trackfleet_compute_duration_seconds_count"]}
        assert workers <= {"local-0", "local-1"}
        assert total(b, "trackfleet_request_duration_seconds_count") == count
        assert total(b, "trackfleet_retries_total") == total(b, "trackfleet_requeues_total")
        assert total(b, "trackfleet_sent_bytes_total") > 0 and total(b, "trackfleet_received_bytes_total") > 0
        assert total(b, "trackfleet_stage_duration_seconds_count", stage="finding") == count
        assert total(b, "trackfleet_deregistrations_total", reason="expired") >= 1
        # and the restarted worker serves its own series again on the same port, under the same name
        fleet.wait_ready(2, timeout_s=30)
        w0 = scrape(w0_port)
        assert {lab["worker"] for lab, _ in w0["trackfleet_worker_events_total"]} == {"local-0"}
        assert total(w0, "trackfleet_worker_registrations_total") >= 1
        assert total(w0, "process_start_time_seconds") > 0
        w1 = scrape(w1_port)
        assert total(w1, "trackfleet_worker_events_total", status="succeeded") > 0
        assert total(w1, "trackfleet_worker_busy_seconds_total") > 0
        assert total(w1, "trackfleet_worker_batch_size_count") == total(w1, "trackfleet_worker_batches_total")
    finally:
        fleet.stop(timeout_s=10)


def test_gpu_exporter_program_without_gpu_serves_availability_zero():
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "metrics", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        samples = scrape(port)
        import importlib.util

        if importlib.util.find_spec("pynvml") is None:
            assert total(samples, "trackfleet_gpu_available") == 0
            assert not any(n.startswith("trackfleet_gpu_utilization") for n in samples)
        assert "process_cpu_seconds_total" in samples
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
