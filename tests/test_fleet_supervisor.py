"""``trackfleet up`` / ``status`` / ``down`` with a real supervisord: a worker killed with SIGKILL mid-stream
is restarted by supervisord and no event is lost or duplicated. Config, sockets (ipc) and logs live in a
temporary directory; ``trackfleet down`` always runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from metrics_helpers import BUNDLED, small_events

from broker.errors import ConfigError
from producer.client import ClientConfig, FleetClient, ProducerRun, Reply, RunConfig
from producer.launch import FleetSpec, broker_stats, supervisord_config


def free_port_base(n: int = 12) -> int:
    """A port P with P .. P+n-1 free a moment ago (``trackfleet up --metrics-port P`` uses P, P+1, P+10...)."""
    import socket

    from metrics.exposition import free_ports

    for _ in range(100):
        (base,) = free_ports(1)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def trackfleet(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_config_has_one_program_per_gpu_with_pinned_devices(tmp_path):
    spec = FleetSpec(run_dir=tmp_path, gpus=(0, 3), instances_per_gpu=4, detector=BUNDLED)
    text = supervisord_config(spec)
    assert "[program:broker]" in text and "[program:worker-gpu0]" in text and "[program:worker-gpu3]" in text
    assert 'environment = CUDA_VISIBLE_DEVICES="3"' in text and text.count("numprocs = 4") == 2
    assert "--backend cupy" in text and "%(process_num)d" in text and "worker-cpu" not in text
    assert "tcp://127.0.0.1:5555" in text  # loopback unless told otherwise
    cpu = supervisord_config(FleetSpec(run_dir=tmp_path, cpu_workers=3, detector=BUNDLED))
    assert "[program:worker-cpu]" in cpu and "--backend numpy" in cpu and "numprocs = 3" in cpu
    remote = supervisord_config(
        FleetSpec(run_dir=tmp_path, gpus=(1,), run_broker=False, connect="tcp://head:5556", detector=BUNDLED)
    )
    assert "[program:broker]" not in remote and "--connect tcp://head:5556" in remote


def test_config_under_mps_starts_the_daemon_first_and_workers_pick_devices_by_position(tmp_path):
    text = supervisord_config(
        FleetSpec(run_dir=tmp_path, gpus=(2, 5), instances_per_gpu=3, detector=BUNDLED, mps=True)
    )
    mps = text.split("[program:mps]")[1].split("[program:")[0]
    assert "nvidia-cuda-mps-control -f" in mps and "priority = 5" in mps
    assert (
        'CUDA_VISIBLE_DEVICES="2,5"' in mps
        and f'CUDA_MPS_PIPE_DIRECTORY="{tmp_path.resolve()}/mps-pipe"' in mps
    )
    gpu5 = text.split("[program:worker-gpu5]")[1].split("[program:")[0]
    assert "--device 1" in gpu5 and "CUDA_MPS_PIPE_DIRECTORY" in gpu5 and "CUDA_VISIBLE_DEVICES" not in gpu5
    assert "--device 0" in text.split("[program:worker-gpu2]")[1].split("[program:")[0]
    with pytest.raises(ConfigError, match="--mps needs --gpus"):
        FleetSpec(run_dir=tmp_path, cpu_workers=1, detector=BUNDLED, mps=True)


def test_up_mps_without_the_mps_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control here
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "up",
            "--gpus",
            "0",
            "--mps",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "nvidia-cuda-mps-control is not on PATH" in out.stderr
    assert not (tmp_path / "run" / "supervisord.conf").exists()


@pytest.mark.timeout(90)
def test_up_kill_9_worker_supervisord_restarts_it_no_event_lost(tmp_path, monkeypatch):
    from producer.io.detector import load_detector

    monkeypatch.setenv("TRACKFLEET_CACHE_DIR", str(tmp_path / "cache"))
    load_detector(BUNDLED)  # build the cache once for all workers
    run_dir = tmp_path / "run"
    frontend, backend = f"ipc://{tmp_path}/fe.sock", f"ipc://{tmp_path}/be.sock"
    metrics = free_port_base()
    try:
        up = trackfleet(
            "up",
            "--cpu-workers",
            "2",
            "--run-dir",
            str(run_dir),
            "--frontend",
            frontend,
            "--backend",
            backend,
            "--detector",
            str(BUNDLED),
            "--broker-args=--heartbeat-ms 200",
            "--worker-args=--heartbeat-ms 200 --simulate-compute-ms 15",
            "--wait-s",
            "40",
            "--metrics-port",
            str(metrics),
        )
        assert up.returncode == 0, up.stdout + up.stderr
        status = trackfleet("status", "--run-dir", str(run_dir), "--json")
        s = json.loads(status.stdout)
        assert s["broker"]["n_workers"] == 2 and len(s["programs"]) == 4  # broker, 2 workers, exporter
        assert all("RUNNING" in line for line in s["programs"])
        pids_before = {w["info"]["pid"] for w in s["broker"]["workers"]}

        # stream small events while one worker is killed with SIGKILL
        events = small_events()
        victim = sorted(pids_before)[0]
        count, seen = 40, Counter()
        replies: dict[int, list[Reply]] = {}

        def on_reply(r: Reply) -> None:
            replies.setdefault(r.id, []).append(r)
            seen["n"] += 1
            if seen["n"] == 10:
                os.kill(victim, signal.SIGKILL)

        cfg = ClientConfig(endpoint=frontend, timeout_s=20.0, heartbeat_interval_s=0.2, broker_timeout_s=1.0)
        with FleetClient(cfg) as client:
            summary = ProducerRun(
                client, events, RunConfig(concurrency=6, count=count, progress=False), on_reply
            ).run()
        assert sorted(replies) == list(range(count)) and all(len(v) == 1 for v in replies.values())
        assert summary.events_ok == count and summary.events_lost == 0

        # supervisord brought a fresh worker process up, and it registered
        deadline = time.monotonic() + 30
        pids_after: set[int] = set()
        while time.monotonic() < deadline:
            stats = broker_stats(frontend, 1.0) or {}
            pids_after = {w["info"]["pid"] for w in stats.get("workers", [])}
            if len(pids_after) == 2 and victim not in pids_after:
                break
            time.sleep(0.2)
        assert victim not in pids_after and len(pids_after) == 2, pids_after
        while True:  # RUNNING once the new process has stayed up for startsecs
            ctl = trackfleet("status", "--run-dir", str(run_dir))
            if ctl.stdout.count("RUNNING") == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ctl.stdout.count("RUNNING") == 4, ctl.stdout
        # the broker's metrics counted every event once; the restarted worker serves its series again,
        # on its own port and under its own name (docs/metrics.md section 2)
        broker = _scrape(metrics)
        assert broker["trackfleet_events_total", (("status", "succeeded"),)] == count
        assert broker["trackfleet_events_received_total", ()] == count
        names = {dict(labels)["worker"] for name, labels in broker if name == "trackfleet_leases"}
        for i in range(2):
            worker = _scrape(metrics + 10 + i)
            assert any(name == "trackfleet_worker_info" for name, _ in worker)
            assert {
                dict(labels).get("worker") for name, labels in worker if name == "trackfleet_worker_info"
            } <= names
    finally:
        down = trackfleet("down", "--run-dir", str(run_dir), timeout_s=90)
    assert down.returncode == 0, down.stdout + down.stderr
    assert (
        not (run_dir / "supervisord.pid").exists()
        or trackfleet("status", "--run-dir", str(run_dir)).returncode == 3
    )


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_status_and_down_without_a_fleet(tmp_path):
    assert trackfleet("status", "--run-dir", str(tmp_path)).returncode == 3
    r = trackfleet("down", "--run-dir", str(tmp_path))
    assert r.returncode == 0 and "no fleet" in r.stdout
