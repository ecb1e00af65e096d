"""The toy world's erase settings: what a plain ``forgetpatch.erase(toy.pipeline(), ["circle"])`` uses.

The toy pipeline carries :func:`erase_defaults` as ``pipe.forgetpatch_defaults``; ``forgetpatch.erase`` fills
every setting the caller leaves unset from it (:mod:`forgetpatch.methods.defaults`). Each method's settings
are its working recipe on this model, measured under the strict judge (an image counts as forgotten only
when another shape is confidently seen), so a shape erased with defaults is *replaced*, not smudged:

* every erased shape turns into a shape the model draws reliably (:data:`GUIDES`: ``cross`` unless it is
  erased too), since a blank guide leaves blobs no one can name (``forgetpatch.eval.guide_ceiling``);
* closed form (UCE, ScaPre): edited inside the world's prompt forms (:data:`ERASE_TEMPLATES`, never the
  held-out ones) at its own token and every later one, the other shapes preserved in the same prompts;
* ScaPre without its Bures proximal step (``bures_iters=0``): the step moves every edited row a fixed share
  (``mu / (lam + 2 mu)``, about a third) back to the old row whatever the erase scale, and on this model that
  leaves 38% of circle prompts as shapes no one can name (strict UA 0.62 [0.45-0.77] at erase_scale 20 or 50,
  0.94 [0.80-0.98] without the step; 32 images each, ``runs/quick.py``);
* KSCU and ESD: cross-attention LoRA of rank 8, 200 iterations at lr 5e-4 (the paper's 750-1000 at 1e-5 are
  for full SD weights); KSCU preserves the near neighbours and steers to the guide (its anchor prompt): with
  the paper's empty anchor its key steps turn circles into blobs no one can name (strict UA 0.19 [0.09-0.35]),
  with ``cross`` 0.69 [0.51-0.82] (32 images each, ``runs/quick.py``);
* Dynamic Mask: 200 steps at lr 1e-3, batch 4, 32 generated images per prompt form, guidance 4.

Only toy shapes get settings; other words (colours, textures) get none, so the methods' own apply.

Example:
    >>> erase_defaults("uce", ["circle"], closed_form=True)["guide"]
    'cross'
"""

from __future__ import annotations

from typing import Any

from forgetpatch.toy.vocab import ERASE_TEMPLATES, NEAR_NEIGHBOURS, SHAPES

#: What an erased shape turns into, first one not erased: shapes the toy model draws most reliably.
GUIDES: tuple[str, ...] = ("cross", "square", "triangle", "rectangle", "star")

_FINE_TUNING = {"rank": 8, "iterations": 200, "lr": 5e-4}

#: Per method: settings that do not depend on the concepts.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "uce": {"erase_scale": 20.0},
    "scapre": {"erase_scale": 20.0, "bures_iters": 0},
    "kscu": {"task": "object", "scope": "xattn", **_FINE_TUNING},
    "esd": {"variant": "x", "eta": 1.0, **_FINE_TUNING},
    "dynamic_mask": {
        "steps": 200, "epochs": 4, "update_every": 50, "lr": 1e-3, "batch": 4, "images": 32,
        "templates": list(ERASE_TEMPLATES), "guidance_scale": 4.0,
    },
}


def guide_for(targets: list[str]) -> str:
    """The first of :data:`GUIDES` that is not being erased."""
    return next(g for g in GUIDES if g not in targets)


def erase_defaults(method: str, targets: list[str], *, closed_form: bool = False) -> dict[str, Any]:
    """Settings for erasing ``targets`` with ``method`` on the toy model: ``guide``, ``superclass``,
    ``preserve`` and ``params`` (see the module docstring); empty unless every target is a shape.

    ``closed_form``: the method computes its patch from text embeddings (the method's flag, passed in by
    :func:`forgetpatch.methods.defaults.with_defaults`): it is edited in the world's prompt forms, any such method.
    """
    if not targets or any(t not in SHAPES for t in targets) or (method not in METHOD_SETTINGS and not closed_form):
        return {}
    guide = guide_for(targets)
    params = dict(METHOD_SETTINGS.get(method, {}))
    if closed_form:
        params.update(tokens="trailing", templates=list(ERASE_TEMPLATES))
        return {"guide": guide, "preserve": tuple(s for s in SHAPES if s not in targets), "params": params}
    if method == "kscu":
        near = dict.fromkeys(n for t in targets for n in NEAR_NEIGHBOURS[t] if n not in targets)
        return {"guide": guide, "preserve": tuple(n for n in near if n != guide), "params": params}
    if method == "dynamic_mask":
        return {"superclass": guide, "params": params}
    return {"params": params}
