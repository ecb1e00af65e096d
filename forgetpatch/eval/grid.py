"""Before/after image grids as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from forgetpatch.eval.report import EvalReport, retained
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
    notes: tuple[Sequence[str], Sequence[str]] | None = None,
    flagged: tuple[Sequence[bool], Sequence[bool]] | None = None,
    extra: tuple[str, np.ndarray, Sequence[str]] | None = None,
) -> Path:
    """Save a two-row grid (top: before, bottom: after), one column per image, labelled underneath.

    Images are float in ``[0, 1]`` or uint8, ``N x H x W x 3``; they are enlarged ``scale`` times
    (nearest neighbour) so 32x32 images stay readable. ``notes`` puts a short line under each tile of
    the before and after rows (e.g. the judge's verdict), ``flagged`` frames tiles in red, and
    ``extra`` = ``(title, images, notes)`` adds a third row of other images (e.g. those the judge and
    the geometric fit disagree on).

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
    for what, pair in (("notes", notes), ("flagged", flagged)):
        if pair is not None and [len(pair[0]), len(pair[1])] != [n, n]:
            raise ValueError(f"got {len(pair[0])} and {len(pair[1])} {what} for {n} images before and after: give one each")
    rows: list[tuple[str, np.ndarray, Sequence[str], Sequence[bool]]] = [
        ("before", before, notes[0] if notes else [""] * n, flagged[0] if flagged else [False] * n),
        ("after", after, notes[1] if notes else [""] * n, flagged[1] if flagged else [False] * n),
    ]
    font = ImageFont.load_default()
    chars = max(4, w // 6)
    wrapped = [textwrap.wrap(label, chars)[:4] for label in labels]
    text_h = 14 * max((len(lines) for lines in wrapped), default=0) + 4
    note_h = 24 if notes or extra else 0
    gutter, margin = 2, 44
    extra_imgs = _to_uint8(extra[1]) if extra is not None and len(extra[1]) else None
    extra_h = 14 + (h + note_h + gutter if extra_imgs is not None else 0) if extra is not None else 0
    width = margin + max(n, len(extra_imgs) if extra_imgs is not None else 0) * (w + gutter)
    canvas = Image.new("RGB", (width, 2 * (h + note_h + gutter) + text_h + extra_h), "white")
    draw = ImageDraw.Draw(canvas)

    def tile_row(y: int, imgs: np.ndarray, row_notes: Sequence[str], row_flags: Sequence[bool]) -> None:
        for i, img in enumerate(imgs):
            x = margin + i * (w + gutter)
            canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x, y))
            if row_flags[i]:
                draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(230, 0, 0), width=2)
            if row_notes[i]:
                lines = [line[: chars + 2] for line in row_notes[i].split("\n")[:2]]
                draw.multiline_text((x + 1, y + h), "\n".join(lines), fill="black", font=font, spacing=1)

    for row, (name, imgs, row_notes, row_flags) in enumerate(rows):
        y = row * (h + note_h + gutter)
        draw.text((2, y + h // 2 - 5), name, fill="black", font=font)
        tile_row(y, imgs, row_notes, row_flags)
    for i, lines in enumerate(wrapped):
        draw.multiline_text(
            (margin + i * (w + gutter), 2 * (h + note_h + gutter) + 1), "\n".join(lines), fill="black", font=font
        )
    if extra is not None:
        y = 2 * (h + note_h + gutter) + text_h
        draw.text((2, y), extra[0], fill="black", font=font)
        if extra_imgs is not None:
            tile_row(y + 14, extra_imgs, extra[2], [True] * len(extra_imgs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def verdict_note(verdict: dict | None, fitted: str | None = None) -> str:
    """A tile's caption: the judge's shape (``?`` where it abstains) and, below it, the geometric fit's."""
    if verdict is None:
        return ""
    shape = verdict.get("shape") or "?"
    return shape if fitted is None else f"{shape}\nfit: {fitted}"


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
        [i for i in usable if retained(items[i], erased)]
    )
    picked: list[int] = []
    while len(picked) < columns and any(groups):
        for group in groups:  # round robin so every group shows
            if group and len(picked) < columns:
                picked.append(group.pop(0))
    return picked


def save_report_grid(report: EvalReport, path: str | Path, columns: int = 12) -> Path:
    """Before/after grid of a report evaluated with a ``reference`` (base on top, model under test below).

    Under each tile of the model under test: the judge's shape (``?``: it abstains) and the geometric
    fit's; red frames mark tiles where the two disagree, and a third row lists the images they disagree on.

    Example:
        >>> save_report_grid(evaluate(pipe, ["circle"], reference=base), "no-circle.png")
    """
    if report.base_images is None:
        raise ValueError("this report has no base images: evaluate with reference=<base pipeline or report>")
    cols = pick_columns(report, columns)
    labels = [report.items[i].prompt for i in cols]
    fitted = report.fitted
    notes_after = [verdict_note(report.judged[i], fitted[i] if fitted else None) for i in cols]
    disagree = report.disagreements()
    flags_after = [i in set(disagree) for i in cols]
    extra = None
    if fitted is not None:
        shown = disagree[:columns]
        title = (
            f"judge and geometric fit disagree on {len(disagree)} images"
            + (f" (first {len(shown)}):" if len(disagree) > len(shown) else ":")
            if disagree
            else "judge and geometric fit agree on every image"
        )
        extra = (title, report.images[shown], [verdict_note(report.judged[i], fitted[i]) for i in shown])
    return save_grid(
        report.base_images[cols],
        report.images[cols],
        path,
        labels,
        notes=([""] * len(cols), notes_after),
        flagged=([False] * len(cols), flags_after),
        extra=extra,
    )


def save_rows(
    rows: Sequence[tuple[str, np.ndarray, Sequence[str], Sequence[bool]]],
    path: str | Path,
    labels: Sequence[str] = (),
    *,
    scale: int = 3,
) -> Path:
    """Save a grid of titled rows ``(title, images, notes, flagged)``; ``labels`` go under the columns.

    Like :func:`save_grid` with any number of rows: a note under each tile, a red frame on flagged ones.

    Example:
        >>> save_rows([("base", base_imgs, ["circle"] * 8, [True] * 8), ("attacked", imgs, notes, flags)],
        ...           "attack.png", labels=prompts)
    """
    font = ImageFont.load_default()
    arrays = [_to_uint8(images) for _, images, _, _ in rows]
    h = w = (arrays[0].shape[1] * scale) if arrays else 0
    gutter, margin, note_h = 2, 120, 14
    chars = max(4, w // 6)
    wrapped = [textwrap.wrap(label, chars)[:4] for label in labels]
    text_h = 14 * max((len(lines) for lines in wrapped), default=0) + 4
    n = max([len(a) for a in arrays] + [len(wrapped)], default=0)
    canvas = Image.new("RGB", (margin + n * (w + gutter), len(rows) * (h + note_h + gutter) + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, ((title, _, notes, flags), images) in enumerate(zip(rows, arrays, strict=True)):
        y = r * (h + note_h + gutter)
        lines = [line[:20] for line in title.split("\n")[:2]]
        draw.multiline_text((2, y + h // 2 - 7 * len(lines)), "\n".join(lines), fill="black", font=font)
        for i, img in enumerate(images):
            x = margin + i * (w + gutter)
            canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (x, y))
            if i < len(flags) and flags[i]:
                draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(230, 0, 0), width=2)
            if i < len(notes) and notes[i]:
                draw.text((x + 1, y + h), notes[i][: chars + 2], fill="black", font=font)
    for i, lines in enumerate(wrapped):
        draw.multiline_text((margin + i * (w + gutter), len(rows) * (h + note_h + gutter) + 1), "\n".join(lines),
                            fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
