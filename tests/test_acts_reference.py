"""bench/acts_reference.py: ACTS' CPU reconstruction on one bundled event.

Checks the premise the benchmark rests on (an ACTS track state's source-link index is our truth
measurement_id), the written files, the timing, and the side-by-side table; about 2 s with pyacts,
skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytestmark = pytest.mark.sim

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "acts_reference.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("acts_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_missing_acts_names_the_sim_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _load()
    monkeypatch.setitem(sys.modules, "acts", None)  # makes `import acts` raise ImportError
    with pytest.raises(ref.ActsUnavailable, match="sim extra"):
        ref.import_acts()


def test_one_event_tracks_carry_our_measurement_ids(bundled: Path, tmp_path: Path) -> None:
    pytest.importorskip("acts")
    ref = _load()
    from producer.io.measurements import read_measurements
    from producer.io.tracks_csv import read_tracks

    seen: list[dict] = []
    run = ref.run_acts(bundled, tmp_path, max_events=1, on_event=seen.append)
    assert run["events"] == [0] and [e["event_id"] for e in seen] == [0]

    tracks = read_tracks(tmp_path / "acts", 0)
    assert tracks.size == run["n_tracks"][0] > 100  # ~240 at mu=20
    assert (tracks.n_measurements >= 7).all() and (tracks.n_holes <= 2).all()
    m = read_measurements(bundled / "event000000000-measurements.csv.gz")
    ids = tracks.meas_truth_id
    assert ids.min() >= 0 and ids.max() < m.size
    np.testing.assert_array_equal(tracks.meas_geometry_id, m.geometry_id[ids])
    np.testing.assert_array_equal(tracks.meas_local0, m.local0[ids])
    # inside out: the first measurement of a track is closer to the beam than its last one
    first, last = tracks.meas_offsets[:-1], tracks.meas_offsets[1:] - 1
    r = np.hypot(m.global_xyz[ids, 0], m.global_xyz[ids, 1])
    assert (r[first] < r[last]).all()

    timing = json.loads((tmp_path / "acts" / "timing.json").read_text())
    assert 0 < timing["seconds_per_event"] <= timing["total_seconds_per_event"]
    assert set(ref.RECO_STAGES) <= set(timing["stages_seconds_per_event"])

    pytest.importorskip("producer.validate")
    result = ref._validate(bundled, run["tracks_dir"], 1)
    assert result["efficiency"] > 0.95 and result["fake_rate"] < 0.02
    table = ref.format_table({"ACTS": ref._summary(result, timing["seconds_per_event"], 1)})
    assert "efficiency" in table and "time / event [s]" in table
