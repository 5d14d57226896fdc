"""The Grafana dashboards against a real Prometheus: a loopback fleet (broker, two numpy workers, a node GPU
exporter on a fake NVML) is scraped every second, and every PromQL expression of every panel must return
data. Needs the ``prometheus`` binary (Debian's package; ``.ci/run`` installs it): skipped locally without
it, a failure when ``TRACKFLEET_REQUIRE_PROMETHEUS=1`` (set by ``.ci/run`` once it is installed).

The dashboard checks that need no Prometheus (structure, datasource, metric names) always run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from fake_nvml import FakeNvml
from metrics_helpers import BUNDLED, FAST, cache_env, exported_names, small_events  # noqa: F401 - a fixture

from metrics.exposition import MetricsServer, free_ports, new_registry
from metrics.gpu import GpuCollector, Nvml
from producer.client import ClientConfig, FleetClient
from producer.launch import LocalFleet

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCE_UID = "trackfleet-prometheus"


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])  # panels inside collapsed rows
    return out


def expressions() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) of every target of every panel."""
    return [
        (name, p["title"], t["expr"])
        for name, board in dashboards().items()
        for p in panels(board)
        for t in p.get("targets", [])
    ]


def promql(expr: str, rate_interval: str = "3s") -> str:
    """What Grafana sends: its interval variables replaced (a fast scrape needs a short rate window)."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", "1s")


def test_dashboards_are_well_formed_and_use_the_provisioned_datasource():
    boards = dashboards()
    assert set(boards) == {"fleet-overview.json", "workers-and-stages.json", "gpus.json"}
    ds = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    assert f"uid: {DATASOURCE_UID}" in ds and "type: prometheus" in ds
    prov = (GRAFANA / "provisioning" / "dashboards" / "trackfleet.yaml").read_text()
    assert "type: file" in prov and "path:" in prov
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        ps = panels(board)
        assert len({p["id"] for p in ps}) == len(ps), f"{name}: duplicate panel ids"
        for p in ps:
            assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            if p["type"] == "row":
                continue
            assert p["targets"], f"{name}: panel {p['title']!r} has no query"
            for t in [p, *p["targets"]]:
                assert t["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}


def test_dashboards_use_only_metrics_that_exist():
    known = exported_names()
    for board, title, expr in expressions():
        for name in re.findall(r"\btrackfleet_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, f"{board} / {title}: unknown metric {name}"


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.timeout(60)
def test_every_dashboard_panel_returns_data_from_a_real_prometheus(tmp_path, cache_env):  # noqa: F811
    if PROMETHEUS is None:
        if os.environ.get("TRACKFLEET_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("prometheus is required here (TRACKFLEET_REQUIRE_PROMETHEUS=1) but not installed")
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run does)")
    b_port, w0_port, w1_port, gpu_port, prom_port = free_ports(5)
    fleet = LocalFleet(
        tmp_path / "fleet",
        broker_args=[*FAST, "--metrics-port", str(b_port)],
        worker_args=[*FAST, "--simulate-compute-ms", "10"],
        detector=BUNDLED,
    )
    stop = threading.Event()
    prom: subprocess.Popen[bytes] | None = None
    gpu_server: MetricsServer | None = None
    load: threading.Thread | None = None
    try:
        # Given a fleet whose broker, workers and node GPU exporter serve metrics on loopback
        fleet.start_broker()
        fleet.start_workers(1, ["--metrics-port", str(w0_port)])
        fleet.start_workers(1, ["--metrics-port", str(w1_port)])
        fake = FakeNvml(pids=[[fleet.workers[0].pid], [fleet.workers[1].pid]], no_power=[1])
        gpu_registry = new_registry()
        gpu_registry.register(GpuCollector(Nvml(fake)))
        gpu_server = MetricsServer(gpu_registry, gpu_port).start()
        # and a Prometheus scraping all four every second
        targets = [f"127.0.0.1:{p}" for p in (b_port, w0_port, w1_port, gpu_port)]
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: trackfleet\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        with (tmp_path / "prometheus.log").open("wb") as logf:
            prom = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        events = small_events()
        fleet.wait_ready(2, timeout_s=30)

        # When events stream through the fleet
        def stream() -> None:  # closed loop, 3 events in flight, until told to stop
            with FleetClient(ClientConfig(endpoint=fleet.frontend, timeout_s=15.0)) as client:
                seq = 0
                while not stop.is_set():
                    while client.in_flight < 3:
                        ev = events[seq % len(events)]
                        client.submit(seq, ev.event_id, ev.payload)
                        seq += 1
                    client.poll(0.05)
                deadline = time.monotonic() + 10.0
                while client.in_flight and time.monotonic() < deadline:
                    client.poll(0.05)

        load = threading.Thread(target=stream, name="load", daemon=True)
        load.start()
        # Then every panel's query returns data within a bounded time
        base = f"http://127.0.0.1:{prom_port}"
        pending = {(b, t, promql(e)) for b, t, e in expressions()}
        deadline = time.monotonic() + 30.0
        while pending and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                pending = {(b, t, e) for b, t, e in pending if not _query(base, e)}
            except OSError:
                continue  # Prometheus still starting
        up = _query(base, "up")
        assert sorted(float(r["value"][1]) for r in up) == [1.0] * 4, up
        assert not pending, "no data for:\n" + "\n".join(f"{b} / {t}: {e}" for b, t, e in sorted(pending))
        # and the per-process GPU memory is labelled by worker name, not pid
        procs = _query(base, "trackfleet_gpu_process_memory_used_bytes")
        assert {r["metric"]["worker"] for r in procs} == {"local-0", "local-1"}
    finally:
        stop.set()
        if load is not None:
            load.join(15)
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(5)
        if gpu_server is not None:
            gpu_server.stop()
        fleet.stop(timeout_s=10)
