"""Clusterization: connected components of cells per module with 8-connectivity.

Two cells are neighbours when they are on the same module (and event) and |dch0| <= 1 and
|dch1| <= 1. Cells arrive sorted by (event, module, channel1, channel0); for each cell the four
neighbours that precede it in that order are found by binary search on a packed key, which gives
the edge list without any neighbour scan. Components are then found by min-label propagation with
root hooking and pointer jumping (the FastSV idea used by traccc on GPUs): labels converge to the
smallest cell index of each component in O(log(cluster size)) rounds.

Reference: traccc ``core/include/traccc/clusterization`` (SparseCCL on the CPU, FastSV on devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from kernels import fused, fused_clusterization
from kernels.errors import ConfigError
from kernels.xp import Array, scatter_min

CHANNEL_BITS = 20  # channels must be < 2**20 per axis
_CH_LIMIT = 1 << CHANNEL_BITS


@dataclass(frozen=True)
class ClusteringConfig:
    """Attributes:
    max_iterations: bound on label-propagation rounds; each round at least halves the label
        depth, so 64 covers any cluster that fits in memory (default 64).
    """

    max_iterations: int = 64

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ConfigError("ClusteringConfig.max_iterations must be >= 1")


def cell_keys(xp: ModuleType, module_key: Array, channel0: Array, channel1: Array) -> Array:
    """Sortable int64 key per cell: (module_key, channel1, channel0) packed in 23 + 20 + 20 bits."""
    return (
        (module_key.astype(xp.int64) << (2 * CHANNEL_BITS))
        | (channel1.astype(xp.int64) << CHANNEL_BITS)
        | channel0.astype(xp.int64)
    )


def neighbour_edges(xp: ModuleType, keys: Array, channel0: Array, channel1: Array) -> tuple[Array, Array]:
    """Edges (cell, earlier neighbour) of the 8-connectivity graph; ``keys`` must be ascending."""
    n = keys.shape[0]
    idx = xp.arange(n, dtype=xp.int64)
    src, dst = [], []
    # the four neighbours that sort before a cell: (ch1-1, ch0-1), (ch1-1, ch0), (ch1-1, ch0+1), (ch1, ch0-1)
    for d1, d0 in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        valid = (channel1 + d1 >= 0) & (channel0 + d0 >= 0) & (channel0 + d0 < _CH_LIMIT)
        target = keys + (d1 << CHANNEL_BITS) + d0
        pos = xp.searchsorted(keys, target)
        pos = xp.minimum(pos, n - 1)
        hit = valid & (keys[pos] == target)
        src.append(idx[hit])
        dst.append(pos[hit])
    return xp.concatenate(src), xp.concatenate(dst)


def connected_components(xp: ModuleType, n: int, src: Array, dst: Array, max_iterations: int = 64) -> Array:
    """Label of each vertex = smallest vertex index of its component (int32: 32-bit atomics are
    native on GPUs, 64-bit minimum is not everywhere).

    Raises:
        RuntimeError: no convergence within ``max_iterations`` (cannot happen for valid input).
    """
    label = xp.arange(n, dtype=xp.int32)
    src, dst = src.astype(xp.int32), dst.astype(xp.int32)
    if src.shape[0] == 0:
        return label
    for _ in range(max_iterations):
        ls, ld = label[src], label[dst]
        new = label.copy()
        # hook each endpoint and each endpoint's root onto the smaller label
        scatter_min(xp, new, src, ld)
        scatter_min(xp, new, dst, ls)
        scatter_min(xp, new, ls, ld)
        scatter_min(xp, new, ld, ls)
        # pointer jumping: follow labels to their roots
        for _ in range(4):
            new = new[new]
        if bool(xp.all(new == label)):
            return label
        label = new
    raise RuntimeError(f"clusterization did not converge in {max_iterations} rounds")


def clusterize(
    xp: ModuleType, module_key: Array, channel0: Array, channel1: Array, config: ClusteringConfig
) -> tuple[Array, int]:
    """Cluster index of every cell.

    Args:
        module_key: per cell, ``event * n_modules + module`` (ascending with the cell order).
        channel0, channel1: cell channels (sorted within a module by (channel1, channel0)).

    Returns:
        (cluster index per cell (int64, clusters numbered in order of their first cell), number of clusters).
    """
    n = channel0.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=xp.int64), 0
    keys = cell_keys(xp, module_key, channel0, channel1)
    if fused.enabled(xp):
        label = fused_clusterization.component_labels(xp, keys, channel0, channel1, CHANNEL_BITS)
    else:
        src, dst = neighbour_edges(xp, keys, channel0, channel1)
        label = connected_components(xp, n, src, dst, config.max_iterations)
    is_root = label == xp.arange(n, dtype=xp.int32)
    rank = xp.cumsum(is_root) - 1
    return rank[label], int(rank[-1]) + 1
