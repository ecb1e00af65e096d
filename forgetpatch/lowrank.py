"""Turn a full weight change ``dW`` into LoRA factors ``B @ A`` with a truncated SVD.

* :func:`factorize`: the exact SVD (float64), rank given, by energy, or the numerical rank;
* :func:`factorize_sketched`: a randomized SVD (float32) for large changes, rank by energy;
* :func:`factorize_in_span`: a change known as coordinates in an orthonormal row basis plus a small remainder
  outside it (no ``out x in`` product needed);
* :func:`truncate`: a change already given as factors ``B @ A``, cut to a smaller rank (no ``out x in`` product
  needed either).

All three return a :class:`LowRank` and split the kept singular values evenly between ``A`` and ``B``.

Example:
    >>> import torch
    >>> delta = torch.randn(8, 2) @ torch.randn(2, 16)          # an exact rank-2 change
    >>> low = factorize(delta)
    >>> low.rank, low.rel_error < 1e-6
    (2, True)
    >>> torch.allclose(low.B @ low.A, delta, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetpatch.errors import MethodError


@dataclass(frozen=True)
class LowRank:
    """LoRA factors of a change: ``delta ~= B @ A`` with ``A`` ``(rank, in)`` and ``B`` ``(out, rank)``."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    rel_error: float
    """Relative Frobenius error ``|delta - B @ A| / |delta|`` (0 for an all-zero delta)."""


def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    atol: float = 1e-6,
) -> LowRank:
    """Factor ``delta`` (``out x in``, or a conv kernel ``out x in x kh x kw``) into ``B @ A``.

    The rank is chosen as:

    * ``rank`` given: exactly that (capped at what the matrix allows);
    * ``energy`` given (e.g. ``0.99``): the smallest rank keeping that share of the squared singular values;
    * neither: the numerical rank, i.e. singular values above ``atol * s_max``. Closed-form edits
      (UCE, ...) that change a weight by a rank-k update are recovered exactly at rank k.

    The numerical rank also caps ``rank`` and ``energy``; when several apply, the smallest wins. The singular
    values are split evenly (``A = sqrt(S) V^T``, ``B = U sqrt(S)``) so neither factor dominates.
    Conv kernels are flattened to ``out x (in*kh*kw)``; reshape ``A`` to ``(rank, in, kh, kw)`` and ``B``
    to ``(out, rank, 1, 1)`` for peft (``build_patch`` does it for you). Factors come back in
    ``delta``'s dtype; the SVD runs in float64.
    """
    if delta.ndim < 2:
        raise MethodError(
            f"factorize needs a matrix or conv kernel, got a tensor of shape {tuple(delta.shape)}"
        )
    if energy is not None:
        _check_energy(energy)
    if rank is not None and rank < 1:
        raise MethodError(f"rank must be >= 1, got {rank}")
    matrix = delta.detach().reshape(delta.shape[0], -1).to(torch.float64)
    norm = torch.linalg.matrix_norm(matrix).item()
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if norm == 0.0:
        keep = 1
    else:
        candidates = [int((atol * S[0] < S).sum().item())]  # the numerical rank caps every choice
        if rank is not None:
            candidates.append(rank)
        if energy is not None:
            candidates.append(_energy_rank(S.square(), float(S.square().sum()), energy))
        keep = max(1, min(min(candidates), len(S)))
    A, B = _split(U, S, Vh, keep)
    error = torch.linalg.matrix_norm(matrix - B @ A).item() / norm if norm > 0 else 0.0
    return LowRank(A=A.to(delta.dtype), B=B.to(delta.dtype), rank=keep, rel_error=error)


@torch.no_grad()
def factorize_sketched(
    delta: torch.Tensor,
    *,
    energy: float = 0.999,
    max_rank: int | None = None,
    range_hint: torch.Tensor | None = None,
    sketch: int = 16,
    seed: int = 0,
) -> LowRank:
    """Truncated SVD of the matrix ``delta`` keeping ``energy`` of its squared Frobenius norm, in float32.

    A randomized range finder: the columns of ``range_hint`` (``out x h``, directions known to carry most of
    ``delta``, e.g. the ``B`` side of a low-rank update) plus ``sketch`` random projections of ``delta`` are
    orthonormalised, and the SVD of ``delta`` projected on them gives the factors. The random part doubles
    until the kept singular values reach ``energy`` of ``|delta|_F^2``; a sketch as large as half the
    matrix falls back to the exact SVD. The reported ``rel_error`` is measured: ``|delta - B A|_F / |delta|_F``.

    Example:
        >>> low = factorize_sketched(torch.randn(64, 3) @ torch.randn(3, 32), energy=0.999)
        >>> low.rank, low.rel_error < 1e-3
        (3, True)
    """
    _check_energy(energy)
    matrix = delta.detach().float()
    full = min(matrix.shape)
    cap = full if max_rank is None else max(1, min(max_rank, full))
    total = float(matrix.double().square().sum())
    if total == 0.0:
        zeros = matrix.new_zeros
        return LowRank(A=zeros(1, matrix.shape[1]), B=zeros(matrix.shape[0], 1), rank=1, rel_error=0.0)
    hint = None if range_hint is None else range_hint.detach().float().to(matrix.device)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    extra = max(1, sketch)
    while True:
        cols = extra + (0 if hint is None else hint.shape[1])
        exact = cols >= full // 2  # a sketch this large costs as much as the exact SVD
        if exact:
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        else:
            omega = torch.randn(matrix.shape[1], extra, generator=generator, device=matrix.device)
            Y = matrix @ omega if hint is None else torch.cat([hint, matrix @ omega], dim=1)
            Q = torch.linalg.qr(Y).Q
            Us, S, Vh = torch.linalg.svd(Q.T @ matrix, full_matrices=False)
            U = Q @ Us
        reached = _energy_rank(S.double().square(), total, energy)
        if exact or reached < cols or cols >= cap:
            break
        extra *= 2
    rank = max(1, min(reached, cap, len(S)))
    A, B = _split(U, S, Vh, rank)
    error = float((matrix - B @ A).double().norm()) / total**0.5
    return LowRank(A=A, B=B, rank=rank, rel_error=error)


