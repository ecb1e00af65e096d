"""A geometric second opinion on a toy-world image's shape: segment the shape, fit every outline to it.

Nothing here is learned. The toy world draws one saturated shape on a neutral grey texture, so:

1. **Segment.** A pixel's chroma is its colour minus its grey level (``rgb - mean(rgb)``); greys have
   none. After removing a global colour cast (estimated on the background) and a light ``[1, 2, 1]``
   smoothing against noise, the chroma's length is thresholded at half the shape's own level (and at
   least :data:`CHROMA_MIN`); blobs under :data:`BLOB_MIN_PX` pixels are specks and are dropped.
   A pixel's coverage by the shape is its unsmoothed chroma length over that level (a grey plus a
   fraction ``a`` of a colour has ``a`` times the colour's chroma, whatever the grey).
2. **Fit.** Each of the toy world's shapes is drawn by the renderer's own inside-test
   (:func:`forgetpatch.toy.render.shape_mask`) once, at unit radius, into a fine look-up table of
   pixel coverage (rings also with a smaller and a bigger hole). A candidate ``(centre, radius,
   rotation)`` is drawn by sampling that table at every pixel; its score is the soft IoU with the
   foreground's coverage, ``sum(min) / sum(max)``, where the whole candidate counts, also any part off
   the image (a shape is seen whole). Each shape starts at the foreground's centroid with the radius
   that gives its area and the best of a few rotations (within +-25 degrees); a compass search then
   refines centre, radius and rotation. All candidates of a step are scored in one numpy batch.
3. **Decide.** The best-scoring shape is the answer, unless there is no foreground (``"none"``),
   several separate blobs, the best IoU is below :data:`FIT_MIN_IOU` or the best fit is too small to
   tell shapes apart (:data:`RADIUS_MIN_PX`) (``"unclear"``).

Example:
    >>> from forgetpatch.toy.render import render
    >>> from forgetpatch.toy.vocab import Scene
    >>> fit_shape(render(Scene("star", "blue", "checker"), seed=3)).shape
    'star'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from forgetpatch.toy import SHAPES, shape_mask

#: Below this soft IoU the best fit is not trusted and the shape is ``"unclear"``. Measured: clean renders
#: fit at 0.93-0.99; degraded renders (:mod:`forgetpatch.toy.degrade`) that a person names fit above 0.75
#: in 99.9% of cases (0.80: 99%, 0.85: 94%), while 42% of those a person calls unclear fall below it or
#: split in blobs (the rest are mostly in-between outlines that fit one shape well); the toy model's own
#: images fit at 0.78 or more in 95% of cases.
FIT_MIN_IOU = 0.75
#: Chroma (length of ``rgb - mean(rgb)``, in [0, 1] units) a foreground pixel has at least.
CHROMA_MIN = 0.12
#: Foreground blobs smaller than this many pixels are specks, not shapes.
BLOB_MIN_PX = 6
#: A best fit with a smaller radius (pixels) is too small to tell one shape from another: ``"unclear"``.
RADIUS_MIN_PX = 4.0

_MAX_ROTATION = np.deg2rad(25.0)
_MAX_RADIUS = 0.45  # of the image size; the renderer draws at most 0.38, degraded renders 0.40
#: Shapes that look the same at every rotation (their rotation is not searched).
_ROUND = frozenset({"circle", "ring"})
#: The outlines fitted, as ``(shape, hole)``: every shape as the renderer draws it (its ring's hole is 0.55
#: of the radius) and rings with a bigger and a smaller hole, as a ring drawn by hand or by a model is.
_OUTLINES: tuple[tuple[str, float], ...] = (*((s, 0.0) for s in SHAPES), ("ring", 0.4), ("ring", 0.7))
_LUT_HALF = 1.4  # the look-up table covers [-1.4, 1.4]^2 in unit-radius coordinates
_LUT_CELLS = 168
_REF_RADIUS = 10.0  # pixel footprint the table is box-filtered with: 1 / _REF_RADIUS units
_MARGIN = 3  # pixels around the foreground that candidates are scored on
_CAST_MAX = 0.25  # largest colour cast removed (chroma over grey level); real casts are under ~0.15
_ITERATIONS, _PRUNE_AFTER, _PRUNE_GAP = 14, 4, 0.12


@dataclass(frozen=True)
class Fit:
    """The best-fitting shape outline of one image, and how well it fits.

    Example:
        >>> from forgetpatch.toy.render import render
        >>> from forgetpatch.toy.vocab import Scene
        >>> fit = fit_shape(render(Scene("hexagon", "green", "dots"), seed=1))
        >>> fit.shape, round(fit.iou, 2), fit.runner_up, round(fit.runner_up_iou, 2), fit.components
        ('hexagon', 0.99, 'circle', 0.94, 1)
    """

    shape: str
    """Best-fitting shape; ``"none"`` without foreground; ``"unclear"`` for several blobs, a poor fit
    (:data:`FIT_MIN_IOU`) or one too small to tell (:data:`RADIUS_MIN_PX`)."""
    iou: float
    """Soft IoU of the best fit with the foreground's coverage (of the largest blob if there are several;
    0.0 for ``"none"``)."""
    runner_up: str | None
    """The second-best shape (``None`` for ``"none"``)."""
    runner_up_iou: float
    cx: float
    """Best fit's centre, x (column) in pixels, in the renderer's convention (NaN for ``"none"``)."""
    cy: float
    """Best fit's centre, y (row) in pixels."""
    radius: float
    """Best fit's radius in pixels, as the renderer's ``radius``."""
    rotation: float
    """Best fit's rotation in radians, as the renderer's ``theta`` (0 for circle and ring)."""
    components: int
    """Number of separate foreground blobs of at least :data:`BLOB_MIN_PX` pixels."""
    area: float
    """Foreground area as a fraction of the image."""


@cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per outline: coverage table (``_LUT_CELLS`` square, float32), area and centroid ``(x, y)`` at unit
    radius."""
    ss = 2  # inside-tests per table cell and axis
    n = _LUT_CELLS * ss
    cell = 2 * _LUT_HALF / n
    coords = -_LUT_HALF + (np.arange(n) + 0.5) * cell
    x, y = np.meshgrid(coords, coords)
    width = int(round(1.0 / _REF_RADIUS / cell))  # one pixel's footprint, in fine cells
    tables, areas, centroids = [], [], []
    for shape, hole in _OUTLINES:
        if hole:  # a ring with another hole than the renderer's
            inside = shape_mask("circle", x, y, 1.0) & ~shape_mask("circle", x, y, hole)
        else:
            inside = shape_mask(shape, x, y, 1.0)
        inside = inside.astype(np.float64)
        areas.append(inside.mean() * (2 * _LUT_HALF) ** 2)
        centroids.append((x[inside > 0].mean(), y[inside > 0].mean()))
        cover = _box(_box(inside, width, axis=0), width, axis=1)
        tables.append(_ramp(cover.reshape(_LUT_CELLS, ss, _LUT_CELLS, ss).mean(axis=(1, 3))))
    return np.stack(tables).astype(np.float32), np.array(areas), np.array(centroids)


def _ramp(a: np.ndarray) -> np.ndarray:
    """Coverage with noise under 0.15 cut to 0 and over 0.85 to 1 (0.5 stays 0.5, where the edge is)."""
    return np.clip((a - 0.15) / 0.7, 0.0, 1.0)


def _box(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Moving average of ``width`` samples along ``axis`` (zero outside), same size."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (width // 2 + 1, width - width // 2 - 1)
    c = np.cumsum(np.pad(a, pad), axis=axis)
    n = a.shape[axis]
    return (np.take(c, range(width, width + n), axis=axis) - np.take(c, range(n), axis=axis)) / width


def _as_float(image: Any) -> np.ndarray:
    """``H x W x 3`` float64 in [0, 1] from uint8 (0..255), float ([0, 1]) or a PIL image."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:  # to 8 bits, so that every input form of an image fits the same
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0)
    return arr[..., :3] / 255.0


