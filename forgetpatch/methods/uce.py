"""UCE: Unified Concept Editing (Gandikota et al., 2024), the closed-form baseline.

For every ``attn2.to_k`` / ``attn2.to_v`` weight ``W`` (``d x D``), erased token embeddings ``c_i`` with
guide embeddings ``g_i`` and preserved embeddings ``p_j``::

    W' = (lam W + s_e sum_i (W g_i) c_i^T + s_p sum_j (W p_j) p_j^T) (lam I + s_e sum_i c_i c_i^T + s_p sum_j p_j p_j^T)^-1

Writing ``K`` for the right-hand matrix, the numerator is ``W K + s_e W (G - C)^T C``, so the change is

    W' - W = [s_e W (G - C)^T] [C K^-1] = B A,

exactly rank ``|E|``. ``A`` is the same for every layer (it only involves embeddings), so a call costs one
``D x D`` solve plus one thin matmul per layer, and the patch stores ``B``, ``A`` as they are: an exact
LoRA whose only error is float32 rounding (measured against the float64 closed form and recorded). With
``max_rank`` each layer keeps the best rank-``max_rank`` part of ``B A`` instead, its error recorded too.

Concepts that patches already on the pipeline erased (:func:`~forgetpatch.methods.base.erased_on`), when
preserved, are held: kept as the pipeline maps them now (still erased) like the other preserved ones, but with
weight ``s_h`` (``hold_scale``, by default ``s_e``), i.e. ``+ s_h sum_h (W h) h^T`` and ``+ s_h sum_h h h^T``.
That only changes ``K``.

On SD3 / FLUX (no ``attn2``) the same closed form edits ``transformer.context_embedder`` on the text encoders' rows
(``context="embedder"``, exact: the only layer linear in the prompt), or each joint block's ``add_k_proj`` /
``add_v_proj`` on the rows it receives (``context="joint"``); :mod:`forgetpatch.methods.joint` gives the maths and
exactly what is and is not edited, and the manifest's ``params["edited"]`` says it per patch.

Example:
    >>> patch = forgetpatch.erase(pipe, ["circle", "star"], method="uce", preserve=["ellipse"])
    >>> patch.manifest.lora.rank
    2
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from forgetpatch.errors import MethodError
from forgetpatch.lowrank import truncate
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

#: Guide prompt per concept kind when a concept names none (UCE maps styles to generic "art").
DEFAULT_GUIDES: dict[str, str] = {"style": "art"}


@dataclass(frozen=True)
class UCEParams:
    """UCE's settings (the published defaults)."""

    lam: float = 0.5
    """Weight of staying close to the original layer."""
    erase_scale: float = 1.0
    """``s_e``: weight of mapping each erased embedding to its guide."""
    preserve_scale: float = 1.0
    """``s_p``: weight of keeping preserved embeddings' outputs."""
    hold_scale: float | None = None
    """``s_h``: weight of keeping the outputs of preserved concepts that patches already on the pipeline erased
    (:func:`~forgetpatch.methods.base.erased_on`), so that this patch does not undo theirs. ``None`` = ``s_e``:
    held as strongly as this patch erases."""
    tokens: str = "last"
    """Edited positions: the concept's ``"last"`` word token, or ``"trailing"`` (it and every EOS /
    padding position after it, as the authors' release does)."""
    templates: tuple[str, ...] = ()
    """Prompts with a ``{concept}`` placeholder in which each concept (and its guide) is also edited,
    as the release's "image of {concept}" prompts."""
    robust: int = 0
    """RECE rounds (arXiv 2407.12383): invert the edit in closed form, erase the inverted embeddings too, solve
    again (:func:`~forgetpatch.methods.closed_form.robust_rounds`). 0 = plain UCE."""
    robust_lambda: float = 0.1
    """Ridge weight of each round's inversion (the inversion attack's ``lambda``)."""
    max_rank: int | None = None
    """Cut each layer's change to its best rank-``max_rank`` approximation (:func:`forgetpatch.lowrank.truncate`;
    the relative error is recorded per layer). ``None`` = exact: rank = edited rows, which in context is up to the
    text width (an 80 MB patch for one concept on SD 1.5)."""
    context: str = "embedder"
    """SD3 / FLUX only: ``"embedder"`` edits ``context_embedder`` (exact), ``"joint"`` every joint block's
    ``add_k_proj`` / ``add_v_proj`` on the rows it receives (:mod:`forgetpatch.methods.joint`)."""
    joint_sigmas: int = 4
    """SD3 / FLUX, ``context="joint"``: sigmas of the pipeline's grid the block inputs are captured at."""
    latent_size: int = 0
    """SD3 / FLUX, ``context="joint"``: latent side of the captures (0 = the pipeline's default size)."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> UCEParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known - {"name", "progress", "seed"})
        if unknown:
            raise MethodError(f"unknown UCE parameter(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        converted = as_declared(hints, {k: v for k, v in params.items() if k in known})
        values = typed(cls(**converted))
        if values.lam <= 0:
            raise MethodError(f"UCE needs lam > 0 (the solve is singular otherwise), got {values.lam}")
        if values.erase_scale <= 0 or values.preserve_scale < 0:
            raise MethodError(
                f"UCE needs erase_scale > 0 (at 0 the patch changes nothing) and preserve_scale >= 0, got "
                f"{values.erase_scale} and {values.preserve_scale}"
            )
        if values.hold_scale is not None and values.hold_scale < 0:
            raise MethodError(f"hold_scale must be >= 0 (or None for erase_scale), got {values.hold_scale}")
        if values.max_rank is not None and values.max_rank < 1:
            raise MethodError(f"max_rank must be >= 1 (or None for the exact change), got {values.max_rank}")
        if values.robust < 0 or values.robust_lambda < 0:
            raise MethodError(f"robust rounds and robust_lambda must be >= 0, got {values.robust}, {values.robust_lambda}")
        return values


def uce_factors(
    weights: dict[str, torch.Tensor], emb: Embeddings, params: UCEParams, *, progress: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{path: (A, B, rel_error)}`` with ``W' - W = B @ A`` per layer (float32; error vs float64 formula)."""
    C, G = emb.erase, emb.guide
    width = C.shape[1]
    # A = C K^-1 with K = lam I + Z^T Z, Z = [sqrt(s_e) C; sqrt(s_p) P; sqrt(s_h) H], shared by every layer. With
    # fewer rows than the width, by Woodbury an (n+m)-sized solve: K^-1 C^T = (C^T - Z^T (lam I + Z Z^T)^-1 Z C^T)
    # / lam; with more (edits in many templates), the width-sized solve is the smaller one.
    Z = torch.cat([params.erase_scale**0.5 * C, kept_rows(emb, params)])
    if Z.shape[0] <= width:
        small = params.lam * torch.eye(Z.shape[0], dtype=torch.float64) + Z @ Z.T
        A64 = ((C.T - Z.T @ torch.linalg.solve(small, Z @ C.T)) / params.lam).T
    else:
        K = params.lam * torch.eye(width, dtype=torch.float64) + Z.T @ Z
        A64 = torch.linalg.solve(K, C.T).T
    A = A64.float()
    shift = (G - C).T
    out = {}
    for path, W in tqdm(weights.items(), desc="uce: editing layers", disable=not progress, leave=False):
        if W.shape[1] != width:
            raise MethodError(
                f"{path} takes {W.shape[1]}-wide inputs but the text embeddings are {width} wide"
            )
        # the product where the weight lives (a GPU pipeline's), the small d x n result on the CPU with the rest
        B64 = (params.erase_scale * W.double() @ shift.to(W.device)).cpu()
        B = B64.float()
        out[path] = (A.clone(), B, _product_error(B, A, B64, A64))  # a tensor per layer: no shared storage
    return out


