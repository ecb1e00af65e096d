"""Measure a toy-world recipe against the issue bars: erase, apply the patch as shipped, evaluate vs base.

Bars are checked on the safe end of each 95% interval (:meth:`EvalReport.worst` with ``safe=True``): UA
on :data:`UA_IMAGES` images per erased concept, retention on :data:`RETAIN_IMAGES` per concept, in two stages: stage 1
measures :data:`FIRST_UA_IMAGES` (retention on :data:`FIRST_RETAIN_IMAGES`) and stops there when stage 2 could not
show the UA bar met (:func:`can_still_meet`), so an unmet bar costs a third of the images. The base
is evaluated once per test session and stage for every shape the recipes erase and reused as the reference.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from filelock import FileLock, Timeout

import forgetpatch
from forgetpatch.recipes import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
#: Images per erased concept for UA: all forgotten gives a lower bound of 0.98, 11 misses still 0.90. (96 until stop 31,
#: where Dynamic Mask's defaults forgot 92 of 96, lower bound 0.898, a hair under: 192 resolves a rate near the bar;
#: the first 96 are the same prompts. Only recipes at 31 of 32 or better in stage 1 get here, as with 96.)
UA_IMAGES = 192
FIRST_UA_IMAGES = 32
#: Retention images per kept concept in stage 2: 32 (16 until stop 36: a patch keeping 0.94-0.95 of the base's
#: in-domain accuracy could not show the 0.85 bar there). A ratio's safe bound is its own interval's lower end since
#: stop 42 (:mod:`forgetpatch.rates`, conservative): Dynamic Mask's and KSCU's defaults show 0.867 on 32 per concept,
#: 0.845 on 16.
RETAIN_IMAGES = 32
FIRST_RETAIN_IMAGES = 4
#: The default run bar-tests the defaults of UCE, ScaPre and Dynamic Mask (KSCU's on stage 1 only); ESD's (200
#: training iterations) and KSCU's (440 more images than stage 1) run with FORGETPATCH_ALL_BARS=1, to keep the suite
#: within its 15 minutes.
ALL_BARS = os.environ.get("FORGETPATCH_ALL_BARS", "") not in ("", "0")
all_bars_only = pytest.mark.skipif(
    not ALL_BARS,
    reason="minutes of training or images: set FORGETPATCH_ALL_BARS=1 (or python benchmarks/recipes.py)",
)
#: Every shape a bar-tested recipe erases: the shared base report covers them all.
BAR_SHAPES = ("circle", "square", "triangle", "star", "hexagon")


@dataclass
class Measured:
    worst: dict[str, float | None]
    """Worst case over the erased concepts at the safe end of each 95% interval (UA's lower bound; IRA,
    CRA and near: their ratio to the base's, its lower bound); what the bars are checked on."""
    point: dict[str, float | None]
    """The same worst case on point estimates, for the record."""
    erase_s: float
    report: object
    ua_images: int = UA_IMAGES
    """UA images per erased concept the figures come from (:data:`FIRST_UA_IMAGES` when stage 1 settled it)."""
    retain_images: int = RETAIN_IMAGES
    ceiling: dict[str, tuple[str, float]] | None = None
    """Per erased concept: the shape it is steered to and the strict UA the base scores when that shape replaces the
    word in the same prompts (:func:`forgetpatch.eval.guide_ceiling`): what an exact steering would reach. ``None``
    when the UA bar is met, or not measured (a recipe erasing more than one, without ``FORGETPATCH_ALL_BARS=1``)."""

    def below(self, bars: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 3) for k, bar in bars.items() if (v := self.worst[k]) is None or v < bar}

    def figures(self) -> str:
        from forgetpatch.eval import wilson

        safe = {k: None if v is None else round(v, 3) for k, v in self.worst.items()}
        point = {k: None if v is None else round(v, 3) for k, v in self.point.items()}
        n = self.ua_images
        ceiling = "not measured" if self.ceiling is None else {
            f"{concept}->{to or 'blank'}": "{:.3f} [{:.3f}-{:.3f}]".format(v, *wilson(round(v * n), n))
            for concept, (to, v) in self.ceiling.items()
        }
        # what strict UA leaves out: the erased concept named in its own images (the rest of a miss is abstentions)
        named = {c: f"{round(r.scores.split.get('kept', 0.0) * n)} of {n}" for c, r in self.report.concepts.items()}
        return (f"safe (95% bound) {safe}; point {point}; UA on {n} images, retention on "
                f"{self.retain_images} per concept; erased concept named as itself {named}; "
                f"erase {self.erase_s:.0f} s; ceiling (the base drawing the steered-to shape in the same prompts) "
                f"{ceiling}")


