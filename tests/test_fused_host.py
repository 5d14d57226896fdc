"""The fused CUDA kernels, compiled for the host, give the same results as the array code.

This runs everywhere a C++ compiler is present, so CI checks the kernels' arithmetic without a GPU;
tests/test_fused.py repeats the comparison on a real GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_kernels import build, compiler, launcher

from kernels import fused, fused_fit, fused_prune, fused_seeding
from kernels.pipeline import Chain, ChainConfig
from producer.io.events import discover, load_cells

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")


@pytest.fixture
def host_fused(monkeypatch):
    """Route every fused launch to the host build and switch the fused paths on for numpy."""
    monkeypatch.setattr(fused, "_launch", launcher(build(fused._SOURCE)))
    monkeypatch.setattr(fused_seeding, "_launch", launcher(build(fused_seeding._SOURCE)))
    monkeypatch.setattr(fused_prune, "_launch", launcher(build(fused_prune._SOURCE)))
    fit_lib = build(fused_fit.full_source())

    class _Fit:
        def __call__(self, grid, block, args):
            launcher(fit_lib)("fit_tracks", int(args[5]), args)

    monkeypatch.setattr(fused_fit, "_kernel", lambda: _Fit())
    monkeypatch.setattr(fused, "enabled", lambda xp: True)


def _reconstruct(detector, events):
    chain = Chain(np, detector, ChainConfig())
    return [chain.reconstruct(e)[0] for e in events]


def test_whole_chain_same_tracks(bundled, detector, monkeypatch, request):
    events = [load_cells(s, detector) for s in discover(bundled)[:1]]
    ref = _reconstruct(detector, events)
    request.getfixturevalue("host_fused")
    got = _reconstruct(detector, events)
    for a, b in zip(ref, got, strict=True):
        assert a.size == b.size and a.size > 200
        np.testing.assert_array_equal(a.meas_truth_id, b.meas_truth_id)
        np.testing.assert_allclose(b.params, a.params, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(b.chi2, a.chi2, rtol=1e-5, atol=1e-8)


def test_seeding_in_small_blocks_and_chunks_gives_the_same_seeds(bundled, detector, request):
    """Middles in blocks and doublets in chunks (bounded memory) are an implementation detail: the
    smallest allowed bound, which splits the bundled events into hundreds of blocks, changes no seed."""
    import dataclasses

    request.getfixturevalue("host_fused")
    events = [load_cells(s, detector) for s in discover(bundled)[:2]]
    base = ChainConfig()
    small = dataclasses.replace(
        base, seeding=dataclasses.replace(base.seeding, max_candidates_per_chunk=1000)
    )
    ref = Chain(np, detector, base).run_front(events, {}).seeds
    got = Chain(np, detector, small).run_front(events, {}).seeds
    assert ref is not None and got is not None and ref.size > 1000
    for name in ("bottom", "middle", "top", "weight", "z_vertex", "event"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
