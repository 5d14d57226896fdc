"""A CUDA source compiled on first use and its kernels launched with one thread per item.

CuPy is imported only when a kernel is first needed, so the modules holding the sources import on
machines without CuPy (the numpy backend, and tests that compile the sources for the host).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any


class CudaModule:
    """Args:
    source: the CUDA C++ source, or a function returning it (built on first use).
    block: threads per block of every launch.
    options: extra NVRTC options (``--std=c++14`` is always given).
    """

    def __init__(
        self, source: str | Callable[[], str], block: int = 128, options: tuple[str, ...] = ()
    ) -> None:
        self._source = source
        self.block = block
        self.options = ("--std=c++14", *options)
        self._module: Any = None

    def function(self, name: str) -> Any:
        """The compiled kernel ``name`` (the whole source is compiled at the first call)."""
        if self._module is None:
            cupy = importlib.import_module("cupy")
            code = self._source() if callable(self._source) else self._source
            self._module = cupy.RawModule(code=code, options=self.options)
        return self._module.get_function(name)

    def launch(self, name: str, n: int, args: tuple) -> None:
        """Run kernel ``name`` over ``n`` threads (nothing when ``n`` is 0)."""
        if n > 0:
            self.function(name)((math.ceil(n / self.block),), (self.block,), args)