#: Toy-world bar tests (forgetting / retention relative to the base) only mean something when the base model draws
#: shapes; below this held-out shape accuracy they xfail with the measured figure (and the base's own fidelity tests
#: fail).
MIN_BASE_SHAPE_FIDELITY = 0.6
#: Under these point figures a bar test fails instead of xfailing: whatever the bars, a patch this far off forgets or
#: keeps nothing like what its recipe measured (a regression), e.g. one that erases nothing (UA about 0).
FLOOR = {"ua": 0.5, "ira": 0.8, "cra": 0.9}


@cache
def base_fidelity() -> dict[str, float]:
    """Held-out fidelity of the shipped toy pipeline (64 prompts), made once per test run (:func:`made_once`)."""
    from forgetpatch.toy.fidelity import fidelity

    pipe = toy_pipeline()
    return made_once("base-fidelity-64", lambda: fidelity(pipe, forgetpatch.toy.load_judge(), n=64, steps=25))


def require_competent_toy() -> dict[str, float]:
    """The base's :func:`base_fidelity`; xfails the test when its held-out shape accuracy is under
    :data:`MIN_BASE_SHAPE_FIDELITY`, where no bar means anything."""
    measured = base_fidelity()
    if measured["shape"] < MIN_BASE_SHAPE_FIDELITY:
        pytest.xfail(
            f"the shipped toy checkpoint draws the right shape for only {measured['shape']:.0%} of held-out prompts "
            f"(needs >= {MIN_BASE_SHAPE_FIDELITY:.0%}; measured {measured}): train it further with "
            "`python -m forgetpatch.toy.train --resume`"
        )
    return measured


def check_bars(
    measured: Measured, bars: dict[str, float], label: str, floor: dict[str, float] = FLOOR, *, strict: bool = False
) -> None:
    """Fail under ``floor`` (point figures); under ``bars`` (the safe end of each interval) xfail with the figures, or
    fail with ``strict=True`` (a recipe that meets its bars with room to spare); pass when every bar is met."""
    figures = f"{label}: {measured.figures()}"
    print(figures)
    low = {k: v for k, f in floor.items() if (v := measured.point.get(k)) is None or v < f}
    assert not low, f"under the floor {floor} (point figures) {low}: {figures}"
    below = measured.below(bars)
    assert not (strict and below), f"below the toy bars {bars}: {below}; {figures}"
    if below:
        pytest.xfail(f"below the toy bars {bars}: {figures}")


def toy_pipeline():
    from forgetpatch import toy

    try:
        toy.load_judge()
        return toy.pipeline()
    except forgetpatch.errors.ForgetPatchError as exc:
        pytest.skip(f"toy world not available: {exc}")


#: Under ``pytest -n N``: a folder the run's workers share (conftest sets it), where the first worker that makes a base
#: report leaves it for the others; ``None`` in a run without workers.
SHARED: Path | None = None
T = TypeVar("T")


