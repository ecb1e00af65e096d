"""What an attack run found: :class:`AttackResult` per attack, :class:`AttackReport` per concept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgetpatch.eval import save_rows
from forgetpatch.rates import rate_text, wilson


@dataclass(frozen=True)
class Rate:
    """Strict UA over ``n`` images with its 95% Wilson interval."""

    value: float
    n: int
    interval: tuple[float, float]

    @classmethod
    def of(cls, flags: list[bool]) -> Rate:
        """The rate of ``flags`` (one per image, ``True`` = forgotten); refused for none, which measured nothing
        (it read as 0%, "the concept came back")."""
        if not flags:
            raise ValueError("a rate of no images measures nothing: give at least one image")
        k, n = sum(flags), len(flags)
        return cls(k / n, n, wilson(k, n))

    def __str__(self) -> str:
        return rate_text(self.value, self.interval)


@dataclass
class AttackResult:
    """One attack on one concept: strict UA on the same prompts and seeds without and with it."""

    name: str
    before: Rate
    after: Rate
    seconds: float
    """Wall time of the attack: its search or training, and generating its images."""
    unet_passes: int
    """UNet calls the attack made (a batched call counts once; a backward pass counts once)."""
    budget: dict[str, Any]
    detail: dict[str, Any] = field(default_factory=dict)
    """What the attack found: the worst prompt, the learned prefix, the moved embedding's norm..."""
    named: Rate | None = None
    """Share of the images after the attack in which the judge names the concept itself: the concept surely
    back. Strict UA's other misses are the judge's abstentions (it cannot tell what the image shows)."""
    fitted: Rate | None = None
    """Share of the images after the attack whose best geometric fit is the concept: the second opinion, not
    learned (:mod:`forgetpatch.eval.geometry`), which names a shape on nearly every image, also where the judge
    abstains. ``None`` for a colour or a texture."""
    images: np.ndarray | None = field(default=None, repr=False)
    verdicts: list[dict] | None = field(default=None, repr=False)
    fits: list[str] | None = field(default=None, repr=False)
    """The geometric fit's shape per image (``"unclear"``, ``"none"`` or a shape)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ua_before": self.before.value,
            "ua_after": self.after.value,
            **_share("named", self.named),
            **_share("fitted", self.fitted),
            "n": self.after.n,
            "n_before": self.before.n,
            "interval": list(self.after.interval),
            "interval_before": list(self.before.interval),
            "seconds": round(self.seconds, 2),
            "unet_passes": self.unet_passes,
            "budget": self.budget,
            "detail": self.detail,
        }


@dataclass
class AttackReport:
    """Every attack on one concept of a patched pipeline (:func:`forgetpatch.attack.attack`).

    Example:
        >>> report = attack(pipe, "circle", attacks=["inversion"])
        >>> report.results["inversion"].after.value, report.to_dict()["attacks"]["inversion"]["interval"]
    """

    concept: str
    seed: int
    budget: dict[str, Any]
    patches: list[dict[str, Any]]
    """The patches under test, ``{"name", "digest", "scale", "fused", "key_steps"}`` in application order
    (:func:`forgetpatch.eval.patches_on`)."""
    base: Rate
    """Strict UA of the unpatched base on the same prompts (a low UA: the base draws the concept)."""
    before: Rate
    results: dict[str, AttackResult]
    prompts: list[str] = field(repr=False)
    images_base: np.ndarray | None = field(default=None, repr=False)
    images_before: np.ndarray | None = field(default=None, repr=False)
    verdicts_base: list[dict] | None = field(default=None, repr=False)
    verdicts_before: list[dict] | None = field(default=None, repr=False)
    version: str = ""
    fitted_base: Rate | None = None
    """Share of the base's images whose geometric fit is the concept: how often the second opinion sees the concept
    where it is drawn (``None`` for a colour or a texture)."""
    fits_base: list[str] | None = field(default=None, repr=False)
    fits_before: list[str] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures; ``{"attacks": {name: {"ua_before", "ua_after", "interval", ...}}, ...}``."""
        return {
            "concept": self.concept,
            "seed": self.seed,
            "forgetpatch": self.version,
            "budget": self.budget,
            "patches": self.patches,
            "ua_base": {"value": self.base.value, "n": self.base.n, "interval": list(self.base.interval)},
            **({} if self.fitted_base is None else {"fitted_base": {
                "value": self.fitted_base.value, "n": self.fitted_base.n, "interval": list(self.fitted_base.interval)
            }}),
            "attacks": {name: r.to_dict() for name, r in self.results.items()},
        }

    def weakest(self) -> AttackResult | None:
        """The attack that left the lowest UA."""
        return min(self.results.values(), key=lambda r: r.after.value, default=None)

    def table(self) -> Any:
        """A :class:`rich.table.Table`: per attack, strict UA before and after with intervals, and its cost."""
        from rich.table import Table

        on = ", ".join(p["name"] for p in self.patches) or "no patch"
        fit = "" if self.fitted_base is None else (
            f"; 'fitted as the concept': its outline's best geometric fit is the concept (not learned; on the "
            f"base {self.fitted_base})"
        )
        table = Table(
            title=f"attacks on '{self.concept}' ({on}): strict UA before -> after",
            caption=(
                f"UA of the unpatched base on the same prompts {self.base} (n {self.base.n}); "
                "[95% Wilson interval]; an image counts as forgotten only when the judge confidently sees "
                "something else; 'named as the concept': the judge sees the concept itself (the rest of what UA "
                f"misses, it cannot tell){fit}"
            ),
        )
        columns = ("attack", "UA before", "UA after", "named as the concept after", "fitted as the concept after",
                   "n before/after", "seconds", "UNet passes", "found")
        for col in columns:
            table.add_column(col, justify="left" if col in ("attack", "found") else "right")
        for name, r in self.results.items():
            table.add_row(
                name, str(r.before), str(r.after), "-" if r.named is None else str(r.named),
                "-" if r.fitted is None else str(r.fitted),
                f"{r.before.n}/{r.after.n}", f"{r.seconds:.0f}", str(r.unet_passes), _found(r),
            )
        return table

    def save_grid(self, path: str | Path, columns: int = 8, *, every: bool = False) -> Path:
        """A PNG: the base, the patched model, then each attack's images (red frame: the concept is back), the
        judge's shape under each (``?``: it cannot tell), and after a slash the geometric fit's where it differs
        (``?/ring``). The first ``columns`` images of each, or with ``every`` all of them, ``columns`` to a row.

        Example:
            >>> report.save_grid("attacks.png", every=True)  # all 32 images of each attack, 8 to a row
        """
        from forgetpatch.eval import outcome

        rows = []

        def row(title: str, images: np.ndarray | None, verdicts: list[dict] | None, fits: list[str] | None) -> None:
            if images is None or not len(images):
                return
            verdicts = verdicts or [{}] * len(images)
            fits = fits or [""] * len(images)
            for start in range(0, len(images) if every else 1, columns):
                part = slice(start, start + columns)
                notes = [_note(v, f) for v, f in zip(verdicts[part], fits[part], strict=True)]
                kept = [bool(v) and outcome(v, self.concept) == "kept" for v in verdicts[part]]
                end = min(start + columns, len(images))
                label = title  # the default grid's one row, and the first of a named worst rewording's rows
                if every and (start or "\n" not in title):
                    label = f"{title.splitlines()[0]}\n{start + 1}-{end}"
                rows.append((label, images[part], notes, kept))

        row("base", self.images_base, self.verdicts_base, self.fits_base)
        row("patched", self.images_before, self.verdicts_before, self.fits_before)
        for name, r in self.results.items():
            worst = str(r.detail.get("worst_prompt", "")).split(":")[0]
            row(f"{name}\n({worst})" if worst else name, r.images, r.verdicts, r.fits)
        return save_rows(rows, path, labels=self.prompts[:columns])


