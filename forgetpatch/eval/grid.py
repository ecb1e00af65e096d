"""Before/after image grids as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from forgetpatch.eval.report import EvalReport
from forgetpatch.toy import vocab


def _to_uint8(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images N x H x W x 3, got shape {arr.shape}")
    return arr


def save_grid(
    images_before: np.ndarray | Sequence[np.ndarray],
    images_after: np.ndarray | Sequence[np.ndarray],
    path: str | Path,
    labels: Sequence[str] | None = None,
    *,
    scale: int = 3,
) -> Path:
    """Save a two-row grid (top: before, bottom: after), one column per image, labelled underneath.

    Images are float in ``[0, 1]`` or uint8, ``N x H x W x 3``; they are enlarged ``scale`` times
    (nearest neighbour) so 32x32 images stay readable.

    Example:
        >>> save_grid(base_report.images[:8], report.images[:8], "grid.png", [i.prompt for i in report.items[:8]])
    """
    before, after = _to_uint8(images_before), _to_uint8(images_after)
    if before.shape != after.shape:
        raise ValueError(f"before and after differ in shape: {before.shape} vs {after.shape}")
    n, h, w = before.shape[0], before.shape[1] * scale, before.shape[2] * scale
    labels = list(labels) if labels is not None else [""] * n
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    font = ImageFont.load_default()
    chars = max(4, w // 6)
    wrapped = [textwrap.wrap(label, chars)[:4] for label in labels]
    text_h = 14 * max((len(lines) for lines in wrapped), default=0) + 4
    gutter, margin = 2, 44
    canvas = Image.new("RGB", (margin + n * (w + gutter), 2 * (h + gutter) + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (name, imgs) in enumerate((("before", before), ("after", after))):
        y = row * (h + gutter)
        draw.text((2, y + h // 2 - 5), name, fill="black", font=font)
        for i, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (margin + i * (w + gutter), y))
    for i, lines in enumerate(wrapped):
        draw.multiline_text(
            (margin + i * (w + gutter), 2 * (h + gutter) + 1), "\n".join(lines), fill="black", font=font
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def pick_columns(report: EvalReport, columns: int = 12) -> list[int]:
    """Item indices worth showing: prompts naming each erased concept, paraphrases, near neighbours, then others."""
    items, erased = report.items, report.erased
    have_base = report.base_images is not None
    usable = [i for i in range(len(items)) if not have_base or not np.isnan(report.base_images[i]).any()]
    groups = []
    for concept in erased:
        near = vocab.NEAR_NEIGHBOURS.get(concept, ()) if vocab.kind_of(concept) == "shape" else ()
        groups.append([i for i in usable if items[i].role == "main" and items[i].names(concept)])
        groups.append([i for i in usable if items[i].role == "paraphrase" and items[i].concept == concept])
        groups.append([i for i in usable if items[i].role == "main" and items[i].scene.shape in near])
    groups.append(
        [i for i in usable if items[i].role == "main" and not any(items[i].names(e) for e in erased)]
    )
    picked: list[int] = []
    while len(picked) < columns and any(groups):
        for group in groups:  # round robin so every group shows
            if group and len(picked) < columns:
                picked.append(group.pop(0))
    return picked


def save_report_grid(report: EvalReport, path: str | Path, columns: int = 12) -> Path:
    """Before/after grid of a report evaluated with a ``reference`` (base on top, model under test below).

    Example:
        >>> save_report_grid(evaluate(pipe, ["circle"], reference=base), "no-circle.png")
    """
    if report.base_images is None:
        raise ValueError("this report has no base images: evaluate with reference=<base pipeline or report>")
    cols = pick_columns(report, columns)
    labels = [report.items[i].prompt for i in cols]
    return save_grid(report.base_images[cols], report.images[cols], path, labels)
