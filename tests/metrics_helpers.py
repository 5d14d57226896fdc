"""Shared pieces of the metrics tests: small events, a detector cache for worker subprocesses, scraping,
and the list of every metric the exporters can produce."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from fake_nvml import FakeNvml
from prometheus_client.parser import text_string_to_metric_families

from kernels.edm.packed import pack_event
from metrics.broker import BrokerMetrics
from metrics.exposition import new_registry
from metrics.gpu import GpuCollector, Nvml
from metrics.worker import WorkerMetrics
from producer.client import PackedInput

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "generic-mu20"
FAST = ["--heartbeat-ms", "200"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A private detector cache, built once per session (every module using it shares the directory),
    inherited by every worker subprocess."""
    from producer.io.detector import load_detector

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACKFLEET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "metrics-detector-cache"))
        load_detector(BUNDLED)
        yield


def small_events(n_cells: int = 100) -> list[PackedInput]:
    """The bundled events cut to their first cells: cheap to reconstruct, same detector."""
    from producer.io.detector import load_detector
    from producer.io.events import iter_cells

    det = load_detector(BUNDLED)
    cols = ("geometry_id", "channel0", "channel1", "activation", "time", "measurement_id")
    out = []
    for c in iter_cells(BUNDLED, det):
        header, buffers = pack_event(
            replace(c, **{k: getattr(c, k)[:n_cells] for k in cols}), det.fingerprint()
        )
        out.append(PackedInput(c.event_id, (header, *buffers)))
    return out


def scrape(port: int, timeout_s: float = 10.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name from http://127.0.0.1:port/metrics (retried until the server answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def exported_names() -> set[str]:
    """Every trackfleet metric name the exporters can produce (families, as docs/metrics.md lists them)."""
    regs = [BrokerMetrics().registry, WorkerMetrics("w").registry]
    gpu = new_registry()
    gpu.register(GpuCollector(Nvml(FakeNvml(pids=[[1]]))))
    regs.append(gpu)
    names = set()
    for reg in regs:
        for family in reg.collect():
            if family.name.startswith("trackfleet_"):
                suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
                names.add(family.name + suffix)
    return names
