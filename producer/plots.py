"""PNG plots of a validation result: efficiency vs pT and eta, residual and pull histograms.

Importing this module needs matplotlib (the ``plot`` extra); :mod:`producer.validate` imports it only
when plots are asked for and carries on without them when the import fails.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np

from producer.validate import SEED_PARAMS, TRACK_PARAMS, UNITS, Samples

log = logging.getLogger(__name__)


def _efficiency_plot(path: Path, curves: list[tuple[str, dict[str, Any]]], xlabel: str, logx: bool) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, b in curves:
        e = np.asarray(b["edges"])
        centre, half = 0.5 * (e[1:] + e[:-1]), 0.5 * (e[1:] - e[:-1])
        eff = np.array([np.nan if v is None else v for v in b["efficiency"]])
        err = np.array([np.nan if v is None else v for v in b["uncertainty"]])
        ax.errorbar(centre, eff, xerr=half, yerr=err, fmt="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("efficiency")
    ax.set_ylim(0, 1.05)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histograms(path: Path, data: dict[str, np.ndarray], title: str, units: dict[str, str] | None) -> None:
    names = list(data)
    ncol = min(3, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.2 * nrow), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        x = data[name][np.isfinite(data[name])]
        if x.size:
            if units is None:
                ax.hist(np.clip(x, -5, 5), bins=50, range=(-5, 5), histtype="step")
            else:
                lo, hi = np.quantile(x, [0.005, 0.995])
                ax.hist(x, bins=50, range=(lo, hi) if hi > lo else None, histtype="step")
            ax.set_title(f"{name}: mean {x.mean():.3g}, std {x.std():.3g}", fontsize=8)
        ax.set_xlabel(f"{name} [{units[name]}]" if units else f"pull {name}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(result: dict[str, Any], samples: Samples, out_dir: str | Path) -> list[Path]:
    """Write the plots of :func:`producer.validate.run_validation`'s output; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for var, xlabel, logx in (("pt", "truth pT [GeV]", True), ("eta", "truth eta", False)):
        curves = [
            (label, result[key])
            for label, key in (("tracks", f"efficiency_vs_{var}"), ("seeds", f"seeding_efficiency_vs_{var}"))
            if result.get(key) is not None
        ]
        if curves:
            path = out / f"efficiency_vs_{var}.png"
            _efficiency_plot(path, curves, xlabel, logx)
            written.append(path)
    for prefix, params, residuals, pulls in (
        ("track", TRACK_PARAMS, samples.track_residual, samples.track_pull),
        ("seed", SEED_PARAMS, samples.seed_residual, samples.seed_pull),
    ):
        if not residuals:
            continue
        path = out / f"{prefix}_residuals.png"
        _histograms(path, {p: Samples.pooled(residuals, p) for p in params}, f"{prefix} residuals", UNITS)
        written.append(path)
        path = out / f"{prefix}_pulls.png"
        _histograms(path, {p: Samples.pooled(pulls, p) for p in params}, f"{prefix} pulls", None)
        written.append(path)
    log.debug("plots: %s", [str(p) for p in written])
    return written
