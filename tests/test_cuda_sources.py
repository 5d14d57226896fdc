"""Every CUDA source of :mod:`kernels` compiles with NVRTC, the compiler CuPy uses at run time.

NVRTC needs no GPU: with the ``cuda-check`` extra installed (NVIDIA's ``nvidia-cuda-nvrtc-cu12``
wheel), a kernel change is compiled here before it ever reaches a GPU machine. Without it, or with
``TRACKFLEET_NVRTC`` pointing at no library, the test is skipped. The host build of the same sources
(tests/test_fused_host.py) checks what they compute.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import pytest
from host_kernels import launched_modules

from kernels import fused_fit


def _nvrtc() -> ctypes.CDLL | None:
    candidates = [os.environ.get("TRACKFLEET_NVRTC", "")]
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    except ModuleNotFoundError:  # no "nvidia" namespace at all
        spec = None
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        candidates += sorted(str(p) for p in lib.glob("libnvrtc.so*") if "builtins" not in p.name)
    for path in filter(None, candidates):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _nvrtc()
SOURCES = {m.__name__.rsplit(".", 1)[-1]: (lambda m=m: m._SOURCE) for m in launched_modules()}
SOURCES["fused_fit"] = fused_fit.full_source


def _compile(lib: ctypes.CDLL, name: str, source: str) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) == 0
    try:
        options = (ctypes.c_char_p * 2)(b"--std=c++14", b"--gpu-architecture=compute_90")
        status = lib.nvrtcCompileProgram(prog, 2, options)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return status, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.skipif(NVRTC is None, reason="NVRTC not installed (pip install -e '.[cuda-check]')")
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_cuda_source_compiles(name):
    assert NVRTC is not None
    status, log = _compile(NVRTC, name, SOURCES[name]())
    assert status == 0, f"{name} does not compile:\n{log}"


@pytest.mark.skipif(NVRTC is None, reason="NVRTC not installed (pip install -e '.[cuda-check]')")
def test_a_broken_source_is_reported():
    assert NVRTC is not None
    status, log = _compile(NVRTC, "broken", 'extern "C" __global__ void k() { undefined_fn(); }')
    assert status != 0 and "undefined_fn" in log
