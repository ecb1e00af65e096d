"""Deterministic renderer of toy-world scenes: one coloured shape on a grey texture.

Shapes are drawn as inside-tests on a supersampled grid (anti-aliasing by box filtering), at a
random position, size (about 55-75% of the image) and a small rotation (so square and diamond
stay distinct). Backgrounds are neutral greys, so the shape's colour is what reads as colour.

Example:
    >>> from forgetpatch.toy.render import render
    >>> from forgetpatch.toy.vocab import Scene
    >>> render(Scene("circle", "red", "stripes"), seed=0).shape
    (32, 32, 3)
"""

from __future__ import annotations

import numpy as np

from forgetpatch.toy.vocab import COLOURS, SHAPES, TEXTURES, Scene

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_MAX_ROTATION = np.deg2rad(15.0)


def _regular_polygon(x: np.ndarray, y: np.ndarray, n: int, radius: float, phase: float) -> np.ndarray:
    """Inside-test for a regular ``n``-gon of circumradius ``radius``."""
    apothem = radius * np.cos(np.pi / n)
    inside = np.ones_like(x, dtype=bool)
    for k in range(n):
        a = phase + (2 * k + 1) * np.pi / n
        inside &= x * np.cos(a) + y * np.sin(a) <= apothem
    return inside


def _star(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Inside-test for a five-pointed star pointing up (union of the pentagon and five spikes)."""
    inner = radius * 0.45
    angle = np.arctan2(x, -y)  # 0 pointing up
    r = np.hypot(x, y)
    sector = np.mod(angle, 2 * np.pi / 5) - np.pi / 5  # in [-pi/5, pi/5), 0 at a spike
    # distance along the edge from the spike tip (radius, 0) to the inner vertex (inner, pi/5)
    tip = np.array([radius, 0.0])
    valley = np.array([inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)])
    px, py = r * np.cos(np.abs(sector)), r * np.sin(np.abs(sector))
    ex, ey = valley - tip
    cross = ex * (py - tip[1]) - ey * (px - tip[0])
    return cross >= 0


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Inside-test of ``shape`` centred at the origin in a frame where ``y`` grows downwards."""
    r = np.hypot(x, y)
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return r <= radius
    if shape == "ellipse":
        return (x / radius) ** 2 + (y / (0.6 * radius)) ** 2 <= 1
    if shape == "ring":
        return (r <= radius) & (r >= 0.55 * radius)
    if shape == "square":
        return np.maximum(ax, ay) <= 0.8 * radius
    if shape == "rectangle":
        return (ax <= radius) & (ay <= 0.5 * radius)
    if shape == "diamond":
        return ax / (0.75 * radius) + ay / (1.1 * radius) <= 1
    if shape == "triangle":
        return _regular_polygon(x, y - 0.25 * radius, 3, 1.25 * radius, np.pi / 2 + np.pi / 3)
    if shape == "star":
        return _star(x, y, 1.1 * radius)
    if shape == "cross":
        arm = 0.33 * radius
        return ((ax <= arm) & (ay <= radius)) | ((ay <= arm) & (ax <= radius))
    if shape == "hexagon":
        return _regular_polygon(x, y, 6, radius, 0.0)
    raise KeyError(f"unknown shape {shape!r}; known: {SHAPES}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey level in [0, 1] of ``texture`` at pixel coordinates ``u`` (x) and ``v`` (y)."""
    dark, light = 0.32, 0.68
    ou, ov = rng.uniform(0, 8, size=2)
    u, v = u + ou, v + ov
    if texture == "plain":
        return np.full_like(u, rng.uniform(0.45, 0.55))
    if texture == "stripes":  # diagonal stripes, period 6 px
        return np.where(np.mod((u + v) / 6.0, 1.0) < 0.5, dark, light)
    if texture == "dots":  # dark dots on a light ground, period 6 px
        du, dv = np.mod(u, 6.0) - 3.0, np.mod(v, 6.0) - 3.0
        return np.where(du**2 + dv**2 <= 1.4**2, dark - 0.1, light)
    if texture == "grid":  # thin dark lines on a light ground, period 8 px
        return np.where((np.mod(u, 8.0) < 1.2) | (np.mod(v, 8.0) < 1.2), dark - 0.1, light + 0.05)
    if texture == "checker":  # 5 px squares
        return np.where((np.floor(u / 5.0) + np.floor(v / 5.0)) % 2 == 0, dark, light)
    raise KeyError(f"unknown texture {texture!r}; known: {TEXTURES}")


def render(scene: Scene, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``scene`` as an RGB ``uint8`` array of shape ``(size, size, 3)``.

    The same ``(scene, seed, size)`` always gives the same pixels; the seed picks position,
    size, rotation and texture phase.

    Example:
        >>> img = render(Scene("star", "blue", "checker"), seed=3)
        >>> img.dtype, img.shape
        (dtype('uint8'), (32, 32, 3))
    """
    if scene.colour not in COLOURS:
        raise KeyError(f"unknown colour {scene.colour!r}; known: {tuple(COLOURS)}")
    rng = np.random.default_rng([seed, size, SHAPES.index(scene.shape) if scene.shape in SHAPES else 99])
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE  # pixel units of the final image
    u, v = np.meshgrid(coords, coords)  # u: x (columns), v: y (rows)

    radius = rng.uniform(0.27, 0.38) * size
    margin = 0.85 * radius
    cx, cy = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
    dx, dy = u - cx, v - cy
    x = np.cos(theta) * dx + np.sin(theta) * dy
    y = -np.sin(theta) * dx + np.cos(theta) * dy
    mask = shape_mask(scene.shape, x, y, radius).astype(np.float64)

    grey = _texture(scene.texture, u, v, rng)
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float64) / 255.0
    img = grey[..., None] * (1 - mask[..., None]) + colour * mask[..., None]
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene], seeds: list[int], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render several scenes into an ``N x size x size x 3`` ``uint8`` array."""
    if len(scenes) != len(seeds):
        raise ValueError(f"got {len(scenes)} scenes but {len(seeds)} seeds")
    return np.stack([render(s, seed, size) for s, seed in zip(scenes, seeds, strict=True)])
