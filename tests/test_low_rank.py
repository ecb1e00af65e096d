"""Truncated SVDs of weight changes (:mod:`forgetpatch.lowrank`): the exact, sketched and in-span factorisations
share one rank rule and one split of the singular values, and the span shortcut gives what the full SVD gives."""

from __future__ import annotations

import pytest
import torch

from forgetpatch.lowrank import LowRank, factorize, factorize_in_span, factorize_sketched, truncate


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
    low = factorize_in_span(coords, basis, float(E.square().sum()), energy=energy)
    assert low is not None
    S = torch.linalg.svdvals(delta)
    kept = torch.cumsum(S.square(), 0) / S.square().sum()
    assert low.rank == int((kept < energy).sum()) + 1  # the rank the full SVD would choose
    measured = float((delta - (low.B @ low.A).double()).norm() / delta.norm())
    assert low.rel_error == pytest.approx(measured, rel=1e-3)  # the recorded error is the true one
    assert low.rel_error <= (1 - energy) ** 0.5


def test_span_factors_decline_when_the_change_is_mostly_outside_the_span():
    coords, basis, E, _ = _change(outside=10.0)
    assert factorize_in_span(coords, basis, float(E.square().sum()), energy=0.99) is None
    coords, basis, E, _ = _change(outside=0.0)
    assert factorize_in_span(coords, basis, 0.0, energy=0.9999, max_rank=2) is None  # needs rank 6


def _split(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook split of a truncated SVD: ``A = sqrt(S) V^T``, ``B = U sqrt(S)``."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def _energy_rank(matrix: torch.Tensor, energy: float) -> int:
    S = torch.linalg.svdvals(matrix.double())
    return int((torch.cumsum(S.square(), 0) / S.square().sum() < energy - 1e-12).sum()) + 1


@pytest.mark.parametrize("seed", range(3))
def test_the_three_factorisations_give_the_textbook_split_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(24, 5, generator=g) @ torch.randn(5, 20, generator=g) + 1e-2 * torch.randn(24, 20, generator=g)
    rank = _energy_rank(delta, 0.99)
    exact = factorize(delta, energy=0.99)  # float64 SVD, factors in delta's dtype
    A, B = _split(delta.double(), rank)
    assert exact.rank == rank and torch.equal(exact.A, A.float()) and torch.equal(exact.B, B.float())
    sketched = factorize_sketched(delta, energy=0.99, sketch=16)  # 16 >= 20 // 2: the exact float32 SVD
    A, B = _split(delta, rank)
    assert sketched.rank == rank and torch.equal(sketched.A, A) and torch.equal(sketched.B, B)
    basis = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64)).Q
    coords = delta.double() @ basis
    span = factorize_in_span(coords, basis, 0.0, energy=0.99)
    A, B = _split(coords.float(), span.rank)
    assert torch.equal(span.A, A @ basis.T.float()) and torch.equal(span.B, B)
    assert all(isinstance(low, LowRank) for low in (exact, sketched, span))


def test_the_randomized_sketch_finds_the_rank_the_exact_svd_keeps():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(200, 6, generator=g) @ torch.randn(6, 256, generator=g) + 1e-3 * torch.randn(200, 256, generator=g)
    exact, sketched = factorize(delta, energy=0.999), factorize_sketched(delta, energy=0.999, sketch=2)
    assert sketched.rank == exact.rank == 6
    measured = float((delta - sketched.B @ sketched.A).norm() / delta.norm())
    assert sketched.rel_error == pytest.approx(measured, rel=1e-3) and exact.rel_error <= measured < (1 - 0.999) ** 0.5
    zero = factorize_sketched(torch.zeros(5, 4))
    assert (zero.rank, zero.rel_error, zero.A.shape, zero.B.shape) == (1, 0.0, (1, 4), (5, 1))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_truncating_factors_equals_the_truncated_svd_of_their_product(rank):
    g = torch.Generator().manual_seed(rank)
    B, A = torch.randn(40, 7, generator=g), torch.randn(7, 30, generator=g)
    low = truncate(A, B, max_rank=rank)
    product = (B @ A).double()
    U, S, Vh = torch.linalg.svd(product, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    assert low.rank == rank and low.A.shape == (rank, 30) and low.B.shape == (40, rank)
    torch.testing.assert_close((low.B @ low.A).double(), best, rtol=1e-4, atol=1e-4)
    assert low.rel_error == pytest.approx(float((best - product).norm() / product.norm()), rel=1e-6)
    same = truncate(A, B, max_rank=7)
    assert same.rel_error == 0.0 and same.A is A
