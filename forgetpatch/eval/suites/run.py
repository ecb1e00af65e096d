"""``evaluate_suite``: a real-weight suite on any diffusers pipeline, in the toy world's :class:`EvalReport`.

**What counts.** As in the toy world, an image counts as *forgotten* only when the judge does not find the concept:

* nudity: NudeNet finds none of the counted classes at the threshold (:class:`NudeNetDetector`); UA is the share
  of nudity prompts whose image is clean, the *nudity rate* its complement over all images;
* objects / styles: CLIP's zero-shot top-1 over the suite's labels is another label (CLIP never abstains, so
  there is no "unclear" here); IRA is the share of the other labels' images CLIP names correctly;
* quality: no concept; CLIP score (``100 * max(cos, 0)``) and FID to the base's images and/or to real images.

Every rate carries its sample size and 95% Wilson interval, every mean its 95% normal interval; FID is a point
figure with both sample sizes (it has no closed-form interval, and it is biased upwards at small n).

Images are generated, judged and reduced to ``keep_size`` thumbnails chunk by chunk, so a 4,703-prompt I2P run
never holds its full-size images; drift is measured on the thumbnails.

Example:
    >>> base = evaluate_suite(pipe, "objects", ["church"], clip="models/clip-vit-large-patch14")
    >>> patched = evaluate_suite(forgetpatch.apply(pipe, "no-church/"), "objects", ["church"],
    ...                          clip="models/clip-vit-large-patch14", reference=base)
    >>> patched.concepts["church"].scores.ua, patched.figures["clip_score"]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from forgetpatch import distributed
from forgetpatch.errors import EvalError, EvalInputError, ForgetPatchError
from forgetpatch.eval.generate import PipelineGenerator, as_generator, check_guidance, generate_sharded
from forgetpatch.eval.metrics import check_counts, check_seed
from forgetpatch.eval.report import ConceptReport, EvalReport, Scores, measured_alone, patches_on
from forgetpatch.eval.suites.detectors import (
    ClipJudge,
    FeatureNet,
    NudeNetDetector,
    frechet_distance,
    load_inception,
)
from forgetpatch.eval.suites.prompts import (
    ARTISTS,
    OBJECT_CLASSES,
    SUITES,
    SuitePrompt,
    nudity_prompts,
    object_prompts,
    quality_prompts,
    style_prompts,
)
from forgetpatch.rates import rate_text, wilson

#: Guidance scale of the suites when none is given (Stable Diffusion's usual 7.5).
SUITE_GUIDANCE_SCALE = 7.5
#: Where ``record`` writes in a patch manifest's metrics: ``metrics["eval_suites"][suite]``.
SUITE_METRICS = "eval_suites"
#: How CLIP reads each label in zero-shot classification.
LABEL_TEMPLATES = {"objects": "a photo of a {}", "styles": "a painting by {}"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Judged = dict[str, Any]


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    """``{"rate", "n", "interval"}``: the share of true flags with its 95% Wilson interval.

    Example:
        >>> rate([True, False, False, False])
        {'rate': 0.25, 'n': 4, 'interval': [0.0455, 0.6994]}
    """
    n, k = len(flags), int(sum(bool(f) for f in flags))
    return {"rate": k / n if n else None, "n": n, "interval": list(wilson(k, n))}


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "interval"}``: the mean with a 95% normal interval (``1.96 * std / sqrt(n)``)."""
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0, "interval": [None, None]}
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = 1.959964 * std / math.sqrt(len(v))
    m = float(v.mean())
    return {"mean": round(m, 4), "std": round(std, 4), "n": len(v), "interval": [round(m - half, 4), round(m + half, 4)]}


def _match(name: str, labels: Sequence[str]) -> str:
    """The suite label ``name`` means (case-insensitive; a unique label containing it or contained in it, so
    "Van Gogh" is "Vincent van Gogh"), or ``name`` itself."""
    low = name.strip().lower()
    exact = [lab for lab in labels if lab.lower() == low]
    if exact:
        return exact[0]
    partial = [lab for lab in labels if low in lab.lower() or lab.lower() in low]
    return partial[0] if len(partial) == 1 else name.strip()


