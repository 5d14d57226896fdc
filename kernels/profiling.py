"""Optional fine-grained timing of sections inside stages, for benchmarks.

Off by default (no synchronization, no cost). ``enable(xp)`` makes every :func:`section` wait for
the device before and after it and add its wall time [s] to :data:`TIMES`, so a benchmark can see
which kernels of a stage cost what.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

TIMES: defaultdict[str, float] = defaultdict(float)
_XP: ModuleType | None = None


def enable(xp: ModuleType | None) -> None:
    """Start (``xp`` given) or stop (None) collecting section times."""
    global _XP
    _XP = xp
    TIMES.clear()


def _sync() -> None:
    if _XP is not None and _XP.__name__.split(".")[0] == "cupy":
        _XP.cuda.get_current_stream().synchronize()


@contextmanager
def section(name: str) -> Iterator[None]:
    if _XP is None:
        yield
        return
    _sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        TIMES[name] += time.perf_counter() - t0
