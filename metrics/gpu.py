"""The node GPU exporter's collector: every GPU of this node from NVML, for ``python -m metrics``.

NVML comes from ``pynvml`` (the ``nvidia-ml-py`` package, in the ``gpu`` extras), imported lazily
(:class:`~metrics.nvml.Nvml`). Without it, without a driver, or without a GPU, :class:`GpuCollector` exports
only ``trackfleet_gpu_available 0`` and logs the reason once; a query a GPU does not support (power or energy
on some boards) leaves that one series out. Values are read at scrape time, so there is no sampling thread in
the exporter.

Per-process GPU memory is labelled by the *worker name* found in the process's command line (``--name``;
``host-pid`` for a worker started without one, as the worker itself names it), so a restarted worker
continues the same series; processes that are not trackfleet workers are labelled ``pid-<pid>``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from metrics.nvml import GpuReading, GpuSampler, Nvml

log = logging.getLogger(__name__)

__all__ = ["GpuCollector", "GpuReading", "GpuSampler", "Nvml", "worker_name_of"]


def worker_name_of(pid: int, hostname: str | None = None, proc: Path = Path("/proc")) -> str:
    """The trackfleet worker name of process ``pid`` from its command line, else ``pid-<pid>``."""
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:  # gone, or in another pid namespace (containers)
        return f"pid-{pid}"
    argv = [a.decode(errors="replace") for a in args if a]
    for i, a in enumerate(argv):
        if a == "--name" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--name="):
            return a.split("=", 1)[1]
    is_worker = any(a == "worker" or a.endswith("/worker") for a in argv[:3])
    return f"{hostname or socket.gethostname()}-{pid}" if is_worker else f"pid-{pid}"


class GpuCollector(Collector):
    """Prometheus collector of every GPU of this node (see ``docs/metrics.md``).

    Args:
        nvml: NVML access (a default :class:`Nvml` when None).
        name_of: pid -> worker name for per-process memory (default :func:`worker_name_of`).
    """

    def __init__(self, nvml: Nvml | None = None, name_of: Callable[[int], str] | None = None) -> None:
        self.nvml = nvml if nvml is not None else Nvml()
        self.name_of = name_of or worker_name_of
        self._logged = False

    def describe(self) -> list[Metric]:
        return []  # families depend on what the GPUs report; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        ok = self.nvml.available()
        yield GaugeMetricFamily(
            "trackfleet_gpu_available", "1 when NVML reports at least one GPU, else 0.", value=1 if ok else 0
        )
        if not ok:
            if not self._logged:
                log.warning("no GPU metrics: %s", self.nvml.error)
                self._logged = True
            return
        readings = self.nvml.read()
        labels = ["gpu", "gpu_uuid", "name"]

        def gauge(name: str, doc: str, attr: str) -> GaugeMetricFamily | None:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for r in readings:
                v = getattr(r, attr)
                if v is not None:
                    g.add_metric([str(r.index), r.uuid, r.name], v)
            return g if g.samples else None

        for fam in (
            gauge("trackfleet_gpu_utilization", "Fraction of time a kernel ran (NVML) [0-1].", "utilization"),
            gauge("trackfleet_gpu_memory_used_bytes", "Device memory in use.", "memory_used_bytes"),
            gauge("trackfleet_gpu_memory_total_bytes", "Device memory size.", "memory_total_bytes"),
            gauge("trackfleet_gpu_power_watts", "Board power draw.", "power_w"),
            gauge("trackfleet_gpu_power_limit_watts", "Enforced power limit.", "power_limit_w"),
            gauge("trackfleet_gpu_temperature_celsius", "GPU temperature.", "temperature_c"),
        ):
            if fam is not None:
                yield fam
        energy = CounterMetricFamily(
            "trackfleet_gpu_energy_joules", "Energy used since the driver loaded.", labels=labels
        )
        for r in readings:
            if r.energy_j is not None:
                energy.add_metric([str(r.index), r.uuid, r.name], r.energy_j)
        if energy.samples:
            yield energy
        procs = GaugeMetricFamily(
            "trackfleet_gpu_process_memory_used_bytes",
            "GPU memory used by one process, labelled by worker name.",
            labels=["gpu", "gpu_uuid", "worker"],
        )
        for r in readings:
            per_name: dict[str, int] = {}
            for pid, used in r.processes:
                name = self.name_of(pid)
                per_name[name] = per_name.get(name, 0) + used
            for name, used in sorted(per_name.items()):
                procs.add_metric([str(r.index), r.uuid, name], used)
        if procs.samples:
            yield procs
