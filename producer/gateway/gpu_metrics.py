"""Triton-style metrics on the gateway's metrics port: GPU gauges from NVML and the model's counters.

perf_analyzer's ``--collect-metrics`` scrapes this endpoint and matches each GPU line with a regular
expression of the form ``\\nNAME{gpu_uuid="..."} DIGITS[.DIGITS]``: one label, one space, a plain
decimal number. prometheus_client renders floats with ``repr`` (``8.1e+10``), which that expression
does not match, so the text is written here by hand, without exponents:

- ``nv_gpu_utilization{gpu_uuid}``: 0..1 over NVML's last sample period;
- ``nv_gpu_memory_total_bytes`` / ``nv_gpu_memory_used_bytes``: integers;
- ``nv_gpu_power_usage``: watts; ``nv_energy_consumption``: joules since the driver loaded;
- ``nv_inference_*{model,version}``: request, inference and execution counts and cumulative durations
  [µs] (Triton's names), from the gateway's statistics.

NVML (``pynvml``, the ``nvidia-ml-py`` package) is imported lazily; without it, or without a GPU, the
endpoint still answers, with the model's counters only.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment.

    Attributes:
        uuid: NVML's UUID (``GPU-...``). utilization: busy fraction 0..1. memory_total_bytes /
        memory_used_bytes: device memory [bytes]. power_w: draw [W]. energy_j: energy since the driver
        loaded [J] (None when NVML does not report it).
    """

    uuid: str
    utilization: float
    memory_total_bytes: int
    memory_used_bytes: int
    power_w: float
    energy_j: float | None = None


class NvmlSampler:
    """Samples every GPU NVML sees; a machine without NVML or GPUs gives an empty list."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._failed = False

    def _init(self) -> bool:
        if self._nvml is not None:
            return True
        if self._failed:
            return False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as exc:  # no package, no driver, no GPU: metrics without GPU series
            self._failed = True
            log.info("no GPU metrics: NVML unavailable (%s)", exc)
            return False
        return True

    def sample(self) -> list[GpuSample]:
        with self._lock:
            if not self._init():
                return []
            nv = self._nvml
            out = []
            for h in self._handles:
                try:
                    uuid = nv.nvmlDeviceGetUUID(h)
                    uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                    util = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
                    mem = nv.nvmlDeviceGetMemoryInfo(h)
                    power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                    try:
                        energy: float | None = nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0
                    except Exception:  # not supported on every board
                        energy = None
                    out.append(GpuSample(uuid, util, int(mem.total), int(mem.used), power, energy))
                except Exception as exc:  # one GPU that cannot be read must not hide the others
                    log.debug("NVML read failed: %s", exc)
            return out


def plain(value: float, decimals: int = 6) -> str:
    """A non-negative number in plain decimal notation (never an exponent); integers without a point."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    v = max(0.0, float(value))
    if v.is_integer():
        return str(int(v))
    return f"{v:.{decimals}f}"


_GPU_GAUGES: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", lambda s: s.utilization),
    ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", lambda s: s.memory_total_bytes),
    ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", lambda s: s.memory_used_bytes),
    ("nv_gpu_power_usage", "GPU power usage in watts", lambda s: s.power_w),
    (
        "nv_energy_consumption",
        "GPU energy consumption in joules since the driver loaded",
        lambda s: s.energy_j,
    ),
)

_MODEL_COUNTERS = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        "success",
        "count",
    ),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "fail", "count"),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds",
        "success",
        "us",
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds",
        "queue",
        "us",
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
        "compute_input",
        "us",
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
        "compute_infer",
        "us",
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds",
        "compute_output",
        "us",
    ),
)


def render(gpus: Sequence[GpuSample], model_stats: Sequence[dict[str, Any]] = ()) -> str:
    """The Prometheus text exposition (format 0.0.4) of GPU samples and KServe ``model_stats`` entries."""
    lines: list[str] = []
    for name, help_text, get in _GPU_GAUGES:
        rows = [(s.uuid, get(s)) for s in gpus]
        rows = [(u, v) for u, v in rows if v is not None and math.isfinite(v)]
        if not rows:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{gpu_uuid="{_escape(u)}"}} {plain(v)}' for u, v in rows]
    if model_stats:
        for name, help_text, key, unit in _MODEL_COUNTERS:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            for m in model_stats:
                d = m["inference_stats"][key]
                v = d["count"] if unit == "count" else d["ns"] // 1000
                lines.append(
                    f'{name}{{model="{_escape(m["name"])}",version="{_escape(m["version"])}"}} {int(v)}'
                )
        for name, help_text, key in (
            ("nv_inference_count", "Number of inferences performed", "inference_count"),
            ("nv_inference_exec_count", "Number of model executions performed", "execution_count"),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [
                f'{name}{{model="{_escape(m["name"])}",version="{_escape(m["version"])}"}} {int(m[key])}'
                for m in model_stats
            ]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer(ThreadingHTTPServer):
    """``GET /metrics`` on its own port (Triton's 8002).

    Args:
        address: (host, port); port 0 picks a free one.
        collect: returns the exposition text on each scrape.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], collect: Callable[[], str]) -> None:
        self.collect = collect
        super().__init__(address, _MetricsHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _MetricsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MetricsServer
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            body, status, ctype = b'{"error":"not found; try /metrics"}', 404, "application/json"
        else:
            try:
                body, status, ctype = (
                    self.server.collect().encode(),
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            except Exception as exc:  # a scrape must never take the server down
                log.exception("metrics collection failed")
                body, status, ctype = f'{{"error":"{type(exc).__name__}"}}'.encode(), 500, "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
