"""Forgetting and retention scores computed from judged images, and the :class:`EvalReport`.

**Strict unlearning accuracy.** An image of a prompt naming an erased concept counts as *forgotten*
only when the judge confidently names another concept of that kind, or sees no shape at all. When the
judge abstains (it can't tell), the image counts as *not* forgotten: a method that shrinks and deforms
the concept instead of removing it gets no credit for that. The same rule decides paraphrase leakage
(a paraphrase image leaks unless it is forgotten) and retention (an image is retained only when the
judge names the expected concept). Every rate comes with its sample size and a 95% Wilson interval.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from forgetpatch.errors import EvalError
from forgetpatch.eval.prompts import KINDS, ScoringPrompt
from forgetpatch.rates import paired_ratio_interval, percent, rate_text, ratio_interval, wilson
from forgetpatch.toy import NO_SHAPE, Scene, Verdict, vocab

Outcome = Literal["kept", "replaced", "empty", "unclear"]
OUTCOMES: tuple[Outcome, ...] = ("kept", "replaced", "empty", "unclear")
#: The rates every :class:`Scores` carries with a sample size and an interval.
RATES = ("ua", "ira", "cra", "near", "leakage")
R = TypeVar("R", bound="EvalReport")


def outcome(verdict: Verdict, concept: str) -> Outcome:
    """What became of ``concept`` in an image the judge gave ``verdict``.

    ``kept``: the judge names it; ``replaced``: it confidently names another concept of the kind;
    ``empty``: it sees no shape (for a shape or a colour: nothing is left to show it); ``unclear``:
    it abstains.
    """
    kind = vocab.kind_of(concept)
    if kind != "texture" and verdict.get("shape") == NO_SHAPE:
        return "empty"
    label = verdict.get(kind)
    if label is None:
        return "unclear"
    return "kept" if label == concept else "replaced"


def forgotten(verdict: Verdict, concept: str) -> bool:
    """The strict rule: ``concept`` is forgotten in the image only if it was replaced or left empty."""
    return outcome(verdict, concept) in ("replaced", "empty")


def top1(verdict: Verdict, kind: str) -> str:
    """The old reading: the concept of ``kind`` with the highest probability, never abstaining."""
    p = verdict["p"][kind]
    return max(vocab.concepts_of(kind), key=lambda c: p.get(c, 0.0))


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


@dataclass
class Scores:
    """The scores of one erased concept on one model; ``None`` where no image applies.

    All are fractions in ``[0, 1]``. Higher is better for every score but ``leakage``. ``n`` and
    ``interval`` give each of :data:`RATES` its sample size and 95% Wilson interval.
    """

    ua: float | None
    """Strict unlearning accuracy: images of prompts naming the concept in which it is forgotten
    (replaced by another concept or left empty; an abstention is not forgotten)."""
    ira: float | None
    """In-domain retention: retained prompts whose concept of the same kind the judge names correctly."""
    cra: float | None
    """Cross-domain retention: retained prompts whose concepts of the other kinds are named correctly."""
    near: float | None
    """Near-neighbour retention: retained prompts naming a near neighbour (shapes only) judged as it."""
    leakage: float | None
    """Paraphrase leakage: prompts naming the concept by a synonym or rewording in which it is not forgotten."""
    ua_soft: float | None = None
    """``1 - mean p(concept)`` over the images of prompts naming it (no threshold)."""
    ua_top1: float | None = None
    """The old UA: the judge's most likely concept is another one (never abstains), for comparison."""
    split: dict[str, float] = field(default_factory=dict)
    """What became of the concept in its images: shares ``kept`` / ``replaced`` / ``empty`` / ``unclear``."""
    n: dict[str, int] = field(default_factory=dict)
    interval: dict[str, list[float]] = field(default_factory=dict)
    ira_by: dict[str, float] = field(default_factory=dict)
    near_by: dict[str, float] = field(default_factory=dict)
    cra_by: dict[str, float] = field(default_factory=dict)
    flags: dict[str, list[bool]] = field(default_factory=dict, repr=False)
    """Per rate, each image's outcome (in the order of the items scored), for intervals of ratios to the base on
    the same images; not written by :meth:`ConceptReport.to_dict`."""