def _smooth(a: np.ndarray) -> np.ndarray:
    """``[1, 2, 1] / 4`` smoothing along both image axes (edges repeated)."""
    for axis in (0, 1):
        p = np.pad(a, [(1, 1) if i == axis else (0, 0) for i in range(a.ndim)], mode="edge")
        lo, mid, hi = (np.take(p, range(k, k + a.shape[axis]), axis=axis) for k in range(3))
        a = (lo + 2 * mid + hi) / 4
    return a


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 dilation of a boolean mask."""
    return _neighbours(mask, np.max, False)


def _neighbours(a: np.ndarray, reduce: Any, fill: Any) -> np.ndarray:
    """``reduce`` (``np.min`` or ``np.max``) over each pixel's 3 x 3 neighbourhood (``fill`` outside)."""
    h, w = a.shape
    p = np.pad(a, 1, constant_values=fill)
    rows = reduce([p[i : i + h] for i in range(3)], axis=0)
    return reduce([rows[:, j : j + w] for j in range(3)], axis=0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of ``mask`` as boolean masks, largest first."""
    big = mask.size + 1
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    while True:  # spread the smallest id through each blob
        spread = np.where(mask, _neighbours(labels, np.min, big), big)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, sizes = np.unique(labels[mask], return_counts=True)
    return [labels == i for i in ids[np.argsort(-sizes, kind="stable")]]


def _foreground(image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Chroma-based foreground of a float image: ``(coverage, blobs)``, blobs largest first, specks dropped.

    ``coverage`` (in [0, 1]) is the chroma's length over the shape's own level: the fraction of each
    pixel the shape covers, as a grey plus a colour is ``grey + a * (colour - grey)``.
    """
    grey = image.mean(axis=-1, keepdims=True)
    chroma = image - grey
    background = np.linalg.norm(chroma, axis=-1) <= np.percentile(np.linalg.norm(chroma, axis=-1), 40)
    for _ in range(2):  # a colour cast is chroma proportional to the grey level: estimate it off the shape
        cast = np.median(chroma[background] / np.maximum(grey[background], 0.05), axis=0)
        cast *= min(1.0, _CAST_MAX / max(float(np.linalg.norm(cast)), 1e-9))  # a cast, not a colour
        length = np.linalg.norm(_smooth(chroma - cast * grey), axis=-1)  # smoothed against noise
        level = max(np.sort(length.ravel())[-min(20, length.size)], CHROMA_MIN)  # the shape's own chroma
        mask = length > max(CHROMA_MIN, 0.5 * level)
        if (~_dilate(mask)).sum() >= 16:
            background = ~_dilate(mask)
    blobs = [b for b in _components(mask) if b.sum() >= BLOB_MIN_PX]
    coverage = _ramp(np.linalg.norm(chroma - cast * grey, axis=-1) / level)
    return coverage, blobs


def segment(image: np.ndarray) -> np.ndarray:
    """``H x W`` boolean foreground mask (the coloured shape) of one ``H x W x 3`` image.

    ``image`` is uint8 in 0..255 or float in [0, 1]. Specks under :data:`BLOB_MIN_PX` pixels are dropped.

    Example:
        >>> from forgetpatch.toy.render import render
        >>> from forgetpatch.toy.vocab import Scene
        >>> mask = segment(render(Scene("square", "red", "grid"), seed=0))
        >>> mask.shape, mask.dtype
        ((32, 32), dtype('bool'))
    """
    blobs = _foreground(_as_float(image))[1]
    return np.any(blobs, axis=0) if blobs else np.zeros(np.shape(image)[:2], dtype=bool)


def _score(target: np.ndarray, u: np.ndarray, v: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Soft IoU with ``target`` (coverage at pixel centres ``u``, ``v``, all flat) of candidates ``params``:
    ``K x 5`` rows of ``(shape index, cx, cy, radius, rotation)``."""
    tables = _tables()[0]
    k, cx, cy, r, th = params.T
    scale = _LUT_CELLS / (2 * _LUT_HALF)
    c, s = np.cos(th) / r * scale, np.sin(th) / r * scale
    # table column and row of each pixel: the pixel rotated into the shape's frame, scaled to cells
    e = _LUT_HALF * scale + 0.5
    col = np.stack([c, s, e - c * cx - s * cy], 1).astype(np.float32) @ np.stack([u, v, np.ones_like(u)])
    row = np.stack([-s, c, e + s * cx - c * cy], 1).astype(np.float32) @ np.stack([u, v, np.ones_like(u)])
    np.clip(col, 0, _LUT_CELLS - 1, out=col)
    np.clip(row, 0, _LUT_CELLS - 1, out=row)
    flat = row.astype(np.intp)
    flat *= _LUT_CELLS
    flat += col.astype(np.intp)
    flat += (k.astype(np.intp) * _LUT_CELLS**2)[:, None]
    cover = tables.ravel()[flat]
    inter = np.minimum(cover, target).sum(axis=1)
    # all of the candidate counts, also where it leaves the box or the image: a shape is seen whole
    mass = tables.sum(axis=(1, 2))[k.astype(np.intp)] * (r / scale) ** 2
    return inter / (mass + target.sum() - inter)


def _fit(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every outline's best ``(outline index, cx, cy, radius, rotation)`` row and its soft IoU."""
    _, areas, centroids = _tables()
    rows, cols = np.nonzero(coverage)
    top, left = max(rows.min() - _MARGIN, 0), max(cols.min() - _MARGIN, 0)
    box = coverage[top : rows.max() + _MARGIN + 1, left : cols.max() + _MARGIN + 1]
    v, u = (a.ravel().astype(np.float32) + 0.5 for a in np.indices(box.shape))
    u += left
    v += top
    target = box.ravel().astype(np.float32)
    total = target.sum()
    mx, my = (target * u).sum() / total, (target * v).sum() / total
    n = len(_OUTLINES)
    largest = _MAX_RADIUS * min(coverage.shape)  # a shape bigger than this is no toy shape, it is the frame
    radius = np.sqrt(total / areas)
    # start: centroid, area-matched radius, the best of 9 rotations and 3 sizes
    rots = np.linspace(-_MAX_ROTATION, _MAX_ROTATION, 9)
    grid = np.array(
        [
            (i, rho, 0.0 if _OUTLINES[i][0] in _ROUND else t)
            for i in range(n)
            for rho in (0.92, 1.0, 1.08)
            for t in rots
        ]
    )
    k = grid[:, 0].astype(int)
    r0 = np.minimum(radius[k] * grid[:, 1], largest)
    ox, oy = centroids[k, 0] * r0, centroids[k, 1] * r0  # centroid offset, rotated into the image
    cos, sin = np.cos(grid[:, 2]), np.sin(grid[:, 2])
    cand = np.stack([grid[:, 0], mx - (cos * ox - sin * oy), my - (sin * ox + cos * oy), r0, grid[:, 2]], 1)
    iou = _score(target, u, v, cand).reshape(n, -1)
    best = cand.reshape(n, -1, 5)[np.arange(n), iou.argmax(axis=1)]
    best_iou = iou.max(axis=1)
    # compass search on (cx, cy, radius, rotation): try +-step on each, take the best, else halve the steps
    step = np.tile([1.0, 1.0, 0.06, np.deg2rad(6.0)], (n, 1))
    step[[i for i, (s, _) in enumerate(_OUTLINES) if s in _ROUND], 3] = 0.0
    moves = np.concatenate([np.eye(4), -np.eye(4)])
    live = np.arange(n)
    for it in range(_ITERATIONS):
        if it == _PRUNE_AFTER:  # shapes far behind will not come first or second
            live = live[best_iou[live] >= np.sort(best_iou)[-2] - _PRUNE_GAP]
        delta = moves[None] * step[live, None]  # live x 8 x 4
        delta[..., 2] *= best[live, None, 3]
        cand = np.repeat(best[live, None], 8, axis=1)
        cand[..., 1:] += delta
        cand[..., 3] = np.clip(cand[..., 3], 1.0, largest)
        cand[..., 4] = np.clip(cand[..., 4], -_MAX_ROTATION, _MAX_ROTATION)
        iou = _score(target, u, v, cand.reshape(-1, 5)).reshape(len(live), 8)
        j = iou.argmax(axis=1)
        top_iou = iou[np.arange(len(live)), j]
        better = top_iou > best_iou[live]
        best[live[better]] = cand[better, j[better]]
        best_iou[live[better]] = top_iou[better]
        step[live[~better]] /= 2
    return best, best_iou


def _none() -> Fit:
    nan = float("nan")
    return Fit("none", 0.0, None, 0.0, nan, nan, nan, nan, 0, 0.0)


def fit_shape(image: Any) -> Fit:
    """Fit every toy-world shape outline to the foreground of one image and report the best.

    ``image``: ``H x W x 3`` uint8 (0..255) or float ([0, 1]) array, or a PIL image. With several
    blobs the largest is fitted (and the shape is ``"unclear"``).

    Example:
        >>> from forgetpatch.toy.render import render
        >>> from forgetpatch.toy.vocab import Scene
        >>> fit = fit_shape(render(Scene("cross", "pink", "stripes"), seed=2))
        >>> fit.shape, fit.iou > FIT_MIN_IOU, fit.components
        ('cross', True, 1)
    """
    coverage, blobs = _foreground(_as_float(image))
    if not blobs:
        return _none()
    target = coverage * _dilate(blobs[0])
    params, iou = _fit(target if target.sum() >= 1 else blobs[0].astype(np.float64))
    best: dict[str, int] = {}  # each shape's best outline
    for i in np.argsort(-iou):
        best.setdefault(_OUTLINES[i][0], i)
    (first, i), (second, j) = list(best.items())[:2]
    _, cx, cy, radius, rotation = (float(p) for p in params[i])
    clear = len(blobs) == 1 and iou[i] >= FIT_MIN_IOU and radius >= RADIUS_MIN_PX
    return Fit(
        shape=first if clear else "unclear",
        iou=float(iou[i]),
        runner_up=second,
        runner_up_iou=float(iou[j]),
        cx=cx,
        cy=cy,
        radius=radius,
        rotation=rotation,
        components=len(blobs),
        area=float(sum(b.sum() for b in blobs) / coverage.size),
    )


def fit_shapes(images: np.ndarray | Sequence[Any]) -> list[Fit]:
    """:func:`fit_shape` of each image: an ``N x H x W x 3`` uint8 or float ([0, 1]) array, or a list
    of arrays or PIL images.

    Example:
        >>> from forgetpatch.toy.render import render_batch
        >>> from forgetpatch.toy.vocab import Scene
        >>> images = render_batch([Scene("circle", "red", "plain"), Scene("cross", "blue", "grid")], [0, 1])
        >>> [f.shape for f in fit_shapes(images)]
        ['circle', 'cross']
    """
    return [fit_shape(image) for image in images]
