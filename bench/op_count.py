"""Array operations and host waits per event and stage, counted on the CPU: a proxy for GPU launches.

At batch 1 on the GPU the chain is bound by launches, not arithmetic: each array operation is a
kernel launch costing ~10-30 us of host time, and each host wait drains the device's queue
(``bench/gpu_timeline.py`` measures that on the GPU). This script counts both without a GPU, so a
change that removes launches can be checked before any device time is spent. It runs the chain on
the numpy backend with the fused kernels compiled for the host (the same code path CuPy takes,
tests/host_kernels.py), through a namespace that counts:

- ``ops``: ufunc calls (elementwise and reductions), array functions (concatenate, cumsum, where,
  ...), creations (empty, zeros, arange, asarray of device data), ``astype``/``copy``, indexing with
  arrays, every assignment into an array, and fused kernel launches (``kernels``, also counted
  apart): one each, what CuPy launches for them, roughly (a fancy-index gather is one kernel, a
  boolean mask several);
- ``allocs``: allocations without a launch (``empty``, ``ascontiguousarray`` of an array already
  contiguous and of the dtype asked for);
- ``waits``: conversions to host scalars or lists (``int``, ``float``, ``bool``, ``item``,
  ``tolist``), ``nonzero``/``flatnonzero``/``argwhere``/``unique`` (their size needs the device) and
  copies to the host (``kernels.xp.to_numpy`` included).

Per stage, as the difference between prefixes of the chain (``last_stage``), per event.

    .venv/bin/python bench/op_count.py [--input data/generic-mu20] [--events 1] [--json OUT] [--sites N]
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kernels.pipeline import STAGES, Chain, ChainConfig  # noqa: E402
from producer.io.detector import find_detector_files, load_detector  # noqa: E402
from producer.io.events import discover, load_cells  # noqa: E402

COUNTS: Counter[str] = Counter()
#: (kind, "file:line") of the chain's code that asked for each counted operation, when --sites is given
SITES: Counter[tuple[str, str]] = Counter()
_TRACK_SITES = [False]
_DEPTH = [0]
WAITING = {"nonzero", "flatnonzero", "argwhere", "unique"}
ALLOCATING = {"empty", "empty_like"}  # memory from the pool, no launch
COPY_IF_NEEDED = {"ascontiguousarray"}  # a launch only when it copies
FREE = {"dtype", "result_type", "can_cast", "iinfo", "finfo", "ndim", "shape"}


KEYS = ("ops", "kernels", "waits", "allocs")


def _wrap(x: Any) -> Any:
    if type(x) is np.ndarray:
        return x.view(Counted)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _plain(x: Any) -> Any:
    if isinstance(x, Counted):
        return x.view(np.ndarray)
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):  # keyword arguments (out=...)
        return {k: _plain(v) for k, v in x.items()}
    return x


def _count(kind: str) -> None:
    if _DEPTH[0] == 0:
        COUNTS[kind] += 1
        if _TRACK_SITES[0]:
            SITES[kind, _site()] += 1


def _site() -> str:
    """The innermost frame of the chain's own code (kernels/) below this script's wrappers."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/kernels/" in name and not name.endswith("kernels/xp.py"):
            return f"{Path(name).relative_to(ROOT)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _count_host_copies() -> None:
    """``kernels.xp.to_numpy`` is a copy to the host on CuPy (a wait) but free on numpy: count it (and
    ``to_host_many`` as one wait), in every module of the chain that imported them by name."""
    import kernels.xp as kxp

    inner = kxp.to_numpy

    def to_numpy(a):
        _count("waits")
        return inner(_plain(a))

    many = kxp.to_host_many

    def to_host_many(arrays):  # one wait for all of them
        _count("waits")
        return many([_plain(a) for a in arrays])

    for name, module in list(sys.modules.items()):
        if name == "kernels" or name.startswith("kernels."):
            if getattr(module, "to_numpy", None) is inner:
                module.to_numpy = to_numpy
            if getattr(module, "to_host_many", None) is many:
                module.to_host_many = to_host_many