def retained(item: ScoringPrompt, erased: Sequence[str]) -> bool:
    """Whether ``item`` is a *retained* one: a main item that names no erased concept."""
    return item.role == "main" and not any(item.names(e) for e in erased)


def score_concept(
    concept: str, erased: Sequence[str], items: Sequence[ScoringPrompt], judged: Sequence[Verdict]
) -> Scores:
    """Score erased ``concept`` from ``items`` (main and paraphrase) and their verdicts.

    A *retained* item is a main item that names no erased concept.
    """
    kind = vocab.kind_of(concept)
    main = [(it, j) for it, j in zip(items, judged, strict=True) if it.role == "main"]
    kept = [(it, j) for it, j in main if retained(it, erased)]
    named = [j for it, j in main if it.names(concept)]
    outcomes = [outcome(j, concept) for j in named]
    ira_by: dict[str, list[bool]] = {}
    for it, j in kept:
        ira_by.setdefault(it.scene.of(kind), []).append(j[kind] == it.scene.of(kind))
    cra_by = {k: [j[k] == it.scene.of(k) for it, j in kept] for k in KINDS if k != kind}
    neighbours = vocab.NEAR_NEIGHBOURS.get(concept, ()) if kind == "shape" else ()
    near_by = {n: ira_by[n] for n in neighbours if n in ira_by}
    flags = {
        "ua": [o in ("replaced", "empty") for o in outcomes],
        "ira": [f for fl in ira_by.values() for f in fl],
        "cra": [all(j[k] == it.scene.of(k) for k in KINDS if k != kind) for it, j in kept],  # one per image
        "near": [f for fl in near_by.values() for f in fl],
        "leakage": [
            not forgotten(j, concept)
            for it, j in zip(items, judged, strict=True)
            if it.role == "paraphrase" and it.concept == concept
        ],
    }
    value = {k: (float(np.mean(f)) if f else None) for k, f in flags.items()}
    if not neighbours:
        value["near"] = None
    return Scores(
        **value,
        ua_soft=1.0 - float(np.mean([j["p"][kind].get(concept, 0.0) for j in named])) if named else None,
        ua_top1=float(np.mean([top1(j, kind) != concept for j in named])) if named else None,
        split={o: outcomes.count(o) / len(outcomes) for o in OUTCOMES} if outcomes else {},
        n={k: len(f) for k, f in flags.items() if value[k] is not None},
        interval={k: list(wilson(sum(f), len(f))) for k, f in flags.items() if value[k] is not None},
        ira_by={c: float(np.mean(f)) for c, f in sorted(ira_by.items())},
        near_by={c: float(np.mean(f)) for c, f in near_by.items()},
        cra_by={k: float(np.mean(f)) for k, f in cra_by.items() if f},
        flags={k: f for k, f in flags.items() if value[k] is not None},
    )


def accuracy(
    items: Sequence[ScoringPrompt], judged: Sequence[Verdict], erased: Sequence[str]
) -> dict[str, float]:
    """Per kind, the share of retained main items the judge names correctly (the model's fidelity)."""
    keep = [(it, j) for it, j in zip(items, judged, strict=True) if retained(it, erased)]
    return {k: float(np.mean([j[k] == it.scene.of(k) for it, j in keep])) for k in KINDS} if keep else {}


#: The retention rates given as ratios to the base.
RETAINED = ("ira", "cra", "near")


