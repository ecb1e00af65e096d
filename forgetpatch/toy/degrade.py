"""Renders degraded the way generated images are, with the label a person would give them.

The judge (:mod:`forgetpatch.toy.judge`) learns from these. A generated image is rarely a clean
render: edges wobble, corners round off, shapes shrink, fade, blur, come out half-drawn, turn into
something between two neighbours, appear twice or not at all. Each sample here is one such case,
labelled as a person looking at it would label it:

* an outline is named after the clean shape it is nearest to (:func:`outline_label`), when it is
  clearly nearer to it than to any other; wobbly, rounded, smaller and blurred shapes keep their name
  while they stay near it, and a morph between two neighbours is named only near one end;
* an outline about as near to two shapes (a lumpy disc is as much a hexagon as a circle), or near to
  none, a shape cut to less than :data:`VISIBLE_MIN` of itself, one too small to tell, and two shapes
  in one image are "unclear" (no single shape);
* a background with nothing on it is "none" (no shape: the concept is gone).

Shapes are drawn from their outline in polar form: ``inside <=> r <= R * rho(theta)`` with ``rho``
sampled from the renderer's own inside-tests (every toy shape is star-shaped around its centre;
the ring adds a hole). Warps act on ``rho`` (smoothing rounds corners, low harmonics make lumps)
and on the pixel grid (a smooth displacement makes edges wobble).

Example:
    >>> image, labels = degraded_sample(np.random.default_rng(0))
    >>> image.shape, sorted(labels)
    ((32, 32, 3), ['colour', 'shape', 'texture'])
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from forgetpatch.toy import vocab
from forgetpatch.toy.render import _MAX_ROTATION, IMAGE_SIZE, _texture, shape_mask

#: The shape head's outcomes besides the ten shapes: nothing drawn, and no single clear shape.
NO_SHAPE = "none"
UNCLEAR = "unclear"
SHAPE_LABELS: tuple[str, ...] = (*vocab.SHAPES, NO_SHAPE, UNCLEAR)
#: The colour head's outcomes besides the eight colours (no shape, or shapes of several colours).
COLOUR_LABELS: tuple[str, ...] = (*vocab.COLOURS, UNCLEAR)
TEXTURE_LABELS: tuple[str, ...] = vocab.TEXTURES
#: What the judge (:meth:`forgetpatch.toy.judge.ToyJudge.classify`) says of one image: a label per kind
#: (``None``: it abstains; shape :data:`NO_SHAPE`: nothing drawn) and ``"p"``, the calibrated
#: probability of every outcome per kind.
Verdict = dict[str, Any]

#: A shape cut to less than this fraction of its area is "unclear" (half a disc is no disc).
VISIBLE_MIN = 0.8
#: Circumradius in pixels below which a shape is too small to name.
RADIUS_MIN_PX = 4.5
#: An outline is named after its nearest shape when that one is at most this fraction of the distance
#: to the second nearest, and at most :data:`OUTLINE_MAX` away (relative RMS radius difference).
OUTLINE_MARGIN = 0.7
OUTLINE_MAX = 0.12
#: A ring's hole (fraction of its radius) at least this big reads as a ring; below ``HOLE_SEEN`` as a disc.
HOLE_RING, HOLE_SEEN = 0.35, 0.12

_ANGLES = 720
_SS = 4  # supersampling, as the renderer


@cache
def outline(shape: str) -> np.ndarray:
    """``rho(theta)`` of ``shape`` at unit radius, ``_ANGLES`` angles from 0 (x axis, y down)."""
    theta = np.linspace(0, 2 * np.pi, _ANGLES, endpoint=False)
    lo, hi = np.zeros(_ANGLES), np.full(_ANGLES, 2.0)
    probe = "circle" if shape == "ring" else shape
    for _ in range(30):  # bisection along each ray; every shape is star-shaped around the origin
        mid = (lo + hi) / 2
        inside = shape_mask(probe, mid * np.cos(theta), mid * np.sin(theta), 1.0)
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    return lo


def _normalised(rho: np.ndarray) -> np.ndarray:
    return rho / np.sqrt(np.mean(rho**2))


@cache
def _references() -> np.ndarray:
    """Every disc-like shape's normalised outline at each rotation the renderer uses (+-25 deg)."""
    shifts = range(-50, 51, 2)  # half a degree per index
    return np.stack([[np.roll(_normalised(outline(s)), k) for k in shifts] for s in _DISCS])


_DISCS = tuple(s for s in vocab.SHAPES if s != "ring")


def outline_label(rho: np.ndarray, hole: float = 0.0) -> str:
    """What a person calls the outline ``rho(theta)`` (with a hole of ``hole`` times the radius).

    The nearest clean shape (relative RMS distance, best rotation) when it is clearly the nearest,
    else :data:`UNCLEAR`. Example: ``outline_label(outline("hexagon")) == "hexagon"``.
    """
    dist = np.sqrt(np.mean((_references() - _normalised(rho)) ** 2, axis=2)).min(axis=1)
    first, second = np.argsort(dist)[:2]
    if dist[first] > OUTLINE_MAX or dist[first] > OUTLINE_MARGIN * dist[second]:
        return UNCLEAR
    name = _DISCS[first]
    if hole >= HOLE_SEEN:
        return "ring" if name == "circle" and hole >= HOLE_RING else UNCLEAR
    return name


