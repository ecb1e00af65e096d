"""Forgetting and retention scores computed from judged images, and the :class:`EvalReport`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from forgetpatch.errors import ForgetPatchError
from forgetpatch.eval.prompts import KINDS, ScoringPrompt
from forgetpatch.toy import vocab
from forgetpatch.toy.vocab import Scene

Judgement = dict[str, str]


def _mean(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


@dataclass
class Scores:
    """The scores of one erased concept on one model; ``None`` where no image applies.

    All are fractions in ``[0, 1]``. Higher is better for every score but ``leakage``.
    """

    ua: float | None
    """Unlearning accuracy: images of prompts naming the concept that are *not* judged as it."""
    ira: float | None
    """In-domain retention: retained prompts whose concept of the same kind is rendered correctly."""
    cra: float | None
    """Cross-domain retention: retained prompts whose concepts of the other kinds are rendered correctly."""
    near: float | None
    """Near-neighbour retention: retained prompts naming a near neighbour (shapes only) judged as it."""
    leakage: float | None
    """Paraphrase leakage: prompts naming the concept by a synonym or rewording still judged as it."""
    ira_by: dict[str, float] = field(default_factory=dict)
    near_by: dict[str, float] = field(default_factory=dict)
    cra_by: dict[str, float] = field(default_factory=dict)


def score_concept(
    concept: str, erased: Sequence[str], items: Sequence[ScoringPrompt], judged: Sequence[Judgement]
) -> Scores:
    """Score erased ``concept`` from ``items`` (main and paraphrase) and their judgements.

    A *retained* item is a main item that names no erased concept.
    """
    kind = vocab.kind_of(concept)
    main = [(it, j) for it, j in zip(items, judged, strict=True) if it.role == "main"]
    retained = [(it, j) for it, j in main if not any(it.names(e) for e in erased)]
    ua = [j[kind] != concept for it, j in main if it.names(concept)]
    ira_by: dict[str, list[bool]] = {}
    for it, j in retained:
        ira_by.setdefault(it.scene.of(kind), []).append(j[kind] == it.scene.of(kind))
    ira = [f for flags in ira_by.values() for f in flags]
    cra_by = {k: [j[k] == it.scene.of(k) for it, j in retained] for k in KINDS if k != kind}
    cra = [f for flags in cra_by.values() for f in flags]
    neighbours = vocab.NEAR_NEIGHBOURS.get(concept, ()) if kind == "shape" else ()
    near_by = {n: ira_by[n] for n in neighbours if n in ira_by}
    near = [f for flags in near_by.values() for f in flags]
    leak = [
        j[kind] == concept
        for it, j in zip(items, judged, strict=True)
        if it.role == "paraphrase" and it.concept == concept
    ]
    return Scores(
        ua=_mean(ua),
        ira=_mean(ira),
        cra=_mean(cra),
        near=_mean(near) if neighbours else None,
        leakage=_mean(leak),
        ira_by={c: float(np.mean(f)) for c, f in sorted(ira_by.items())},
        near_by={c: float(np.mean(f)) for c, f in near_by.items()},
        cra_by={k: float(np.mean(f)) for k, f in cra_by.items() if f},
    )


def accuracy(
    items: Sequence[ScoringPrompt], judged: Sequence[Judgement], erased: Sequence[str]
) -> dict[str, float]:
    """Per kind, the fraction of retained main items rendered correctly (the model's fidelity)."""
    keep = [
        (it, j)
        for it, j in zip(items, judged, strict=True)
        if it.role == "main" and not any(it.names(e) for e in erased)
    ]
    return {k: float(np.mean([j[k] == it.scene.of(k) for it, j in keep])) for k in KINDS} if keep else {}


@dataclass
class ConceptReport:
    """Scores of one erased concept on the model under test, on the base, and their ratios."""

    concept: str
    kind: str
    scores: Scores
    base: Scores | None = None

    @property
    def ratios(self) -> dict[str, float | None]:
        """Retention relative to the base (``ira / base ira`` etc.); 1.0 = nothing lost."""
        b = self.base
        return {
            "ira": _ratio(self.scores.ira, b and b.ira),
            "cra": _ratio(self.scores.cra, b and b.cra),
            "near": _ratio(self.scores.near, b and b.near),
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, **asdict(self.scores)}
        if self.base is not None:
            out["base"] = asdict(self.base)
            out["ratios"] = self.ratios
        return out


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
    judged: list[Judgement] = field(repr=False)
    base_accuracy: dict[str, float] | None = None
    base_images: np.ndarray | None = field(default=None, repr=False)

    def worst(self) -> dict[str, float | None]:
        """The worst case over the erased concepts, as bars are stated: the lowest UA, the lowest IRA,
        CRA and near-neighbour ratios to the base, and the highest leakage (``None``: not measured).

        Example:
            >>> evaluate(pipe, ["circle", "star"], reference=base).worst()
            {'ua': 0.94, 'ira': 0.99, 'cra': 1.0, 'near': 0.97, 'leakage': 0.06}
        """
        reports = list(self.concepts.values())

        def lowest(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return min(known) if known else None

        leakage = [r.scores.leakage for r in reports if r.scores.leakage is not None]
        return {
            "ua": lowest([r.scores.ua for r in reports]),
            **{key: lowest([r.ratios[key] for r in reports]) for key in ("ira", "cra", "near")},
            "leakage": max(leakage) if leakage else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (no images), e.g. for a patch manifest's ``metrics``."""
        return {
            "erased": list(self.erased),
            "concepts": {c: r.to_dict() for c, r in self.concepts.items()},
            "accuracy": self.accuracy,
            "base_accuracy": self.base_accuracy,
            "drift": self.drift,
            "n_images": len(self.items),
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
        }

    def table(self) -> Any:
        """A :class:`rich.table.Table` with one row per erased concept (base values in brackets)."""
        from rich.table import Table

        def cell(value: float | None, base: float | None = None) -> str:
            if value is None:
                return "-"
            return f"{value:.0%}" + (f" ({base:.0%})" if base is not None else "")

        drift = "-" if self.drift is None else f"{self.drift:.3f}"
        table = Table(
            title=f"forgetting {', '.join(self.erased) or 'nothing'}: {len(self.items)} images, drift {drift}",
            caption="UA, leakage: on prompts naming the concept; IRA/CRA/near: retained prompts; (base)",
        )
        for col in ("concept", "UA", "IRA", "CRA", "near", "leakage"):
            table.add_column(col, justify="left" if col == "concept" else "right")
        for c, r in self.concepts.items():
            s, b = r.scores, r.base
            table.add_row(
                f"{c} ({r.kind})",
                cell(s.ua, b and b.ua),
                cell(s.ira, b and b.ira),
                cell(s.cra, b and b.cra),
                cell(s.near, b and b.near),
                cell(s.leakage, b and b.leakage),
            )
        if not self.concepts:
            acc = ", ".join(f"{k} {v:.0%}" for k, v in self.accuracy.items())
            table.add_row("(fidelity)", acc, "", "", "", "")
        return table

    def save(self, path: str | Path) -> Path:
        """Write the report with its images to one ``.npz`` file (reload with :meth:`load`).

        Example:
            >>> evaluate(base_pipe, ["circle"]).save("base-circle.npz")
            >>> evaluate(pipe, ["circle"], reference=EvalReport.load("base-circle.npz"))
        """
        meta = {
            **self.to_dict(),
            "seconds": self.seconds,
            "items": [{**asdict(it), "scene": asdict(it.scene)} for it in self.items],
            "judged": self.judged,
        }
        arrays = {"images": self.images, "meta": np.array(json.dumps(meta))}
        if self.base_images is not None:
            arrays["base_images"] = self.base_images
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """Read a report written by :meth:`save`."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                images = data["images"]
                base_images = data.get("base_images")
        except (OSError, ValueError, KeyError) as exc:
            raise ForgetPatchError(
                f"{path} is not an evaluation report saved by EvalReport.save: {exc}"
            ) from exc
        names = {f.name for f in fields(Scores)}

        def scores(d: dict[str, Any] | None) -> Scores | None:
            return None if d is None else Scores(**{k: v for k, v in d.items() if k in names})

        concepts = {
            c: ConceptReport(c, d["kind"], scores(d), scores(d.get("base")))
            for c, d in meta["concepts"].items()
        }
        items = [ScoringPrompt(**{**it, "scene": Scene(**it["scene"])}) for it in meta["items"]]
        return cls(
            erased=meta["erased"],
            concepts=concepts,  # type: ignore[arg-type]
            accuracy=meta["accuracy"],
            drift=meta["drift"],
            settings=meta["settings"],
            seconds=meta["seconds"],
            items=items,
            images=images,
            judged=meta["judged"],
            base_accuracy=meta["base_accuracy"],
            base_images=base_images,
        )
