"""A stand-in for ``pynvml`` with two GPUs, so the GPU exporter is tested on machines without one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class FakeNvml:
    """Module-like object: ``Nvml(FakeNvml(...))``.

    Args:
        pids: per GPU, the pids of its compute processes (1 GiB each).
        no_power: GPU indices whose power and energy queries raise NotSupported.
        fail_init: nvmlInit raises (no driver).
    """

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError

    def __init__(
        self, pids: Sequence[Sequence[int]] = ((), ()), no_power: Sequence[int] = (), fail_init: bool = False
    ) -> None:
        self.pids = [list(p) for p in pids]
        self.no_power = set(no_power)
        self.fail_init = fail_init
        self.t0 = time.monotonic()

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.pids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-0000000{h}-fake".encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return "Fake H100"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=50 + 10 * h, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=(1 + h) * 2**30, total=80 * 2**30, free=(79 - h) * 2**30)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h in self.no_power:
            raise NVMLError_NotSupported("Not Supported")
        return 300_000 + h  # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        if h in self.no_power:
            raise NVMLError_NotSupported("Not Supported")
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if h in self.no_power:
            raise NVMLError_NotSupported("Not Supported")
        return int(1e6 + 300_000 * (time.monotonic() - self.t0))  # mJ, growing at 300 W

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 40

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=2**30) for p in self.pids[h]]
