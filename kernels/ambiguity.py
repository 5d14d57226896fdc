"""Greedy ambiguity resolution between track candidates that share measurements.

Candidates are ranked by quality (more measurements first, then lower chi^2 per measurement) and
accepted greedily in that order: a candidate is kept when at most ``max_shared`` of its
measurements are already held by kept, better candidates. This is the sequential greedy solver
(ACTS/traccc remove the candidate with the most shared hits one at a time, which converges to the
same kind of solution) made parallel: each round decides every candidate whose better competitors
are all decided, so the number of rounds is the length of the longest chain of conflicts, not the
number of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from kernels import fused, fused_ambiguity
from kernels.errors import ConfigError
from kernels.segments import segment_sum
from kernels.xp import Array, repeat_index, scatter_min

UNDECIDED, KEPT, REMOVED = 0, 1, 2


@dataclass(frozen=True)
class AmbiguityConfig:
    """Attributes:
    max_shared: measurements a kept track may share with better kept tracks (2).
    min_measurements: shortest track kept (7).
    max_rounds: bound on decision rounds; candidates still undecided then are removed (1000).
    """

    max_shared: int = 2
    min_measurements: int = 7
    max_rounds: int = 1000

    def __post_init__(self) -> None:
        if self.max_shared < 0 or self.min_measurements < 1 or self.max_rounds < 1:
            raise ConfigError("AmbiguityConfig: max_shared >= 0, min_measurements >= 1, max_rounds >= 1")


def resolve(
    xp: ModuleType,
    offsets: Array,
    measurements: Array,
    chi2: Array,
    n_measurements_total: int,
    cfg: AmbiguityConfig,
) -> Array:
    """Boolean mask of the candidates kept.

    Args:
        offsets, measurements: CSR measurement indices per candidate.
        chi2: per candidate.
        n_measurements_total: number of measurements the indices refer to.
    """
    n = offsets.shape[0] - 1
    if n == 0:
        return xp.zeros(0, dtype=bool)
    length = offsets[1:] - offsets[:-1]
    owner = repeat_index(xp, length, int(measurements.shape[0]))  # the total is known: no wait
    # rank: 0 is best
    quality_order = xp.lexsort(xp.stack([chi2 / xp.maximum(length, 1), -length.astype(xp.float64)]))
    rank = xp.empty(n, dtype=xp.int64)
    rank[quality_order] = xp.arange(n, dtype=xp.int64)
    status = xp.where(length >= cfg.min_measurements, UNDECIDED, REMOVED).astype(xp.int8)
    if fused.enabled(xp):
        status = fused_ambiguity.decide(
            xp,
            offsets,
            measurements,
            owner,
            rank,
            status,
            n_measurements_total,
            cfg.max_shared,
            cfg.max_rounds,
        )
        return status == KEPT
    r_row = rank[owner]
    big = n + 1
    for _ in range(cfg.max_rounds):
        und = status == UNDECIDED
        if not bool(und.any()):
            break
        st_row = status[owner]
        # best rank of a kept / of a still-undecided candidate on each measurement
        best_kept = xp.full(n_measurements_total, big, dtype=xp.int64)
        scatter_min(xp, best_kept, measurements, xp.where(st_row == KEPT, r_row, big))
        best_und = xp.full(n_measurements_total, big, dtype=xp.int64)
        scatter_min(xp, best_und, measurements, xp.where(st_row == UNDECIDED, r_row, big))
        taken = (best_kept[measurements] < r_row).astype(xp.int64)
        pending = (best_und[measurements] < r_row).astype(xp.int64)
        n_taken = segment_sum(xp, owner, taken, n)
        n_pending = segment_sum(xp, owner, pending, n)
        # decided when no better undecided candidate competes for any of its measurements
        ready = und & (n_pending == 0)
        status = xp.where(ready & (n_taken <= cfg.max_shared), KEPT, status).astype(xp.int8)
        status = xp.where(ready & (n_taken > cfg.max_shared), REMOVED, status).astype(xp.int8)
        # already hopeless whatever the pending ones do
        status = xp.where(und & ~ready & (n_taken > cfg.max_shared), REMOVED, status).astype(xp.int8)
    return status == KEPT
