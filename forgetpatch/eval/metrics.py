"""``evaluate``: generate the scoring prompts, judge the images, score the erased concepts."""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from forgetpatch.errors import ConceptError, EvalError, EvalInputError, ForgetPatchError
from forgetpatch.eval.generate import (
    DEFAULT_GUIDANCE_SCALE,
    Generator,
    as_generator,
    check_guidance,
    generate_sharded,
)
from forgetpatch.eval.geometry import fit_shapes
from forgetpatch.eval.prompts import ALL_CONCEPTS, ScoringPrompt, main_prompts, paraphrase_prompts
from forgetpatch.eval.report import (
    ConceptReport,
    EvalReport,
    Verdict,
    accuracy,
    patches_on,
    retained,
    score_concept,
)
from forgetpatch.toy import vocab


class Judge(Protocol):
    """Says what each image shows, or that it can't tell (see :data:`~forgetpatch.eval.report.Verdict`):
    ``{"shape": str | None, "colour": ..., "texture": ..., "p": {kind: {label: prob}}}`` per image."""

    def classify(self, images: np.ndarray) -> list[Verdict]: ...


def scoring_prompts(
    erased: Sequence[str], images_per_concept: int = 8, seed: int = 0, images_per_erased: int | None = None
) -> list[ScoringPrompt]:
    """The main set plus the paraphrase set of every erased concept (see :mod:`forgetpatch.eval.prompts`).

    ``images_per_erased`` (more than ``images_per_concept``) adds the items of further rounds of the
    main set that name an erased concept, so UA is measured on that many images while retention keeps
    ``images_per_concept`` per concept: a tighter UA interval at a fraction of the cost.
    """
    rounds = max(images_per_concept, images_per_erased or 0)
    first = len(vocab.SHAPES) * images_per_concept
    items = [
        it
        for i, it in enumerate(main_prompts(rounds, seed))
        if i < first or any(it.names(c) for c in erased)
    ]
    for concept in erased:
        items += paraphrase_prompts(concept, images_per_concept, seed)
    return items


def _check_concepts(erased: Sequence[str]) -> list[str]:
    erased = [erased] if isinstance(erased, str) else list(erased)  # a generator is read once, here
    unknown = [c for c in erased if c not in ALL_CONCEPTS]
    if unknown:
        raise ConceptError(
            f"cannot evaluate forgetting of {unknown}: not toy-world concepts. Name canonical concepts "
            f"(synonyms are scored as paraphrases automatically): {', '.join(ALL_CONCEPTS)}"
        )
    return list(dict.fromkeys(erased))


#: Seeds are whole numbers below this: every image's torch seed (the seed plus an offset; an attack's streams,
#: a million times it) stays in torch's range.
MAX_SEED = 2**32