def _smooth_periodic(rho: np.ndarray, width: float) -> np.ndarray:
    """Circular Gaussian smoothing of ``rho`` over ``width`` radians (rounds corners)."""
    if width <= 0:
        return rho
    k = np.fft.rfftfreq(_ANGLES, d=1.0 / _ANGLES)
    return np.fft.irfft(np.fft.rfft(rho) * np.exp(-0.5 * (k * width) ** 2), n=_ANGLES)


def _lumps(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A relative radius change made of harmonics 2..8, ``amplitude`` at most."""
    theta = np.linspace(0, 2 * np.pi, _ANGLES, endpoint=False)
    out = np.zeros(_ANGLES)
    for k in range(2, 9):
        out += rng.normal() / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    peak = np.abs(out).max()
    return out * (amplitude / peak) if peak > 0 else out


def _coverage(
    rho: np.ndarray,
    hole: float,
    cx: float,
    cy: float,
    radius: float,
    theta0: float,
    rng: np.random.Generator,
    wobble: float,
    cut: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Supersampled coverage (``IMAGE_SIZE`` x ``IMAGE_SIZE``, in [0, 1]) of one outline."""
    n = IMAGE_SIZE * _SS
    coords = (np.arange(n) + 0.5) / _SS
    u, v = np.meshgrid(coords, coords)
    if wobble > 0:  # a smooth displacement field: wobbly edges
        for axis in (0, 1):
            f = rng.uniform(0.15, 0.45, size=2)
            shift = wobble * np.sin(f[0] * u + rng.uniform(0, 6.3)) * np.cos(f[1] * v + rng.uniform(0, 6.3))
            if axis == 0:
                u = u + shift
            else:
                v = v + shift
    dx, dy = u - cx, v - cy
    x = np.cos(theta0) * dx + np.sin(theta0) * dy
    y = -np.sin(theta0) * dx + np.cos(theta0) * dy
    r = np.hypot(x, y)
    idx = np.mod(np.arctan2(y, x), 2 * np.pi) / (2 * np.pi) * _ANGLES
    lo = np.floor(idx).astype(int) % _ANGLES
    frac = idx - np.floor(idx)
    edge = radius * ((1 - frac) * rho[lo] + frac * rho[(lo + 1) % _ANGLES])
    inside = r <= edge
    if hole > 0:
        inside &= r >= hole * edge
    if cut is not None:  # keep one side of a line through the shape
        nx, ny, offset = cut
        inside &= nx * dx + ny * dy <= offset
    return inside.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))


def _area(rho: np.ndarray, hole: float) -> float:
    return float(np.mean(rho**2) * (1 - hole**2))


