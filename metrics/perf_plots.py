"""PNG figures of a ``trackfleet perf`` sweep, the ones a study puts on a slide.

- ``throughput_vs_concurrency.png`` (or ``throughput_vs_rate.png``): events/s against the load level, one
  curve per instance count;
- ``latency_vs_throughput.png``: p50 (dashed) and p99 (solid) latency against throughput, one colour per
  instance count;
- ``gpu_utilization_vs_instances.png``: GPU utilization and peak throughput against instances (left), GPU
  memory used (right), at the highest load level;
- ``latency_breakdown.png``: where the time of an event goes at the highest load level, per instance count
  (broker queue, worker queue, decode, chain, pack, rest).

Points whose windows never agreed within the stability bound are drawn hollow. Importing this module needs
matplotlib (the ``plot`` extra); :func:`metrics.perf.write_plots` skips the plots when it is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot

import matplotlib.pyplot as plt

log = logging.getLogger(__name__)
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its INFO lines would flood `trackfleet -v perf`


def _title(meta: dict[str, Any]) -> str:
    cfg = meta.get("config", {})
    devices = meta.get("gpu", {}).get("devices") or []
    card = devices[0]["name"] if devices else "CPU"
    events = Path(str(meta.get("events", {}).get("input", cfg.get("input", "")))).name
    return f"{events} on {card} ({cfg.get('backend', '?')}, batch {cfg.get('batch', 1)})"


def _level(row: dict[str, Any]) -> float:
    return float(row["concurrency"] if row.get("concurrency") is not None else row["request_rate"])


def _by_instances(rows: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(int(r["instances"]), []).append(r)
    for v in out.values():
        v.sort(key=_level)
    return dict(sorted(out.items()))


def _series(ax: Any, xs: list[float], ys: list[Any], stable: list[bool], **kw: Any) -> None:
    pts = [(x, y, s) for x, y, s in zip(xs, ys, stable, strict=True) if y is not None]
    if not pts:
        return
    line = ax.plot([p[0] for p in pts], [p[1] for p in pts], **kw)[0]
    hollow = [(x, y) for x, y, s in pts if not s]
    if hollow:
        ax.plot(*zip(*hollow, strict=True), "o", mfc="white", mec=line.get_color(), ms=7, zorder=3)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """Write every figure into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _by_instances(rows)
    if not groups:
        return []
    cmap = plt.get_cmap("viridis")
    colours = {n: cmap(i / max(len(groups) - 1, 1)) for i, n in enumerate(groups)}
    closed = rows[0].get("concurrency") is not None
    xlabel = "concurrency (events in flight)" if closed else "request rate [events/s]"
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, rs in groups.items():
        _series(
            ax,
            [_level(r) for r in rs],
            [r["throughput_eps"] for r in rs],
            [bool(r["stable"]) for r in rs],
            marker="o",
            color=colours[n],
            label=f"{n} instance{'s' if n > 1 else ''}",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("throughput [events/s]")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="per GPU", fontsize=8)
    ax.set_title(_title(meta), fontsize=10)
    name = "throughput_vs_concurrency.png" if closed else "throughput_vs_rate.png"
    written.append(_save(fig, out_dir / name))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, rs in groups.items():  # in load order, as perf_analyzer's latency-throughput curves
        xs = [r["throughput_eps"] for r in rs]
        st = [bool(r["stable"]) for r in rs]
        _series(
            ax, xs, [r["latency_p99_ms"] for r in rs], st, marker="o", color=colours[n], label=f"{n}: p99"
        )
        _series(ax, xs, [r["latency_p50_ms"] for r in rs], st, ls="--", color=colours[n], label=f"{n}: p50")
    ax.set_xlabel("throughput [events/s]")
    ax.set_ylabel("latency [ms]")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="instances", fontsize=7, ncol=2)
    ax.set_title(_title(meta), fontsize=10)
    written.append(_save(fig, out_dir / "latency_vs_throughput.png"))

    top = [max(rs, key=_level) for rs in groups.values()]
    ns = list(groups)
    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(10, 4.2))
    util = [None if r.get("gpu_utilization") is None else 100 * float(r["gpu_utilization"]) for r in top]
    peak = [max(float(r["throughput_eps"]) for r in rs) for rs in groups.values()]
    ax2 = ax.twinx()
    ax2.bar(ns, peak, color="0.85", width=0.6, label="peak throughput", zorder=0)
    ax2.set_ylabel("peak throughput [events/s]")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    if any(u is not None for u in util):
        ax.plot(
            [n for n, u in zip(ns, util, strict=True) if u is not None],
            [u for u in util if u is not None],
            "o-",
        )
    else:
        ax.text(0.5, 0.5, "no GPU readings", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_ylim(0, 105)
    ax.set_xlabel("instances per GPU")
    ax.set_ylabel(f"GPU utilization [%] at {xlabel.split(' ')[0]} {_level(top[-1]):g}")
    ax.set_xticks(ns)
    ax.grid(alpha=0.3)
    mem = [r.get("gpu_memory_used_bytes") for r in top]
    total = next((r.get("gpu_memory_total_bytes") for r in top if r.get("gpu_memory_total_bytes")), None)
    if any(m is not None for m in mem):
        ax_mem.plot([n for n, m in zip(ns, mem, strict=True) if m], [m / 1e9 for m in mem if m], "o-")
        if total:
            ax_mem.axhline(float(total) / 1e9, color="0.5", ls=":", label="GPU memory")
            ax_mem.legend(fontsize=8)
    else:
        ax_mem.text(0.5, 0.5, "no GPU readings", transform=ax_mem.transAxes, ha="center", color="0.4")
    ax_mem.set_xlabel("instances per GPU")
    ax_mem.set_ylabel("GPU memory used [GB]")
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_xticks(ns)
    ax_mem.grid(alpha=0.3)
    fig.suptitle(_title(meta), fontsize=10)
    written.append(_save(fig, out_dir / "gpu_utilization_vs_instances.png"))

    parts = (
        ("broker_queue_ms", "broker queue"),
        ("worker_queue_ms", "worker queue"),
        ("compute_input_ms", "decode"),
        ("compute_infer_ms", "chain"),
        ("compute_output_ms", "pack"),
        ("other_ms", "network + client"),
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = [0.0] * len(top)
    for key, label in parts:
        vals = [max(0.0, float(r.get(key) or 0.0)) for r in top]
        ax.bar(range(len(ns)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("instances per GPU")
    ax.set_ylabel("mean time per event [ms]")
    ax.set_title(f"{_title(meta)}\nat {xlabel.split(' ')[0]} {_level(top[-1]):g}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    written.append(_save(fig, out_dir / "latency_breakdown.png"))
    log.debug("plots: %s", [str(p) for p in written])
    return written
