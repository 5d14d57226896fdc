"""Live track-finding candidates packed into two row-major arrays.

The CKF selects, drops, merges and concatenates its candidates several times per layer step. With
one array per field each of those is a dozen gathers, and on the GPU every gather is a kernel
launch: packing the fields into one float64 and one int64 table makes each of them two.

Columns of ``real`` (float64 [n, 32]): bound parameters (0:5), covariance row-major (5:30), summed
chi^2 (30), path already travelled towards the next layer past a gap [mm] (31).
Columns of ``index`` (int64 [n, 8]): module, event, seed, node (last link in the node table),
number of measurements, holes, last measurement (m1) and the one before it (m2).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from kernels.xp import Array

N_REAL = 32
N_INDEX = 8
PARAMS = slice(0, 5)
COV = slice(5, 30)
CHI2 = 30
S_DONE = 31
MODULE, EVENT, SEED, NODE, N_MEAS, HOLES, M1, M2 = range(N_INDEX)


@dataclass(frozen=True)
class Candidates:
    """Packed candidates; the properties are views of columns (writing through them writes the table)."""

    real: Array
    index: Array

    @classmethod
    def build(
        cls,
        xp: ModuleType,
        *,
        params: Array,
        cov: Array,
        chi2: Array,
        s_done: Array | float,
        module: Array,
        event: Array,
        seed: Array,
        node: Array,
        n_meas: Array | int,
        holes: Array | int,
        m1: Array,
        m2: Array,
    ) -> Candidates:
        n = int(params.shape[0])
        real = xp.empty((n, N_REAL), dtype=xp.float64)
        real[:, PARAMS] = params
        real[:, COV] = cov.reshape(n, 25)
        real[:, CHI2] = chi2
        real[:, S_DONE] = s_done
        index = xp.empty((n, N_INDEX), dtype=xp.int64)
        for col, v in ((MODULE, module), (EVENT, event), (SEED, seed), (NODE, node), (N_MEAS, n_meas),
                       (HOLES, holes), (M1, m1), (M2, m2)):  # fmt: skip
            index[:, col] = v
        return cls(real, index)

    @classmethod
    def concat(cls, xp: ModuleType, parts: list[Candidates]) -> Candidates:
        if len(parts) == 1:
            return parts[0]
        return cls(xp.concatenate([p.real for p in parts]), xp.concatenate([p.index for p in parts]))

    def take(self, rows: Array) -> Candidates:
        return Candidates(self.real[rows], self.index[rows])

    @property
    def size(self) -> int:
        return int(self.real.shape[0])

    @property
    def params(self) -> Array:
        return self.real[:, PARAMS]

    @property
    def cov(self) -> Array:
        return self.real[:, COV].reshape(-1, 5, 5)

    @property
    def chi2(self) -> Array:
        return self.real[:, CHI2]

    @property
    def s_done(self) -> Array:
        return self.real[:, S_DONE]

    @property
    def module(self) -> Array:
        return self.index[:, MODULE]

    @property
    def event(self) -> Array:
        return self.index[:, EVENT]

    @property
    def seed(self) -> Array:
        return self.index[:, SEED]

    @property
    def node(self) -> Array:
        return self.index[:, NODE]

    @property
    def n_meas(self) -> Array:
        return self.index[:, N_MEAS]

    @property
    def holes(self) -> Array:
        return self.index[:, HOLES]

    @property
    def m1(self) -> Array:
        return self.index[:, M1]

    @property
    def m2(self) -> Array:
        return self.index[:, M2]
