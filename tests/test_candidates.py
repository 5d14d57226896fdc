"""Packed CKF candidates and the sort/segment helpers the CKF step relies on (numpy and CuPy)."""

from __future__ import annotations

import numpy as np
import pytest
from host_kernels import build, compiler, launcher

from kernels import fused, fused_prune
from kernels.candidates import NODE, Candidates
from kernels.ckf import _cap_per_seed, _merge_duplicates
from kernels.segments import rank_in_segment
from kernels.xp import argsort_stable, to_numpy


def _random(xp, n: int, seed: int = 1) -> tuple[Candidates, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cols = {
        "params": rng.normal(size=(n, 5)),
        "cov": rng.normal(size=(n, 5, 5)),
        "chi2": rng.integers(0, 4, n).astype(float),  # ties on purpose
        "s_done": rng.uniform(0, 50, n),
        "module": rng.integers(0, 100, n),
        "event": rng.integers(0, 3, n),
        "seed": rng.integers(0, 20, n),
        "node": rng.integers(-1, 1000, n),
        "n_meas": rng.integers(3, 8, n),
        "holes": rng.integers(0, 3, n),
        "m1": rng.integers(0, 6, n),
        "m2": rng.integers(0, 6, n),
    }
    return Candidates.build(xp, **{k: xp.asarray(v) for k, v in cols.items()}), cols


def test_build_take_concat_keep_every_field(xp):
    cands, cols = _random(xp, 50)
    rows = xp.asarray([7, 3, 3, 49, 0])
    part = cands.take(rows)
    both = Candidates.concat(xp, [part, cands.take(xp.asarray([1]))])
    assert both.size == 6 and part.size == 5
    for name, ref in cols.items():
        got = to_numpy(getattr(both, name))
        np.testing.assert_array_equal(got, np.concatenate([ref[[7, 3, 3, 49, 0]], ref[[1]]]), err_msg=name)
    part.real[0, 30] = -1.0  # take copies: the source table is untouched
    assert float(to_numpy(cands.chi2)[7]) == cols["chi2"][7]


def test_rank_in_segment_and_stable_argsort(xp):
    keys = xp.asarray([0, 0, 0, 2, 2, 5, 7, 7, 7, 7])
    np.testing.assert_array_equal(to_numpy(rank_in_segment(xp, keys)), [0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
    a = xp.asarray([3.0, 1.0, 3.0, 1.0, 2.0])
    np.testing.assert_array_equal(to_numpy(argsort_stable(xp, a)), [1, 3, 4, 0, 2])


def test_merge_and_cap_select_what_lexsort_selects(xp):
    cands, c = _random(xp, 400, seed=3)
    n_total = 6
    merged = _merge_duplicates(xp, cands, n_total)
    key = (c["event"] * (n_total + 1) + c["m1"]) * (n_total + 1) + c["m2"]
    quality = c["chi2"] / np.maximum(c["n_meas"], 1) - 3.0 * c["n_meas"]
    order = np.lexsort(np.stack([quality, key.astype(float)]))
    first = np.r_[True, key[order][1:] != key[order][:-1]]
    np.testing.assert_array_equal(to_numpy(merged.node), c["node"][np.sort(order[first])])

    capped = _cap_per_seed(xp, cands, 2)
    order = np.lexsort(np.stack([c["chi2"], -c["n_meas"].astype(float), c["seed"].astype(float)]))
    seed_sorted = c["seed"][order]
    starts = np.r_[True, seed_sorted[1:] != seed_sorted[:-1]]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    np.testing.assert_array_equal(to_numpy(capped.node), c["node"][np.sort(order[rank < 2])])


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("n", [0, 1, 700])
def test_fused_prune_keeps_the_rows_the_array_code_keeps(xp, monkeypatch, merge, n):
    """The hash-and-atomics pruning kernels (on the GPU, or compiled for the host) against the sorts."""
    if xp is np:
        if compiler() is None:
            pytest.skip("no C++ compiler")
        monkeypatch.setattr(fused_prune, "_launch", launcher(build(fused_prune._SOURCE)))
    cands, _ = _random(xp, n, seed=5)
    cands.index[:, NODE] = xp.arange(n)  # row identity
    n_total = 6
    ref = _merge_duplicates(xp, cands, n_total) if merge else cands
    ref = _cap_per_seed(xp, ref, 2) if n else ref
    keep = fused_prune.prune(xp, cands.real, cands.index, n_total, 20, 2, merge, fused.no_limit(xp))
    np.testing.assert_array_equal(to_numpy(xp.nonzero(keep)[0]), to_numpy(ref.node))


@pytest.mark.parametrize("merge", [True, False])
def test_fused_prune_ignores_rows_past_the_live_count(xp, monkeypatch, merge):
    """Tables sized from a bound: rows past the device's live count are neither kept nor compete."""
    if xp is np:
        if compiler() is None:
            pytest.skip("no C++ compiler")
        monkeypatch.setattr(fused_prune, "_launch", launcher(build(fused_prune._SOURCE)))
    n, live = 700, 411
    cands, _ = _random(xp, n, seed=9)
    cands.index[:, NODE] = xp.arange(n)
    head = Candidates(cands.real[:live].copy(), cands.index[:live].copy())
    ref = _cap_per_seed(xp, _merge_duplicates(xp, head, 6) if merge else head, 2)
    keep = fused_prune.prune(xp, cands.real, cands.index, 6, 20, 2, merge, xp.asarray([live], dtype=xp.int64))
    np.testing.assert_array_equal(to_numpy(xp.nonzero(keep)[0]), to_numpy(ref.node))
