"""Compile the fused CUDA kernels for the host, so that tests can check them against the array code
on machines without a GPU (the same source, with a tiny shim for the CUDA built-ins)."""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHIM = """
#include <cmath>
using std::sin; using std::cos; using std::floor; using std::fabs; using std::sqrt; using std::hypot;
using std::fmax; using std::fmin; using std::asin; using std::log; using std::isnan; using std::isfinite;
#define __device__
#define __forceinline__ inline
#define __global__
struct Dim { int x; };
static thread_local Dim blockIdx{0}, threadIdx{0}, blockDim{1};
// the host runs the threads one after another, so an atomic is a plain read-modify-write
#include <cstring>
inline long long __double_as_longlong(double d) { long long b; std::memcpy(&b, &d, 8); return b; }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long cmp, unsigned long long v) {
  unsigned long long old = *a; if (old == cmp) *a = v; return old; }
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
  unsigned long long old = *a; if (v < old) *a = v; return old; }
inline int atomicCAS(int* a, int cmp, int v) { int old = *a; if (old == cmp) *a = v; return old; }
inline double atomicAdd(double* a, double v) { double old = *a; *a = old + v; return old; }
inline int atomicAdd(int* a, int v) { int old = *a; *a = old + v; return old; }
inline int atomicMax(int* a, int v) { int old = *a; if (v > old) *a = v; return old; }
inline int atomicMin(int* a, int v) { int old = *a; if (v < old) *a = v; return old; }
inline long long atomicMin(long long* a, long long v) { long long old = *a; if (v < old) *a = v; return old; }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  unsigned long long old = *a; *a = old + v; return old; }
"""


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def build(source: str) -> ctypes.CDLL:
    """Shared library with one host driver per kernel: ``name(args..., n_threads)``."""
    code = source.replace('extern "C" __global__ void ', "void k_")
    drivers = []
    for m in re.finditer(r"void k_(\w+)\((.*?)\)\s*\{", code, re.S):
        name, params = m.group(1), m.group(2)
        names = [re.split(r"[\s\*]+", p.strip())[-1] for p in params.split(",")]
        drivers.append(
            f'extern "C" void {name}({params}, int n_total) {{ for (int t = 0; t < n_total; ++t) '
            f"{{ blockIdx.x = t; k_{name}({', '.join(names)}); }} }}"
        )
    text = SHIM + code + "\n" + "\n".join(drivers) + "\n"
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"trackfleet-host-{digest}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(text)
        subprocess.run([compiler() or "g++", "-O1", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return ctypes.CDLL(str(out))


def _arg(a):
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise AssertionError("a kernel received a non-contiguous array")
        return a.ctypes.data_as(ctypes.c_void_p)
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a))
    if isinstance(a, (np.int32, np.int8, int)):
        return ctypes.c_int(int(a))
    return ctypes.c_double(float(a))


def launcher(lib: ctypes.CDLL):
    def launch(name: str, n: int, args: tuple) -> None:
        if n:
            getattr(lib, name)(*[_arg(a) for a in args], ctypes.c_int(n))

    return launch


def launched_modules() -> list[Any]:
    """The kernel modules whose kernels go through their module's ``_launch`` (built from ``_SOURCE``);
    :mod:`kernels.fused_fit` calls its kernel directly (source: ``full_source()``)."""
    import importlib

    names = (
        "fused",
        "fused_seeding",
        "fused_prune",
        "fused_ambiguity",
        "fused_clusterization",
        "fused_measurements",
        "fused_rows",
    )
    return [importlib.import_module(f"kernels.{name}") for name in names]


def install(set_attr: Callable[[Any, str, Any], None] = setattr) -> None:
    """Route every fused launch of :mod:`kernels` to host builds and switch the fused paths on for
    numpy (``set_attr``: ``setattr``, or pytest's ``monkeypatch.setattr`` to undo it after a test)."""
    from kernels import fused, fused_fit

    for module in launched_modules():
        set_attr(module, "_launch", launcher(build(module._SOURCE)))
    fit_lib = build(fused_fit.full_source())

    class _Fit:
        def __call__(self, grid, block, args):
            launcher(fit_lib)("fit_tracks", int(args[5]), args)

    set_attr(fused_fit, "_kernel", lambda lanes=1: _Fit())  # one thread per track on the host
    set_attr(fused, "enabled", lambda xp: True)