def draw(drawer, keys: list[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
    """``drawer``'s image of each ``(prompt, seed)`` in ``keys``, by key."""
    return dict(zip(keys, drawer.generate([p for p, _ in keys], [s for _, s in keys]), strict=True))


def drawn_in_parts(key: str, drawer, keys: list[tuple[str, int]], part: int = 64) -> dict[tuple[str, int], np.ndarray]:
    """``drawer``'s images of ``keys`` (``(prompt, seed)`` pairs) in parts of ``part``, which the run's workers share:
    each draws the parts no other has begun, then reads the rest as they are finished, so a worker that needs the
    same images as another helps to draw them instead of waiting for it. Without workers, all drawn here."""
    parts = [keys[i : i + part] for i in range(0, len(keys), part)]
    if SHARED is None:
        return {k: v for chunk in parts for k, v in draw(drawer, chunk).items()}
    files = [SHARED / f"{key}-part{i}.pickle" for i in range(len(parts))]
    for file, chunk in zip(files, parts, strict=True):  # the parts no one has begun
        try:
            with FileLock(f"{file}.lock", timeout=0):
                if not file.exists():
                    file.write_bytes(pickle.dumps(draw(drawer, chunk)))
        except Timeout:
            continue  # another worker is drawing it
    images = {}
    for file, chunk in zip(files, parts, strict=True):  # then every part, waiting for those another worker draws
        with FileLock(f"{file}.lock"):
            if not file.exists():  # the worker drawing it failed
                file.write_bytes(pickle.dumps(draw(drawer, chunk)))
            images.update(pickle.loads(file.read_bytes()))
    return images


def made_once(key: str, make: Callable[[], T]) -> T:
    """``make()``, made by one worker of the run and read by the others from :data:`SHARED` (a lock keeps a second
    worker waiting while the first makes it); without workers, just ``make()``."""
    if SHARED is None:
        return make()
    file = SHARED / f"{key}.pickle"
    with FileLock(f"{file}.lock"):
        if file.exists():
            return pickle.loads(file.read_bytes())
        value = make()
        file.write_bytes(pickle.dumps(value))
        return value


class Cached:
    """A :class:`~forgetpatch.eval.generate.Generator` drawing with ``pipe`` at :func:`forgetpatch.eval.evaluate`'s
    default settings, each (prompt, seed) once: a stage's prompts are among the next stage's (a recipe's 72 of 512;
    184 of the base's stage-2 512 are among its stage-1 200), so stage 2 draws only the new ones. ``images`` may hold
    some already. The UNet is put in the channels-last memory layout: a sixth less time on a CPU, for pixels within
    4e-5 of the default layout's (its convolutions only: a patch's linear layers keep theirs)."""

    def __init__(self, pipe, images: dict[tuple[str, int], np.ndarray] | None = None) -> None:
        import torch

        from forgetpatch.eval.generate import PipelineGenerator

        pipe.unet.to(memory_format=torch.channels_last)
        self.drawer = PipelineGenerator(pipe, progress=False)
        self.images = {} if images is None else images

    def generate(self, prompts, seeds) -> np.ndarray:
        keys = list(zip(prompts, seeds, strict=True))
        if new := [k for k in dict.fromkeys(keys) if k not in self.images]:
            self.images.update(draw(self.drawer, new))
        return np.stack([self.images[k] for k in keys])


#: The base's images this process holds, by (prompt, seed): those of every base report it made or read.
_base_images: dict[tuple[str, int], np.ndarray] = {}


@cache
def base_report(ua_images: int = UA_IMAGES, retain_images: int = RETAIN_IMAGES, shapes: tuple[str, ...] = BAR_SHAPES):
    """The shipped base model's evaluation, ``shapes`` erased (every bar-tested shape: stage 1's, shared by every
    recipe), at one stage's sizes, made once per session: a stage's images are a subset of the next stage's, so
    scoring against either gives the same figures. Stage 2 asks for the recipe's own shapes only (192 UA images of
    each), and only when the recipe reaches it; it draws only what stage 1 did not. Under ``pytest -n N`` the workers
    that need it draw its images together (:func:`drawn_in_parts`) and each judges them."""
    from forgetpatch.eval import evaluate, scoring_prompts

    drawn = set()  # by every worker: stage 1's images
    if (ua_images, retain_images) != (FIRST_UA_IMAGES, FIRST_RETAIN_IMAGES):
        drawn = {it.key for it in base_report(FIRST_UA_IMAGES, FIRST_RETAIN_IMAGES, BAR_SHAPES).items}
    sizes = {"images_per_concept": retain_images, "images_per_erased": ua_images}
    base = Cached(toy_pipeline(), _base_images)
    new = [k for k in dict.fromkeys(it.key for it in scoring_prompts(shapes, retain_images, 0, ua_images))
           if k not in drawn]  # fmt: skip
    _base_images.update(drawn_in_parts(f"base-{ua_images}-{retain_images}-{'-'.join(shapes)}", base.drawer, new))
    return evaluate(base, list(shapes), progress=False, geometry=False, **sizes)  # drawn: judged only


def can_still_meet(report, ua_bar: float) -> bool:
    """After stage 1: whether measuring :data:`UA_IMAGES` images could show the UA bar met. No, when even the upper
    end of some concept's interval is under the bar, or when its rate, kept at :data:`UA_IMAGES` images, would
    leave the lower end under the bar (to clear 0.90 on 192 images the rate must be about 0.94)."""
    from forgetpatch.eval import wilson

    for concept in report.concepts.values():
        scores = concept.scores
        at_full = wilson(round(scores.ua * UA_IMAGES), UA_IMAGES)[0]
        if scores.interval["ua"][1] < ua_bar or at_full < ua_bar:
            return False
    return True


def measure_recipe(name: str, ua_bar: float = 0.90, *, stages: int = 2) -> Measured:
    """Run ``recipes/<name>.yaml`` on the shipped toy model and score the patch it makes (two stages, above; stage 1
    only with ``stages=1``, which cannot show a bar met), and, when the UA bar is missed after stage 2 or settled in
    stage 1, the ceiling of what it steers each concept to, on the same prompts."""
    from forgetpatch.eval import Replay, evaluate, guide_ceiling, steered_to

    recipe = load_recipe(RECIPES / f"{name}.yaml")
    erased = [c.target for c in recipe.concepts]
    assert set(erased) <= set(BAR_SHAPES), f"add {erased} to BAR_SHAPES"
    start = time.perf_counter()
    patch = forgetpatch.erase(toy_pipeline(), recipe.erase_concepts(), progress=False, **recipe.erase_kwargs())
    erase_s = time.perf_counter() - start
    # After training, not before: a worker that trains longer finds the base's fidelity made, instead of waiting
    # at the start while another worker makes it.
    require_competent_toy()
    patched = Cached(forgetpatch.apply(toy_pipeline(), patch))
    for ua_images, retain_images in ((FIRST_UA_IMAGES, FIRST_RETAIN_IMAGES), (UA_IMAGES, RETAIN_IMAGES))[:stages]:
        sizes = {"images_per_concept": retain_images, "images_per_erased": ua_images, "progress": False}
        # The patch's images first, then scored against the base's: under `pytest -n N` another worker may be
        # making the base's report meanwhile, and this one is not kept waiting for it.
        made = evaluate(patched, erased, geometry=False, **sizes)
        base = base_report(ua_images, retain_images, BAR_SHAPES if ua_images != UA_IMAGES else tuple(erased))
        report = evaluate(Replay(made.items, made.images), erased, reference=base, geometry=False, **sizes)
        if settled := ua_images == UA_IMAGES or not can_still_meet(report, ua_bar):
            break
    ceiling = None
    # What would explain a miss: the steered-to shapes' own rate. 32 images of the base per concept: for one concept
    # (shared by the recipes that steer it alike), or for every one with FORGETPATCH_ALL_BARS=1.
    if settled and report.worst(safe=True)["ua"] < ua_bar and (len(erased) == 1 or ALL_BARS):
        targets = steered_to(patch.manifest.concepts)
        ceiling = {
            c: (targets[c], made_once(
                f"ceiling-{c}-{targets[c]}-{ua_images}",
                lambda c=c: guide_ceiling(toy_pipeline(), [c], targets, images_per_concept=ua_images)[c],
            ))
            for c in erased
        }  # each concept's alone: the same figure in every recipe that steers it there
    return Measured(
        worst=report.worst(safe=True), point=report.worst(), erase_s=erase_s, report=report, ua_images=ua_images,
        retain_images=retain_images, ceiling=ceiling,
    )