def factorize_in_span(
    coords: torch.Tensor,
    basis: torch.Tensor,
    outside_sq: float,
    *,
    energy: float = 0.999,
    max_rank: int | None = None,
) -> LowRank | None:
    """Truncated SVD of ``delta = coords @ basis.T + E`` where ``E`` is orthogonal to ``basis``' columns.

    ``coords`` (``out x k``) is ``delta @ basis`` for an orthonormal ``basis`` (``in x k``) and ``outside_sq``
    is ``|E|_F^2``, the part of ``delta`` outside that row space. The factors keep the leading singular
    directions of ``coords`` (the best rank-``r`` approximation within the span), with ``r`` the smallest
    rank whose singular values hold ``energy`` of ``|delta|_F^2 = |coords|_F^2 + |E|_F^2``. The relative
    error is exact: ``sqrt(sum of the dropped S_i^2 + |E|^2) / |delta|_F``, without forming ``delta``.

    Returns ``None`` when the span cannot hold ``energy`` of ``delta`` (or ``max_rank`` is too small for
    it): then use :func:`factorize_sketched` on the full matrix.

    Example:
        >>> basis = torch.linalg.qr(torch.randn(32, 3)).Q
        >>> low = factorize_in_span(torch.randn(64, 3), basis, 0.0, energy=0.999)
        >>> low.rank, low.rel_error < 1e-6
        (3, True)
    """
    _check_energy(energy)
    U, S, Vh = torch.linalg.svd(coords.detach().float(), full_matrices=False)  # float32: the stored dtype
    squares = S.double().square()
    total = float(squares.sum()) + max(0.0, outside_sq)
    if total == 0.0:
        return None
    reached = _energy_rank(squares, total, energy)
    cap = len(S) if max_rank is None else max(1, min(max_rank, len(S)))
    if reached > cap:
        return None
    A, B = _split(U, S, Vh, reached)
    dropped = float(squares[reached:].sum()) + max(0.0, outside_sq)
    return LowRank(A=A @ basis.T.to(Vh), B=B, rank=reached, rel_error=(dropped / total) ** 0.5)


def truncate(A: torch.Tensor, B: torch.Tensor, *, max_rank: int) -> LowRank:
    """The best rank-``max_rank`` approximation of ``B @ A`` (``B`` ``out x k``, ``A`` ``k x in``), from the factors.

    ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (thin QR), so ``B A = Q_b (R_b R_a^T) Q_a^T`` and the SVD of the
    ``k x k`` core gives the singular values of the product exactly. The relative error is exact too:
    ``sqrt(sum of the dropped S_i^2) / |B A|_F``. Factors with rank ``<= max_rank`` come back as they are
    (error 0). Runs in float64, returns ``A``'s dtype.

    Example:
        >>> B, A = torch.randn(64, 6), torch.randn(6, 32)
        >>> low = truncate(A, B, max_rank=6)
        >>> low.rank, low.rel_error
        (6, 0.0)
        >>> truncate(A, B, max_rank=2).rank
        2
    """
    if max_rank < 1:
        raise MethodError(f"max_rank must be >= 1, got {max_rank}")
    if A.shape[0] <= max_rank:
        return LowRank(A=A, B=B, rank=A.shape[0], rel_error=0.0)
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    squares = S.square()
    total = float(squares.sum())
    new_A, new_B = _split(Qb @ U, S, Vh @ Qa.T, max_rank)
    error = (float(squares[max_rank:].sum()) / total) ** 0.5 if total > 0 else 0.0
    return LowRank(A=new_A.to(A.dtype), B=new_B.to(A.dtype), rank=max_rank, rel_error=error)


def _check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise MethodError(f"energy must be in (0, 1], got {energy}")


def _energy_rank(squares: torch.Tensor, total: float, energy: float) -> int:
    """The smallest rank whose squared singular values ``squares`` (float64, descending) hold ``energy`` of ``total``."""
    return int((torch.cumsum(squares, 0) / total < energy - 1e-12).sum()) + 1


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S) V^T``, ``B = U sqrt(S)`` of the leading ``rank`` singular triplets."""
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]