def check_seed(seed: Any, *, error: type[ForgetPatchError] = EvalInputError) -> int:
    """``seed`` if it is a whole number from 0 to ``MAX_SEED - 1`` (it orders the prompts and seeds each image), else
    ``error``; before anything is generated.

    Example:
        >>> check_seed(7)
        7
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        raise error(f"seed must be a whole number from 0 to {MAX_SEED - 1}, got {seed!r}")
    return int(seed)


def check_counts(**counts: Any) -> None:
    """Every count an integer >= 1 (``None`` allowed, meaning the default), or :class:`EvalInputError` naming it,
    before anything is generated.

    Example:
        >>> check_counts(images_per_concept=8, num_inference_steps=25)
    """
    for name, value in counts.items():
        if value is None and name == "images_per_erased":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise EvalInputError(f"{name} must be a whole number >= 1, got {value!r}")


def _base_from_report(
    ref: EvalReport, items: Sequence[ScoringPrompt], settings: dict[str, Any]
) -> tuple[list[int], list[int]]:
    """Indices ``(ours, theirs)`` of the items ``ref`` has; every main item must be there."""
    judges = (ref.settings.get("judge"), settings.get("judge"))
    if None not in judges and judges[0] != judges[1]:
        raise EvalError(
            f"the reference report was judged by another judge ({judges[0]}, this evaluation's is {judges[1]}): its base "
            "figures and this model's would not be read alike; evaluate the base with the same judge"
        )
    for key in ("num_inference_steps", "guidance_scale"):
        if ref.settings.get(key) != settings.get(key):
            raise ForgetPatchError(
                f"the reference report was generated with {key}={ref.settings.get(key)} but this evaluation "
                f"uses {settings.get(key)}; evaluate the base again with the same settings"
            )
    where = {it.key: i for i, it in enumerate(ref.items)}
    missing = [it.prompt for it in items if it.role == "main" and it.key not in where]
    if missing:
        raise ForgetPatchError(
            f"the reference report lacks {len(missing)} of the scoring prompts (e.g. {missing[0]!r}): it was "
            "made with another images_per_concept, seed or prompt set; evaluate the base with the same settings"
        )
    ours = [i for i, it in enumerate(items) if it.key in where]
    return ours, [where[items[i].key] for i in ours]


def toy_judge(model: Any) -> Judge:
    """The shipped toy judge, once ``model`` is known to draw the toy world: the judge reads 32-pixel images of its
    shapes, colours and textures, and would give any other model's images confident, meaningless verdicts.

    Raises:
        EvalInputError: ``model`` is a pipeline of another architecture (a :class:`Generator` is not checked).
    """
    from forgetpatch.toy import is_toy_model, load_judge

    if hasattr(model, "set_progress_bar_config") and not is_toy_model(model):
        raise EvalInputError(
            "this pipeline is not a toy-world model, and the toy judge reads only the toy world's 32-pixel images "
            "of shapes: pass judge= a classifier for its images, or measure it with a real-weight suite "
            "(forgetpatch.eval.evaluate_suite; CLI: forgetpatch eval --suite objects|styles|nudity|quality)"
        )
    return load_judge()


def evaluate(
    pipe: Any,
    erased: Sequence[str],
    *,
    reference: Any = None,
    images_per_concept: int = 8,
    images_per_erased: int | None = None,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    judge: Judge | None = None,
    prompts: Sequence[ScoringPrompt] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    geometry: bool = True,
) -> EvalReport:
    """Measure how well ``pipe`` has forgotten ``erased`` toy-world concepts and what else it lost.

    Args:
        pipe: the model under test: a diffusers pipeline (with patches applied, or none) or any
            :class:`~forgetpatch.eval.generate.Generator`.
        erased: canonical toy concepts (``"circle"``, ``"red"``, ``"stripes"``); may be empty to
            measure fidelity only.
        reference: the base model, for base figures, ratios and image drift: a pipeline, a
            ``Generator``, or the :class:`EvalReport` of an earlier ``evaluate(base, ...)`` with the
            same settings (its images are reused). ``None``: no base figures.
        images_per_concept: every concept is named by at least this many main prompts; every erased
            concept gets this many paraphrase prompts.
        images_per_erased: measure UA on this many images of each erased concept (default:
            ``images_per_concept``), for a tighter interval without generating more retention images.
        seed: fixes the prompt design and the generation seeds (same seeds for base and patched).
        judge: defaults to the shipped toy judge (:func:`toy_judge`, which refuses a pipeline that is not a toy-world
            model).
        prompts: scoring items to use instead of :func:`scoring_prompts`.
        geometry: also fit every image's outline (:mod:`forgetpatch.eval.geometry`), the second opinion
            the report compares the judge with.

    Under ``accelerate launch --num_processes N`` each process generates its block of the (prompt, seed)
    pairs (:func:`~forgetpatch.eval.generate.generate_sharded`), the images are gathered once, and every
    process returns the report a single process makes; print or save it on process 0 only
    (:func:`forgetpatch.distributed.is_main`).

    Example:
        >>> base_report = evaluate(forgetpatch.toy.pipeline(), ["circle"])
        >>> pipe = forgetpatch.apply(forgetpatch.toy.pipeline(), "./no-circle")
        >>> report = evaluate(pipe, ["circle"], reference=base_report)
        >>> report.concepts["circle"].scores.ua, report.concepts["circle"].ratios["ira"], report.drift
    """
    start = time.perf_counter()
    check_counts(images_per_concept=images_per_concept, images_per_erased=images_per_erased,
                  num_inference_steps=num_inference_steps, batch_size=batch_size)  # fmt: skip
    check_guidance(guidance_scale)
    seed = check_seed(seed)
    erased = _check_concepts(erased)
    items = list(prompts) if prompts is not None else scoring_prompts(erased, images_per_concept, seed, images_per_erased)
    if not items:
        raise ForgetPatchError("no scoring prompts to evaluate; pass prompts=None for the default set")
    settings = {
        "images_per_concept": images_per_concept,
        "images_per_erased": max(images_per_concept, images_per_erased or 0),  # what scoring_prompts uses
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "patches": patches_on(pipe),
    }
    gen_kwargs = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "progress": progress,
    }
    judge = judge if judge is not None else toy_judge(pipe)
    settings["judge"] = getattr(judge, "digest", None)  # the shipped judges' (toy.load_judge); None for others
    if on := (reference.settings.get("patches") if isinstance(reference, EvalReport) else patches_on(reference)):
        raise EvalError(
            f"the reference has {', '.join(p['name'] for p in on)} on: it stands for the base model, which every "
            "ratio is taken against; pass the pipeline without patches, or a report of it"
        )
    if isinstance(reference, EvalReport):  # before generating: a reference made otherwise cannot be used
        ours, theirs = _base_from_report(reference, items, settings)
    generator = as_generator(pipe, **gen_kwargs)
    images = _generate(generator, items, batch_size)
    judged = list(judge.classify(images))

    base_images = base_judged = None
    base_items: list[ScoringPrompt] = []
    if isinstance(reference, EvalReport):
        base_items = [items[i] for i in ours]
        base_images = reference.images[theirs]
        base_judged = [reference.judged[i] for i in theirs]
        paired = ours
    elif reference is not None:
        base_items, paired = items, list(range(len(items)))
        base_images = _generate(as_generator(reference, **gen_kwargs), items, batch_size)
        base_judged = list(judge.classify(base_images))

    concepts = {}
    for concept in erased:
        scores = score_concept(concept, erased, items, judged)
        base = None
        if base_judged is not None:
            base = score_concept(concept, erased, base_items, base_judged)
            # the model's outcomes on the images the base was scored on, in the same order: paired ratios
            scores.flags = score_concept(concept, erased, base_items, [judged[i] for i in paired]).flags
        concepts[concept] = ConceptReport(concept, vocab.kind_of(concept), scores, base)

    drift = None
    if base_images is not None:
        kept = [(i, b) for b, i in enumerate(paired) if retained(items[i], erased)]
        if kept:
            ours_idx, base_idx = zip(*kept, strict=True)
            drift = float(np.abs(images[list(ours_idx)] - base_images[list(base_idx)]).mean())

    return EvalReport(
        erased=erased,
        concepts=concepts,
        accuracy=accuracy(items, judged, erased),
        drift=drift,
        settings=settings,
        seconds=time.perf_counter() - start,
        items=items,
        images=images,
        judged=judged,
        base_accuracy=accuracy(base_items, base_judged, erased) if base_judged is not None else None,
        base_images=_align(base_images, paired if base_images is not None else [], len(items)),
        fitted=[f.shape for f in fit_shapes(images)] if geometry else None,
    )


def _generate(generator: Generator, items: Sequence[ScoringPrompt], batch_size: int = 1) -> np.ndarray:
    """The items' images; under a launch each process makes its whole batches of them (bit-equal to one process)."""
    prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
    images = np.asarray(generate_sharded(generator, prompts, seeds, block=batch_size), np.float32)
    if images.ndim != 4 or images.shape[0] != len(items) or images.shape[-1] != 3:
        raise ForgetPatchError(
            f"the generator returned images of shape {images.shape}; expected ({len(items)}, H, W, 3) in [0, 1]"
        )
    return images