@dataclass
class ConceptReport:
    """Scores of one erased concept on the model under test, on the base, and their ratios."""

    concept: str
    kind: str
    scores: Scores
    base: Scores | None = None
    ratio_interval: dict[str, list[float]] = field(default_factory=dict)
    """Each of :attr:`ratios`' 95% interval (:mod:`forgetpatch.rates`): paired where both models were scored on the
    same images (the scores carry each image's outcome, as :func:`score_concept` makes them), else one from the
    two rates' intervals. Filled in when not given."""

    def __post_init__(self) -> None:
        if self.base is None:
            return
        for key in RETAINED:
            if key in self.ratio_interval or getattr(self.scores, key) is None or getattr(self.base, key) is None:
                continue
            ours, theirs = self.scores.flags.get(key), self.base.flags.get(key)
            if ours is not None and theirs is not None and len(ours) == len(theirs):
                found = paired_ratio_interval(ours, theirs)
            elif key in self.scores.interval and key in self.base.interval:
                found = ratio_interval(self.scores.interval[key], self.base.interval[key])
            else:
                found = None
            if found is not None:
                self.ratio_interval[key] = list(found)

    @property
    def ratios(self) -> dict[str, float | None]:
        """Retention relative to the base (``ira / base ira`` etc.); 1.0 = nothing lost."""
        b = self.base
        return {key: _ratio(getattr(self.scores, key), b and getattr(b, key)) for key in RETAINED}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, **_written(self.scores)}
        if self.base is not None:
            out["base"] = _written(self.base)
            out["ratios"] = self.ratios
            out["ratio_interval"] = self.ratio_interval
        return out


def _written(scores: Scores) -> dict[str, Any]:
    return {k: v for k, v in asdict(scores).items() if k != "flags"}


