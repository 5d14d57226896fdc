"""Tests for producer.sim: digitization-config builder (pure) and a tiny pyacts simulation.

The simulation tests need pyacts (the ``sim`` extra) and are skipped without it; they check that a
run writes every documented file, non-empty, and that the same seed gives byte-identical CSV files
(the determinism the bundled data and its README promise).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from producer.sim import digi_config as dc
from producer.sim import simulate as sim

# --- pure parts (no acts needed) ----------------------------------------------------------------


def test_pixel_layer_grouped_with_50um_cells() -> None:
    shapes = [dc.ModuleShape(8, 2, s, "rectangle", 8.4, 36.0) for s in range(1, 5)]
    cfg = dc.build_digi_config(shapes)
    assert cfg["acts-geometry-hierarchy-map"]["value-identifier"] == "digitization-configuration"
    (entry,) = cfg["entries"]
    assert entry["volume"] == 8 and entry["layer"] == 2 and "sensitive" not in entry
    geo = entry["value"]["geometric"]
    b0, b1 = geo["segmentation"]["binningdata"]
    assert (b0["bins"], b0["min"], b0["max"], b0["value"]) == (336, -8.4, 8.4, "binX")
    assert (b1["bins"], b1["min"], b1["max"], b1["value"]) == (1440, -36.0, 36.0, "binY")
    assert geo["indices"] == [0, 1] and geo["thickness"] == 0.15 and geo["threshold"] == 0.0
    assert geo["digital"] is False


def test_mixed_trapezoid_layer_gets_per_module_entries_and_long_strips_are_1d() -> None:
    shapes = [
        dc.ModuleShape(16, 2, 7, "trapezoid", 72.0, 78.0),
        dc.ModuleShape(16, 2, 3, "trapezoid", 64.2, 78.0),
    ]
    entries = dc.build_digi_config(shapes)["entries"]
    assert [e["sensitive"] for e in entries] == [3, 7]  # sorted, one per module
    geo = entries[0]["value"]["geometric"]
    b0, b1 = geo["segmentation"]["binningdata"]
    assert b0["bins"] == 1070 and b1["bins"] == 1 and (b1["min"], b1["max"]) == (-78.0, 78.0)
    assert geo["indices"] == [0] and geo["thickness"] == 0.35


def test_short_strip_pitch_and_unknown_volume() -> None:
    (entry,) = dc.build_digi_config([dc.ModuleShape(13, 4, 1, "rectangle", 24.0, 54.0)])["entries"]
    b0, b1 = entry["value"]["geometric"]["segmentation"]["binningdata"]
    assert (b0["bins"], b1["bins"]) == (600, 90)
    with pytest.raises(ValueError, match="volume 3"):
        dc.build_digi_config([dc.ModuleShape(3, 2, 1, "rectangle", 1.0, 1.0)])


def test_written_config_is_valid_json(tmp_path: Path) -> None:
    cfg = dc.build_digi_config([dc.ModuleShape(7, 2, 1, "rectangle", 8.4, 36.0)])
    path = tmp_path / "digi.json"
    dc.write_digi_config(cfg, path)
    assert json.loads(path.read_text()) == cfg


def test_settings_defaults_and_validation() -> None:
    muons = sim.resolve_settings(events=1, particles=10, species="muon")
    assert muons.spectrum == "flat" and muons.pt_range_gev == (1.0, 100.0) and muons.eta_max == 2.5
    assert muons.pieces() == [(10, 1.0, 100.0)]
    pileup = sim.resolve_settings(events=1, mu=20)
    assert pileup.spectrum == "falling" and pileup.eta_max == 3.0
    assert sum(c for c, _, _ in pileup.pieces()) == 35
    split = sim.resolve_settings(events=1, particles=10).pieces()
    assert sum(c for c, _, _ in split) == 10
    with pytest.raises(ValueError):
        sim.resolve_settings(events=1, mu=20, particles=3)
    with pytest.raises(ValueError):
        sim.resolve_settings(events=1)
    with pytest.raises(ValueError):
        sim.resolve_settings(events=1, mu=5, spectrum="falling", pt_range_gev=(1.0, 2.0))


def test_missing_acts_explains_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "acts", None)  # makes `import acts` raise ImportError
    with pytest.raises(sim.SimulationUnavailable, match=r"pip install -e '\.\[sim\]'"):
        sim.simulate(tmp_path, events=1, particles=1)


# --- pyacts simulation --------------------------------------------------------------------------


def _run(out: Path, **kwargs: Any) -> dict[str, Any]:
    pytest.importorskip("acts")
    return sim.simulate(out, events=1, particles=5, species="muon", seed=7, **kwargs)


@pytest.mark.sim
def test_tiny_simulation_files_and_determinism(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    summary = _run(tmp_path / "a", progress=lambda done, total, _rec: seen.append((done, total)))
    _run(tmp_path / "b")
    assert seen == [(1, 1)]

    a, b = tmp_path / "a", tmp_path / "b"
    expected = ["detectors.csv.gz", "digitization-config.json"] + [
        f"event000000000-{name}.csv.gz" for name in sim.EVENT_FILES
    ]
    for name in expected:
        assert (a / name).stat().st_size > 0, name
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between runs"
    assert not list(a.glob("*.csv")), "plain CSV files must be removed after compression"

    with gzip.open(a / "event000000000-measurements.csv.gz", "rt") as fh:
        assert fh.readline().startswith("measurement_id,geometry_id,local_key,local0,local1")
    (event,) = summary["events"]
    assert event["particles"] >= 5 and event["hits"] > 0 and event["measurements"] > 0
    assert event["cells"] >= event["measurements"]
    recorded = json.loads((a / "simulation.json").read_text())
    assert recorded["seed"] == 7 and recorded["events"][0]["hits"] == event["hits"]
    assert recorded["settings"]["particles"] == 5 and recorded["pyacts_version"]


@pytest.mark.sim
def test_refuses_to_mix_with_an_earlier_run(tmp_path: Path) -> None:
    _run(tmp_path, gzip=False)
    assert (tmp_path / "event000000000-cells.csv").stat().st_size > 0
    with pytest.raises(FileExistsError):
        _run(tmp_path, gzip=False)
    _run(tmp_path, overwrite=True)
    assert not list(tmp_path.glob("*.csv"))
