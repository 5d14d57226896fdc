"""Every reader on the bundled data, input discovery, and `trackfleet inspect`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from producer.cli import main
from producer.io.errors import InputError
from producer.io.events import discover, iter_cells, load_cells, load_truth
from producer.io.particle_id import vertex_primary


def test_discover_directory(bundled):
    sources = discover(bundled)
    assert [s.event_id for s in sources] == [0, 1, 2, 3, 4]
    assert all(s.has_truth for s in sources)


def test_single_file_input_finds_its_truth(bundled):
    [src] = discover(bundled / "event000000002-cells.csv.gz")
    assert src.event_id == 2 and src.has_truth


def test_cells_sorted_as_traccc_expects(bundled, detector):
    cells = load_cells(discover(bundled)[0], detector)
    key = np.lexsort((cells.channel0, cells.channel1, cells.geometry_id))
    np.testing.assert_array_equal(key, np.arange(cells.size))
    assert cells.has_truth and cells.size > 30000


def test_truth_readers_are_consistent(bundled):
    t = load_truth(discover(bundled)[0])
    assert t.particles.size == 700
    assert set(np.unique(t.measurements.local_key).tolist()) <= {2, 6}
    assert t.simhit_map.hit_id.max() < t.hits.size
    assert np.all(np.isin(t.simhit_map.measurement_id, t.measurements.measurement_id))
    # every hit belongs to a known particle (ACTS 48 split id columns packed consistently)
    assert np.all(np.isin(t.hits.particle_id, t.particles.particle_id))
    assert vertex_primary(t.particles.particle_id).max() == 20


def test_multi_event_csv_round_trip(tmp_path, bundled):
    events = list(iter_cells(bundled))[:2]
    rows = ["event_id,geometry_id,measurement_id,channel0,channel1,timestamp,value"]
    for e in events:
        rows += [
            f"{e.event_id},{g},{m},{c0},{c1},0,{v!r}"
            for g, m, c0, c1, v in zip(
                e.geometry_id.tolist(),
                e.measurement_id.tolist(),
                e.channel0.tolist(),
                e.channel1.tolist(),
                e.activation.tolist(),
                strict=True,
            )
        ]
    f = tmp_path / "many.csv"
    f.write_text("\n".join(rows) + "\n")
    again = list(iter_cells(f))
    assert [e.event_id for e in again] == [0, 1]
    for a, b in zip(events, again, strict=True):
        np.testing.assert_array_equal(a.channel0, b.channel0)
        np.testing.assert_array_equal(a.geometry_id, b.geometry_id)


def test_discover_errors(tmp_path):
    with pytest.raises(InputError, match="no event files"):
        discover(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        discover(tmp_path / "missing")


def test_inspect_json(bundled, capsys):
    assert main(["inspect", str(bundled), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["events"]) == 5
    e = out["events"][0]
    assert e["event_id"] == 0 and e["n_cells"] > 30000 and e["n_particles"] == 700
    assert out["detector"]["modules"] == 18728


def test_inspect_table_and_error(bundled, tmp_path, capsys):
    assert main(["inspect", str(bundled), "--events", "1"]) == 0
    assert "cells per volume" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no event files" in capsys.readouterr().err
