"""Where a method's unset settings come from, so that a plain ``erase(pipe, ["circle"])`` forgets.

First wins:

1. what the caller passes (params, a concept's own ``guide`` / ``superclass``, a ``preserve`` list);
2. the base's own defaults: a pipeline may carry ``forgetpatch_defaults``, a function
   ``(method, targets, *, closed_form, held, caller_params) -> dict`` of :class:`BaseDefaults` fields with settings
   measured to forget on that model, ``closed_form`` being the method's flag, ``held`` the concepts patches already
   on the pipeline erased (:func:`~forgetpatch.methods.base.erased_on`), which a guide or superclass must not be, and
   ``caller_params`` the parameters the caller set, for settings that depend on them (the toy world's pipeline
   carries :func:`forgetpatch.toy.defaults.erase_defaults`);
3. for closed-form methods on any other base, editing in context: each concept is also edited inside the
   prompts of its kind (:data:`KIND_TEMPLATES`, after the "image of {concept}" / "painting by {concept}"
   prompts of UCE's code release) at its own token and every later one (``tokens="trailing"``);
4. the method's published defaults.

``paper=True`` skips 2 and 3: the method exactly as its paper states it (closed form: the bare word's last
token, no templates).

Example:
    >>> erased, kept, params = with_defaults(pipe, "uce", as_concepts(["circle"]), [], {})
    >>> erased[0].guide, params["tokens"]                 # on the toy world
    ('cross', 'trailing')
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from forgetpatch.methods.base import Concept, as_concepts, erased_on, get_method

#: Prompts a closed-form edit is also made in, per concept kind, unless a base supplies its own.
KIND_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("image of {concept}", "photo of {concept}", "portrait of {concept}", "picture of {concept}",
               "painting of {concept}"),
    "style": ("painting by {concept}", "art by {concept}", "artwork by {concept}", "picture by {concept}",
              "style of {concept}"),
    "identity": ("photo of {concept}", "portrait of {concept}", "image of {concept}", "picture of {concept}",
                 "{concept} smiling"),
    "nudity": ("photo of {concept}", "image of {concept}", "{concept} person", "{concept} body", "{concept} art"),
    "other": (),
}


@dataclass(frozen=True)
class BaseDefaults:
    """A base model's own settings for one method and set of concepts (every field optional)."""

    guide: str | Mapping[str, str] | None = None
    """What each erased concept without a guide turns into (closed form: the guide; ESD, KSCU: the anchor): one for
    all, or one per target."""
    superclass: str | Mapping[str, str] | None = None
    """The superclass of each erased concept that names none (Dynamic Mask): one for all, or one per target."""
    preserve: Sequence[str] = ()
    """Concepts to keep, used when the caller preserves nothing."""
    params: dict[str, Any] = field(default_factory=dict)
    """Method parameters the caller did not set."""


def _for(setting: str | Mapping[str, str] | None, target: str) -> str | None:
    """A :class:`BaseDefaults` setting given once for all targets or per target, for ``target``."""
    return setting.get(target) if isinstance(setting, Mapping) else setting


def is_closed_form(method: str) -> bool:
    """Whether ``method`` computes its patch in closed form (and so edits text embeddings in context)."""
    return get_method(method).closed_form


def with_defaults(
    pipe: Any, method: str, concepts: list[Concept], preserve: list[Concept], params: dict[str, Any], *,
    paper: bool = False,
) -> tuple[list[Concept], list[Concept], dict[str, Any]]:
    """``(concepts, preserve, params)`` with every unset setting filled in, in the order above."""
    if paper:
        return concepts, preserve, params
    supplied = getattr(pipe, "forgetpatch_defaults", None)
    closed_form = is_closed_form(method)
    if callable(supplied):
        held = [c.target for c in erased_on(pipe)]
        targets = [c.target for c in concepts]
        given = supplied(method, targets, closed_form=closed_form, held=held, caller_params=params)
        if not given and concepts:
            warnings.warn(
                f"the base has no settings that forget {', '.join(targets)} with {method} (the toy "
                "world's are for its shapes, colours and textures, each kind in a patch of its own): the method's own "
                "settings run, which may forget little; measure the patch (forgetpatch eval)",
                UserWarning,
                stacklevel=3,
            )
        base = BaseDefaults(**given)
    elif closed_form:
        kinds = {c.kind for c in concepts}
        templates = tuple(t for kind in sorted(kinds) for t in KIND_TEMPLATES.get(kind, ()))
        base = BaseDefaults(params={"tokens": "trailing", "templates": templates})
    else:
        base = BaseDefaults()
    filled = [
        replace(c, guide=c.guide if c.guide is not None else _for(base.guide, c.target),
                superclass=c.superclass or _for(base.superclass, c.target))
        for c in concepts
    ]
    erased = {c.key for c in concepts}
    kept = preserve or [c for c in as_concepts(list(base.preserve)) if c.key not in erased]
    return filled, kept, {**base.params, **params}
