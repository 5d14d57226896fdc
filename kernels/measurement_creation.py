"""Measurement creation: one measurement per cluster, the activation-weighted mean of its cell
centres in local coordinates, with the weighted variance plus pitch^2/12 per axis (traccc's
``measurement_creation``). On 1-D (strip) modules only loc0 is measured.

All cluster reductions are segment sums over cells sorted by cluster (cells of a cluster are
contiguous after sorting by cluster index; clusters never span modules).
"""

from __future__ import annotations

from types import ModuleType

from kernels import fused, fused_measurements
from kernels.detector import Detector, cell_to_local
from kernels.edm.measurements import Measurements
from kernels.xp import Array, scatter_add, scatter_max, scatter_min


def _segment_sum(xp: ModuleType, seg: Array, values: Array, n: int) -> Array:
    out = xp.zeros(n, dtype=values.dtype)
    scatter_add(xp, out, seg, values)
    return out


def majority_truth(xp: ModuleType, cluster: Array, truth: Array, n_clusters: int) -> Array:
    """Most frequent truth id per cluster (ties: smallest id)."""
    order = xp.lexsort(xp.stack([truth, cluster]))
    c, t = cluster[order], truth[order]
    n = c.shape[0]
    new_run = xp.ones(n, dtype=bool)
    new_run[1:] = (c[1:] != c[:-1]) | (t[1:] != t[:-1])
    run_start = xp.nonzero(new_run)[0]
    run_len = xp.diff(xp.concatenate([run_start, xp.asarray([n], dtype=run_start.dtype)]))
    run_cluster = c[run_start]
    # order runs by (cluster, -length, truth): the first run of each cluster is its majority
    pick = xp.lexsort(xp.stack([t[run_start], -run_len, run_cluster]))
    first = xp.ones(pick.shape[0], dtype=bool)
    first[1:] = run_cluster[pick][1:] != run_cluster[pick][:-1]
    out = xp.full(n_clusters, -1, dtype=xp.int64)
    out[run_cluster[pick][first]] = t[run_start][pick][first]
    return out


def create_measurements(
    xp: ModuleType,
    det: Detector,
    module: Array,
    event: Array,
    channel0: Array,
    channel1: Array,
    activation: Array,
    cluster: Array,
    n_clusters: int,
    truth: Array | None = None,
) -> Measurements:
    """Measurements from clustered cells.

    Args:
        det: the detector (arrays in ``xp``).
        module, event: per cell module index and event index (int32).
        channel0, channel1, activation: per cell.
        cluster: per cell cluster index in [0, n_clusters), clusters numbered by first cell.
        truth: per cell truth measurement id, or None.
    """
    if truth is None:
        truth_id = xp.full(n_clusters, -1, dtype=xp.int64)
    elif fused.enabled(xp):
        truth_id = fused_measurements.majority_truth(xp, cluster, truth, n_clusters)
    else:
        truth_id = majority_truth(xp, cluster, truth, n_clusters)
    if fused.enabled(xp):
        m = fused_measurements.cluster_moments(
            xp, det, module, event, channel0, channel1, activation, cluster, n_clusters
        )
        return Measurements(**m, truth_id=truth_id)
    l0, l1 = cell_to_local(xp, det, module, channel0, channel1)
    w = activation.astype(xp.float64)
    sw = _segment_sum(xp, cluster, w, n_clusters)
    sw0 = _segment_sum(xp, cluster, w * l0, n_clusters)
    sw1 = _segment_sum(xp, cluster, w * l1, n_clusters)
    sw00 = _segment_sum(xp, cluster, w * l0 * l0, n_clusters)
    sw11 = _segment_sum(xp, cluster, w * l1 * l1, n_clusters)
    ncell = _segment_sum(xp, cluster, xp.ones_like(cluster, dtype=xp.int32), n_clusters)
    extents = []
    for ch in (channel0, channel1):
        hi = xp.full(n_clusters, -1, dtype=xp.int32)
        lo = xp.full(n_clusters, 2**30, dtype=xp.int32)
        scatter_max(xp, hi, cluster, ch.astype(xp.int32))
        scatter_min(xp, lo, cluster, ch.astype(xp.int32))
        extents.append(hi - lo + 1)
    # every cluster's first cell gives its module and event (clusters are numbered by first cell)
    first = xp.zeros(n_clusters, dtype=xp.int64)
    is_first = xp.ones(cluster.shape[0], dtype=bool)
    is_first[1:] = cluster[1:] != cluster[:-1]
    first[cluster[is_first]] = xp.nonzero(is_first)[0]
    mod = module[first]
    # a cluster of zero total activation falls back to the plain mean of its cells
    safe = sw > 0
    sw_safe = xp.where(safe, sw, 1.0)
    mean0 = xp.where(safe, sw0 / sw_safe, 0.0)
    mean1 = xp.where(safe, sw1 / sw_safe, 0.0)
    if not bool(xp.all(safe)):
        cnt = ncell.astype(xp.float64)
        mean0 = xp.where(safe, mean0, _segment_sum(xp, cluster, l0, n_clusters) / cnt)
        mean1 = xp.where(safe, mean1, _segment_sum(xp, cluster, l1, n_clusters) / cnt)
    pitch = (det.seg_max[mod] - det.seg_min[mod]) / det.seg_bins[mod]
    var0 = xp.maximum(sw00 / sw_safe - mean0 * mean0, 0.0) * safe + pitch[:, 0] ** 2 / 12.0
    var1 = xp.maximum(sw11 / sw_safe - mean1 * mean1, 0.0) * safe + pitch[:, 1] ** 2 / 12.0
    dimension = det.dimension[mod].astype(xp.int8)
    return Measurements(
        module=mod.astype(xp.int32),
        event=event[first].astype(xp.int32),
        local0=mean0,
        local1=mean1,
        var0=var0,
        var1=var1,
        dimension=dimension,
        n_cells=ncell,
        extent0=extents[0],
        extent1=extents[1],
        truth_id=truth_id,
    )
