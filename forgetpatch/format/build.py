"""``build_patch``: what every unlearning method calls to turn LoRA factors into a :class:`Patch`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from forgetpatch.errors import ManifestError, MethodError
from forgetpatch.format.concept import ConceptLike, as_concepts
from forgetpatch.format.fingerprint import (
    base_model_ref,
    detect_family,
    fingerprint,
    key_step_convention,
    resolve_module,
)
from forgetpatch.format.manifest import (
    BaseModelInfo,
    KeyStepRange,
    LoraInfo,
    Manifest,
    MethodInfo,
    problems,
)
from forgetpatch.format.patch import Patch

#: ``pipe -> digests`` of the patches applied on ``pipe``: a patch built there records them as its lineage. The
#: loader, which sits above this package, registers its own at import (:func:`set_lineage_source`); until then
#: nothing is applied anywhere.
LineageSource = Callable[[Any], list[str]]


def _nothing_applied(pipe: Any) -> list[str]:
    return []


_lineage_source: LineageSource = _nothing_applied


def set_lineage_source(source: LineageSource | None) -> LineageSource:
    """Make ``source(pipe)`` give the lineage that :func:`build_patch` records when none is passed (the digests of
    the patches applied on ``pipe``, oldest first); ``None`` restores the default (none). Returns the previous one.

    :mod:`forgetpatch.loader` registers ``lambda pipe: [e.digest for e in applied(pipe)]`` when it is imported, so
    that this package never imports the loader.
    """
    global _lineage_source
    previous, _lineage_source = _lineage_source, source or _nothing_applied
    return previous


def _peft_layout(
    path: str, module: nn.Module, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check factor shapes against the module and reshape them the way peft stores them."""
    weight = module.weight
    out_features = weight.shape[0]
    in_shape = tuple(weight.shape[1:])
    in_flat = int(torch.tensor(in_shape).prod().item()) if in_shape else 1
    r = A.shape[0]
    if A.ndim < 2 or B.ndim < 2 or B.shape[0] != out_features or B.reshape(out_features, -1).shape[1] != r:
        raise MethodError(
            f"{path}: B must be ({out_features}, r) and A (r, in); got A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if A.reshape(r, -1).shape[1] != in_flat:
        raise MethodError(f"{path}: A {tuple(A.shape)} does not match the module's input {in_shape}")
    if isinstance(module, nn.Conv2d):
        return A.reshape(r, *in_shape), B.reshape(out_features, r, 1, 1)
    if isinstance(module, nn.Linear):
        return A.reshape(r, in_flat), B.reshape(out_features, r)
    raise MethodError(f"{path}: only Linear and Conv2d layers can be patched, not {type(module).__name__}")


def _ranges(pipe, key_steps: Sequence[KeyStepRange | Mapping[str, Any]]) -> list[KeyStepRange]:
    """Validate key-step ranges; one that does not name its convention gets the pipeline's (flow matching:
    ``"sigma"``, with the scheduler's name when it names none)."""
    convention = key_step_convention(pipe)
    out = []
    for k in key_steps:
        r = KeyStepRange.model_validate(k)
        if "convention" not in r.model_fields_set and convention != r.convention:
            update: dict[str, Any] = {"convention": convention}
            if "scheduler" not in r.model_fields_set:
                update["scheduler"] = type(pipe.scheduler).__name__
            r = r.model_copy(update=update)
        out.append(r)
    return out


def build_patch(
    pipe,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    name: str,
    method: MethodInfo | str,
    concepts: Iterable[ConceptLike],
    preserved: Iterable[ConceptLike] = (),
    key_steps: Sequence[KeyStepRange | Mapping[str, Any]] | None = None,
    params: Mapping[str, Any] | None = None,
    reconstruction_errors: Mapping[str, float] | None = None,
    base_model_id: str | None = None,
    lineage: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Patch:
    """Package LoRA factors computed on ``pipe`` as a :class:`Patch` with a full manifest.

    ``factors`` maps module paths (``"unet.down_blocks.0...attn2.to_k"``) to ``(A, B)`` with
    ``delta W = B @ A`` (``A``: ``r x in``, ``B``: ``out x r``; conv factors may be flattened, they are
    reshaped to peft's layout). Every module gets ``alpha = r`` (scale 1). The manifest records the
    fingerprint of the base weights, ranks, the architecture family, the base model's Hub id and revision as
    far as the pipeline tells them (:func:`base_model_ref`; ``base_model_id`` overrides), and as lineage
    (unless given) the digests of the patches currently applied to ``pipe``: it asks the source registered
    with :func:`set_lineage_source` (the loader registers one when imported; without it, the lineage is
    empty, as nothing can have been applied). Key-step ranges that do not name their
    convention get the pipeline's (``"sigma"`` on a flow-matching scheduler, see :class:`KeyStepRange`).

    Example:
        >>> low = factorize(new_weight - old_weight)
        >>> patch = build_patch(pipe, {"unet.mid_block.attentions.0.proj_in": (low.A, low.B)},
        ...                     name="no-cat", method="uce", concepts=["cat"], preserved=["dog"])
        >>> patch.save("no-cat")
    """
    if not factors:
        raise MethodError("build_patch needs at least one module's factors")
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, (A, B) in factors.items():
        module = resolve_module(pipe, path)
        A, B = _peft_layout(path, module, torch.as_tensor(A), torch.as_tensor(B))
        state_dict[f"{path}.lora_A.weight"] = A.detach().to("cpu", dtype).contiguous()
        state_dict[f"{path}.lora_B.weight"] = B.detach().to("cpu", dtype).contiguous()
        ranks[path] = A.shape[0]
    rank = max(ranks.values())
    method_info = method if isinstance(method, MethodInfo) else MethodInfo(name=method)
    if params:
        method_info = method_info.model_copy(update={"params": {**method_info.params, **params}})
    if lineage is None:
        lineage = _lineage_source(pipe)
    errors = dict(reconstruction_errors or {})
    base_model_id, revision = (base_model_id, None) if base_model_id is not None else base_model_ref(pipe)
    try:  # a field pydantic refuses (an infinite timestep, a NaN error) is named in one line
        manifest = Manifest(
            name=name,
            method=method_info,
            concepts=as_concepts(list(concepts)),
            preserved=as_concepts(list(preserved)),
            key_steps=None if key_steps is None else _ranges(pipe, key_steps),
            base_model=BaseModelInfo(
                id=base_model_id,
                revision=revision,
                family=detect_family(pipe, base_model_id),
                fingerprint=fingerprint(pipe, list(factors)),
            ),
            lora=LoraInfo(
                rank=rank,
                alpha=rank,
                target_modules=list(factors),
                rank_pattern={p: r for p, r in ranks.items() if r != rank},
                alpha_pattern={p: r for p, r in ranks.items() if r != rank},
                reconstruction_error=max(errors.values()) if errors else None,
                reconstruction_errors=errors,
            ),
            lineage=list(lineage),
            metrics=dict(metrics or {}),
        )
    except ValidationError as exc:
        raise ManifestError(f"build_patch cannot describe this patch: {problems(exc)}") from None
    return Patch(manifest, state_dict)
