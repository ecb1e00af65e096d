"""Key-step analysis: at which denoising steps does a concept get decided?

For every switch step ``k`` of a DDIM sampler with ``E`` steps, images are generated with the
concept prompt for steps ``0 .. k-1`` and the empty (or a guide) prompt from step ``k`` on; a
detector judges whether the concept still appears. ``presence[k]`` rises from about 0 (``k = 0``,
the concept is never asked for) to the base rate (``k = E``). Where it rises is where the concept's
key steps lie: the steps after the curve has reached its top no longer decide *whether* the
concept appears. Concept trajectories are shared across ``k`` (each image's concept prefix is
sampled once), so a full analysis costs about ``E^2 / 2`` batched UNet calls.

Example:
    >>> curve = analyze(pipe, "circle", detector=toy_detector("circle"), num_images=16)
    >>> curve.save("out/")           # keysteps.json, keysteps.csv, keysteps.md, keysteps.png
    >>> curve.rise()                 # (first k with >= 10% of the top, first k with >= 90%)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from forgetpatch.errors import MethodError
from forgetpatch.eval.generate import check_guidance
from forgetpatch.methods import Cond, encode_prompt, preset_check, rise_steps
from forgetpatch.progress import bar as progress_bar

#: Judges a batch of ``(N, H, W, 3)`` uint8 images: does each show the concept?
Detector = Callable[[np.ndarray], Sequence[bool]]


@dataclass
class KeyStepCurve:
    """How often the concept still appears when conditioning switches away from it at step ``k``."""

    concept: str
    guide: str
    num_inference_steps: int
    guidance_scale: float
    timesteps: list[int]
    switch_steps: list[int]
    presence: list[float]
    num_images: int
    seed: int
    prompts: list[str] = field(default_factory=list)

    def rise(self, low: float = 0.1, high: float = 0.9) -> tuple[int | None, int | None]:
        """First switch steps where presence reaches ``low`` and ``high`` of its maximum."""
        return rise_steps(self.switch_steps, self.presence, low, high)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.rise()
        return {**asdict(self), "rise_10": low, "rise_90": high}

    def table(self) -> str:
        """A Markdown table: switch step, its timestep, trajectory fraction, presence."""
        rows = ["| switch step k | timestep | fraction | concept present |", "|---:|---:|---:|---:|"]
        for k, p in zip(self.switch_steps, self.presence, strict=True):
            t = self.timesteps[k] if k < len(self.timesteps) else 0
            rows.append(f"| {k} | {t} | {k / self.num_inference_steps:.2f} | {p:.0%} |")
        return "\n".join(rows)

    def save(self, folder: str | Path) -> Path:
        """Write ``keysteps.json``, ``keysteps.csv``, ``keysteps.md`` and ``keysteps.png`` to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "keysteps.json").write_text(json.dumps(self.to_dict(), indent=2))
        lines = ["k,timestep,presence"]
        lines += [
            f"{k},{self.timesteps[k] if k < len(self.timesteps) else 0},{p:.4f}"
            for k, p in zip(self.switch_steps, self.presence, strict=True)
        ]
        (folder / "keysteps.csv").write_text("\n".join(lines) + "\n")
        (folder / "keysteps.md").write_text(self.table() + "\n")
        plot(self, folder / "keysteps.png")
        return folder


