"""Sort-and-segment helpers: the building blocks of every stage (count, then expand, then fill).

All are written against an array namespace and never bring data to the host except for the total
size of an expansion, which is needed to allocate it.
"""

from __future__ import annotations

from types import ModuleType

from kernels.xp import Array, repeat_index, scatter_add, scatter_max


def expand_ranges(xp: ModuleType, starts: Array, counts: Array) -> tuple[Array, Array]:
    """CSR expansion: for every owner ``i`` and ``k`` in ``[0, counts[i])`` one row
    ``(owner=i, item=starts[i] + k)``.

    Returns:
        (owner (int64), item (int64)); rows grouped by owner in ascending owner order.
    """
    counts = counts.astype(xp.int64, copy=False)
    n = counts.shape[0]
    if n == 0:
        empty = xp.zeros(0, dtype=xp.int64)
        return empty, empty
    offsets = xp.cumsum(counts)
    total = int(offsets[-1])
    if total == 0:
        empty = xp.zeros(0, dtype=xp.int64)
        return empty, empty
    owner = repeat_index(xp, counts, total)
    first = offsets - counts
    item = xp.arange(total, dtype=xp.int64) - first[owner] + starts.astype(xp.int64)[owner]
    return owner, item


def segment_starts(xp: ModuleType, sorted_keys: Array) -> Array:
    """Boolean mask: True where a new run of equal keys begins."""
    n = sorted_keys.shape[0]
    flag = xp.ones(n, dtype=bool)
    if n > 1:
        flag[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return flag


def rank_in_segment(xp: ModuleType, sorted_keys: Array) -> Array:
    """Position of each row within its run of equal keys (keys sorted)."""
    n = sorted_keys.shape[0]
    start = segment_starts(xp, sorted_keys)
    seg = xp.cumsum(start) - 1
    pos = xp.arange(n, dtype=xp.int64)
    # first row of every segment, scattered by segment id; the other rows write to a spare slot, so
    # no nonzero() and no wait for the host
    first = xp.zeros(n + 1, dtype=xp.int64)
    first[xp.where(start, seg, n)] = pos
    return pos - first[seg]


def segment_sum(xp: ModuleType, seg: Array, values: Array, n: int) -> Array:
    """Sum of ``values`` per segment id in [0, n)."""
    out = xp.zeros(n, dtype=values.dtype)
    scatter_add(xp, out, seg, values)
    return out


def segment_max(xp: ModuleType, seg: Array, values: Array, n: int, initial: float) -> Array:
    out = xp.full(n, initial, dtype=values.dtype)
    scatter_max(xp, out, seg, values)
    return out
