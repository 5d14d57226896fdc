"""Clusterization equals a plain union-find reference; measurements match ACTS' truth measurements."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.clusterization import ClusteringConfig, clusterize
from kernels.edm.cells import Cells, merge_duplicate_cells
from kernels.measurement_creation import create_measurements
from kernels.xp import to_numpy
from producer.io.events import discover, load_cells, load_truth


def union_find_clusters(module, ch0, ch1):
    """Reference: naive union-find over all cell pairs of a module; clusters numbered by first cell."""
    n = len(module)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_module = {}
    for i, m in enumerate(module):
        by_module.setdefault(int(m), []).append(i)
    for cells in by_module.values():
        pos = {(int(ch0[i]), int(ch1[i])): i for i in cells}
        for i in cells:
            for d0 in (-1, 0, 1):
                for d1 in (-1, 0, 1):
                    j = pos.get((int(ch0[i]) + d0, int(ch1[i]) + d1))
                    if j is not None:
                        a, b = find(i), find(j)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(n)]
    rank, out = {}, []
    for r in roots:
        rank.setdefault(r, len(rank))
        out.append(rank[r])
    return np.array(out)


def sorted_cells(rng, n_modules, n, max_ch, dense=False):
    module = rng.integers(0, n_modules, n)
    if dense:
        ch0, ch1 = rng.integers(0, max_ch, n), rng.integers(0, max_ch, n)
    else:
        # blobs and long lines, like particle clusters, delta rays and long strip clusters
        centre0, centre1 = rng.integers(0, max_ch, n // 20 + 1), rng.integers(0, max_ch, n // 20 + 1)
        k = rng.integers(0, centre0.size, n)
        ch0 = np.clip(centre0[k] + rng.integers(-2, 3, n), 0, max_ch - 1)
        ch1 = np.clip(centre1[k] + rng.integers(-2, 3, n), 0, max_ch - 1)
    cells = Cells(
        geometry_id=module.astype(np.uint64),
        channel0=ch0.astype(np.int32),
        channel1=ch1.astype(np.int32),
        activation=np.ones(n, np.float32),
        time=np.zeros(n, np.float32),
    )
    return merge_duplicate_cells(cells)[0]


@pytest.mark.parametrize(
    ("n_modules", "n", "max_ch", "dense"), [(5, 400, 60, False), (2, 3000, 40, True), (50, 2000, 30, False)]
)
def test_equals_union_find(xp, rng, n_modules, n, max_ch, dense):
    cells = sorted_cells(rng, n_modules, n, max_ch, dense)
    module = cells.geometry_id.astype(np.int32)
    ref = union_find_clusters(module, cells.channel0, cells.channel1)
    got, n_clusters = clusterize(
        xp, xp.asarray(module), xp.asarray(cells.channel0), xp.asarray(cells.channel1), ClusteringConfig()
    )
    np.testing.assert_array_equal(to_numpy(got), ref)
    assert n_clusters == ref.max() + 1


def test_huge_snake_cluster(xp):
    # a serpentine line of 20000 cells on one module: worst case for label propagation depth
    rows, cols = [], []
    for r in range(0, 200, 2):
        cs = range(100) if (r // 2) % 2 == 0 else range(99, -1, -1)
        for c in cs:
            rows.append(r)
            cols.append(c)
        rows.append(r + 1)
        cols.append(99 if (r // 2) % 2 == 0 else 0)
    ch1, ch0 = np.array(rows), np.array(cols)
    order = np.lexsort((ch0, ch1))
    ch0, ch1 = ch0[order].astype(np.int32), ch1[order].astype(np.int32)
    module = np.zeros(ch0.size, np.int32)
    got, n_clusters = clusterize(xp, xp.asarray(module), xp.asarray(ch0), xp.asarray(ch1), ClusteringConfig())
    assert n_clusters == 1 and int(to_numpy(got).max()) == 0


def test_strip_line_and_separate_modules(xp):
    # adjacent channels on different modules never join; a 1-D strip run of 1000 cells is one cluster
    module = np.r_[np.zeros(1000), np.ones(3)].astype(np.int32)
    ch0 = np.r_[np.arange(1000), [0, 2, 3]].astype(np.int32)
    ch1 = np.zeros(1003, np.int32)
    got, n_clusters = clusterize(xp, xp.asarray(module), xp.asarray(ch0), xp.asarray(ch1), ClusteringConfig())
    assert n_clusters == 3
    assert to_numpy(got)[-3:].tolist() == [1, 2, 2]


def test_measurements_match_acts_truth(xp, bundled, detector):
    det = detector.to(xp)
    total = matched = 0
    for src in discover(bundled)[:2]:
        cells = load_cells(src, detector).to(xp)
        truth = load_truth(src).measurements
        module = det.module_index(xp, cells.geometry_id)
        cluster, n = clusterize(xp, module, cells.channel0, cells.channel1, ClusteringConfig())
        m = create_measurements(
            xp,
            det,
            module,
            xp.zeros_like(module),
            cells.channel0,
            cells.channel1,
            cells.activation,
            cluster,
            n,
            cells.measurement_id,
        )
        tid = to_numpy(m.truth_id)
        k = np.searchsorted(truth.measurement_id, tid)
        same_module = truth.geometry_id[k] == detector.geometry_id[to_numpy(m.module)]
        d0 = np.abs(to_numpy(m.local0) - truth.local0[k])
        d1 = np.where(to_numpy(m.dimension) == 2, np.abs(to_numpy(m.local1) - truth.local1[k]), 0)
        # one-to-one: every truth measurement is exactly one cluster
        assert np.unique(tid).size == tid.size == truth.size
        total += tid.size
        matched += int(np.sum(same_module & (d0 < 1e-3) & (d1 < 1e-3)))
        assert np.all(to_numpy(m.var0) > 0) and np.all(to_numpy(m.var1) > 0)
    assert matched / total >= 0.99