@dataclass
class EvalReport:
    """What :func:`forgetpatch.eval.evaluate` measured.

    ``items``, ``images`` and ``judged`` keep every generated image and its judgement, so a report
    of the base model can be passed as ``reference=`` to later evaluations (no regeneration).

    Example:
        >>> report = evaluate(pipe, ["circle"], reference=base_report)
        >>> report.concepts["circle"].scores.ua
        0.875
        >>> rich.print(report.table()); manifest.metrics.update(report.to_dict())
    """

    erased: list[str]
    concepts: dict[str, ConceptReport]
    accuracy: dict[str, float]
    """Per kind, fidelity on retained prompts (see :func:`accuracy`)."""
    drift: float | None
    """Mean absolute pixel difference (images in ``[0, 1]``) to the base on retained prompts, same seeds."""
    settings: dict[str, Any]
    seconds: float
    items: list[ScoringPrompt] = field(repr=False)
    images: np.ndarray = field(repr=False)
    judged: list[Verdict] = field(repr=False)
    base_accuracy: dict[str, float] | None = None
    base_images: np.ndarray | None = field(default=None, repr=False)
    fitted: list[str] | None = field(default=None, repr=False)
    """Per image, the geometric second opinion (:mod:`forgetpatch.eval.geometry`): the best-fitting
    shape, ``"none"`` or ``"unclear"``."""

    # What :meth:`save` writes besides the base fields, so that a subclass only names what it adds: optional
    # array fields (``.npz`` entries), fields read back from the JSON metadata (written by :meth:`to_dict`),
    # and what :meth:`load` calls a file it cannot read.
    _arrays: ClassVar[tuple[str, ...]] = ("base_images",)
    _fields: ClassVar[tuple[str, ...]] = ()
    _what: ClassVar[str] = "an evaluation report"

    def _both_named(self) -> list[int]:
        """Images on which the judge and the geometric fit both name a shape (or none)."""
        if self.fitted is None:
            return []
        return [
            i
            for i, (j, f) in enumerate(zip(self.judged, self.fitted, strict=True))
            if j.get("shape") is not None and f != "unclear"
        ]

    def disagreements(self) -> list[int]:
        """Images where the judge and the geometric fit both name a shape (or none) and differ."""
        return [i for i in self._both_named() if self.judged[i]["shape"] != self.fitted[i]]

    def disagreement(self) -> dict[str, Any] | None:
        """Judge-vs-fit disagreement: ``{"rate", "n", "interval"}`` over the images both name, or ``None``."""
        if self.fitted is None:
            return None
        n, k = len(self._both_named()), len(self.disagreements())
        return {"rate": k / n if n else None, "n": n, "interval": list(wilson(k, n))}

    def worst(self, *, safe: bool = False) -> dict[str, float | None]:
        """The worst case over the erased concepts, as bars are stated: the lowest UA, the lowest IRA,
        CRA and near-neighbour ratios to the base, and the highest leakage (``None``: not measured).

        With ``safe=True`` each figure is the end of its 95% interval that a bar must clear: UA's lower
        bound, each retention ratio's lower bound (:attr:`ConceptReport.ratio_interval`: the model's and the
        base's sampling noise both counted), leakage's upper bound. A bar met by these is met with 95%
        confidence.

        Example:
            >>> evaluate(pipe, ["circle", "star"], reference=base).worst()
            {'ua': 0.94, 'ira': 0.99, 'cra': 1.0, 'near': 0.97, 'leakage': 0.06}
        """
        reports = list(self.concepts.values())

        def bound(s: Scores, key: str, end: int) -> float | None:
            value = getattr(s, key)
            return None if value is None else (s.interval[key][end] if safe else value)

        def lowest(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return min(known) if known else None

        def ratio(r: ConceptReport, key: str) -> float | None:
            value = r.ratios[key]
            if not safe or value is None:
                return value
            return r.ratio_interval[key][0] if key in r.ratio_interval else 0.0  # no interval: nothing is shown

        ratios = {key: lowest([ratio(r, key) for r in reports]) for key in RETAINED}
        leakage = [v for r in reports if (v := bound(r.scores, "leakage", 1)) is not None]
        return {
            "ua": lowest([bound(r.scores, "ua", 0) for r in reports]),
            **ratios,
            "leakage": max(leakage) if leakage else None,
        }

    def fidelity_text(self) -> str:
        """``"shape 72% [60-82%], colour 100% [94-100%], texture 100% [94-100%]; n=64"``: :attr:`accuracy` with
        its intervals, over the retained prompts."""
        n = sum(1 for it in self.items if retained(it, self.erased))
        shares = ", ".join(f"{k} {rate_text(v, wilson(round(v * n), n))}" for k, v in self.accuracy.items())
        return f"{shares}; n={n}" if shares else "-"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (no images), e.g. for a patch manifest's ``metrics``."""
        return {
            "erased": list(self.erased),
            "concepts": {c: r.to_dict() for c, r in self.concepts.items()},
            "accuracy": self.accuracy,
            "base_accuracy": self.base_accuracy,
            "drift": self.drift,
            "judge_fit_disagreement": self.disagreement(),
            "n_images": len(self.items),
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
        }

    def table(self) -> Any:
        """A :class:`rich.table.Table`: per erased concept a row for the model, one for its base and one for the
        retention ratios to the base.

        Rates show their 95% interval; the caption gives the sample sizes and the judge-vs-fit
        disagreement.
        """
        from rich.table import Table

        def cell(s: Scores, key: str) -> str:
            return rate_text(getattr(s, key), s.interval.get(key))

        def split(s: Scores) -> str:
            return "/".join(percent(s.split.get(o, 0)) for o in ("replaced", "empty", "unclear")) if s.split else "-"

        drift = "-" if self.drift is None else f"{self.drift:.3f}"
        table = Table(
            title=f"forgetting {', '.join(self.erased) or 'nothing'}: {len(self.items)} images, drift {drift}",
            caption=self._caption(),
        )
        columns = ("concept", "UA strict", "replaced/empty/unclear", "UA soft", "UA top-1", "IRA", "CRA", "near",
                   "leakage")
        for col in columns:
            table.add_column(col, justify="left" if col == "concept" else "right", no_wrap=col == "concept")
        for c, r in self.concepts.items():
            for label, s in ((f"{c} ({r.kind})", r.scores), ("  base", r.base)):
                if s is None:
                    continue
                table.add_row(
                    label,
                    cell(s, "ua"),
                    split(s),
                    percent(s.ua_soft),
                    percent(s.ua_top1),
                    *(cell(s, key) for key in ("ira", "cra", "near", "leakage")),
                    style="dim" if s is r.base else None,
                )
            if r.base is not None:
                ratios = [rate_text(r.ratios[key], r.ratio_interval.get(key)) for key in RETAINED]
                table.add_row("  of the base", "", "", "", "", *ratios, "", style="dim")
        if not self.concepts:
            table.add_row("(fidelity)", self.fidelity_text(), *[""] * (len(columns) - 2))
        return table

    def _caption(self) -> str:
        parts = ["UA strict: forgotten only if another concept is named or no shape is seen; [95% interval]"]
        sizes = {c: ", ".join(f"{k} {v}" for k, v in r.scores.n.items()) for c, r in self.concepts.items()}
        if len(set(sizes.values())) == 1:
            parts.append(f"n: {next(iter(sizes.values()))}")
        elif sizes:  # each concept's own: its kind, near neighbours and extra UA images make them differ
            parts.append("n: " + " | ".join(f"{c}: {n}" for c, n in sizes.items()))
        d = self.disagreement()
        if d is not None and d["rate"] is not None:
            parts.append(f"judge vs geometric fit disagree on {rate_text(d['rate'], d['interval'])} of {d['n']} images")
        return "; ".join(parts)

    def save(self, path: str | Path) -> Path:
        """Write the report with its images to one ``.npz`` file (reload with :meth:`load`).

        Example:
            >>> evaluate(base_pipe, ["circle"]).save("base-circle.npz")
            >>> evaluate(pipe, ["circle"], reference=EvalReport.load("base-circle.npz"))
        """
        meta = {
            **self.to_dict(),
            "seconds": self.seconds,
            "items": [asdict(it) for it in self.items],
            "judged": self.judged,
            "fitted": self.fitted,
        }
        arrays = {"images": self.images, "meta": np.array(json.dumps(meta))}
        arrays.update({k: v for k in self._arrays if (v := getattr(self, k)) is not None})
        path = Path(path)
        if path.is_dir():
            raise EvalError(f"cannot save the report to {str(path)!r}: it is a folder; give a file name (.npz)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise EvalError(f"cannot save the report to {str(path)!r}: a folder above it is a file") from None
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a report written by :meth:`save`."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                images = data["images"]
                arrays = {k: data[k] for k in cls._arrays if k in data}
            extra = {k: meta[k] for k in cls._fields}
            return cls._from(meta, images, arrays, extra)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # another file, or another report's (a suite's)
            raise EvalError(f"{path} is not {cls._what} saved by {cls.__name__}.save: {exc!r}") from exc

    @classmethod
    def _from(cls: type[R], meta: dict[str, Any], images: np.ndarray, arrays: dict[str, Any], extra: dict) -> R:
        names = {f.name for f in fields(Scores)}

        def scores(d: dict[str, Any] | None) -> Scores | None:
            return None if d is None else Scores(**{k: v for k, v in d.items() if k in names})

        concepts = {
            c: ConceptReport(c, d["kind"], scores(d), scores(d.get("base")), dict(d.get("ratio_interval") or {}))
            for c, d in meta["concepts"].items()
        }
        return cls(
            erased=meta["erased"],
            concepts=concepts,  # type: ignore[arg-type]
            accuracy=meta["accuracy"],
            drift=meta["drift"],
            settings=meta["settings"],
            seconds=meta["seconds"],
            items=[cls._item(it) for it in meta["items"]],
            images=images,
            judged=meta["judged"],
            base_accuracy=meta["base_accuracy"],
            fitted=meta.get("fitted"),
            **arrays,
            **extra,
        )

    @classmethod
    def _item(cls, d: dict[str, Any]) -> Any:
        """An item of :attr:`items` from its saved dict."""
        return ScoringPrompt(**{**d, "scene": Scene(**d["scene"])})


def patches_on(model: Any) -> list[dict[str, Any]] | None:
    """The forgetpatch patches on ``model`` as a report's ``settings["patches"]`` records them (name, digest, scale,
    fused, gated to key steps), in application order; ``None`` for a ``Generator``, which does not say."""
    from forgetpatch.eval.generate import Generator

    if isinstance(model, Generator) or not hasattr(model, "set_progress_bar_config"):
        return None
    from forgetpatch.loader import applied

    return [
        {"name": e.patch.name, "digest": e.digest, "scale": e.scale, "fused": e.fused, "key_steps": e.ranges is not None}
        for e in applied(model)
    ]


def measured_alone(
    patches: list[dict[str, Any]] | None,
    patch: Any,
    *,
    what: str = "this report",
    error: type[Exception] = EvalError,
) -> None:
    """Raise ``error`` (:class:`EvalError` unless given) saying what to measure instead, unless ``patches``, the
    record of the patches on the measured model (:func:`patches_on`, a report's ``settings["patches"]``), say it
    measured ``patch`` alone as it ships (scale 1, not gated to key steps): what a report recorded into that patch
    must be. ``what`` names the measurement in the message ("the attack on 'circle'")."""
    if patches is None:
        raise error(
            f"{what} does not say which patches were on the model it measured (made from a Generator, or by an "
            f"older forgetpatch): measure the pipeline with {patch.name!r} applied alone, then record that"
        )
    if [p["digest"] for p in patches] != [patch.digest]:
        measured = ", ".join(p["name"] for p in patches) or "no patch"
        raise error(
            f"{what} measured {measured}, not {patch.name!r} ({patch.digest[:12]}) alone: measure the pipeline "
            "with that patch applied by itself to record its figures"
        )
    if patches[0]["scale"] != 1.0 or patches[0]["key_steps"]:
        how = f"at scale {patches[0]['scale']}" if patches[0]["scale"] != 1.0 else "gated to its key steps"
        raise error(
            f"{what} measured {patch.name!r} {how}; record figures measured as the patch ships (applied at "
            "scale 1, without key_steps=True)"
        )


def record_toy(folder: str | Path, report: EvalReport) -> Path:
    """Write a toy-world evaluation into the manifest of the patch in ``folder`` (``metrics["toy_eval"]``, what
    ``forgetpatch demo`` records and the model card's summary table reads). The patch's digest does not change.

    The report must be of that patch alone, applied as it ships (scale 1, not gated to key steps; the caller
    applies it), with the concepts it erases as ``erased``: the patches :func:`~forgetpatch.eval.evaluate` found on
    the pipeline (``settings["patches"]``) and the concepts are checked before anything is written, and
    :class:`~forgetpatch.errors.EvalError` says what to evaluate instead.

    Example:
        >>> base = evaluate(toy.pipeline(), ["circle"])
        >>> record_toy("no-circle/", evaluate(forgetpatch.apply(toy.pipeline(), "no-circle/"), ["circle"], reference=base))
    """
    from forgetpatch.format import TOY_EVAL_METRICS, record_metrics

    def figures(patch) -> dict[str, Any]:
        measured_alone(report.settings.get("patches"), patch)
        erased = sorted({c.key for c in patch.manifest.concepts})
        if sorted(report.erased) != erased:
            raise EvalError(
                f"this report measures {', '.join(report.erased)} as erased, but {patch.name!r} erases "
                f"{', '.join(erased)}: the card would show figures of other concepts as its own; evaluate it on "
                "the concepts it erases (forgetpatch eval PATCH, without --concept)"
            )
        return {TOY_EVAL_METRICS: report.to_dict()}

    return record_metrics(folder, figures)
