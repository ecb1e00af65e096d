"""Measure a toy-world recipe against the issue bars: erase, apply the patch as shipped, evaluate vs base."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import forgetpatch
from forgetpatch.recipes import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class Measured:
    worst: dict[str, float | None]
    """Worst case over the erased concepts (:meth:`EvalReport.worst`): UA absolute; IRA, CRA and near as
    ratios of the base."""
    erase_s: float
    report: object

    def below(self, bars: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 3) for k, bar in bars.items() if (v := self.worst[k]) is not None and v < bar}


def toy_pipeline():
    from forgetpatch import toy

    try:
        toy.load_judge()
        return toy.pipeline()
    except forgetpatch.errors.ForgetPatchError as exc:
        pytest.skip(f"toy world not available: {exc}")


def measure_recipe(name: str, images_per_concept: int = 16) -> Measured:
    """Run ``recipes/<name>.yaml`` on the shipped toy model and score the patch it makes."""
    from forgetpatch.eval import evaluate

    recipe = load_recipe(RECIPES / f"{name}.yaml")
    erased = [c.target for c in recipe.concepts]
    base_pipe = toy_pipeline()
    base = evaluate(base_pipe, erased, images_per_concept=images_per_concept, progress=False)
    start = time.perf_counter()
    patch = forgetpatch.erase(base_pipe, recipe.erase_concepts(), progress=False, **recipe.erase_kwargs())
    erase_s = time.perf_counter() - start
    pipe = forgetpatch.apply(toy_pipeline(), patch)
    report = evaluate(pipe, erased, reference=base, images_per_concept=images_per_concept, progress=False)
    return Measured(worst=report.worst(), erase_s=erase_s, report=report)