def _product_error(B: torch.Tensor, A: torch.Tensor, B64: torch.Tensor, A64: torch.Tensor) -> float:
    """``|B A - B64 A64|_F / |B64 A64|_F`` without forming the ``d x D`` products (via ``r x r`` Grams)."""

    def sq_norm(X: torch.Tensor, Y: torch.Tensor) -> float:  # |X Y|_F^2 = tr((X^T X)(Y Y^T))
        if X.shape[1] >= min(X.shape[0], Y.shape[1]):  # r x r Grams bigger than the product itself
            return float((X @ Y).square().sum())
        return float(((X.T @ X) * (Y @ Y.T)).sum())

    exact = sq_norm(B64, A64)
    # B A - B64 A64 = (B - B64) A + B64 (A - A64): small terms only, no cancellation
    diff = sq_norm(torch.cat([B.double() - B64, B64], 1), torch.cat([A.double(), A.double() - A64]))
    return (max(diff, 0.0) / exact) ** 0.5 if exact > 0 else 0.0


def _compress(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """More edited embeddings than a layer's width: re-factor ``B A`` exactly at rank ``min(d, D)`` (QR)."""
    for path, (A, B, _) in factors.items():
        d, D = B.shape[0], A.shape[1]
        if A.shape[0] <= min(d, D):
            continue
        A64, B64 = A.double(), B.double()
        if d <= D:  # B = Q R: B A = Q (R A)
            Q, R = torch.linalg.qr(B64)
            new_B, new_A = Q, R @ A64
        else:  # A^T = Q R: B A = (B R^T) Q^T
            Q, R = torch.linalg.qr(A64.T)
            new_B, new_A = B64 @ R.T, Q.T
        exact = B64 @ A64
        norm = float(exact.norm())
        error = float((new_B.float().double() @ new_A.float().double() - exact).norm()) / norm if norm else 0.0
        factors[path] = (new_A.float(), new_B.float(), error)
    return factors


def _truncated(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], max_rank: int | None):
    """Each layer cut to ``max_rank``; the recorded error bounds both cuts (truncation plus float32 rounding)."""
    if max_rank is None:
        return factors
    out = {}
    for path, (A, B, error) in factors.items():
        low = truncate(A, B, max_rank=max_rank)
        out[path] = (low.A, low.B, low.rel_error + error)
    return out


