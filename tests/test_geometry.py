"""The geometric second opinion (forgetpatch.eval.geometry): segmentation and outline fitting."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from PIL import Image

from forgetpatch.eval.geometry import FIT_MIN_IOU, Fit, fit_shape, fit_shapes, segment
from forgetpatch.toy.render import _MAX_ROTATION, IMAGE_SIZE, _texture, render, shape_mask
from forgetpatch.toy.vocab import COLOURS, SHAPES, TEXTURES, Scene

_SS = 4  # supersampling, as the renderer


def _clean_set(n: int = 200) -> tuple[list[Scene], list[int], np.ndarray]:
    """``n`` renders covering every shape, colour and texture (40 shape-colour pairs per texture)."""
    scenes = [Scene(SHAPES[i % 10], list(COLOURS)[i % 8], TEXTURES[(i // 40) % 5]) for i in range(n)]
    seeds = [500 + i for i in range(n)]
    return scenes, seeds, np.stack([render(s, seed) for s, seed in zip(scenes, seeds, strict=True)])


def _drawn_at(scene: Scene, seed: int) -> tuple[float, float, float, float]:
    """The renderer's ``(cx, cy, radius, theta)`` for ``scene``: its seeded draws, replayed in its order."""
    rng = np.random.default_rng([seed, IMAGE_SIZE, SHAPES.index(scene.shape)])
    radius = rng.uniform(0.27, 0.38) * IMAGE_SIZE
    margin = 0.85 * radius
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    return float(cx), float(cy), float(radius), float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))


def _grey(texture: str, seed: int) -> np.ndarray:
    """A ``IMAGE_SIZE`` x ``IMAGE_SIZE`` x 3 float grey texture with a slight colour cast and pixel noise."""
    rng = np.random.default_rng(seed)
    coords = (np.arange(IMAGE_SIZE * _SS) + 0.5) / _SS
    u, v = np.meshgrid(coords, coords)
    grey = _texture(texture, u, v, rng).reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))
    img = grey[..., None] * (1 + rng.normal(0, 0.04, size=3))
    return np.clip(img + rng.normal(0, 0.02, size=img.shape), 0, 1)


def _paint(img: np.ndarray, shape: str, colour: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """``img`` with ``shape`` drawn on it (anti-aliased, as the renderer draws)."""
    coords = (np.arange(IMAGE_SIZE * _SS) + 0.5) / _SS
    u, v = np.meshgrid(coords, coords)
    cover = (
        shape_mask(shape, u - cx, v - cy, radius).reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))
    )
    rgb = np.asarray(COLOURS[colour]) / 255.0
    return img * (1 - cover[..., None]) + rgb * cover[..., None]


@pytest.fixture(scope="module")
def clean() -> tuple[list[Scene], list[int], np.ndarray, list[Fit]]:
    scenes, seeds, images = _clean_set()
    return scenes, seeds, images, fit_shapes(images)


def test_clean_renders_fit_their_shape(clean):
    scenes, _, _, fits = clean
    right = [f.shape == s.shape for f, s in zip(fits, scenes, strict=True)]
    confusion = collections.Counter(
        (s.shape, f.shape) for f, s in zip(fits, scenes, strict=True) if f.shape != s.shape
    )
    assert np.mean(right) >= 0.95, f"accuracy {np.mean(right):.3f}; (drawn, fitted): {dict(confusion)}"
    assert all(f.components == 1 and f.iou >= FIT_MIN_IOU for f in fits)
    assert all(f.runner_up != f.shape and f.runner_up_iou <= f.iou for f in fits)


def test_clean_renders_fit_where_drawn(clean):
    """Centre within 1.5 px, radius within 15% of the renderer's own draws (replayed from its seeded rng);
    rotation within 5 degrees where the shape has one (circle and ring have none)."""
    scenes, seeds, _, fits = clean
    for scene, seed, fit in zip(scenes, seeds, fits, strict=True):
        if fit.shape != scene.shape:
            continue
        cx, cy, radius, theta = _drawn_at(scene, seed)
        where = f"{scene} seed {seed}: fit {fit}, drawn at {(cx, cy, radius, theta)}"
        assert math.hypot(fit.cx - cx, fit.cy - cy) <= 1.5, where
        assert abs(fit.radius / radius - 1) <= 0.15, where
        if scene.shape not in ("circle", "ring"):
            assert abs(fit.rotation - theta) <= np.deg2rad(5), where


