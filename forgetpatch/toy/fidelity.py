"""How faithfully a toy pipeline draws what it is asked: judge accuracy per concept kind.

Scored on held-out material only: combinations never trained on (:func:`vocab.is_heldout`)
written with reworded templates (:data:`vocab.HELDOUT_TEMPLATES`).

Example:
    >>> from forgetpatch.toy import pipeline, load_judge
    >>> from forgetpatch.toy.fidelity import fidelity
    >>> fidelity(pipeline(), load_judge(), n=32)  # doctest: +SKIP
    {'shape': 0.9, 'colour': 0.97, 'texture': 0.94, 'n': 32}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from forgetpatch.toy import vocab
from forgetpatch.toy.judge import KINDS, ToyJudge


def heldout_prompts(
    n: int, templates: tuple[str, ...] = vocab.HELDOUT_TEMPLATES
) -> list[tuple[vocab.Scene, str]]:
    """``n`` (scene, prompt) pairs cycling through held-out scenes and ``templates``, deterministic."""
    scenes = vocab.heldout_scenes()
    order = np.random.default_rng(0).permutation(len(scenes))
    return [
        (
            scenes[order[i % len(scenes)]],
            vocab.prompt(scenes[order[i % len(scenes)]], templates[i % len(templates)]),
        )
        for i in range(n)
    ]


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0, batch_size: int = 32
) -> np.ndarray:
    """Images (N x H x W x 3, floats in [0, 1]) for ``prompts``, one generator per seed."""
    device = pipe.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[chunk]]
        result = pipe(
            prompts[chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        )
        out.append(result.images)
    return np.concatenate(out)


def fidelity_with_images(
    pipe, judge: ToyJudge, n: int = 32, steps: int = 25, guidance: float = 4.0, templates: str = "heldout"
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`fidelity`, also returning the generated images (N x H x W x 3 in [0, 1])."""
    if templates not in ("heldout", "train"):
        raise ValueError(f"templates must be 'heldout' or 'train', got {templates!r}")
    chosen = vocab.HELDOUT_TEMPLATES if templates == "heldout" else vocab.TRAIN_TEMPLATES
    pairs = heldout_prompts(n, chosen)
    images = generate(pipe, [p for _, p in pairs], list(range(n)), steps=steps, guidance=guidance)
    verdicts = judge.classify(images)
    scores: dict[str, float] = {
        k: float(np.mean([v[k] == scene.of(k) for v, (scene, _) in zip(verdicts, pairs, strict=True)]))
        for k in KINDS
    }
    scores["n"] = n
    return scores, images


def fidelity(
    pipe, judge: ToyJudge, n: int = 32, steps: int = 25, guidance: float = 4.0, templates: str = "heldout"
) -> dict[str, float]:
    """Fraction of ``n`` held-out prompts whose images the judge reads correctly, per kind.

    ``templates="heldout"`` words them with the reworded :data:`vocab.HELDOUT_TEMPLATES`;
    ``"train"`` with the training templates (still on never-trained combinations).
    """
    return fidelity_with_images(pipe, judge, n, steps, guidance, templates)[0]


def save_sheet(images: np.ndarray, path: Path | str, columns: int = 8, scale: int = 3) -> Path:
    """Tile ``images`` (N x H x W x 3, [0, 1] floats or uint8) into one PNG, upscaled ``scale`` times."""
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8:
        imgs = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
    n, h, w, _ = imgs.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    path = Path(path)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(
        path
    )
    return path