@register
class UCE:
    """Unified Concept Editing: exact closed form on every cross-attention key/value projection."""

    name: ClassVar[str] = "uce"
    closed_form: ClassVar[bool] = True
    """Computed in closed form from text embeddings (so edited in context by default)."""
    denoisers: ClassVar[frozenset[str]] = frozenset({"unet", "transformer"})
    """A UNet's cross-attention, or an SD3 / FLUX transformer's context embedder (or joint attention)."""
    key_steps: ClassVar[bool] = False
    params: ClassVar[tuple[type, ...]] = (UCEParams,)
    version: ClassVar[str] = "1"

    @staticmethod
    def compute_deltas(
        pipe, concepts: list[Concept], *, preserve: list[Concept] = (), **params: Any
    ) -> dict[str, torch.Tensor]:
        """The full weight changes ``{path: W' - W}`` (float32), for tests and analysis."""
        factors, _ = UCE._factors(pipe, concepts, list(preserve), params)
        return {path: B @ A for path, (A, B, _) in factors.items()}

    @staticmethod
    def _factors(pipe, concepts, preserve, params):
        check_concepts(concepts, preserve)
        settings = UCEParams.from_dict(params)
        if flow.family(pipe) is not None:
            factors, rounds = _transformer_factors(pipe, concepts, preserve, settings, params)
            return _truncated(factors, settings.max_rank), rounds
        if (settings.context, settings.joint_sigmas, settings.latent_size) != ("embedder", 4, 0):
            raise MethodError("context / joint_sigmas / latent_size apply to SD3 and FLUX pipelines; leave them unset on a UNet")
        plain, held = split_held(pipe, preserve)
        emb, _ = embed_concepts(
            pipe,
            [c.target for c in concepts],
            [guide_prompt(c, DEFAULT_GUIDES) for c in concepts],
            [c.target for c in plain],
            tokens=settings.tokens,
            templates=settings.templates,
            held=[c.target for c in held],
        )
        weights = current_weights(pipe, cross_attention_layers(pipe))

        def solve(emb: Embeddings):
            return uce_factors(weights, emb, settings, progress=params.get("progress", True))

        def edited(factors):
            return {path: weights[path] + (B @ A).to(weights[path].device) for path, (A, B, _) in factors.items()}

        factors, rounds = robust_rounds(emb, settings.robust, settings.robust_lambda, weights, solve, edited)
        return _truncated(_compress(factors), settings.max_rank), rounds

    def erase(self, pipe, concepts: list[Concept], *, preserve: list[Concept], **params: Any):
        """Erase ``concepts`` (keeping ``preserve``) and return the change as an exact-LoRA Patch.

        Params: ``lam`` (0.5), ``erase_scale`` (1), ``preserve_scale`` (1), ``max_rank`` (exact), ``name``, ``progress``; ``seed`` is
        accepted for a uniform interface (UCE draws no noise).
        """
        from forgetpatch.format import build_patch

        factors, rounds = self._factors(pipe, concepts, preserve, params)
        settings = UCEParams.from_dict(params)
        recorded = asdict(settings)
        if flow.family(pipe) is None:
            recorded = {k: v for k, v in recorded.items() if k not in ("context", "joint_sigmas", "latent_size")}
        else:
            recorded["edited"] = joint.EDITED[settings.context]
            if settings.context == "embedder":
                del recorded["joint_sigmas"], recorded["latent_size"]
        return build_patch(
            pipe,
            {path: (A, B) for path, (A, B, _) in factors.items()},
            name=params.get("name") or patch_name(self.name, concepts),
            method=self.name,
            concepts=concepts,
            preserved=preserve,
            params={**recorded, "default_guides": {"default": "", **DEFAULT_GUIDES}},
            reconstruction_errors={path: err for path, (_, _, err) in factors.items()},
            metrics={"robust": robust_record(rounds)} if rounds else None,
        )