def _share(key: str, rate: Rate | None) -> dict[str, Any]:
    """``{key_after, key_interval}`` of a share measured after an attack, or nothing when it was not measured."""
    return {} if rate is None else {f"{key}_after": rate.value, f"{key}_interval": list(rate.interval)}


def _note(verdict: dict, fit: str) -> str:
    """A tile's note: the judge's shape (``?``: it cannot tell), then the geometric fit's where it differs."""
    if not verdict:
        return ""
    judged = str(verdict.get("shape") or "?")
    return judged if not fit or fit == judged else f"{judged}/{fit}"


def _found(r: AttackResult) -> str:
    d = r.detail
    if "pooled_ua" in d:  # paraphrase: UA after is its worst rewording's, chosen after the fact
        pooled = rate_text(d["pooled_ua"], d.get("pooled_interval"), d.get("pooled_n"))
        return f"worst {d['worst_prompt']}; all rewordings pooled {pooled}"
    for key in ("worst_prompt", "prefix", "note"):
        if d.get(key):
            return str(d[key])
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(d.items())[:2])


def robustness_metrics(reports: list[AttackReport]) -> dict[str, Any]:
    """The ``metrics["robustness"]`` entry of a manifest: per concept, :meth:`AttackReport.to_dict`."""
    return {r.concept: r.to_dict() for r in reports}


__all__ = ["AttackReport", "AttackResult", "Rate", "robustness_metrics"]
