"""The Hub model card (README.md) of a patch, rendered from ``hub_cards/patch.md``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from forgetpatch.format import ROBUSTNESS_METRICS, TOY_EVAL_METRICS, WEIGHTS_NAME, Patch, read_patch
from forgetpatch.format.manifest import Manifest

#: Jinja templates for model cards (``hub_cards/`` at the repository root).
TEMPLATES = Path(__file__).resolve().parents[2] / "hub_cards"
TEMPLATE = TEMPLATES / "patch.md"

BASE_TAGS = ["forgetpatch", "concept-unlearning", "lora", "text-to-image", "diffusers"]

#: The license of each base family's weights; a patch is a derivative of them.
FAMILY_LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}

_GRID_NAME = re.compile(r"(grid|before|after|comparison|samples?).*\.(png|jpe?g|webp)$", re.IGNORECASE)
_BLANK_LINES = re.compile(r"\n{3,}")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def find_grid(folder: Path, manifest: Manifest) -> str | None:
    """The before/after image shipped with the patch, if any (a listed ``*.png``/``*.jpg`` named like a grid)."""
    names = sorted(n for n in manifest.files if (folder / n).is_file())
    named = [n for n in names if _GRID_NAME.search(Path(n).name)]
    images = [n for n in names if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]
    return (named or images or [None])[0]


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", f"{value:.4g}" if isinstance(value, float) else value))
    return rows


def _rate(figures: dict[str, Any], key: str) -> str:
    """``"94% [85-98%], n=48"`` from an evaluation's per-concept figures (``-`` where not measured)."""
    value = figures.get(key)
    if value is None:
        return "-"
    lo, hi = (figures.get("interval") or {}).get(key, (None, None))
    n = (figures.get("n") or {}).get(key)
    interval = f" [{lo:.0%}-{hi:.0%}]" if lo is not None else ""
    return f"{value:.0%}{interval}" + (f", n={n}" if n is not None else "")


def toy_summary(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per erased concept from a toy evaluation recorded under ``metrics["toy_eval"]``:
    strict UA and leakage with their 95% intervals and sample sizes, the base beside them, and
    retention as a share of the base's."""
    concepts = (metrics.get(TOY_EVAL_METRICS) or {}).get("concepts") or {}
    rows = []
    for concept, figures in concepts.items():
        base, ratios = figures.get("base") or {}, figures.get("ratios") or {}
        rows.append(
            {
                "concept": concept,
                "ua": _rate(figures, "ua"),
                "base_ua": _rate(base, "ua") if base else "-",
                "leakage": _rate(figures, "leakage"),
                **{k: "-" if ratios.get(k) is None else f"{ratios[k]:.0%}" for k in ("ira", "cra", "near")},
            }
        )
    return rows


def _ua(value: float | None, interval: list[float] | None, n: int | None = None) -> str:
    if value is None:
        return "-"
    lo, hi = interval or (None, None)
    return f"{value:.0%}" + (f" [{lo:.0%}-{hi:.0%}]" if lo is not None else "") + (f", n={n}" if n else "")


def robustness_summary(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per (concept, attack) recorded under ``metrics["robustness"]`` by ``forgetpatch attack --record``:
    strict UA before and after the attack with intervals and sample size, and what the attack spent."""
    rows = []
    for concept, report in (metrics.get(ROBUSTNESS_METRICS) or {}).items():
        for name, r in (report.get("attacks") or {}).items():
            spent = ", ".join(f"{k} {v}" for k, v in (r.get("budget") or {}).items() if k != "num_inference_steps")
            rows.append(
                {
                    "concept": concept,
                    "attack": name,
                    "before": _ua(r.get("ua_before"), r.get("interval_before")),
                    "after": _ua(r.get("ua_after"), r.get("interval"), r.get("n")),
                    "cost": f"{r.get('seconds', 0):.0f} s, {r.get('unet_passes', 0)} UNet passes",
                    "budget": spent,
                    "seed": str(report.get("seed", "-")),
                    "version": str(report.get("forgetpatch", "-")),
                }
            )
    return rows


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
    unless given) and tags; the body says what is forgotten, how, where on the trajectory, on top of
    which patches, the metrics, the before/after grid when ``folder`` has one, and how to load it.

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
    base_id = manifest.base_model.id if _HUB_ID.match(manifest.base_model.id or "") else None
    data = ModelCardData(
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
        repo_id=repo_id,
        base_id=base_id,
        forgotten=", ".join(f"**{c.target}**" for c in manifest.concepts),
        params=sorted(manifest.method.params.items()),
        metrics=_flatten(
            {k: v for k, v in manifest.metrics.items() if k not in (TOY_EVAL_METRICS, ROBUSTNESS_METRICS)}
        ),
        toy=toy_summary(manifest.metrics),
        toy_settings=(manifest.metrics.get(TOY_EVAL_METRICS) or {}).get("settings"),
        robustness=robustness_summary(manifest.metrics),
        grid=grid,
        weights_name=WEIGHTS_NAME,
    )
    return ModelCard(_BLANK_LINES.sub("\n\n", str(card)))  # templates leave runs of blank lines