def degraded_sample(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, str]]:
    """One degraded image (``uint8``, 32 x 32 x 3) and the labels a person would give it.

    ``labels``: ``{"shape": shape | "none" | "unclear", "colour": colour | "unclear", "texture": texture}``.
    """
    texture = str(rng.choice(vocab.TEXTURES))
    n = IMAGE_SIZE * _SS
    coords = (np.arange(n) + 0.5) / _SS
    u, v = np.meshgrid(coords, coords)
    grey = _texture(texture, u, v, rng).reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))
    contrast = rng.uniform(0.6, 1.15)
    grey = 0.5 + (grey - 0.5) * contrast
    img = np.repeat(grey[..., None], 3, axis=2)

    case = rng.choice(
        ["plain", "morph", "small", "cut", "two", "empty", "lumpy"], p=[0.44, 0.16, 0.08, 0.09, 0.09, 0.07, 0.07]
    )
    blur = rng.uniform(0, 1.1) if rng.random() < 0.6 else 0.0
    if case == "empty":
        return _finish(img, blur, rng), {"shape": NO_SHAPE, "colour": UNCLEAR, "texture": texture}

    count = 2 if case == "two" else 1
    colours = [str(c) for c in rng.choice(list(vocab.COLOURS), size=count)]
    shape_label: str | None = None
    for j in range(count):
        shape = str(rng.choice(vocab.SHAPES))
        rho, hole = outline(shape), (rng.uniform(0.45, 0.65) if shape == "ring" else 0.0)
        if case == "morph":  # half the time towards a neighbour, else any shape (an erasure steered to a guide)
            pool = vocab.NEAR_NEIGHBOURS[shape] if rng.random() < 0.5 else [s for s in vocab.SHAPES if s != shape]
            other = str(rng.choice(pool))
            alpha = rng.uniform(0, 1)
            if "ring" in (shape, other):  # ring <-> disc: the hole closes
                hole_a = hole if shape == "ring" else 0.0
                hole_b = rng.uniform(0.45, 0.65) if other == "ring" else 0.0
                hole = (1 - alpha) * hole_a + alpha * hole_b
            rho = (1 - alpha) * rho + alpha * outline(other)
        scale = rng.uniform(0.27, 0.40) * IMAGE_SIZE
        if case == "small":
            scale *= rng.uniform(0.25, 0.75)
        elif count == 2:
            scale *= rng.uniform(0.45, 0.7)
        amplitude = rng.uniform(0.0, 0.08) if case != "lumpy" else rng.uniform(0.05, 0.35)
        rho = _smooth_periodic(rho, rng.uniform(0, 0.12) if rng.random() < 0.7 else 0.0)
        rho = np.maximum(rho * (1 + _lumps(rng, amplitude)), 0.05)
        # as seen: blur and the pixel grid round the outline over about (blur + half a pixel) of arc
        label = outline_label(_smooth_periodic(rho, (blur + 0.5) / scale), hole)
        if scale < RADIUS_MIN_PX:
            label = UNCLEAR
        theta0 = rng.uniform(-1.4 * _MAX_ROTATION, 1.4 * _MAX_ROTATION)
        if count == 2:
            cx = IMAGE_SIZE * (0.28 + 0.44 * j) + rng.uniform(-2, 2)
            cy = rng.uniform(0.3, 0.7) * IMAGE_SIZE
            if rng.random() < 0.5:
                cx, cy = cy, cx
        else:
            margin = 0.8 * scale
            cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
        cut = None
        if case == "cut":
            phi = rng.uniform(0, 2 * np.pi)
            cut = (np.cos(phi), np.sin(phi), rng.uniform(-0.6, 0.8) * scale)
        wobble = rng.uniform(0, 0.9) if rng.random() < 0.6 else 0.0
        cover = _coverage(rho, hole, cx, cy, scale, theta0, rng, wobble, cut)
        if case == "cut":
            whole = _coverage(rho, hole, cx, cy, scale, theta0, np.random.default_rng(0), 0.0)
            visible = cover.sum() / max(whole.sum(), 1e-6)
            label = label if visible >= VISIBLE_MIN else NO_SHAPE if visible < 0.05 else UNCLEAR
        elif cover.sum() < 0.3 * _area(rho, hole) * np.pi * scale**2:
            label = UNCLEAR  # mostly outside the frame
        opacity = rng.uniform(0.65, 1.0)
        colour = np.asarray(vocab.COLOURS[colours[j]], dtype=np.float64) / 255.0
        colour = np.clip(colour + rng.normal(0, 0.04, size=3), 0, 1)
        if rng.random() < 0.5:  # uneven paint: a smooth shade across the shape
            f = rng.uniform(0.1, 0.5, size=2)
            yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
            shade = 1 + rng.uniform(0, 0.15) * np.sin(f[0] * xx + f[1] * yy + rng.uniform(0, 6.3))
            colour = np.clip(colour * shade[..., None], 0, 1)
        a = (opacity * cover)[..., None]
        img = img * (1 - a) + colour * a
        shape_label = label if count == 1 else UNCLEAR
    colour_label = colours[0] if count == 1 or colours[0] == colours[1] else UNCLEAR
    if shape_label == NO_SHAPE:
        colour_label = UNCLEAR
    return _finish(img, blur, rng), {"shape": shape_label or UNCLEAR, "colour": colour_label, "texture": texture}


def _finish(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels, noise and colour cast, then ``uint8``."""
    if sigma > 0.2:
        k = np.arange(-3, 4)
        w = np.exp(-0.5 * (k / sigma) ** 2)
        w /= w.sum()
        pad = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="edge")
        img = sum(wi * pad[3 + ki : 3 + ki + IMAGE_SIZE, 3:-3] for ki, wi in zip(k, w, strict=True))
        pad = np.pad(img, ((0, 0), (3, 3), (0, 0)), mode="edge")
        img = sum(wi * pad[:, 3 + ki : 3 + ki + IMAGE_SIZE] for ki, wi in zip(k, w, strict=True))
    img = img * (1 + rng.normal(0, 0.05, size=3)) + rng.normal(0, 0.03)
    img = img + rng.uniform(0, 0.04) * rng.normal(size=img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def degraded_set(n: int, seed: int | list[int], workers: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` degraded samples: images (``N x 32 x 32 x 3`` uint8) and label indices per head.

    ``workers`` > 1 draws them in that many processes (chunk ``i`` seeded ``[seed, i]``), same result
    for the same ``workers``.
    """
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        sizes = [n // workers + (i < n % workers) for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(degraded_set, sizes, [[seed, i] for i in range(workers)]))
        return np.concatenate([p[0] for p in parts]), {
            k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]
        }
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    heads = {"shape": SHAPE_LABELS, "colour": COLOUR_LABELS, "texture": TEXTURE_LABELS}
    labels = {k: np.empty(n, dtype=np.int64) for k in heads}
    for i in range(n):
        images[i], lab = degraded_sample(rng)
        for k, names in heads.items():
            labels[k][i] = names.index(lab[k])
    return images, labels
