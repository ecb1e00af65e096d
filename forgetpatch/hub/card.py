"""The Hub model card (README.md) of a patch, rendered from ``forgetpatch/hub/cards/patch.md`` (``hub_cards/patch.md``)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from forgetpatch.errors import ForgetPatchError
from forgetpatch.format import (
    ROBUSTNESS_METRICS,
    TOY_EVAL_METRICS,
    WEIGHTS_NAME,
    Manifest,
    Patch,
    adapter_name,
    read_patch,
)
from forgetpatch.hub.download import HUB_ID
from forgetpatch.rates import interval_text, rate_text

#: Jinja templates for model cards, shipped inside the package (``hub_cards/`` at the repository root links here).
TEMPLATES = Path(__file__).resolve().parent / "cards"
TEMPLATE = TEMPLATES / "patch.md"

BASE_TAGS = ["forgetpatch", "concept-unlearning", "lora", "text-to-image", "diffusers"]

#: The license of each base family's weights; a patch is a derivative of them.
FAMILY_LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}

_GRID_NAME = re.compile(r"(grid|before|after|comparison|samples?).*\.(png|jpe?g|webp)$", re.IGNORECASE)
_BLANK_LINES = re.compile(r"\n{3,}")


def find_grid(folder: Path, manifest: Manifest) -> str | None:
    """The before/after image shipped with the patch, if any (a listed ``*.png``/``*.jpg`` named like a grid)."""
    names = sorted(n for n in manifest.files if (folder / n).is_file())
    named = [n for n in names if _GRID_NAME.search(Path(n).name)]
    images = [n for n in names if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]
    return (named or images or [None])[0]


class _Figures(TypedDict, total=False):
    """One concept's figures in a recorded toy evaluation (``EvalReport.to_dict()``), as far as the card reads them."""

    kind: str
    ua: float | None
    leakage: float | None
    ira: float | None
    cra: float | None
    near: float | None
    interval: dict[str, tuple[float, float] | None]
    n: dict[str, int | None]
    ratios: dict[str, float | None]
    ratio_interval: dict[str, tuple[float, float] | None]
    base: _Figures


class _ToyEval(TypedDict, total=False):
    concepts: dict[str, _Figures]
    settings: dict[str, Any]


class _Attack(TypedDict, total=False):
    ua_before: float | None
    ua_after: float | None
    named_after: float | None
    named_interval: tuple[float, float] | None
    fitted_after: float | None
    fitted_interval: tuple[float, float] | None
    interval: tuple[float, float] | None
    interval_before: tuple[float, float] | None
    n: int | None
    n_before: int | None
    seconds: float
    unet_passes: int
    budget: dict[str, Any]
    detail: dict[str, Any]


class _Robustness(TypedDict, total=False):
    attacks: dict[str, _Attack]
    seed: int | None
    forgetpatch: str | None


#: The records the card and ``inspect`` read figures from, and their shapes.
_RECORDS = {TOY_EVAL_METRICS: TypeAdapter(_ToyEval), ROBUSTNESS_METRICS: TypeAdapter(dict[str, _Robustness])}


def readable(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``metrics`` with its evaluation and attack records in the shape forgetpatch writes them, and the names of the
    records that are not (figures written by hand through ``record_metrics``, another tool, or a newer forgetpatch):
    those are left out of the summaries, which say so, instead of failing the card or ``inspect``."""
    out, unreadable = dict(metrics), []
    for key, shape in _RECORDS.items():
        if metrics.get(key) is None:
            continue
        try:
            out[key] = shape.validate_python(metrics[key])
        except ValidationError:
            del out[key]
            unreadable.append(key)
    return out, unreadable


def short_value(value: Any, *, code: Callable[[str], str] = lambda text: f"`{text}`") -> str:
    """A parameter or figure as a table cell: numbers short, long lists folded to a count and a few items, each
    value set by ``code`` (in backticks; the card's :func:`md_code`)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        if len(items) > 3 or sum(map(len, items)) > 80:
            return f"{len(items)} items: " + ", ".join(code(v) for v in items[:2]) + ", ..."
        return ", ".join(code(v) for v in items) or "(none)"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    if value == "":
        return "(blank)"
    return code(str(value))


def md_code(text: str) -> str:
    """``text`` as a code span in a card's table cell, shown as written: no HTML entities (a code span shows ``<``
    itself, and would show ``&lt;``), a fence longer than any run of backticks in it, ``|`` escaped (a table reads
    it as a cell border even in code) and line breaks as spaces (a table row is one line).

    Example:
        >>> print(md_code("<sks> | a`b"))
        ``<sks> \\| a`b``
    """
    text = re.sub(r"[\r\n]+", " ", text).replace("|", "\\|")
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _other_metrics(metrics: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, list[tuple[str, str]]]]]:
    """The metrics that are not an evaluation or attack record: scalar figures, and per-layer tables (a mapping of
    module path to number), each under a readable title; nothing is flattened into dotted keys."""
    figures, per_layer = [], []
    unreadable = readable(metrics)[1]
    for key, value in metrics.items():
        if key in unreadable:
            figures.append((key.replace("_", " "), "recorded in a shape forgetpatch does not read (forgetpatch.json has it)"))
            continue
        if key in (TOY_EVAL_METRICS, ROBUSTNESS_METRICS):
            continue
        title = key.replace("_", " ")
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            per_layer.append((title, [(md_code(k), short_value(v, code=md_code)) for k, v in value.items()]))
        else:
            figures.append((title, short_value(value, code=md_code)))
    return figures, per_layer