def _transformer_factors(pipe, concepts, preserve, settings: UCEParams, params):
    """UCE on SD3 / FLUX: ``context_embedder`` on the text rows, or each joint block's ``add_k_proj`` /
    ``add_v_proj`` on the rows it receives (:mod:`forgetpatch.methods.joint`)."""
    joint.check_context(pipe, settings.context)
    if settings.robust and settings.context == "joint":
        raise MethodError(
            "RECE rounds (robust) invert the edit in one input space; with context='joint' every layer has its own "
            "inputs: use context='embedder' with robust"
        )
    guides = [guide_prompt(c, DEFAULT_GUIDES) for c in concepts]
    plain, held = split_held(pipe, preserve)
    words = dict(
        erase=[c.target for c in concepts], guides=guides, preserve=[c.target for c in plain],
        held=[c.target for c in held], tokens=settings.tokens, templates=settings.templates,
    )
    layers = joint.context_layers(pipe, settings.context)
    weights = current_weights(pipe, layers)
    progress = params.get("progress", True)
    if settings.context == "embedder":
        emb, _ = joint.embed_rows(pipe, **words)

        def solve(emb: Embeddings):
            return uce_factors(weights, emb, settings, progress=progress)

        def edited(factors):
            return {path: weights[path] + (B @ A).to(weights[path].device) for path, (A, B, _) in factors.items()}

        factors, rounds = robust_rounds(emb, settings.robust, settings.robust_lambda, weights, solve, edited)
        return _compress(factors), rounds
    prompts, pairs, kept = joint.row_sets(pipe, **words)
    side = settings.latent_size or None
    sigmas = joint.joint_sigmas(pipe, settings.joint_sigmas, side)
    seen = joint.layer_inputs(pipe, prompts, list(layers), sigmas, seed=int(params.get("seed") or 0), latent_size=side)
    factors = {}
    for path in tqdm(layers, desc="uce: editing joint blocks", disable=not progress, leave=False):
        emb = joint.concat([joint.gather(states, pairs, kept) for states in seen[path]])
        factors.update(uce_factors({path: weights[path]}, emb, settings, progress=False))
    return _compress(factors), []