def _align(base_images: np.ndarray | None, paired: Sequence[int], n: int) -> np.ndarray | None:
    """Base images laid out like the report's items (NaN where the reference had no such item)."""
    if base_images is None:
        return None
    out = np.full((n, *base_images.shape[1:]), np.nan, dtype=np.float32)
    out[list(paired)] = base_images
    return out


class Replay:
    """A :class:`~forgetpatch.eval.generate.Generator` that returns stored images by (prompt, seed)."""

    def __init__(self, items: Sequence[ScoringPrompt], images: np.ndarray) -> None:
        self.stored = {it.key: image for it, image in zip(items, images, strict=True)}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        return np.stack([self.stored[(p, s)] for p, s in zip(prompts, seeds, strict=True)])


def rejudge(report: EvalReport, judge: Judge) -> EvalReport:
    """``report`` scored again by another ``judge`` on the same images (nothing is generated).

    Example:
        >>> old = rejudge(report, forgetpatch.toy.load_judge("v1"))   # the first judge's reading
        >>> old.concepts["circle"].scores.ua, report.concepts["circle"].scores.ua
    """
    reference = None
    if report.base_images is not None:
        if np.isnan(report.base_images).any():
            raise ForgetPatchError(
                "this report's base lacks some of its images (a reference report with fewer prompts); "
                "evaluate the base again with the same settings to re-judge it"
            )
        reference = Replay(report.items, report.base_images)
    settings = report.settings
    out = evaluate(
        Replay(report.items, report.images),
        report.erased,
        reference=reference,
        judge=judge,
        prompts=report.items,
        images_per_concept=settings["images_per_concept"],
        images_per_erased=settings.get("images_per_erased"),
        seed=settings["seed"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        progress=False,
        geometry=False,
    )
    out.fitted = report.fitted
    out.settings["patches"] = report.settings.get("patches")  # the images' model, which a Replay cannot say
    return out