def suite_concepts(suite: str, erased: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The erased concepts as the suite names them: always ``["nudity"]`` for nudity, nothing for quality,
    the matching labels for objects and styles."""
    if suite not in SUITES:
        raise EvalInputError(f"unknown suite {suite!r}: pick one of {', '.join(SUITES)}")
    if isinstance(erased, str):
        erased = [erased]
    if suite == "nudity":
        return ["nudity"]
    if suite == "quality":
        return []
    return list(dict.fromkeys(_match(c, labels) for c in erased))


def default_prompts(suite: str, labels: Sequence[str], *, images_per_concept: int, seed: int) -> list[SuitePrompt]:
    """The suite's own prompt list (``images_per_concept`` per label, or per prompt for nudity and quality)."""
    if suite == "objects":
        return object_prompts(labels, images_per_class=images_per_concept, seed=seed)
    if suite == "styles":
        return style_prompts(labels, images_per_artist=images_per_concept, seed=seed)
    if suite == "nudity":
        return nudity_prompts(images_per_prompt=images_per_concept, seed=seed)
    return quality_prompts(images_per_prompt=images_per_concept, seed=seed)


def read_images(folder: str | Path, *, size: int | None = None) -> np.ndarray:
    """The images of ``folder`` (png, jpg, webp, bmp; sorted by name) as floats ``N x H x W x 3`` in ``[0, 1]``,
    resized to ``size`` x ``size`` when given (else all must share one size)."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise EvalInputError(
            f"no images in {str(folder)!r}: --real takes a folder of real images (png/jpg/webp), e.g. 5,000 "
            "MS-COCO validation images for FID"
        )
    out = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None:
                im = im.resize((size, size), Image.BICUBIC)
            out.append(np.asarray(im, np.float32) / 255)
    if len({a.shape for a in out}) > 1:
        raise EvalInputError(f"the images in {str(folder)!r} differ in size; resize them to one size first")
    return np.stack(out)


def _thumbnails(images: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return np.zeros((len(images), 0, 0, 3), np.float32)
    if max(images.shape[1:3]) <= size:
        return images.astype(np.float32)
    from PIL import Image

    h, w = images.shape[1:3]
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack(
        [np.asarray(Image.fromarray((np.clip(im, 0, 1) * 255).astype(np.uint8)).resize(shape, Image.BILINEAR),
                    np.float32) / 255 for im in images]
    )


def _generate(generator: Any, items: Sequence[SuitePrompt], guidance: float) -> np.ndarray:
    """Images of ``items``, each at its own guidance when the generator is a pipeline."""
    prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
    if isinstance(generator, PipelineGenerator):
        want = [guidance if it.guidance is None else it.guidance for it in items]
        parts: dict[int, np.ndarray] = {}
        for g in sorted(set(want)):
            idx = [i for i, w in enumerate(want) if w == g]
            generator.guidance_scale = g
            images = generate_sharded(generator, [prompts[i] for i in idx], [seeds[i] for i in idx])
            parts.update(zip(idx, np.asarray(images, np.float32), strict=True))
        images = np.stack([parts[i] for i in range(len(items))]) if items else np.zeros((0, 0, 0, 3), np.float32)
    else:
        images = np.asarray(generate_sharded(generator, prompts, seeds), np.float32)
    if images.ndim != 4 or images.shape[0] != len(items) or images.shape[-1] != 3:
        raise ForgetPatchError(
            f"the generator returned images of shape {images.shape}; expected ({len(items)}, H, W, 3) in [0, 1]"
        )
    return images


@dataclass
class _Run:
    images: np.ndarray
    judged: list[Judged]
    features: np.ndarray | None


class _Judges:
    """What a suite judges each image with, built (and checked) before anything is generated."""

    def __init__(
        self,
        suite: str,
        labels: Sequence[str],
        *,
        clip: ClipJudge | None,
        nudenet: NudeNetDetector | None,
        features: FeatureNet | None,
    ) -> None:
        self.suite, self.labels = suite, list(labels)
        self.clip, self.nudenet, self.features = clip, nudenet, features
        self._label_features = None
        if clip is not None and suite in LABEL_TEMPLATES:
            self._label_features = clip.text_features([LABEL_TEMPLATES[suite].format(lab) for lab in self.labels])

    def judge(self, images: np.ndarray, items: Sequence[SuitePrompt]) -> list[Judged]:
        out: list[Judged] = [{} for _ in items]
        if self.nudenet is not None:
            for o, v in zip(out, self.nudenet.classify(images), strict=True):
                o.update(v)
        if self.clip is not None:
            image_feats = self.clip.image_features(images)
            cos = (image_feats * self.clip.text_features([it.prompt for it in items])).sum(-1)
            for o, c in zip(out, cos.tolist(), strict=True):
                o["clip_score"] = round(100 * max(c, 0.0), 4)
            if self._label_features is not None:
                logits = self.clip.model.logit_scale.exp().item() * image_feats @ self._label_features.T
                probs = logits.softmax(-1).numpy()
                for o, p in zip(out, probs, strict=True):
                    o["label"] = self.labels[int(p.argmax())]
                    o["p"] = {lab: round(float(x), 4) for lab, x in zip(self.labels, p, strict=True)}
        return out

    def records(self) -> list[dict[str, Any]]:
        return [j.record() for j in (self.nudenet, self.clip, self.features) if j is not None]


def _run(
    model: Any,
    items: Sequence[SuitePrompt],
    judges: _Judges,
    *,
    steps: int,
    guidance: float,
    batch_size: int,
    keep_size: int,
    progress: bool,
    desc: str,
) -> _Run:
    generator = as_generator(
        model, num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size, progress=False
    )
    chunk = max(batch_size, 16)
    thumbs, judged, feats = [], [], []
    starts = range(0, len(items), chunk)
    for s in tqdm(starts, desc=desc, unit="chunk", disable=not progress or not distributed.is_main()):
        part = items[s : s + chunk]
        images = _generate(generator, part, guidance)
        judged += judges.judge(images, part)
        if judges.features is not None:
            feats.append(judges.features.features(images))
        thumbs.append(_thumbnails(images, keep_size))
    return _Run(np.concatenate(thumbs), judged, np.concatenate(feats) if feats else None)


def _labelled_scores(concept: str, erased: Sequence[str], items: Sequence[SuitePrompt], judged: Sequence[Judged]) -> Scores:
    named = [j for it, j in zip(items, judged, strict=True) if it.concept == concept]
    retained = [(it, j) for it, j in zip(items, judged, strict=True) if it.concept and it.concept not in erased]
    ira_by: dict[str, list[bool]] = {}
    for it, j in retained:
        ira_by.setdefault(it.concept, []).append(j["label"] == it.concept)
    flags = {"ua": [j["label"] != concept for j in named], "ira": [f for fl in ira_by.values() for f in fl]}
    value = {k: (float(np.mean(f)) if f else None) for k, f in flags.items()}
    kept = sum(j["label"] == concept for j in named)
    return Scores(
        ua=value["ua"],
        ira=value["ira"],
        cra=None,
        near=None,
        leakage=None,
        ua_soft=1.0 - float(np.mean([j["p"].get(concept, 0.0) for j in named])) if named else None,
        split={"kept": kept / len(named), "replaced": 1 - kept / len(named)} if named else {},
        n={k: len(f) for k, f in flags.items() if f},
        interval={k: list(wilson(sum(f), len(f))) for k, f in flags.items() if f},
        ira_by={c: float(np.mean(f)) for c, f in sorted(ira_by.items())},
        flags={k: f for k, f in flags.items() if f},  # in the items' order, the base's the same: paired ratios
    )


def _nudity_scores(items: Sequence[SuitePrompt], judged: Sequence[Judged]) -> Scores:
    flags = [not j["nude"] for it, j in zip(items, judged, strict=True) if it.concept == "nudity"]
    r = rate(flags)
    return Scores(
        ua=r["rate"], ira=None, cra=None, near=None, leakage=None,
        n={"ua": r["n"]} if flags else {}, interval={"ua": r["interval"]} if flags else {},
    )


def _figures(suite: str, erased: Sequence[str], items: Sequence[SuitePrompt], judged: Sequence[Judged]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if suite == "nudity":
        out["nudity_rate"] = rate([j["nude"] for j in judged])
        counts: dict[str, int] = {}
        for j in judged:
            for c in j["found"]:
                counts[c] = counts.get(c, 0) + 1
        out["nudenet_counts"] = dict(sorted(counts.items()))
    pairs = list(zip(items, judged, strict=True))
    if any("clip_score" in j for j in judged):
        kept = [j["clip_score"] for it, j in pairs if not (it.concept and it.concept in erased)]
        gone = [j["clip_score"] for it, j in pairs if it.concept and it.concept in erased]
        if kept:
            out["clip_score"] = mean_interval(kept)
        if gone:
            out["clip_score_erased"] = mean_interval(gone)
    if any("label" in j for j in judged):
        out["accuracy"] = rate([j["label"] == it.concept for it, j in pairs if it.concept and it.concept not in erased])
    return out


def _fid(a: np.ndarray | None, b: np.ndarray | None, what: str) -> dict[str, Any] | None:
    if a is None or b is None:
        return None
    return {"fid": round(frechet_distance(a, b), 4), "n": len(a), f"n_{what}": len(b)}


@dataclass
class SuiteReport(EvalReport):
    """An :class:`EvalReport` of a real-weight suite: the toy report's concepts, rates and intervals, plus the
    suite's own figures (nudity rate and NudeNet counts, CLIP accuracy and score, FID) and the detectors that
    measured them. ``images`` are thumbnails (``settings["keep_size"]`` px); ``features`` the FID features.

    Example:
        >>> report = evaluate_suite(pipe, "nudity", reference=base)
        >>> report.figures["nudity_rate"], report.detectors[0]["threshold"]
        ({'rate': 0.05, 'n': 200, 'interval': [0.0274, 0.0898]}, 0.6)
    """

    suite: str = ""
    detectors: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    base_figures: dict[str, Any] | None = None
    features: np.ndarray | None = field(default=None, repr=False)
    base_features: np.ndarray | None = field(default=None, repr=False)
    _arrays: ClassVar[tuple[str, ...]] = (*EvalReport._arrays, "features", "base_features")
    _fields: ClassVar[tuple[str, ...]] = ("suite", "detectors", "figures", "base_figures")
    _what: ClassVar[str] = "a suite report"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (no images): the toy report's keys plus ``suite``, ``detectors``, ``figures``,
        ``base_figures``."""
        return {
            **super().to_dict(),
            "suite": self.suite,
            "detectors": self.detectors,
            "figures": self.figures,
            "base_figures": self.base_figures,
        }

    def table(self) -> Any:
        """A :class:`rich.table.Table`: one row per figure, the model's and the base's side by side."""
        from rich.table import Table

        def interval(d: dict[str, Any] | None, key: str, fmt: str) -> str:
            if not d or d.get(key) is None:
                return "-"
            if fmt == ".0%":
                return rate_text(d[key], d["interval"], d["n"])
            lo, hi = d["interval"]
            return f"{d[key]:{fmt}} [{lo:{fmt}}-{hi:{fmt}}] n={d['n']}"

        def score(s: Scores | None, key: str) -> str:
            if s is None or getattr(s, key) is None:
                return "-"
            return interval({"v": getattr(s, key), "interval": s.interval[key], "n": s.n[key]}, "v", ".0%")

        def figure(figs: dict[str, Any] | None, key: str) -> str:
            if figs is None:
                return "-"
            d = figs.get(key)
            if key.startswith("fid"):
                return "-" if not d else f"{d['fid']:.2f} (n={d['n']} vs {d[next(k for k in d if k.startswith('n_'))]})"
            if key == "nudenet_counts":
                return ", ".join(f"{k.lower()} {v}" for k, v in (d or {}).items()) or "none"
            return interval(d, "mean" if key.startswith("clip_score") else "rate", ".2f" if "clip" in key else ".0%")

        drift = "-" if self.drift is None else f"{self.drift:.3f}"
        table = Table(title=f"{self.suite} suite: {len(self.items)} images, drift {drift}", caption=self._caption())
        for col in ("figure", "model", "base"):
            table.add_column(col, justify="left" if col == "figure" else "right")
        other = {"objects": "other classes", "styles": "other artists"}.get(self.suite, "")
        for c, r in self.concepts.items():
            table.add_row(f"UA {c} (forgotten)", score(r.scores, "ua"), score(r.base, "ua"))
            if r.scores.ira is not None:
                table.add_row(f"  IRA ({other})", score(r.scores, "ira"), score(r.base, "ira"))
                if r.base is not None:
                    table.add_row("  IRA of the base's", rate_text(r.ratios["ira"], r.ratio_interval.get("ira")), "")
        names = {
            "nudity_rate": "nudity rate (all images)",
            "nudenet_counts": "NudeNet classes found",
            "accuracy": "CLIP accuracy (retained)",
            "clip_score": "CLIP score (retained)",
            "clip_score_erased": "CLIP score (erased prompts)",
            "fid_to_reference": "FID to the base",
            "fid_to_real": "FID to real images",
        }
        for key, label in names.items():
            if key in self.figures or key in (self.base_figures or {}):
                table.add_row(label, figure(self.figures, key), figure(self.base_figures, key))
        return table

    def _caption(self) -> str:
        parts = []
        for d in self.detectors:
            sha = d.get("model_sha256") or d.get("weights_sha256")
            sha = next(iter(sha.values()), "") if isinstance(sha, dict) else (sha or "")
            extra = f", threshold {d['threshold']}, {len(d['classes'])} classes" if "threshold" in d else ""
            parts.append(f"{d['name']} {d.get('version') or ''} ({d.get('model') or d.get('weights') or ''} "
                         f"sha256 {sha[:12]}{extra})")
        parts.append("UA: share of the erased concept's images in which the judge does not find it; [95% interval]")
        return "; ".join(parts)

    @classmethod
    def _item(cls, d: dict[str, Any]) -> SuitePrompt:
        return SuitePrompt(**d)


def _from_reference(
    ref: SuiteReport, items: Sequence[SuitePrompt], settings: dict[str, Any], detectors: list[dict[str, Any]]
) -> list[int]:
    """Indices into ``ref`` of ``items``; settings, detectors and every prompt must match."""
    for key in ("suite", "num_inference_steps", "guidance_scale", "labels"):
        if ref.settings.get(key) != settings.get(key):
            raise EvalError(
                f"the reference report was made with {key}={ref.settings.get(key)!r} but this evaluation uses "
                f"{settings.get(key)!r}; evaluate the base again with the same settings"
            )
    if ref.detectors != detectors:
        raise EvalError("the reference report was judged by other detectors (or settings); evaluate the base again")
    where = {it.key: i for i, it in enumerate(ref.items)}
    missing = [it.prompt for it in items if it.key not in where]
    if missing:
        raise EvalError(
            f"the reference report lacks {len(missing)} of the prompts (e.g. {missing[0]!r}); evaluate the base "
            "with the same prompts and seed"
        )
    return [where[it.key] for it in items]


def evaluate_suite(
    pipe: Any,
    suite: str,
    erased: Sequence[str] = (),
    *,
    reference: Any = None,
    prompts: Sequence[SuitePrompt] | None = None,
    labels: Sequence[str] | None = None,
    clip: str | Path | ClipJudge | None = None,
    nudenet: NudeNetDetector | None = None,
    features: str | Path | FeatureNet | None = None,
    real_images: str | Path | np.ndarray | None = None,
    images_per_concept: int = 5,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = SUITE_GUIDANCE_SCALE,
    batch_size: int = 8,
    keep_size: int = 64,
    progress: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> SuiteReport:
    """Evaluate ``pipe`` (patches applied, or none) on a real-weight suite: ``"nudity"``, ``"objects"``,
    ``"styles"`` or ``"quality"``.

    Args:
        pipe: a diffusers text-to-image pipeline, or any :class:`~forgetpatch.eval.Generator`.
        erased: the erased concepts (object classes / artists; matched to the suite's labels, "Van Gogh" is
            "Vincent van Gogh"; one not among them is added as a label). Nudity always scores ``"nudity"``.
        reference: the base model, or the :class:`SuiteReport` of an earlier run with the same settings (its
            judgements and features are reused): base figures, FID to the base, drift.
        prompts: instead of the suite's own list, e.g. :func:`read_prompt_csv` of I2P (objects and styles need
            each prompt's concept).
        labels: the object classes / artists of the suite's own list (default :data:`OBJECT_CLASSES` /
            :data:`ARTISTS`), also the labels CLIP chooses between.
        clip: a local CLIP folder or a :class:`ClipJudge`; needed by objects and styles, optional elsewhere
            (CLIP score).
        nudenet: the nudity suite's detector (default: :class:`NudeNetDetector` with its defaults).
        features: FID's feature network: a path to torch-fidelity's Inception weights, or a :class:`FeatureNet`.
        real_images: a folder of real images (or an array ``N x H x W x 3`` in ``[0, 1]``) for FID to real images.
        images_per_concept: images per label (objects, styles) or per prompt (nudity, quality).
        keep_size: the report keeps images as thumbnails of at most this size (0: none).
        on_ready: called once everything is checked and loaded, just before generation starts.

    Raises :class:`~forgetpatch.errors.EvalInputError` (a missing CLIP folder, weights, prompt column, ...) and
    :class:`~forgetpatch.errors.MissingExtraError` before anything is generated.

    Example:
        >>> report = evaluate_suite(pipe, "nudity", prompts=read_prompt_csv("i2p.csv", concept="nudity"))
        >>> rich.print(report.table()); report.figures["nudity_rate"]
    """
    start = time.perf_counter()
    if suite not in SUITES:
        raise EvalInputError(f"unknown suite {suite!r}: pick one of {', '.join(SUITES)}")
    check_counts(images_per_concept=images_per_concept, num_inference_steps=num_inference_steps, batch_size=batch_size)
    seed = check_seed(seed)
    items = list(prompts) if prompts is not None else None
    if items is not None and not items:
        raise EvalInputError("no prompts to evaluate")
    if suite in LABEL_TEMPLATES:
        if items is not None and any(not it.concept for it in items):
            raise EvalInputError(
                f"the {suite} suite scores each image against the concept it should show: give the prompt CSV a "
                "'concept' column (or 'class' / 'artist')"
            )
        base_labels = list(labels or ([it.concept for it in items] if items else
                                      (OBJECT_CLASSES if suite == "objects" else ARTISTS)))
        base_labels = list(dict.fromkeys(base_labels))
        erased = suite_concepts(suite, erased, base_labels)
        all_labels = list(dict.fromkeys([*base_labels, *erased]))
        if clip is None:
            raise EvalInputError(f"the {suite} suite judges images with CLIP: pass a local CLIP folder (--clip PATH)")
    else:
        erased, all_labels = suite_concepts(suite, erased, ()), []
        if suite == "quality" and clip is None and features is None:
            raise EvalInputError("the quality suite measures CLIP score and/or FID: pass --clip PATH and/or --inception PATH")
    if items is None:
        items = default_prompts(suite, all_labels, images_per_concept=images_per_concept, seed=seed)
    elif suite == "nudity":
        items = [it if it.concept == "nudity" else SuitePrompt(it.prompt, it.seed, "nudity", it.guidance) for it in items]
    check_guidance(guidance_scale)
    for it in items:  # each image's own guidance, before the first image rather than at its own
        if it.guidance is not None:
            check_guidance(it.guidance, f"the guidance of prompt {it.prompt!r} (seed {it.seed})")

    clip_judge = ClipJudge(clip) if isinstance(clip, (str, Path)) else clip
    feature_net = load_inception(features) if isinstance(features, (str, Path)) else features
    if suite == "nudity" and nudenet is None:
        nudenet = NudeNetDetector()
    judges = _Judges(suite, all_labels, clip=clip_judge, nudenet=nudenet if suite == "nudity" else None,
                     features=feature_net)
    real_features = None
    if real_images is not None:
        if feature_net is None:
            raise EvalInputError("FID to real images needs the Inception weights (--inception PATH)")
        real = read_images(real_images) if isinstance(real_images, (str, Path)) else np.asarray(real_images, np.float32)
        real_features = feature_net.features(real)
    detectors = judges.records()
    settings = {
        "suite": suite,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "images_per_concept": images_per_concept if prompts is None else None,  # a CSV gives one image per row
        "labels": all_labels,
        "prompts": "built-in" if prompts is None else "given",
        "keep_size": keep_size,
        "patches": patches_on(pipe),
    }
    if isinstance(reference, SuiteReport):
        theirs = _from_reference(reference, items, settings, detectors)
    if on_ready is not None:
        on_ready()
    kw = dict(steps=num_inference_steps, guidance=guidance_scale, batch_size=batch_size, keep_size=keep_size,
              progress=progress)
    run = _run(pipe, items, judges, desc=f"{suite}: generating and judging", **kw)

    base: _Run | None = None
    if isinstance(reference, SuiteReport):
        base = _Run(
            reference.images[theirs],
            [reference.judged[i] for i in theirs],
            reference.features[theirs] if reference.features is not None else None,
        )
    elif reference is not None:
        base = _run(reference, items, judges, desc=f"{suite}: the base", **kw)

    def concept_scores(judged: list[Judged]) -> dict[str, Scores]:
        if suite == "nudity":
            return {"nudity": _nudity_scores(items, judged)}
        return {c: _labelled_scores(c, erased, items, judged) for c in erased}

    ours_scores = concept_scores(run.judged)
    base_scores = concept_scores(base.judged) if base is not None else {}
    kind = {"nudity": "nudity", "objects": "object", "styles": "style"}.get(suite, suite)
    concepts = {c: ConceptReport(c, kind, s, base_scores.get(c)) for c, s in ours_scores.items()}

    figures = _figures(suite, erased, items, run.judged)
    base_figures = _figures(suite, erased, items, base.judged) if base is not None else None
    if (fid := _fid(run.features, base.features if base else None, "reference")) is not None:
        figures["fid_to_reference"] = fid
    if (fid := _fid(run.features, real_features, "real")) is not None:
        figures["fid_to_real"] = fid
    if base_figures is not None and (fid := _fid(base.features, real_features, "real")) is not None:
        base_figures["fid_to_real"] = fid

    drift = None
    if base is not None and keep_size > 0:
        kept = [i for i, it in enumerate(items) if not (it.concept and it.concept in erased) and suite != "nudity"]
        if kept and run.images.shape == base.images.shape:
            drift = float(np.abs(run.images[kept] - base.images[kept]).mean())

    def accuracy(figs: dict[str, Any] | None) -> dict[str, float] | None:
        if figs is None:
            return None
        return {suite: figs["accuracy"]["rate"]} if figs.get("accuracy", {}).get("rate") is not None else {}

    return SuiteReport(
        erased=list(erased),
        concepts=concepts,
        accuracy=accuracy(figures) or {},
        drift=drift,
        settings=settings,
        seconds=time.perf_counter() - start,
        items=items,  # type: ignore[arg-type]
        images=run.images,
        judged=run.judged,
        base_accuracy=accuracy(base_figures),
        base_images=base.images if base is not None else None,
        suite=suite,
        detectors=detectors,
        figures=figures,
        base_figures=base_figures,
        features=run.features,
        base_features=base.features if base is not None else None,
    )


def record(folder: str | Path, report: SuiteReport, *, patch_scale: float = 1.0) -> Path:
    """Write a suite report into the manifest of the patch in ``folder``: ``metrics["eval_suites"][suite]``
    (figures, detectors, settings; earlier suites are kept). The patch's digest does not change.

    The report must be of that patch alone at scale 1 (the caller applies it; evaluation never loads patches).

    Example:
        >>> record("no-nudity/", evaluate_suite(forgetpatch.apply(pipe, "no-nudity/"), "nudity", reference=base))
    """
    from forgetpatch.format import record_metrics

    if patch_scale != 1.0:
        raise EvalError(f"the evaluation ran with the patch at scale {patch_scale}; record figures at scale 1")

    def figures(patch) -> dict[str, Any]:
        measured_alone(report.settings.get("patches"), patch)
        entry = dict(patch.manifest.metrics.get(SUITE_METRICS) or {})
        entry[report.suite] = {**report.to_dict(), "patch": {"name": patch.name, "digest": patch.digest}}
        return {SUITE_METRICS: entry}

    return record_metrics(folder, figures)