def test_segment_matches_the_drawn_shape(clean):
    scenes, seeds, images, _ = clean
    for scene, seed, image in list(zip(scenes, seeds, images, strict=True))[:40]:
        cx, cy, radius, theta = _drawn_at(scene, seed)
        v, u = np.indices(image.shape[:2]) + 0.5
        dx, dy = u - cx, v - cy
        x, y = np.cos(theta) * dx + np.sin(theta) * dy, -np.sin(theta) * dx + np.cos(theta) * dy
        drawn = shape_mask(scene.shape, x, y, radius)
        mask = segment(image)
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert (mask & drawn).sum() / (mask | drawn).sum() >= 0.85, (scene, seed)


@pytest.mark.parametrize("texture", TEXTURES)
def test_empty_background_is_none(texture):
    for seed in range(4):
        fit = fit_shape(_grey(texture, seed))
        assert fit.shape == "none" and fit.components == 0 and fit.area == 0.0, (texture, seed, fit)
        assert fit.iou == 0.0 and fit.runner_up is None and math.isnan(fit.cx)
        assert not segment(_grey(texture, seed)).any()


def test_flat_images_are_none():
    for image in (
        np.zeros((32, 32, 3), np.uint8),
        np.full((32, 32, 3), 128, np.uint8),
        np.full((32, 32, 3), 0.5),
    ):
        assert fit_shape(image).shape == "none"


def test_too_small_to_tell_is_unclear():
    fit = fit_shape(_paint(_grey("plain", 0), "square", "blue", 16.0, 16.0, 3.0))
    assert fit.shape == "unclear" and fit.components == 1 and fit.radius < 4.5


def test_colour_filling_the_frame_is_no_shape():
    """A flood of colour is foreground but no toy shape: shapes are fitted no bigger than the frame."""
    fit = fit_shape(np.broadcast_to(np.asarray(COLOURS["red"], np.uint8), (32, 32, 3)))
    assert fit.shape == "unclear" and fit.area == 1.0 and fit.iou < FIT_MIN_IOU


@pytest.mark.parametrize(
    ("first", "second", "vertical"),
    [(("circle", "red"), ("square", "blue"), False), (("star", "green"), ("cross", "green"), True),
     (("triangle", "yellow"), ("hexagon", "purple"), False)],
)  # fmt: skip
def test_two_shapes_are_unclear(first, second, vertical):
    img = _grey("dots", 0)
    for (shape, colour), at in ((first, 8.5), (second, 23.5)):
        cx, cy = (16.0, at) if vertical else (at, 16.0)
        img = _paint(img, shape, colour, cx, cy, 6.0)
    fit = fit_shape(img)
    assert fit.components == 2 and fit.shape == "unclear", fit
    assert 0.1 < fit.area < 0.4


def test_input_forms_agree(clean):
    _, _, images, fits = clean
    images, fits = images[::10], fits[::10]
    as_float = images.astype(np.float32) / 255.0
    for other in (
        fit_shapes(list(images)),
        fit_shapes([Image.fromarray(x) for x in images]),
        fit_shapes(as_float),
    ):
        for a, b in zip(fits, other, strict=True):
            assert (a.shape, a.runner_up, a.components, a.area) == (
                b.shape,
                b.runner_up,
                b.components,
                b.area,
            )
            np.testing.assert_allclose(
                [a.iou, a.cx, a.cy, a.radius], [b.iou, b.cx, b.cy, b.radius], atol=0.02
            )


def test_other_image_sizes():
    fit = fit_shape(render(Scene("triangle", "orange", "grid"), seed=4, size=64))
    assert fit.shape == "triangle" and 0.27 * 64 * 0.85 <= fit.radius <= 0.38 * 64 * 1.15