class Counted(np.ndarray):
    """An ndarray whose operations are counted (once each, nested calls not)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _count("ops")
        _DEPTH[0] += 1
        try:
            if "out" in kwargs:
                kwargs["out"] = _plain(kwargs["out"])
            return _wrap(getattr(ufunc, method)(*_plain(inputs), **kwargs))
        finally:
            _DEPTH[0] -= 1

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        _count("waits" if name in WAITING else "ops")
        _DEPTH[0] += 1
        try:
            return _wrap(func(*_plain(args), **_plain(kwargs)))
        finally:
            _DEPTH[0] -= 1

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, (np.ndarray, list)) for k in keys):
            _count("ops")
        return _wrap(np.ndarray.__getitem__(self.view(np.ndarray), _plain(key)))

    def __setitem__(self, key, value):
        _count("ops")
        np.ndarray.__setitem__(self.view(np.ndarray), _plain(key), _plain(value))

    def astype(self, *args, **kwargs):
        _count("ops")
        return _wrap(self.view(np.ndarray).astype(*args, **kwargs))

    def copy(self, *args, **kwargs):
        _count("ops")
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs))

    def nonzero(self):
        _count("waits")
        return _wrap(self.view(np.ndarray).nonzero())

    def __int__(self):
        _count("waits")
        return int(self.view(np.ndarray))

    def __index__(self):
        _count("waits")
        return self.view(np.ndarray).__index__()

    def __float__(self):
        _count("waits")
        return float(self.view(np.ndarray))

    def __bool__(self):
        _count("waits")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        _count("waits")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _count("waits")
        return self.view(np.ndarray).tolist()

    def get(self):  # CuPy's copy to the host
        _count("waits")
        return self.view(np.ndarray).copy()


class CountingNumpy(types.ModuleType):
    """numpy, with every function call counted and its arrays wrapped."""

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr) or isinstance(attr, np.ufunc):
            if isinstance(attr, np.ufunc):
                return _counted_ufunc(attr)
            return attr

        def call(*args, **kwargs):
            if name in FREE:
                return _wrap(attr(*_plain(args), **_plain(kwargs)))
            if name in COPY_IF_NEEDED:
                a = _plain(args[0])
                dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
                same = (
                    isinstance(a, np.ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype)
                )
                _count("allocs" if same else "ops")
                return _wrap(attr(*_plain(args), **_plain(kwargs)))
            _count("waits" if name in WAITING else "allocs" if name in ALLOCATING else "ops")
            _DEPTH[0] += 1
            try:
                return _wrap(attr(*_plain(args), **_plain(kwargs)))
            finally:
                _DEPTH[0] -= 1

        return call


def _counted_ufunc(uf: np.ufunc) -> Any:
    def call(*args, **kwargs):
        _count("ops")
        _DEPTH[0] += 1
        try:
            return _wrap(uf(*_plain(args), **_plain(kwargs)))
        finally:
            _DEPTH[0] -= 1

    return call


def _count_launches() -> None:
    """Count every fused kernel launch (after host_kernels.install routed them to host builds)."""
    from host_kernels import launched_modules

    from kernels import fused_fit

    for module in launched_modules():
        inner = module._launch

        def launch(name, n, args, _inner=inner):
            _count("ops")
            _count("kernels")
            _DEPTH[0] += 1
            try:
                return _inner(name, n, tuple(_plain(a) for a in args))
            finally:
                _DEPTH[0] -= 1

        module._launch = launch
    make = fused_fit._kernel

    def kernel(lanes=1):
        k = make(1)

        def run(grid, block, args):
            _count("ops")
            _count("kernels")
            return k(grid, block, tuple(_plain(a) for a in args))

        return run

    fused_fit._kernel = kernel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(ROOT / "data" / "generic-mu20"))
    ap.add_argument("--events", type=int, default=1, help="events, reconstructed one at a time (default 1)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--sites", type=int, default=0, metavar="N",
        help="also print the N call sites in kernels/ with the most operations and waits (whole chain)",
    )  # fmt: skip
    args = ap.parse_args()
    from host_kernels import compiler, install

    if compiler() is None:
        print("bench/op_count.py: needs a C++ compiler for the host build of the kernels", file=sys.stderr)
        return 2
    install()
    _count_launches()
    import kernels.pipeline  # noqa: F401  (every stage module imported before patching their names)

    _count_host_copies()
    xp = CountingNumpy()
    sources = discover(args.input)[: args.events]
    det = load_detector(find_detector_files(sources[0].cells.parent)[0].parent)
    events = [load_cells(s, det) for s in sources]
    prefixes: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        chain = Chain(xp, det, ChainConfig(last_stage=stage))  # type: ignore[arg-type]
        chain.reconstruct(events[0])  # geometry conversions once, as a warm worker has them
        COUNTS.clear()
        SITES.clear()
        _TRACK_SITES[0] = bool(args.sites) and stage == STAGES[-1]
        for e in events:
            chain.reconstruct(e)
        prefixes[stage] = {k: COUNTS[k] / len(events) for k in KEYS}
    stages, prev = {}, dict.fromkeys(KEYS, 0.0)
    print(f"{'stage':15s} {'ops':>7s} {'kernels':>8s} {'waits':>6s} {'allocs':>7s}")
    for stage in STAGES:
        cur = prefixes[stage]
        stages[stage] = {k: cur[k] - prev[k] for k in cur}
        prev = cur
        row = stages[stage]
        print(f"{stage:15s} {row['ops']:7.0f} {row['kernels']:8.0f} {row['waits']:6.0f} {row['allocs']:7.0f}")
    total = prefixes[STAGES[-1]]
    print(
        f"{'chain':15s} {total['ops']:7.0f} {total['kernels']:8.0f} {total['waits']:6.0f} {total['allocs']:7.0f}"
    )
    if args.sites:
        for kind in ("ops", "waits"):
            top = [(site, c) for (k, site), c in SITES.most_common() if k == kind][: args.sites]
            print(f"\n{kind} per event by call site:")
            for site, c in top:
                print(f"  {c / len(events):7.1f}  {site}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"input": args.input, "stages": stages, "chain": total}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
