"""Unlearning methods. Each module registers one method; :func:`erase` is the entry point."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from typing import Any

from forgetpatch.errors import MethodError
from forgetpatch.format import check_patch_name
from forgetpatch.methods.adversarial import (
    PLACEHOLDER,
    Adversarial,
    at_prefix,
    at_token,
    prefix_search,
    single_token,
    token_vectors,
    word_search,
)
from forgetpatch.methods.base import (
    Concept,
    ConceptLike,
    Method,
    as_concepts,
    available_methods,
    check_concepts,
    check_params,
    check_steering,
    erased_on,
    get_method,
    register,
    registered,
)
from forgetpatch.methods.closed_form import (
    cross_attention_layers,
    current_weight,
    current_weights,
    inversion_map,
)
from forgetpatch.methods.finetune import Cond, denoising_target, encode_prompt

# Method modules register themselves on import; a new method is one module plus its name here.
_METHOD_MODULES = ("uce", "scapre", "esd", "kscu", "dynamic_mask")
for _name in _METHOD_MODULES:
    importlib.import_module(f"forgetpatch.methods.{_name}")


def _check_words(pipe: Any, erased: list[Concept], kept: list[Concept]) -> None:
    """Refuse words outside a base's vocabulary when it knows one (the toy world); elsewhere warn about a concept the
    tokenizer splits into many pieces (a misspelling, or a name the model never saw)."""
    from forgetpatch.errors import ConceptError

    unknown = getattr(pipe, "forgetpatch_unknown_concept", None)
    if callable(unknown):
        for concept in [*erased, *kept]:
            if (why := unknown(concept.target)) is not None:
                raise ConceptError(why)
        return
    tokenizer = getattr(pipe, "tokenizer", None)
    for concept in erased if tokenizer is not None else []:
        pieces = tokenizer.tokenize(concept.target)
        if len(pieces) > 3 * len(concept.target.split()):
            warnings.warn(
                f"{concept.target!r} splits into {len(pieces)} tokenizer pieces ({' '.join(pieces[:8])}...): the model "
                "may not know it by that name; check the spelling, or name it as prompts do",
                stacklevel=3,
            )


def check_inputs(pipe: Any, erased: list[Concept], kept: list[Concept]) -> list[Concept]:
    """:func:`erase`'s checks of what to erase and keep on ``pipe``, before any work: words the base knows, no repeat
    or concept both erased and kept, none steered to a concept erased here or by a patch on the pipeline. Returns the
    concepts those patches erased (:func:`erased_on`); :func:`erase_chain` checks every step with it up front. A patch
    on the pipeline at a scale other than 1 is refused: the lineage records parents, not their scales."""
    from forgetpatch.loader import applied

    _check_words(pipe, erased, kept)
    check_concepts(erased, kept)
    if scaled := [e for e in applied(pipe) if e.scale != 1.0]:
        raise MethodError(
            f"patch {scaled[0].name!r} is on this pipeline at scale {scaled[0].scale}, and a new patch's lineage names "
            "its parents as they ship (scale 1), so applying it with its lineage would put them on otherwise: apply "
            "the parents at scale 1 to erase on top of them, or take them off"
        )
    held = erased_on(pipe)
    check_steering(erased, held, by="a patch on this pipeline erases")
    return held


def erase(
    pipe: Any,
    concepts: ConceptLike | Sequence[ConceptLike],
    *,
    method: str = "scapre",
    preserve: ConceptLike | Sequence[ConceptLike] | None = None,
    paper: bool = False,
    hold: bool = True,
    **params: Any,
):
    """Make ``pipe`` forget ``concepts`` with ``method`` and return the change as a Patch.

    The pipeline itself is not modified; apply the returned patch with :func:`forgetpatch.apply`. Settings
    left unset come from the base model when it supplies them (the toy world does), else closed-form methods
    edit each concept in the prompts of its kind; ``paper=True`` runs the method exactly as published
    instead (:mod:`forgetpatch.methods.defaults`).

    On a pipeline that already carries patches (sequential unlearning), the concepts they erased are added to
    ``preserve`` (:func:`~forgetpatch.methods.base.erased_on`): the new patch keeps them as the pipeline draws them
    now, that is, still erased, and closed-form methods weight them as strongly as the concepts they erase
    (``hold_scale``). ``hold=False`` leaves them out (also from the base's default ``preserve`` list; a ``preserve``
    given explicitly is used as given).

    Example:
        >>> patch = forgetpatch.erase(pipe, ["circle", "star"], method="scapre")
        >>> patch.save("no-circle-star/")
    """
    from forgetpatch.methods.defaults import with_defaults

    for flag, value in (("paper", paper), ("hold", hold)):
        if not isinstance(value, bool):
            raise MethodError(f"{flag} takes True or False, got {value!r}")
    check_params(method, params)
    erased = as_concepts(concepts)
    kept = as_concepts(preserve)
    given = bool(kept)
    if params.get("name") is not None:
        check_patch_name(params["name"])  # before the work that makes the patch it names
    held = check_inputs(pipe, erased, kept)
    erased, kept, params = with_defaults(pipe, method, erased, kept, params, paper=paper)
    if hold:
        named = {c.key for c in [*erased, *kept]}
        kept = [*kept, *(c for c in held if c.key not in named)]
    elif not given:  # the base's own preserve list names them too (the toy world's: every other shape)
        kept = [c for c in kept if c.key not in {h.key for h in held}]
    return get_method(method).erase(pipe, erased, preserve=kept, **params)


from forgetpatch.methods.chain import erase_chain  # noqa: E402  (it calls erase, defined above)
from forgetpatch.methods.kscu import PRESETS as KSCU_PRESETS  # noqa: E402
from forgetpatch.methods.kscu import preset_check, rise_steps  # noqa: E402

__all__ = [
    "KSCU_PRESETS",
    "PLACEHOLDER",
    "Adversarial",
    "Concept",
    "ConceptLike",
    "Cond",
    "Method",
    "as_concepts",
    "available_methods",
    "check_concepts",
    "check_inputs",
    "check_params",
    "check_steering",
    "cross_attention_layers",
    "current_weight",
    "current_weights",
    "denoising_target",
    "encode_prompt",
    "erase_chain",
    "erase",
    "erased_on",
    "get_method",
    "inversion_map",
    "at_prefix",
    "at_token",
    "prefix_search",
    "preset_check",
    "register",
    "registered",
    "rise_steps",
    "single_token",
    "token_vectors",
    "word_search",
]
