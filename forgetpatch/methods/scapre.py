"""ScaPre: Scalable and Precise concept unlearning (Deng et al., 2026), closed form.

Edits every ``attn2.to_k`` / ``attn2.to_v`` weight ``W`` (``d x D``) row by row, following the authors'
reference procedure (see ``methods.md``). With erased token embeddings ``c_k`` (rows of ``C``), their guide
embeddings ``g_k`` and preserved embeddings ``p_j``, per layer:

1. **entropy factor** ``mu``: activations ``W (c + N(0, 0.01^2))``, a 20-bin histogram per output row,
   ``mu = mean_i H_i / log 20``;
2. **spectral gating** (styles): ``R = V diag((1 - gate) mu) V^T`` from the SVD ``C = U S V^T``,
   ``gate = sigmoid((s - median s) / T)^p``, so dominant shared directions are penalised less;
3. **Informax Decoupler**: per row, the mutual information between its median-binarised activation and a
   target-vs-blank label (5 noisy copies each), z-scored over rows, ``m_i = sigmoid(z_i / 0.7)^p``,
   max over concepts;
4. UCE-style sums with erase scale ``s_e``; ``Pi_C = C^T (C C^T + eps I)^-1 C`` (the target subspace);
5. **row solve** ``w_i = M_i^-1 b_i`` with ``M_i = (lam + mu) I + R + [s_e C^T C + s_p P^T P] + S + s_e m_i Pi_C``,
   ``S = C^T C``, ``b_i = (lam + mu) W_i + V_i``, ``V = s_e (W G^T) C + s_p (W P^T) P``; concepts that patches
   already on the pipeline erased (held, ``H``) are kept like ``P`` with weight ``s_h``: ``+ s_h H^T H`` and
   ``+ s_h (W H^T) H`` (``hold_scale``, by default ``s_e``);
6. **Bures proximal step** per row (``bures_iters``), pulling each row's norm and direction towards the old row.

On SD3 / FLUX (no ``attn2``) the same edit is made on ``transformer.context_embedder``, the one layer linear in
the prompt, on the text encoders' rows (UCE's ``context="embedder"``; :mod:`forgetpatch.methods.joint`): every joint
block then reads the edited context. The MI mask's negatives are the blank prompt's first row (CLIP's BOS on SD3,
T5's end token on FLUX). The manifest's ``params["edited"]`` says so.

Fast solve: every matrix except ``(lam + mu) I`` lives in the span of the erased and preserved embeddings
(``k <= n + m`` dimensions), so rows are solved in that basis. There ``M_i = M_0 + a_i Pi`` with one scalar
``a_i = s_e m_i`` per row; one Cholesky ``M_0 = L L^T`` and one eigendecomposition ``L^-1 Pi L^-T = Q K Q^T``
per layer give ``M_i^-1 = F (I + a_i K)^-1 F^T`` with ``F = L^-T Q`` for every row at once (two thin
matmuls instead of ``d`` solves). The Bures step is done on per-row inner products, and the change, which
is close to (not exactly) low rank, is stored as a truncated SVD at an energy threshold, taken in the
basis' span (``d x k``) without forming the ``d x D`` change.

Example:
    >>> patch = forgetpatch.erase(pipe, ["circle", "star"], method="scapre")
    >>> patch.manifest.lora.reconstruction_error < 0.1
    True

Choices where methods.md leaves room (no defect of the release is known for UCE/ScaPre):

* ``C C^T`` in step 5 is read as the UCE sum ``s_e sum c c^T + s_p sum p p^T`` (with it, and no mu, R, S, mask,
  the row solve is exactly UCE), ``S = sum c c^T`` is added on top, ``Pi_C`` spans the erased embeddings only.
* One seeded draw of embedding noise is shared by all concepts and layers (``W (c_k + e_s) = W c_k + W e_s``:
  one ``d x D x samples`` product per layer instead of one per concept); the entropy histogram of a row pools
  all concepts' samples.
* The gate temperature ``T`` is not published: ``T = gate_temperature * median(sigma)`` (scale-free).
* The Bures step keeps the solved row ``a`` fixed across iterations and updates the direction ``u``.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from forgetpatch.errors import MethodError
from forgetpatch.lowrank import LowRank, factorize_in_span, factorize_sketched
from forgetpatch.methods import flow, joint
from forgetpatch.methods.base import Concept, as_declared, check_concepts, patch_name, register, typed
from forgetpatch.methods.closed_form import (
    Embeddings,
    cross_attention_layers,
    current_weights,
    embed_concepts,
    guide_prompt,
    kept_rows,
    robust_record,
    robust_rounds,
    split_held,
)

#: The published settings per concept kind (identity / other use the object preset).
PRESETS: dict[str, dict[str, Any]] = {
    "object": {"erase_scale": 3.0, "p": 5.0, "bures_iters": 1, "spectral_gate": False, "entropy_samples": 20},
    "style": {"erase_scale": 2.0, "p": 8.0, "bures_iters": 1, "spectral_gate": True, "entropy_samples": 30},
    "nudity": {"erase_scale": 2.0, "p": 3.0, "bures_iters": 1, "spectral_gate": False, "entropy_samples": 20},
}
#: The words a ``Concept("nudity", kind="nudity")`` stands for (the paper's nudity concept list).
NUDITY_TERMS: tuple[str, ...] = ("nudity", "nude", "naked", "topless", "unclothed", "erotic")


@dataclass(frozen=True)
class ScaPreParams:
    """ScaPre's settings. Defaults are the object preset; :meth:`for_concepts` picks the preset by kind."""

    lam: float = 0.5
    """Weight of staying close to the original layer."""
    erase_scale: float = 3.0
    """``s_e``: weight of steering erased embeddings to their guides, and of the Informax confinement."""
    preserve_scale: float = 1.0
    """``s_p``: weight of keeping preserved embeddings' outputs."""
    hold_scale: float | None = None
    """``s_h``: weight of keeping the outputs of preserved concepts that patches already on the pipeline erased
    (:func:`~forgetpatch.methods.base.erased_on`), so that this patch does not undo theirs. ``None`` = ``s_e``."""
    p: float = 5.0
    """Sharpness exponent of the spectral gate and of the MI soft mask."""
    spectral_gate: bool = False
    """Add the spectrally gated regulariser ``R`` (the style preset does)."""
    gate_temperature: float = 0.1
    """Gate temperature ``T`` as a fraction of the median singular value of ``C`` (scale-free)."""
    entropy_samples: int = 20
    entropy_bins: int = 20
    mi_samples: int = 5
    """Noisy positives (and as many blank negatives) per concept for the MI mask."""
    mi_temperature: float = 0.7
    noise_std: float = 0.01
    pi_eps: float = 1e-6
    """Ridge of ``Pi_C``'s inverse, relative to the mean squared norm of the erased embeddings."""
    bures_iters: int = 1
    energy: float = 0.995
    """Share of each change's squared Frobenius norm kept by the truncated SVD (relative error <= 7%).

    The change is a rank-``k`` part (``k`` = edited embeddings) plus the Bures step's small full-rank row
    rescaling; on SD 1.5 with 100 concepts the rank-``k`` part holds ~99.85% of the energy, so 0.995
    keeps about ``k`` components where 0.999 needs up to ~2k."""
    max_rank: int | None = None
    seed: int = 0
    expand_nudity: bool = True
    """Erase ``Concept("nudity", kind="nudity")`` as the six words of :data:`NUDITY_TERMS`."""
    preset: str = "object"
    tokens: str = "last"
    """Edited positions of each concept's prompt: ``"last"`` word token (methods.md) or ``"trailing"``
    (that token and the EOS / padding positions after it, as UCE's release edits them)."""
    templates: tuple[str, ...] = ()
    """Prompts with a ``{concept}`` placeholder: each concept is also edited inside each of them (and
    each guide inside the same template), as UCE's release does with "image of {concept}" etc."""
    robust: int = 0
    """RECE rounds (arXiv 2407.12383): invert the edit in closed form, erase the inverted embeddings too, solve
    again (:func:`~forgetpatch.methods.closed_form.robust_rounds`). 0 = plain ScaPre."""
    robust_lambda: float = 0.1
    """Ridge weight of each round's inversion (the inversion attack's ``lambda``)."""

    @classmethod
    def for_concepts(cls, concepts: Sequence[Concept], params: dict[str, Any]) -> ScaPreParams:
        """The preset of the concepts' kind (the most common one when mixed), overridden by ``params``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known - {"name", "progress"})
        if unknown:
            raise MethodError(f"unknown ScaPre parameter(s) {unknown}; known: {sorted(known)}")
        kinds = Counter(c.kind if c.kind in PRESETS else "object" for c in concepts)
        kind = params.get("preset") or kinds.most_common(1)[0][0]
        if kind not in PRESETS:
            raise MethodError(f"unknown ScaPre preset {kind!r}; choose one of {sorted(PRESETS)}")
        if len(kinds) > 1 and "preset" not in params:
            warnings.warn(
                f"concepts of several kinds {sorted(kinds)}: using the {kind!r} preset for all; "
                "erase each kind separately (and stack the patches) to use each kind's preset",
                stacklevel=3,
            )
        given = {**PRESETS[kind], **{k: v for k, v in params.items() if k in known and k != "preset"}}
        values = typed(cls(preset=kind, **as_declared(typing.get_type_hints(cls), given)))
        if values.max_rank is not None and values.max_rank < 1:
            raise MethodError(f"max_rank must be >= 1 (or None for the exact change), got {values.max_rank}")
        if values.lam <= 0 or values.erase_scale <= 0 or values.preserve_scale < 0 or (values.hold_scale or 0) < 0:
            raise MethodError(
                "ScaPre needs lam > 0, erase_scale > 0 (at 0 the patch changes nothing) and non-negative "
                f"preserve/hold scales, got lam {values.lam}, erase_scale {values.erase_scale}, preserve_scale "
                f"{values.preserve_scale}, hold_scale {values.hold_scale}"
            )
        if values.entropy_samples < 2 or values.mi_samples < 1 or values.entropy_bins < 2:
            raise MethodError("ScaPre needs entropy_samples >= 2, entropy_bins >= 2 and mi_samples >= 1")
        if values.robust < 0 or values.robust_lambda < 0:
            raise MethodError(f"robust rounds and robust_lambda must be >= 0, got {values.robust}, {values.robust_lambda}")
        return values


# --- the pieces, each a pure function of activations / embeddings --------------------------------
def entropy_factor(acts: torch.Tensor, bins: int = 20) -> float:
    """``mu = mean_i H_i / log(bins)`` over rows of ``acts`` (``d x samples``), min-max normalised per row.

    ``H_i`` is the entropy of row ``i``'s ``bins``-bin histogram (``e_i = 1 - H_i / log bins`` in the paper's
    notation, ``mu = mean(1 - e_i)``). A constant row has entropy 0.
    """
    rows = acts.shape[0]
    lo, hi = acts.aminmax(dim=1, keepdim=True)
    scale = torch.where(hi > lo, bins / (hi - lo), torch.zeros_like(hi))  # a constant row: all in bin 0
    index = (acts - lo).mul_(scale).to(torch.int32).clamp_(max=bins - 1)  # values >= 0: truncation = floor
    offsets = torch.arange(rows, dtype=torch.int32, device=acts.device)[:, None] * bins
    counts = torch.bincount((index + offsets).flatten(), minlength=rows * bins).view(rows, bins)
    prob = counts.to(acts.dtype) / acts.shape[1]
    entropy = -(prob * prob.clamp_min(1e-30).log()).sum(dim=1)
    return float(entropy.mean() / math.log(bins))


def pooled_entropy_factor(base: torch.Tensor, noise: torch.Tensor, bins: int = 20) -> float:
    """:func:`entropy_factor` of the activations ``base[:, k] + noise[:, s]`` for all ``k, s``, per row.

    Same result without materialising the activations first: row minimum and maximum come from the two
    small factors, and the bin index is one fused pass (``d x n x samples`` int32 values).
    """
    rows = base.shape[0]
    b_lo, b_hi = base.aminmax(dim=1, keepdim=True)
    n_lo, n_hi = noise.aminmax(dim=1, keepdim=True)
    span = (b_hi - b_lo) + (n_hi - n_lo)
    scale = torch.where(span > 0, bins / span, torch.zeros_like(span))
    a, b = (base - b_lo) * scale, (noise - n_lo) * scale
    index = (a[:, :, None] + b[:, None, :]).to(torch.int32).clamp_(max=bins - 1)
    offsets = torch.arange(rows, dtype=torch.int32, device=base.device)[:, None, None] * bins
    counts = torch.bincount((index + offsets).flatten(), minlength=rows * bins).view(rows, bins)
    prob = counts.to(base.dtype) / (base.shape[1] * noise.shape[1])
    entropy = -(prob * prob.clamp_min(1e-30).log()).sum(dim=1)
    return float(entropy.mean() / math.log(bins))


def mi_soft_mask(positive: torch.Tensor, negative: torch.Tensor, p: float, temperature: float = 0.7):
    """Informax Decoupler weights ``m_i`` (``d``) from row activations on positives and negatives.

    Args:
        positive: ``(n, d, s)`` activations of the ``n`` concepts' noisy token embeddings.
        negative: ``(n, d, s)`` (or ``(d, s)``, shared) activations of noisy blank-prompt embeddings.

    Per concept and row, the ``2s`` values are binarised at their median, the mutual information with the
    positive/negative label is z-scored over rows, mapped through ``sigmoid(z / temperature)^p``, and the
    largest weight over concepts is kept.
    """
    if negative.ndim == 2:
        negative = negative.expand(positive.shape[0], *negative.shape)
    values = torch.cat([positive, negative], dim=-1)
    bit = values > values.median(dim=-1, keepdim=True).values
    s_pos = positive.shape[-1]
    ones_pos = bit[..., :s_pos].sum(-1).to(positive.dtype)
    ones_neg = bit[..., s_pos:].sum(-1).to(positive.dtype)
    return _squash(_mutual_information(ones_pos, ones_neg, s_pos, negative.shape[-1]), p, temperature)


def shared_noise_mi_mask(
    clean: torch.Tensor, noise: torch.Tensor, negative: torch.Tensor, p: float, temperature: float = 0.7
) -> torch.Tensor:
    """:func:`mi_soft_mask` when every concept shares one noise draw, without a median per concept and row.

    ``positive[k, i, s] = clean[i, k] + noise[i, s]`` and ``negative`` is ``(d, s)``, as many as the
    positives. The lower median of the ``2s`` values is the ``s``-th smallest, so exactly ``s`` values are
    ones, and the positives among the ``s`` smallest are counted by merging two sorted lists: the ``j``
    smallest positives are among them iff ``pos_(j) < neg_(s - j + 1)``. Sorting the shared noise and the
    negatives once per row replaces ``n x d`` medians (ties, of probability zero, may count differently).
    """
    s = noise.shape[1]
    if negative.shape[1] != s:
        raise MethodError("shared_noise_mi_mask needs as many negatives as positives per row")
    ascending = noise.sort(dim=1).values  # (d, s)
    descending = negative.sort(dim=1, descending=True).values  # neg_(s - j + 1) at column j - 1
    below = (clean.T[:, :, None] + ascending[None]) < descending[None]  # (n, d, s)
    ones_pos = s - below.sum(-1)
    # the MI takes only s + 1 values (one per count): compute those once and look them up
    counts = torch.arange(s + 1, dtype=clean.dtype, device=clean.device)
    table = _mutual_information(counts, s - counts, s, s)
    return _squash(table[ones_pos], p, temperature)


def _mutual_information(
    ones_pos: torch.Tensor, ones_neg: torch.Tensor, s_pos: int, s_neg: int
) -> torch.Tensor:
    """MI between a binarised activation and the positive/negative label, from the counts of ones."""
    total = s_pos + s_neg
    joint = torch.stack([s_pos - ones_pos, ones_pos, s_neg - ones_neg, ones_neg], dim=-1) / total
    label = torch.tensor([s_pos, s_pos, s_neg, s_neg], dtype=joint.dtype, device=joint.device) / total
    ones = ones_pos + ones_neg
    bit_share = torch.stack([total - ones, ones, total - ones, ones], dim=-1) / total
    terms = joint * (joint / (label * bit_share).clamp_min(1e-30)).clamp_min(1e-30).log()
    return torch.where(joint > 0, terms, torch.zeros_like(terms)).sum(-1)


def _squash(mi: torch.Tensor, p: float, temperature: float) -> torch.Tensor:
    """``(n, d)`` MI -> z-score over rows, ``sigmoid(z / temperature)^p``, max over concepts."""
    z = (mi - mi.mean(dim=1, keepdim=True)) / (mi.std(dim=1, keepdim=True, unbiased=False) + 1e-8)
    return (torch.sigmoid(z / temperature) ** p).amax(dim=0)


def gate_weights(sigma: torch.Tensor, p: float, temperature: float) -> torch.Tensor:
    """``1 - gate`` per singular value: ``gate = sigmoid((s - median s) / T)^p``, ``T = temperature * median``."""
    median = sigma.median()
    scale = (temperature * median).clamp_min(1e-12)
    return 1.0 - torch.sigmoid((sigma - median) / scale) ** p


def solve_rows(M0: torch.Tensor, Pi: torch.Tensor, a: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Rows ``x_i = (M0 + a_i Pi)^-1 beta_i`` for all ``i`` at once (``M0`` SPD, ``Pi`` PSD, ``a_i >= 0``).

    ``M0 = L L^T`` and ``L^-1 Pi L^-T = Q diag(kappa) Q^T`` are factored once; then
    ``(M0 + a Pi)^-1 = F diag(1 / (1 + a kappa)) F^T`` with ``F = L^-T Q``.

    Example:
        >>> x = solve_rows(M0, Pi, a, beta)               # beta: (rows, k), a: (rows,)
        >>> torch.allclose(x[3], torch.linalg.solve(M0 + a[3] * Pi, beta[3]))
        True
    """
    L = torch.linalg.cholesky(M0)
    inner = torch.linalg.solve_triangular(L, Pi, upper=False)
    inner = torch.linalg.solve_triangular(L, inner.T, upper=False)  # L^-1 Pi L^-T (symmetric)
    kappa, Q = torch.linalg.eigh((inner + inner.T) / 2)
    F = torch.linalg.solve_triangular(L.T, Q, upper=True)
    Z = beta @ F
    Z = Z / (1.0 + a[:, None] * kappa.clamp_min(0)[None, :])
    return Z @ F.T


