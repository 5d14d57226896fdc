"""NVML readings without Prometheus: :class:`Nvml` (pynvml, imported lazily, failure-tolerant), an
``nvidia-smi`` fallback, and :class:`GpuSampler`, which samples them in the background for the windows of
``trackfleet perf``.

This module needs neither prometheus_client nor pynvml to import, so a sweep runs on a GPU machine that has
only the fleet's own dependencies; :mod:`metrics.gpu` builds the node exporter's collector on top of it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. None: the GPU or driver does not report it.

    Attributes:
        index: NVML index (PCI order). uuid / name: as NVML reports them.
        utilization: fraction of time a kernel was running over the driver's last sample period [0-1].
        memory_used_bytes / memory_total_bytes: device memory [bytes].
        power_w / power_limit_w: board power draw and enforced limit [W].
        energy_j: energy since the driver loaded [J].
        temperature_c: GPU temperature [degrees C].
        processes: (pid, GPU memory used [bytes]) of the compute processes on it.
    """

    index: int
    uuid: str
    name: str
    utilization: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    energy_j: float | None = None
    temperature_c: float | None = None
    processes: tuple[tuple[int, int], ...] = ()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """Failure-tolerant access to NVML.

    Args:
        module: the ``pynvml`` module or a stand-in with the same functions (tests); None imports pynvml
            on first use.
    """

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        self._module = module
        self._ready: bool | None = None
        self.error: str | None = None

    def available(self) -> bool:
        """Initialize NVML once; False (with :attr:`error` set) when there is no library, driver or GPU."""
        if self._ready is not None:
            return self._ready
        mod = self._module
        if mod is None:
            try:
                import pynvml

                mod = pynvml
            except ImportError:
                self.error = "pynvml is not installed (pip install nvidia-ml-py, or the 'gpu' extra)"
        if mod is not None:
            try:
                mod.nvmlInit()
                if int(mod.nvmlDeviceGetCount()) < 1:
                    self.error = "NVML reports no GPU"
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                self.error = f"NVML unavailable: {exc}"
        self._module = mod
        self._ready = self.error is None
        return self._ready

    def _try(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._module, fn)(*args)
        except Exception:  # NVMLError_NotSupported and friends: leave that reading out
            return None

    def read(self) -> list[GpuReading]:
        """Every GPU's current readings ([] when NVML is unavailable)."""
        if not self.available():
            return []
        mod = self._module
        out = []
        count = self._try("nvmlDeviceGetCount") or 0
        for i in range(int(count)):
            h = self._try("nvmlDeviceGetHandleByIndex", i)
            if h is None:
                continue
            util = self._try("nvmlDeviceGetUtilizationRates", h)
            mem = self._try("nvmlDeviceGetMemoryInfo", h)
            power = self._try("nvmlDeviceGetPowerUsage", h)
            limit = self._try("nvmlDeviceGetEnforcedPowerLimit", h)
            energy = self._try("nvmlDeviceGetTotalEnergyConsumption", h)
            temp = self._try("nvmlDeviceGetTemperature", h, getattr(mod, "NVML_TEMPERATURE_GPU", 0))
            procs = self._try("nvmlDeviceGetComputeRunningProcesses", h) or []
            out.append(
                GpuReading(
                    index=i,
                    uuid=_text(self._try("nvmlDeviceGetUUID", h) or f"GPU-index-{i}"),
                    name=_text(self._try("nvmlDeviceGetName", h) or "unknown"),
                    utilization=None if util is None else float(util.gpu) / 100.0,
                    memory_used_bytes=None if mem is None else int(mem.used),
                    memory_total_bytes=None if mem is None else int(mem.total),
                    power_w=None if power is None else float(power) / 1e3,
                    power_limit_w=None if limit is None else float(limit) / 1e3,
                    energy_j=None if energy is None else float(energy) / 1e3,
                    temperature_c=None if temp is None else float(temp),
                    processes=tuple(
                        (int(p.pid), int(p.usedGpuMemory or 0))
                        for p in procs
                        if getattr(p, "pid", None) is not None
                    ),
                )
            )
        return out