#: The toy world's kinds of concept, as the summary names them (a concept's own kind: in-domain retention).
_KINDS = {"shape": "shapes", "colour": "colours", "texture": "textures"}


def _retained(kind: str | None) -> tuple[str, str]:
    """What in-domain and cross-domain retention keep for a concept of ``kind``: ``("other colours", "shapes and
    textures")`` for a colour."""
    if kind not in _KINDS:
        return "other concepts of its kind", "concepts of the other kinds"
    a, b = (name for k, name in _KINDS.items() if k != kind)
    return f"other {_KINDS[kind]}", f"{a} and {b}"


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's one summary table: per erased concept, forgetting (strict UA) and paraphrase leakage beside the
    base model's, retention (in-domain, cross-domain, near neighbours), and the weakest recorded attack.

    Rows are plain text (``what``, ``patched``, ``base``); ``headline`` marks each concept's forgetting row, which
    the card sets in bold."""
    metrics = readable(metrics)[0]
    concepts = (metrics.get(TOY_EVAL_METRICS) or {}).get("concepts") or {}
    rows = []
    for concept, figures in concepts.items():
        base = figures.get("base") or {}
        rows.append({"what": f"{concept} forgotten (strict UA)", "patched": _rate(figures, "ua"),
                     "base": _rate(base, "ua"), "headline": True})
        rows.append({"what": f"{concept} in other words (paraphrase leakage, lower is better)",
                     "patched": _rate(figures, "leakage"), "base": _rate(base, "leakage")})
        own, other = _retained(figures.get("kind"))
        for key, what in (("ira", f"{own} kept (in-domain retention)"),
                          ("cra", f"{other} kept (cross-domain retention)"),
                          ("near", "near neighbours kept")):
            if figures.get(key) is not None:
                rows.append({"what": what, "patched": _rate(figures, key), "base": _rate(base, key)})
    for concept, report in (metrics.get(ROBUSTNESS_METRICS) or {}).items():
        measured = {n: r for n, r in (report.get("attacks") or {}).items() if r.get("ua_after") is not None}
        if measured:
            name, r = min(measured.items(), key=lambda item: item[1]["ua_after"])
            rows.append({"what": f"{concept} under the strongest recorded attack ({name})",
                         "patched": _ua(r["ua_after"], r.get("interval"), r.get("n")), "base": "-"})
    return rows


def model_index(metrics: dict[str, Any]) -> list[EvalResult]:
    """The headline figures as Hub evaluation results (the card's ``model-index``): strict UA, leakage and
    in-domain retention per erased concept, on the toy world."""
    metrics = readable(metrics)[0]
    concepts = (metrics.get(TOY_EVAL_METRICS) or {}).get("concepts") or {}
    results = []
    for concept, figures in concepts.items():
        for key, metric in (("ua", "strict unlearning accuracy"), ("leakage", "paraphrase leakage"),
                            ("ira", "in-domain retention (share named right)")):
            if figures.get(key) is not None:
                n = (figures.get("n") or {}).get(key)
                interval = (figures.get("interval") or {}).get(key)
                measured = ", ".join(
                    [*([f"n={n}"] if n is not None else []), *([f"95% interval {interval_text(interval)}"]
                                                                if interval is not None else [])]
                )
                results.append(EvalResult(
                    task_type="text-to-image", task_name="concept unlearning",
                    dataset_type="forgetpatch-toy", dataset_name=f"forgetpatch toy world: {concept}",
                    metric_type=key, metric_name=f"{metric} ({concept}{'; ' + measured if measured else ''})",
                    metric_value=round(figures[key], 4),
                    metric_args={"n": n, "interval_95": list(interval)} if n is not None and interval else None,
                ))
    return results


def parent_names(patch: Patch) -> list[tuple[str | None, str]]:
    """Each lineage parent as ``(name, digest)``: the name when the parent is among the patch folders beside this
    one, else ``None``."""
    names: dict[str, str] = {}
    source = Path(patch.source) if patch.source is not None else None
    if source is not None and source.is_file() and (source.parent / "forgetpatch.json").is_file():
        source = source.parent  # the weights file of a patch folder: its siblings are the folder's
    if source is not None and source.is_dir() and patch.manifest.lineage:
        for sibling in sorted(source.parent.iterdir())[:64]:
            if sibling != source and (sibling / "forgetpatch.json").is_file():
                try:
                    parent = read_patch(sibling)
                except ForgetPatchError:
                    continue
                names[parent.digest] = parent.name
    return [(names.get(d), d) for d in patch.manifest.lineage]


def _rate(figures: dict[str, Any], key: str) -> str:
    """``"94% [85-98%], n=48"`` from an evaluation's per-concept figures (``-`` where not measured)."""
    return rate_text(figures.get(key), (figures.get("interval") or {}).get(key), (figures.get("n") or {}).get(key))


def toy_summary(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per erased concept from a toy evaluation recorded under ``metrics["toy_eval"]``:
    strict UA and leakage with their 95% intervals and sample sizes, the base beside them, and
    retention as a share of the base's."""
    metrics = readable(metrics)[0]
    concepts = (metrics.get(TOY_EVAL_METRICS) or {}).get("concepts") or {}
    rows = []
    for concept, figures in concepts.items():
        base, ratios = figures.get("base") or {}, figures.get("ratios") or {}
        intervals = figures.get("ratio_interval") or {}
        rows.append(
            {
                "concept": concept,
                "ua": _rate(figures, "ua"),
                "base_ua": _rate(base, "ua") if base else "-",
                "leakage": _rate(figures, "leakage"),
                **{k: rate_text(ratios.get(k), intervals.get(k)) for k in ("ira", "cra", "near")},
            }
        )
    return rows


def _ua(value: float | None, interval: list[float] | None, n: int | None = None) -> str:
    return rate_text(value, interval, n or None)


def _share(attack: dict[str, Any], key: str) -> str:
    """A share recorded after an attack (``named``, ``fitted``) as a rate with its interval, ``"-"`` when absent."""
    value = attack.get(f"{key}_after")
    return "-" if value is None else _ua(value, attack.get(f"{key}_interval"), attack.get("n"))


def robustness_summary(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per (concept, attack) recorded under ``metrics["robustness"]`` by ``forgetpatch attack --record``:
    strict UA before and after the attack with intervals and sample size, the share the judge names as the concept
    after it and the share whose geometric fit is the concept (``"-"`` when not recorded), and what the attack
    spent."""
    metrics = readable(metrics)[0]
    rows = []
    for concept, report in (metrics.get(ROBUSTNESS_METRICS) or {}).items():
        for name, r in (report.get("attacks") or {}).items():
            spent = ", ".join(f"{k} {v}" for k, v in (r.get("budget") or {}).items() if k != "num_inference_steps")
            rows.append(
                {
                    "concept": concept,
                    "attack": _attack_label(name, r),
                    "before": _ua(r.get("ua_before"), r.get("interval_before"), r.get("n_before")),
                    "after": _ua(r.get("ua_after"), r.get("interval"), r.get("n")),
                    "named": _share(r, "named"),
                    "fitted": _share(r, "fitted"),
                    "cost": f"{r.get('seconds', 0):.0f} s, {r.get('unet_passes', 0)} UNet passes",
                    "budget": spent,
                    "seed": str(report.get("seed", "-")),
                    "version": str(report.get("forgetpatch", "-")),
                }
            )
    return rows


def _attack_label(name: str, r: dict[str, Any]) -> str:
    """The attack's name; for the paraphrase attack, what its UA after is (the worst of several rewordings, chosen
    after the fact) and the pooled figure beside it."""
    detail = r.get("detail") or {}
    if name != "paraphrase" or "pooled_ua" not in detail:
        return name
    pooled = _ua(detail["pooled_ua"], detail.get("pooled_interval"), detail.get("pooled_n"))
    return f"paraphrase (the worst of {(r.get('budget') or {}).get('prompts', 'its')} rewordings; all pooled: {pooled})"


def render_card(
    patch_or_folder: Patch | str | Path,
    repo_id: str,
    *,
    folder: str | Path | None = None,
    license: str | None = None,
    template: str | Path = TEMPLATE,
) -> ModelCard:
    """Render the model card of a patch for Hub repo ``repo_id``.

    The YAML header has ``base_model`` (when the manifest names a Hub model),
    ``base_model_relation: adapter``, ``library_name: diffusers``, the license (the base family's
    unless given), tags, and the headline figures as ``model-index`` evaluation results. The body reads
    like a LoRA card: what it forgets and how to load it, the before/after grid when ``folder`` has one,
    one summary table (forgetting, leakage, retention, the strongest recorded attack, each with its interval
    and sample size, the base beside it), then folded details: concepts, per-concept figures, attacks,
    parameters and per-layer figures, key steps and lineage by name.

    Args:
        patch_or_folder: a :class:`~forgetpatch.format.Patch` or a patch folder.
        repo_id: the Hub repo the card is for (used in the usage snippets).
        folder: where to look for a before/after image; defaults to the patch's folder.
        license: the ``license`` field; defaults to the base model family's.
        template: a Jinja template with ``{{ card_data }}`` in its YAML header.

    Example:
        >>> card = render_card("no-vangogh/", "org/no-vangogh")
        >>> card.data.tags
        ['forgetpatch', 'concept-unlearning', 'lora', 'text-to-image', 'diffusers', 'uce']
        >>> card.save("no-vangogh/README.md")
    """
    patch = patch_or_folder if isinstance(patch_or_folder, Patch) else read_patch(patch_or_folder)
    if folder is None and patch.source is not None and Path(patch.source).is_dir():
        folder = patch.source
    manifest = patch.manifest
    base_id = manifest.base_model.id if HUB_ID.match(manifest.base_model.id or "") else None
    figures, per_layer = _other_metrics(manifest.metrics)
    results = model_index(manifest.metrics)
    data = ModelCardData(
        model_name=manifest.name if results else None,
        eval_results=results or None,
        base_model=base_id,
        library_name="diffusers",
        license=license or FAMILY_LICENSES.get(manifest.base_model.family, "other"),
        pipeline_tag="text-to-image",
        tags=[*BASE_TAGS, manifest.method.name],
        base_model_relation="adapter" if base_id else None,
    )
    grid = find_grid(Path(folder), manifest) if folder is not None else None
    card = ModelCard.from_template(
        data,
        template_path=str(template),
        m=manifest,
        name=manifest.name,
        adapter=adapter_name(manifest.name),
        repo_id=repo_id,
        base_id=base_id,
        forgotten=", ".join(f"**{md(c.target)}**" for c in manifest.concepts),
        steered=", ".join(f"{md(c.target)} -> {md(c.steered_to)}" for c in manifest.concepts if c.steered_to),
        preserved=", ".join(md(c.target) for c in manifest.preserved),
        md=md,
        py=json.dumps,
        params=[(k, short_value(v, code=md_code)) for k, v in sorted(manifest.method.params.items())],
        figures=figures,
        per_layer=per_layer,
        summary=summary_rows(manifest.metrics),
        summary_note=_summary_note(manifest.metrics),
        lineage=parent_names(patch),
        toy=toy_summary(manifest.metrics),
        toy_settings=(readable(manifest.metrics)[0].get(TOY_EVAL_METRICS) or {}).get("settings"),
        robustness=robustness_summary(manifest.metrics),
        grid=grid,
        weights_name=WEIGHTS_NAME,
    )
    return ModelCard(_BLANK_LINES.sub("\n\n", str(card)))  # templates leave runs of blank lines


def md(value: Any) -> str:
    """``value`` as text in the card's Markdown: ``&``, ``<`` and ``>`` as HTML entities and ``|`` escaped, so a
    concept, a name or a parameter shows as written and cannot add HTML or table cells to the card (the template
    puts it in code spans only where it is an identifier)."""
    return html.escape(str(value), quote=False).replace("|", "\\|")


def _summary_note(metrics: dict[str, Any]) -> str:
    metrics = readable(metrics)[0]
    settings = (metrics.get(TOY_EVAL_METRICS) or {}).get("settings") or {}
    note = ("Measured on the toy world by the toy judge. Strict UA: an image counts as forgotten only when the judge "
            "confidently sees something else. Brackets: 95% Wilson interval; n: images.")
    if settings:
        note += (f" {settings.get('num_inference_steps')} sampling steps, guidance {settings.get('guidance_scale')}, "
                 f"seed {settings.get('seed')}.")
    return note