def bures_coefficients(
    ww: torch.Tensor, wo: torch.Tensor, oo: torch.Tensor, lam_p: float, mu: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise Bures proximal step as coefficients: new row ``= c1 * a + c2 * w_old``.

    ``a`` is the solved row, ``w_old`` the original; only ``ww = |a|^2``, ``wo = <a, w_old>`` and
    ``oo = |w_old|^2`` are needed. Each iteration: ``kappa = max(0, <u, u0>)``,
    ``r = (lam_p |a| + mu r0 kappa) / (lam_p + mu)``, ``u ~ lam_p |a| u_a + mu r0 kappa u0``, row ``= r u``.
    """
    tiny = torch.finfo(ww.dtype).tiny
    a_norm, r0 = ww.clamp_min(tiny).sqrt(), oo.clamp_min(tiny).sqrt()
    uw, uo = 1.0 / a_norm, torch.zeros_like(ww)  # u = uw * a + uo * w_old, starting at u_a
    c1, c2 = torch.ones_like(ww), torch.zeros_like(ww)
    for _ in range(iters):
        kappa = ((uw * wo + uo * oo) / r0).clamp_min(0.0)
        r = (lam_p * a_norm + mu * r0 * kappa) / (lam_p + mu)
        qw, qo = torch.full_like(ww, lam_p), mu * kappa  # lam_p |a| u_a = lam_p a, r0 u0 = w_old
        norm = (qw**2 * ww + 2 * qw * qo * wo + qo**2 * oo).clamp_min(tiny).sqrt()
        uw, uo = qw / norm, qo / norm
        c1, c2 = r * uw, r * uo
    return c1, c2


# --- per call and per layer ----------------------------------------------------------------------
@dataclass
class Shared:
    """Everything that depends only on the embeddings: computed once per call, reused by every layer."""

    emb: Embeddings
    basis: torch.Tensor
    """``(D, k)`` orthonormal basis of the erased and preserved embeddings' span."""
    probes: torch.Tensor
    """``(cols, D)`` float32 rows every layer is applied to: C, distinct guides, kept rows, basis^T, noise, blank."""
    splits: list[int]
    H: torch.Tensor
    """``s_e C^T C + s_p P^T P + s_h H^T H + S`` in the basis (``k x k``)."""
    Pi: torch.Tensor
    R1: torch.Tensor | None
    """``V diag(1 - gate) V^T`` in the basis (times ``mu`` per layer), or ``None`` without gating."""
    G_b: torch.Tensor
    """``(guides, k)``: per distinct guide, the sum of the basis coordinates of the concepts it guides."""
    P_b: torch.Tensor
    """``(m + h, k)``: the kept rows (preserved and held, each scaled by the root of its weight) in the basis."""
    blank: torch.Tensor
    """The blank prompt's embedding (the MI mask's negatives)."""


def prepare_shared(emb: Embeddings, blank: torch.Tensor, params: ScaPreParams) -> Shared:
    """Build the basis, the shared ``k x k`` terms and the seeded probe embeddings."""
    C, G = emb.erase, emb.guide
    P = kept_rows(emb, params)  # preserved and held rows, each scaled by the root of its weight
    n, width = C.shape
    _, s, vh = torch.linalg.svd(torch.cat([C, P]), full_matrices=False)
    basis = vh[s > s[0] * 1e-9].T  # (D, k)
    C_b, P_b = C @ basis, P @ basis
    S = C_b.T @ C_b
    H = params.erase_scale * S + P_b.T @ P_b + S
    ridge = params.pi_eps * float(C.square().sum()) / n
    if n <= width:
        Pi = C_b.T @ torch.linalg.solve(C @ C.T + ridge * torch.eye(n, dtype=C.dtype), C_b)
    else:  # many edited rows (concepts in templates, trailing tokens): C^T (C C^T + r I)^-1 C = (C^T C + r I)^-1 C^T C
        CtC = C.T @ C
        Pi = basis.T @ torch.linalg.solve(CtC + ridge * torch.eye(width, dtype=C.dtype), CtC) @ basis
    R1 = None
    if params.spectral_gate:
        _, sigma, vhc = torch.linalg.svd(C, full_matrices=False)
        V_b = basis.T @ vhc.T  # right singular vectors of C in the basis, (k, r)
        R1 = V_b @ torch.diag(gate_weights(sigma, params.p, params.gate_temperature)) @ V_b.T
    generator = torch.Generator().manual_seed(params.seed)
    noise = torch.randn(
        params.entropy_samples + 2 * params.mi_samples, width, generator=generator, dtype=C.dtype
    )
    noise = noise * params.noise_std
    # concepts sharing a guide (all blank by default) share its row: sum_k (W g_k) c_k^T = (W G_u^T)(M C)
    guides, group = torch.unique(G, dim=0, return_inverse=True)
    G_b = torch.zeros(guides.shape[0], C_b.shape[1], dtype=C.dtype).index_add_(0, group, C_b)
    probes = torch.cat([C, guides, P, basis.T, noise, blank[None]]).float()
    m, k = P.shape[0], basis.shape[1]
    splits = [n, guides.shape[0], m, k, params.entropy_samples, params.mi_samples, params.mi_samples, 1]
    return Shared(
        emb=emb, basis=basis, probes=probes, splits=splits, H=H, Pi=Pi, R1=R1, G_b=G_b, P_b=P_b, blank=blank
    )


@dataclass
class LayerEdit:
    """One layer's ScaPre edit: the change and the quantities it was computed from (for inspection).

    The change is ``scale_i * W_i`` per row (the Bures step's rescaling) plus ``low_rank @ basis^T``;
    :attr:`delta` forms it, :attr:`coords` and :attr:`outside_sq` describe it without forming it.
    """

    W: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    """``c1 + c2 - 1`` per row (float64)."""
    low_rank: torch.Tensor
    """``d x k`` (float64): the change's part along the basis, apart from the row rescaling."""
    coords: torch.Tensor
    """``delta @ basis`` (``d x k``, float64)."""
    outside_sq: float
    """``|delta (I - basis basis^T)|_F^2``: the change outside the basis' span (rescaled W only)."""
    mu: float
    mask: torch.Tensor
    """``m_i`` per output row."""
    solved: torch.Tensor
    """Rows after the solve, before the Bures step (``d x D``; empty unless asked for)."""

    @property
    def delta(self) -> torch.Tensor:
        """``W' - W`` (``d x D``, float32)."""
        basis_t = self.basis.T.float().to(self.W.device)
        return self.scale.float()[:, None] * self.W + self.low_rank.float() @ basis_t


def edit_layer(W: torch.Tensor, shared: Shared, params: ScaPreParams, keep_solved: bool = False) -> LayerEdit:
    """ScaPre on one ``d x D`` weight (float32; the small ``k x k`` algebra runs in float64)."""
    probes = shared.probes.to(W.device)
    WC, WG, WP, WU, WE, WEp, WEn, Wb = (W @ probes.T).split(shared.splits, dim=1)  # float32 statistics
    # 1. entropy factor over all concepts' noisy activations (one noise draw shared by the concepts)
    mu = pooled_entropy_factor(WC, WE, params.entropy_bins)
    # 3. Informax Decoupler soft mask (positives W c_k + W e_s share the noise draw: see the function)
    mask = shared_noise_mi_mask(WC, WEp, Wb + WEn, params.p, params.mi_temperature)
    # 2, 4, 5. the shared part of every row's system, the rank-|C| term, and all rows' solves
    WG, WP, WU = WG.double(), WP.double(), WU.double()
    k = shared.basis.shape[1]
    M0 = (params.lam + mu) * torch.eye(k, dtype=WU.dtype, device=WU.device) + shared.H.to(WU.device)
    if shared.R1 is not None:
        M0 = M0 + mu * shared.R1.to(WU.device)
    beta = (params.lam + mu) * WU
    beta = beta + params.erase_scale * WG @ shared.G_b.to(WU.device)
    beta = beta + WP @ shared.P_b.to(WU.device)  # P_b: the weighted kept rows
    X = solve_rows(M0, shared.Pi.to(WU.device), params.erase_scale * mask, beta)
    step = X - WU  # solved row = W + step @ basis^T
    # 6. Bures proximal step, from per-row inner products
    oo = torch.linalg.vector_norm(W, dim=1, dtype=torch.float64).square()
    wu_step = (WU * step).sum(dim=1)
    wo = oo + wu_step
    ww = oo + 2 * wu_step + step.square().sum(dim=1)
    c1, c2 = bures_coefficients(ww, wo, oo, params.lam + mu, mu, params.bures_iters)
    scale = c1 + c2 - 1
    low_rank = c1[:, None] * step
    # W's rows outside the span: |W_i|^2 - |W_i basis|^2 (>= 0 up to rounding)
    outside = (oo - WU.square().sum(dim=1)).clamp_min(0.0)
    solved = W + step.float() @ shared.basis.T.float().to(W.device) if keep_solved else W.new_empty(0)
    return LayerEdit(
        W=W,
        basis=shared.basis,
        scale=scale,
        low_rank=low_rank,
        coords=scale[:, None] * WU + low_rank,
        outside_sq=float((scale.square() * outside).sum()),
        mu=mu,
        mask=mask,
        solved=solved,
    )


def edit_factors(edit: LayerEdit, params: ScaPreParams) -> LowRank:
    """The stored truncated SVD of one layer's change (rank by ``params.energy``).

    The change lies almost entirely in the basis' span, so its SVD is taken there (``d x k``); only when
    the span holds less than ``energy`` of it is the full ``d x D`` change formed and sketched.
    """
    low = factorize_in_span(
        edit.coords, edit.basis, edit.outside_sq, energy=params.energy, max_rank=params.max_rank
    )
    if low is not None:
        return low
    return factorize_sketched(
        edit.delta,
        energy=params.energy,
        max_rank=params.max_rank,
        range_hint=edit.low_rank.float(),
        sketch=8,
        seed=params.seed,
    )


@register
class ScaPre:
    """Scalable and Precise concept unlearning: closed-form, many concepts per call."""

    name: ClassVar[str] = "scapre"
    closed_form: ClassVar[bool] = True
    """Computed in closed form from text embeddings (so edited in context by default)."""
    denoisers: ClassVar[frozenset[str]] = frozenset({"unet", "transformer"})
    """A UNet's cross-attention, or an SD3 / FLUX transformer's context embedder."""
    key_steps: ClassVar[bool] = False
    params: ClassVar[tuple[type, ...]] = (ScaPreParams,)
    version: ClassVar[str] = "1"

    @staticmethod
    def targets(concepts: Sequence[Concept], params: ScaPreParams) -> list[Concept]:
        """The concepts whose embeddings are edited (``nudity`` expanded to :data:`NUDITY_TERMS`)."""
        out = []
        for c in concepts:
            if params.expand_nudity and c.kind == "nudity" and c.key == "nudity":
                out += [Concept(target=t, kind="nudity", guide=c.guide) for t in NUDITY_TERMS]
            else:
                out.append(c)
        return out

    @classmethod
    def prepare(cls, pipe, concepts: list[Concept], preserve: list[Concept], params: dict[str, Any]):
        """Check input, resolve settings and encode: ``(settings, Shared, {path: weight})``."""
        check_concepts(concepts, preserve)
        settings = ScaPreParams.for_concepts(concepts, params)
        targets = cls.targets(concepts, settings)
        plain, held = split_held(pipe, preserve)
        words = dict(
            erase=[c.target for c in targets], guides=[guide_prompt(c) for c in targets],
            preserve=[c.target for c in plain], held=[c.target for c in held],
            tokens=settings.tokens, templates=settings.templates,
        )
        if flow.family(pipe) is not None:  # SD3 / FLUX: the one layer linear in the prompt (methods.joint)
            emb, blank = joint.embed_rows(pipe, **words)
            layers = joint.context_layers(pipe, "embedder")
        else:
            emb, (blank,) = embed_concepts(pipe, **words, extra=[""])
            layers = cross_attention_layers(pipe)
        return settings, prepare_shared(emb, blank, settings), layers

    @classmethod
    def compute_deltas(
        cls, pipe, concepts: list[Concept], *, preserve: Sequence[Concept] = (), **params: Any
    ) -> dict[str, torch.Tensor]:
        """The full (untruncated) weight changes ``{path: W' - W}``, for tests and analysis."""
        _, edits, _ = cls._edits(pipe, concepts, list(preserve), params)
        return {path: edit.delta for path, edit in edits.items()}

    @classmethod
    def _edits(cls, pipe, concepts, preserve, params):
        """``(settings, {path: LayerEdit}, RECE rounds)``: every layer's edit, after ``settings.robust`` rounds."""
        settings, shared, layers = cls.prepare(pipe, concepts, preserve, params)
        weights = current_weights(pipe, layers)
        progress = params.get("progress", True)

        def solve(emb: Embeddings):
            current = shared if emb is shared.emb else prepare_shared(emb, shared.blank, settings)
            bar = tqdm(weights.items(), desc="scapre: editing layers", disable=not progress, leave=False)
            return {path: edit_layer(W, current, settings) for path, W in bar}

        def edited(edits):  # full d x D weights: formed only for a RECE round
            return {path: weights[path] + edit.delta for path, edit in edits.items()}

        edits, rounds = robust_rounds(shared.emb, settings.robust, settings.robust_lambda, weights, solve, edited)
        return settings, edits, rounds

    def erase(self, pipe, concepts: list[Concept], *, preserve: list[Concept], **params: Any):
        """Erase ``concepts`` (keeping ``preserve``) and return the change as a Patch.

        Params: any :class:`ScaPreParams` field (``erase_scale``, ``p``, ``energy``, ``seed``, ``preset``...),
        plus ``name`` and ``progress``. Presets follow the concepts' kind.
        """
        from forgetpatch.format import build_patch

        settings, edits, rounds = self._edits(pipe, concepts, preserve, params)
        factors, errors, mus = {}, {}, {}
        for path, edit in edits.items():
            low = edit_factors(edit, settings)
            factors[path], errors[path], mus[path] = (low.A, low.B), low.rel_error, round(edit.mu, 4)
        metrics: dict[str, Any] = {"entropy_factor": mus}
        if rounds:
            metrics["robust"] = robust_record(rounds)
        recorded = {**asdict(settings), "default_guide": ""}
        if flow.family(pipe) is not None:
            recorded["edited"] = joint.EDITED["embedder"]
        return build_patch(
            pipe,
            factors,
            name=params.get("name") or patch_name(self.name, concepts),
            method=self.name,
            concepts=concepts,
            preserved=preserve,
            params=recorded,
            reconstruction_errors=errors,
            metrics=metrics,
        )
