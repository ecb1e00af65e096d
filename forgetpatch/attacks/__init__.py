"""Try to bring an erased concept back, and say how far it came.

:func:`attack` runs the attacks on a pipeline that carries the patches under test; the reference is the same
pipeline with forgetpatch's patches taken off (:func:`forgetpatch.loader.unpatched`). Each attack is
measured on the same scoring prompts and seeds as the patched model before it, with strict UA (an image
counts as forgotten only when the toy judge confidently sees something else), with its 95% interval and its
cost. The attacks (:mod:`forgetpatch.attacks.suite`):

1. ``paraphrase``: synonyms, the superclass, every other word order; the worst prompt.
2. ``inversion``: RECE's closed form (arXiv 2407.12383). With ``W'_l`` the patched and ``W_l`` the base
   cross-attention key/value weights, ``e* = argmin_e sum_l |W'_l e - W_l c|^2 + lambda |e|^2
   = (sum W'^T W' + lambda I)^-1 sum W'^T W c`` replaces the text embedding ``c`` at the concept's token and
   every later position. One solve per patch; white-box (a published LoRA is).
3. ``prompt_search``: UnlearnDiffAtk-style (arXiv 2310.11868): ``k`` prefix token embeddings learned so the
   patched model's noise prediction on noised renders of the concept matches the base's; reported soft
   (``prompt_search_soft``) and projected to the nearest words (``prompt_search_hard``).
4. ``textual_inversion``: concept inversion (arXiv 2308.01508): the concept word's input embedding learned
   again on the patched model from renders of the concept.
5. ``relearning``: a few LoRA fine-tuning steps on renders of the concept (dormancy, arXiv 2505.16174).

Attacks are measured with the toy world's judge, so they run on toy-world pipelines.

Example:
    >>> pipe = forgetpatch.apply(forgetpatch.toy.pipeline(), "./no-circle")
    >>> report = attack(pipe, "circle", attacks=["paraphrase", "inversion"], budget="tiny")
    >>> rich.print(report.table())
    >>> report.to_dict()["attacks"]["inversion"]["ua_after"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetpatch.attacks.budget import Budget
from forgetpatch.attacks.report import AttackReport, AttackResult, Rate, robustness_metrics
from forgetpatch.attacks.suite import ATTACKS, Target
from forgetpatch.errors import AttackError

__all__ = [
    "ATTACKS",
    "AttackReport",
    "AttackResult",
    "Budget",
    "Rate",
    "attack",
    "check_erases",
    "check_request",
    "record",
    "robustness_metrics",
]


def check_request(concept: str, attacks: Sequence[str] | None = None) -> list[str]:
    """Refuse an unknown concept or attack before anything slow starts; returns the attack names to run."""
    from forgetpatch.toy import vocab

    if (why := vocab.why_not_a_concept(concept)) is not None:
        raise AttackError(why)
    names = list(ATTACKS) if attacks is None else [attacks] if isinstance(attacks, str) else list(attacks)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise AttackError(f"unknown attacks {unknown}; choose from {list(ATTACKS)}")
    return list(dict.fromkeys(names))


def attack(
    pipe: Any,
    concept: str,
    *,
    attacks: Sequence[str] | None = None,
    budget: Budget | str | dict[str, Any] | None = None,
    seed: int = 0,
    judge: Any = None,
    progress: bool = True,
) -> AttackReport:
    """Attack ``concept`` on ``pipe`` (which carries the patches under test) and measure what comes back.

    Args:
        pipe: a toy-world pipeline with patches applied (:func:`forgetpatch.apply`); with none, every attack
            should find the concept (a control).
        concept: the canonical name of the erased concept, e.g. ``"circle"``.
        attacks: names from :data:`ATTACKS` (default: all).
        budget: a :class:`Budget`, ``"default"``, ``"tiny"``, or a dict of fields overriding the default.
        seed: fixes the prompts, the generation seeds and every attack's draws: the same seed gives the same
            figures (a whole number below :data:`forgetpatch.eval.MAX_SEED`).
        judge: defaults to the shipped toy judge.

    Returns:
        An :class:`AttackReport`: per attack, strict UA before and after with intervals, seconds, UNet passes.

    Raises:
        AttackError: not a toy pipeline, an unknown concept or attack, or a bad budget (before any work).

    Example:
        >>> report = attack(pipe, "circle", attacks=["inversion", "relearning"], budget={"relearn_steps": 20})
        >>> report.results["relearning"].after
        Rate(value=0.25, n=32, interval=(0.13, 0.42))
    """
    import forgetpatch
    from forgetpatch.eval import check_seed, main_prompts, patches_on
    from forgetpatch.loader import unpatched

    names = check_request(concept, attacks)
    seed = check_seed(seed, error=AttackError)
    if getattr(pipe, "forgetpatch_family", None) != "toy":
        raise AttackError(
            "attacks are scored by the toy world's judge, so they run on toy-world pipelines "
            "(forgetpatch.toy.pipeline() with patches applied); real-model attack suites are not built yet"
        )
    spend = Budget.of(budget)
    if judge is None:
        from forgetpatch.toy import load_judge

        judge = load_judge()
    base = unpatched(pipe)
    items = [it for it in main_prompts(spend.images, seed) if it.names(concept)][: spend.images]
    target = Target(pipe, base, concept, items, spend, seed, judge, progress)
    if "prompt_search" in names:  # its prefix must fit in every prompt it searches on and attacks
        longest = max(len(pipe.tokenizer(p).input_ids) for p in [*target.prompts, *target.data().prompts])
        room = pipe.tokenizer.model_max_length - longest
        if spend.search_tokens > room:
            raise AttackError(
                f"attack budget search_tokens={spend.search_tokens} does not fit: the prompts take up to {longest} of "
                f"the tokenizer's {pipe.tokenizer.model_max_length} tokens; give search_tokens <= {room}"
            )
    images_base = target.generate(target.prompts, target.seeds, pipe=base)
    base_rate, verdicts_base = target.judge_ua(images_base)
    fitted_base, fits_base = target.fitted(images_base)
    images_before = target.generate(target.prompts, target.seeds)
    target.before_flags, verdicts_before = target.forgotten_in(images_before)
    results: dict[str, AttackResult] = {}
    for name in names:
        for result in ATTACKS[name](target):
            results[result.name] = result
    return AttackReport(
        concept=concept,
        seed=seed,
        budget=spend.to_dict(),
        patches=patches_on(pipe) or [],
        base=base_rate,
        before=target.before,
        results=results,
        prompts=target.prompts,
        images_base=images_base,
        images_before=images_before,
        verdicts_base=verdicts_base,
        verdicts_before=verdicts_before,
        version=forgetpatch.__version__,
        fitted_base=fitted_base,
        fits_base=fits_base,
        fits_before=target.fitted(images_before)[1],
    )


def check_erases(patch: Any, concept: str) -> None:
    """:class:`AttackError` unless ``patch`` erases ``concept``: robustness is recorded for the concepts a patch
    erases (checked by :func:`record`, and by ``forgetpatch attack --record`` before any attack runs)."""
    erased = [c.key for c in patch.manifest.concepts]
    if concept.strip().lower() not in erased:
        raise AttackError(
            f"{patch.name!r} does not erase {concept!r} (it erases {', '.join(erased)}): its robustness is recorded "
            "for the concepts it erases; attack one of those to record it"
        )


def record(folder: str | Path, reports: Sequence[AttackReport]) -> Path:
    """Write attack results into the manifest of the patch in ``folder`` (``metrics["robustness"]``, one entry
    per concept; earlier entries for other concepts are kept). The patch's digest does not change.

    Every report must be of that patch alone (applied by itself), so the figures are the patch's own.

    Example:
        >>> record("no-circle/", [attack(forgetpatch.apply(toy.pipeline(), "no-circle/"), "circle")])
    """
    from forgetpatch.eval import measured_alone
    from forgetpatch.format import ROBUSTNESS_METRICS, record_metrics

    reports = list(reports)
    if not reports:
        raise AttackError("no attack reports to record: pass the reports forgetpatch.attacks.attack returned")

    def figures(patch) -> dict[str, Any]:
        for report in reports:
            measured_alone(report.patches, patch, what=f"the attack on {report.concept!r}", error=AttackError)
            check_erases(patch, report.concept)
        entry = dict(patch.manifest.metrics.get(ROBUSTNESS_METRICS) or {})
        entry.update(robustness_metrics(list(reports)))
        return {ROBUSTNESS_METRICS: entry}

    return record_metrics(folder, figures)