def _smi_float(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def read_nvidia_smi(timeout_s: float = 5.0) -> list[GpuReading]:
    """Readings through ``nvidia-smi`` (when pynvml is missing); [] when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "index,uuid,name,utilization.gpu,memory.used,memory.total,power.draw,power.limit"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    readings = []
    for line in out.splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) < 8 or not f[0].isdigit():
            continue
        util, used, total = _smi_float(f[3]), _smi_float(f[4]), _smi_float(f[5])
        readings.append(
            GpuReading(
                index=int(f[0]),
                uuid=f[1],
                name=f[2],
                utilization=None if util is None else util / 100.0,
                memory_used_bytes=None if used is None else int(used * 2**20),
                memory_total_bytes=None if total is None else int(total * 2**20),
                power_w=_smi_float(f[6]),
                power_limit_w=_smi_float(f[7]),
            )
        )
    return readings


class GpuSampler:
    """Samples GPU readings every ``interval_s`` on a background thread, for windows of a sweep.

    Args:
        gpus: NVML indices to keep (None: all).
        interval_s: sampling period [s].
        nvml: NVML access (default: pynvml, falling back to ``nvidia-smi``).
        clock: monotonic time source [s].
    """

    def __init__(
        self,
        gpus: Sequence[int] | None = None,
        interval_s: float = 0.2,
        nvml: Nvml | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gpus = None if gpus is None else tuple(gpus)
        self.interval_s = interval_s
        self.nvml = nvml
        self.clock = clock
        self.source = "none"  # "nvml", "nvidia-smi" or "none", once started
        self.samples: list[tuple[float, list[GpuReading]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _read(self) -> list[GpuReading]:
        if self.source == "nvml" and self.nvml is not None:
            readings = self.nvml.read()
        elif self.source == "nvidia-smi":
            readings = read_nvidia_smi()
        else:
            return []
        return [r for r in readings if self.gpus is None or r.index in self.gpus]

    def start(self) -> GpuSampler:
        """Pick a source (NVML, else nvidia-smi, else none) and start sampling."""
        nvml = self.nvml if self.nvml is not None else Nvml()
        if nvml.available():
            self.nvml, self.source = nvml, "nvml"
        elif read_nvidia_smi():
            self.source = "nvidia-smi"
            log.info("GPU sampling through nvidia-smi (%s)", nvml.error)
        else:
            log.warning("no GPU readings: %s, and no working nvidia-smi", nvml.error)
            return self
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t = self.clock()
            readings = self._read()
            with self._lock:
                self.samples.append((t, readings))
                if len(self.samples) > 100_000:
                    del self.samples[:50_000]
            self._stop.wait(max(0.0, self.interval_s - (self.clock() - t)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def devices(self) -> list[GpuReading]:
        """The latest readings (names, uuids, totals), [] without a source; reads once itself when the
        sampling thread has not produced a sample yet (right after :meth:`start`)."""
        with self._lock:
            if self.samples:
                return list(self.samples[-1][1])
        return list(self._read())

    def summary(self, t0: float, t1: float) -> dict[str, float | None]:
        """Readings between ``t0`` and ``t1`` [s, on :attr:`clock`]: mean utilization over the GPUs, peak
        memory used and total (summed over the GPUs), mean power (summed)."""
        with self._lock:
            window = [rs for t, rs in self.samples if t0 <= t <= t1 and rs]
        out: dict[str, float | None] = {
            "gpu_utilization": None,
            "gpu_memory_used_bytes": None,
            "gpu_memory_total_bytes": None,
            "gpu_power_w": None,
            "gpu_samples": float(len(window)),
        }
        if not window:
            return out
        utils = [r.utilization for rs in window for r in rs if r.utilization is not None]
        used = [sum(r.memory_used_bytes or 0 for r in rs) for rs in window]
        power = [sum(r.power_w or 0.0 for r in rs) for rs in window if any(r.power_w for r in rs)]
        out["gpu_utilization"] = sum(utils) / len(utils) if utils else None
        out["gpu_memory_used_bytes"] = float(max(used))
        out["gpu_memory_total_bytes"] = float(sum(r.memory_total_bytes or 0 for r in window[-1]))
        out["gpu_power_w"] = sum(power) / len(power) if power else None
        return out
