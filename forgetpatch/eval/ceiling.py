"""The UA an exact erasure towards a guide would score: what the base draws when the guide replaces the word.

Erasing a concept "to a guide" (a blank prompt by default for UCE/ScaPre) aims to make prompts naming it
behave like the same prompts naming the guide. If those prompts draw the erased concept anyway (a blank
shape slot draws *some* shape, sometimes the erased one), an erasure that reached its aim exactly would
score UA ``1 - P(concept | guide prompt)``. A real patch is not that exact replacement and may land above
or below it; a ceiling far below a bar says the guide, not the method, is what to change.

A fine-tuning erasure steers each concept to a shape of its own (KSCU's and ESD's anchor, Dynamic Mask's superclass):
``guide`` may then name one per concept, as a patch's manifest records them (:func:`steered_to`).

Example:
    >>> guide_ceiling(forgetpatch.toy.pipeline(), ["circle", "triangle"], guide="")
    {'circle': 0.875, 'triangle': 0.6875}
    >>> guide_ceiling(forgetpatch.toy.pipeline(), ["circle"], steered_to(patch.manifest.concepts))  # doctest: +SKIP
    {'circle': 0.917}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from forgetpatch.errors import ConceptError
from forgetpatch.eval.generate import DEFAULT_GUIDANCE_SCALE, as_generator, check_guidance
from forgetpatch.eval.metrics import Judge, _check_concepts, _generate, check_counts, check_seed, toy_judge
from forgetpatch.eval.prompts import main_prompts
from forgetpatch.eval.report import forgotten
from forgetpatch.format import Concept


def guide_ceiling(
    pipe: Any,
    erased: Sequence[str],
    guide: str | Mapping[str, str] = "",
    *,
    images_per_concept: int = 16,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    judge: Judge | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Per erased concept, the share of its main scoring prompts (same seeds as :func:`evaluate`) in which
    the concept is forgotten (strict rule, as UA) once its word is replaced by ``guide`` (removed for ``""``).

    Args:
        pipe: the base model (a pipeline or a :class:`~forgetpatch.eval.generate.Generator`).
        erased: canonical toy concepts.
        guide: the word erased concepts are steered to; ``""`` is the UCE/ScaPre default. A mapping gives each
            erased concept its own.
    """
    check_counts(images_per_concept=images_per_concept, num_inference_steps=num_inference_steps)
    check_guidance(guidance_scale)
    seed = check_seed(seed)
    erased = _check_concepts(erased)
    guides = dict(guide) if isinstance(guide, Mapping) else dict.fromkeys(erased, guide)
    if missing := [c for c in erased if c not in guides]:
        raise ConceptError(f"no guide for {missing}: name one per erased concept (\"\" for the blank prompt)")
    judge = judge if judge is not None else toy_judge(pipe)
    pairs = [(c, it) for c in erased for it in main_prompts(images_per_concept, seed) if it.names(c)]
    items = [replace(it, prompt=_with_guide(it.prompt, concept, guides[concept])) for concept, it in pairs]
    generator = as_generator(
        pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, progress=progress
    )
    judged = judge.classify(_generate(generator, items))
    out = {}
    for concept in erased:
        gone = [forgotten(j, concept) for (c, _), j in zip(pairs, judged, strict=True) if c == concept]
        out[concept] = sum(gone) / len(gone)
    return out


def _with_guide(prompt: str, concept: str, guide: str) -> str:
    """``prompt`` with the word ``concept`` replaced by ``guide`` (dropped when the guide is blank)."""
    return " ".join(" ".join(guide if w == concept else w for w in prompt.split()).split())


def steered_to(concepts: Sequence[Concept]) -> dict[str, str]:
    """What each concept of a patch is steered to (:attr:`Concept.steered_to`, the blank prompt when it names
    nothing), as its manifest records it: the ``guide`` argument of :func:`guide_ceiling` for that patch."""
    return {c.target: c.steered_to or "" for c in concepts}
