"""The detector: loading, cache, fingerprint, and the geometry conventions checked against ACTS' truth."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kernels.detector import LAYER_CYLINDER, LAYER_DISC, cell_to_local, global_to_local, local_to_global
from producer.io.detector import build_detector, find_detector_files, load_detector
from producer.io.errors import InputError
from producer.io.events import discover, load_cells, load_truth


def test_generic_detector_shape(detector):
    assert detector.n_modules == 18728
    assert np.all(np.diff(detector.geometry_id.astype(np.int64)) > 0)
    assert set(np.unique(detector.dimension).tolist()) == {1, 2}
    # pixels (7, 8, 9) and short strips (12, 13, 14) are 2-D; long strips (16, 17, 18) are 1-D
    vol = detector.volume_id
    assert np.all(detector.dimension[np.isin(vol, [7, 8, 9, 12, 13, 14])] == 2)
    assert np.all(detector.dimension[np.isin(vol, [16, 17, 18])] == 1)
    np.testing.assert_allclose(detector.pitch[vol == 8], 0.05, rtol=1e-5)
    lay = detector.layers
    assert np.all(lay.kind[np.isin(lay.volume_id, [8, 13, 17])] == LAYER_CYLINDER)
    assert np.all(lay.kind[np.isin(lay.volume_id, [7, 9, 12, 14, 16, 18])] == LAYER_DISC)
    assert lay.module_end[-1] == detector.n_modules


def test_cache_is_fast_and_identical(bundled, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKFLEET_CACHE_DIR", str(tmp_path))
    first = load_detector(bundled)
    start = time.perf_counter()
    again = load_detector(bundled)
    assert time.perf_counter() - start < 0.5
    assert again.fingerprint() == first.fingerprint()
    assert list(tmp_path.glob("detector-*.npz"))


def test_fingerprint_changes_with_field(bundled):
    geo, digi = find_detector_files(bundled)
    assert build_detector(geo, digi, 2.0).fingerprint() != build_detector(geo, digi, 1.5).fingerprint()


def test_truth_local_to_global_within_one_micron(bundled, detector):
    src = discover(bundled)[0]
    m = load_truth(src).measurements
    mod = detector.module_index(np, m.geometry_id)
    assert np.all(mod >= 0)
    x, y, z = local_to_global(np, detector, mod, m.local0, m.local1)
    dist = np.linalg.norm(np.stack([x, y, z], axis=1) - m.global_xyz, axis=1)
    assert dist.max() < 1e-3  # mm
    u, _, w = global_to_local(np, detector, mod, x, y, z)
    np.testing.assert_allclose(u, m.local0, atol=1e-9)
    np.testing.assert_allclose(w, 0.0, atol=1e-9)


def test_truth_cluster_mean_reproduces_local_position(bundled, detector):
    src = discover(bundled)[1]
    cells = load_cells(src, detector)
    m = load_truth(src).measurements
    mod = detector.module_index(np, cells.geometry_id)
    l0, l1 = cell_to_local(np, detector, mod, cells.channel0, cells.channel1)
    w = cells.activation.astype(np.float64)
    k = np.searchsorted(m.measurement_id, cells.measurement_id)
    sw = np.bincount(k, w, m.size)
    mean0 = np.bincount(k, w * l0, m.size) / sw
    mean1 = np.bincount(k, w * l1, m.size) / sw
    assert np.max(np.abs(mean0 - m.local0)) < 1e-3
    two_d = m.dimension == 2
    assert np.max(np.abs(mean1 - m.local1)[two_d]) < 1e-3


def test_missing_detector_files(tmp_path):
    with pytest.raises(InputError, match="no detector description"):
        load_detector(tmp_path)


def test_bad_geometry_file(tmp_path, bundled):
    _, digi = find_detector_files(bundled)
    bad = tmp_path / "detectors.csv"
    bad.write_text("geometry_id,volume_id\n1,2\n")
    with pytest.raises(InputError, match="missing column"):
        build_detector(bad, digi)


def test_bad_digitization_file(tmp_path, bundled):
    geo, _ = find_detector_files(bundled)
    digi = tmp_path / "digi.json"
    digi.write_text('{"entries": [')
    with pytest.raises(InputError, match="not valid JSON"):
        build_detector(geo, digi)
    digi.write_text('{"entries": []}')
    with pytest.raises(InputError, match="no digitization entry"):
        build_detector(geo, digi)


def test_cells_validated_against_detector(tmp_path, detector):
    from producer.io.cells import read_cells

    g = int(detector.geometry_id[100])
    f = tmp_path / "c.csv"
    f.write_text(f"geometry_id,channel0,channel1,value\n{g},0,0,1\n{g},100000,0,1\n")
    with pytest.raises(InputError, match="outside the module") as err:
        read_cells(f, detector=detector)
    assert err.value.line == 3 and err.value.column == "channel0"
    f.write_text("geometry_id,channel0,channel1,value\n12345,0,0,1\n")
    with pytest.raises(InputError, match="not a sensitive module"):
        read_cells(f, detector=detector)
