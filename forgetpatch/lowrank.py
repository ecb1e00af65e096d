"""Turn a full weight change ``dW`` into LoRA factors ``B @ A`` with a truncated SVD.

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
    if energy is not None and not 0.0 < energy <= 1.0:
        raise MethodError(f"energy must be in (0, 1], got {energy}")
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
            cumulative = torch.cumsum(S**2, 0) / (S**2).sum()
            candidates.append(int((cumulative < energy - 1e-12).sum().item()) + 1)
        keep = max(1, min(min(candidates), len(S)))
    root = S[:keep].sqrt()
    A = root[:, None] * Vh[:keep]
    B = U[:, :keep] * root[None, :]
    error = torch.linalg.matrix_norm(matrix - B @ A).item() / norm if norm > 0 else 0.0
    return LowRank(A=A.to(delta.dtype), B=B.to(delta.dtype), rank=keep, rel_error=error)
