"""Truncated SVDs of weight changes: the span shortcut gives what the full matrix's SVD gives."""

from __future__ import annotations

import pytest
import torch

from forgetpatch.methods.common import low_rank_in_span


def _change(outside: float, seed: int = 0):
    """``delta = coords @ basis^T + E``: a rank-6 part in an 8-dim row span, ``E`` orthogonal to it."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(48, 8, generator=g, dtype=torch.float64)).Q
    coords = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 8, generator=g).double()
    coords += 1e-3 * torch.randn(40, 8, generator=g, dtype=torch.float64)
    raw = torch.randn(40, 48, generator=g, dtype=torch.float64)
    E = outside * (raw - raw @ basis @ basis.T)
    return coords, basis, E, coords @ basis.T + E


@pytest.mark.parametrize("energy", [0.9, 0.999])
def test_span_factors_equal_the_full_truncated_svd(energy):
    coords, basis, E, delta = _change(outside=1e-3)
    low = low_rank_in_span(coords, basis, float(E.square().sum()), energy=energy)
    assert low is not None
    S = torch.linalg.svdvals(delta)
    kept = torch.cumsum(S.square(), 0) / S.square().sum()
    assert low.rank == int((kept < energy).sum()) + 1  # the rank the full SVD would choose
    measured = float((delta - (low.B @ low.A).double()).norm() / delta.norm())
    assert low.rel_error == pytest.approx(measured, rel=1e-3)  # the recorded error is the true one
    assert low.rel_error <= (1 - energy) ** 0.5


def test_span_factors_decline_when_the_change_is_mostly_outside_the_span():
    coords, basis, E, _ = _change(outside=10.0)
    assert low_rank_in_span(coords, basis, float(E.square().sum()), energy=0.99) is None
    coords, basis, E, _ = _change(outside=0.0)
    assert low_rank_in_span(coords, basis, 0.0, energy=0.9999, max_rank=2) is None  # needs rank 6