def plot(curve: KeyStepCurve, path: str | Path) -> Path:
    """Draw presence against switch step as a PNG (matplotlib if installed, else PIL)."""
    path = Path(path)
    title = f"'{curve.concept}' -> '{curve.guide}' from step k ({curve.num_images} images)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(curve, path, title)
        return path
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve.switch_steps, curve.presence, marker="o", ms=3)
    ax.set(xlabel="switch step k", ylabel="concept present", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_pil(curve: KeyStepCurve, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 380, 50, 20, 30, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, w - right, h - bottom, top
    draw.rectangle([x0, y1, x1, y0], outline="black")
    steps = max(curve.num_inference_steps, 1)

    def xy(k: float, p: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * k / steps, y0 - (y0 - y1) * p

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, frac)
        draw.line([x0, y, x1, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{frac:.0%}", fill="black")
    for k in range(0, steps + 1, max(1, steps // 10)):
        x, _ = xy(k, 0)
        draw.text((x - 6, y0 + 6), str(k), fill="black")
    points = [xy(k, p) for k, p in zip(curve.switch_steps, curve.presence, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=(30, 80, 200), width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 80, 200))
    draw.text((x0, 8), title, fill="black")
    draw.text(((x0 + x1) // 2 - 40, h - 18), "switch step k", fill="black")
    img.save(path)


@torch.no_grad()
def _count_present(verdicts: Any, n: int) -> int:
    """How many of ``n`` images the detector's verdicts say show the concept: one ``True`` / ``False`` per image, or
    :class:`MethodError` (twice as many verdicts gave a presence of 200%; a score of 0.2 counted as present)."""
    verdicts = list(verdicts)
    if len(verdicts) != n:
        raise MethodError(f"the detector returned {len(verdicts)} verdicts for {n} images: return one per image")
    if any(v not in (True, False) for v in verdicts):
        raise MethodError(
            f"the detector returned {next(v for v in verdicts if v not in (True, False))!r}: return True or False "
            "per image (threshold a score first)"
        )
    return sum(bool(v) for v in verdicts)


def analyze(
    pipe: Any,
    concept: str,
    *,
    detector: Detector,
    guide: str = "",
    prompts: Sequence[str] | None = None,
    num_images: int = 16,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    switch_steps: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> KeyStepCurve:
    """Measure how often ``concept`` survives switching the prompt to ``guide`` from step ``k`` on.

    Args:
        pipe: an SD pipeline (SD 1.x-like; the toy world's or any other).
        concept: the concept's name (recorded, and the prompt when ``prompts`` is not given).
        detector: judges ``(N, H, W, 3)`` uint8 images; ``True`` = the concept appears.
        guide: the prompt used from step ``k`` on (``""`` = unconditional).
        prompts: concept prompts, cycled over the images (e.g. toy-world prompts naming the shape).
        num_images, seed: images per switch step; image ``i`` uses seed ``seed + i`` at every ``k``.
        num_inference_steps, guidance_scale: the DDIM sampler (E and classifier-free guidance).
        switch_steps: which ``k`` to test; default every step ``0 .. E``.
        batch_size: images denoised together.

    Example:
        >>> curve = analyze(pipe, "circle", detector=lambda imgs: [True] * len(imgs), num_images=2,
        ...                 num_inference_steps=4)
        >>> curve.switch_steps
        [0, 1, 2, 3, 4]
    """
    if hasattr(pipe, "text_encoder_2"):
        raise MethodError("key-step analysis supports SD 1.x/2.x-style pipelines; SDXL is not supported yet")
    if num_images < 1 or num_inference_steps < 1 or batch_size < 1:
        raise MethodError("key-step analysis needs num_images, num_inference_steps and batch_size >= 1")
    check_guidance(guidance_scale)
    steps = num_inference_steps
    ks = sorted(set(switch_steps if switch_steps is not None else range(steps + 1)))
    if not ks:
        raise MethodError(f"switch_steps is empty: give at least one step in [0, {steps}], or None for all")
    if ks[0] < 0 or ks[-1] > steps:
        raise MethodError(f"switch steps must lie in [0, {steps}], got {ks[0]}..{ks[-1]}")
    prompts = list(prompts or [concept])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    unet, device = pipe.unet, pipe.unet.device
    size = int(unet.config.sample_size)
    conds = {p: encode_prompt(pipe, p, size).to(device, unet.dtype) for p in {*prompts, guide, ""}}

    def step(x: torch.Tensor, i: int, cond: Cond) -> torch.Tensor:
        t = timesteps[i]
        hidden = torch.cat([conds[""].hidden.expand(len(x), -1, -1), cond.hidden])
        e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden, return_dict=False)[0].chunk(2)
        return scheduler.step(e_u + guidance_scale * (e_c - e_u), t, x).prev_sample

    hits = {k: 0 for k in ks}
    bar = progress_bar(
        total=num_images * len(ks), desc=f"key steps of {concept!r}", disable=not progress, unit_name="images"
    )
    for first in range(0, num_images, batch_size):
        idx = list(range(first, min(first + batch_size, num_images)))
        noise = [
            torch.randn(
                (1, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed + i)
            )
            for i in idx
        ]
        x = torch.cat(noise).to(device, unet.dtype) * scheduler.init_noise_sigma
        concept_cond = Cond(torch.cat([conds[prompts[i % len(prompts)]].hidden for i in idx]))
        guide_cond = Cond(conds[guide].hidden.expand(len(idx), -1, -1))
        prefix = {0: x}
        for i in range(max(ks)):
            x = step(x, i, concept_cond)
            prefix[i + 1] = x
        for k in ks:
            x = prefix[k]
            for i in range(k, steps):
                x = step(x, i, guide_cond)
            images = _decode(pipe, x)
            hits[k] += _count_present(detector(images), len(idx))
            bar.update(len(idx))
    bar.close()
    return KeyStepCurve(
        concept=concept,
        guide=guide,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        timesteps=timesteps,
        switch_steps=ks,
        presence=[hits[k] / num_images for k in ks],
        num_images=num_images,
        seed=seed,
        prompts=prompts,
    )


def toy_detector(concept: str, judge: Any = None) -> Detector:
    """A detector from the toy world's judge: does the image still show ``concept`` (a shape, colour or
    texture)? As strict UA reads it: yes unless the judge confidently sees another concept or no shape.

    Example:
        >>> detect = toy_detector("circle")
        >>> detect(images)  # [True, False, ...]
    """
    from forgetpatch.eval.report import forgotten

    if judge is None:
        from forgetpatch.toy import load_judge

        judge = load_judge()

    def detect(images: np.ndarray) -> list[bool]:
        return [not forgotten(v, concept) for v in judge.classify(images)]

    return detect


def toy_prompts(concept: str, n: int = 8) -> list[str]:
    """Training-style toy prompts naming ``concept`` with varied other attributes."""
    from forgetpatch.toy import vocab

    kind = vocab.kind_of(concept)
    scenes = [s for s in vocab.train_scenes() if s.of(kind) == concept]
    step = max(1, len(scenes) // n)
    return [vocab.prompt(s) for s in scenes[::step][:n]]


def _decode(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    images = vae.decode(scaled, return_dict=False)[0]
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def compare_with_preset(curve: KeyStepCurve, start_step: int, num_steps: int = 50) -> dict[str, Any]:
    """Where a KSCU preset's start (out of ``num_steps``) sits on the measured curve
    (:func:`forgetpatch.methods.preset_check` on the curve's data)."""
    return preset_check(curve.to_dict(), start_step, num_steps)