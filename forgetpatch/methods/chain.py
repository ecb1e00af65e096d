"""Sequential unlearning as a chain of patches: forget one concept, then the next on top of it, and so on.

Step ``k`` is computed on the pipeline carrying steps ``1..k-1`` (fused, so a fine-tuning method's teacher is the
patched model and Dynamic Mask's distillation keeps their concepts forgotten), and :func:`~forgetpatch.methods.erase`
preserves their concepts as the patched model draws them (``hold``: closed-form methods weight them as strongly as
they erase, ``hold_scale``); its lineage names them, so
``forgetpatch.apply(pipe, step_k)`` refuses without its parents and ``apply(..., with_lineage=True)`` puts them on
first. The pipeline is given back as it came.

Example:
    >>> patches = erase_chain(pipe, ["circle", "star", "triangle"], method="dynamic_mask")
    >>> [p.manifest.lineage == [q.digest for q in patches[:i]] for i, p in enumerate(patches)]
    [True, True, True]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from forgetpatch.methods.base import ConceptLike, as_concepts


def erase_chain(
    pipe: Any,
    concepts: Sequence[ConceptLike],
    *,
    method: str = "scapre",
    preserve: Sequence[ConceptLike] | None = None,
    name: str | None = None,
    on_step: Callable[[int, Any, Any], None] | None = None,
    **params: Any,
) -> list[Any]:
    """Erase ``concepts`` one after another, one patch per concept; returns the patches in order.

    Args:
        name: step ``k``'s patch is named ``f"{name}-step-{k}"`` (default: the method's own names).
        on_step: called as ``on_step(k, patch, pipe)`` after step ``k`` with the pipeline carrying steps
            ``1..k`` (e.g. to evaluate relapse of every concept so far).
        **params: the method's parameters, the same for every step.
    """
    from forgetpatch.format import check_patch_name
    from forgetpatch.loader import applied, apply, remove
    from forgetpatch.methods import check_inputs, check_params, erase

    check_params(method, {k: v for k, v in params.items() if k != "paper"})
    steps = as_concepts(list(concepts) if not isinstance(concepts, str) else [concepts])
    check_inputs(pipe, steps, as_concepts(preserve))  # every step's words, repeats and steering: before any step
    if name is not None:
        check_patch_name(f"{name}-step-{len(steps)}")
    patches: list[Any] = []
    try:
        for k, concept in enumerate(steps, start=1):
            step_name = f"{name}-step-{k}" if name else None
            patch = erase(pipe, [concept], method=method, preserve=preserve, **params,
                          **({"name": step_name} if step_name else {}))
            apply(pipe, patch, fuse=True)
            patches.append(patch)
            if on_step is not None:
                on_step(k, patch, pipe)
    finally:  # take off the steps this call put on (all of them, unless on_step removed some)
        on = {entry.digest for entry in applied(pipe)}
        mine = [p.digest for p in patches if p.digest in on]
        if mine:
            remove(pipe, mine)
    return patches
