"""What evaluation generates images with: a :class:`Generator`, by default a diffusers pipeline.

Anything with ``generate(prompts, seeds) -> images`` can be evaluated, e.g. a fake that renders
the scene a prompt names, to check the metrics on known inputs. Under ``accelerate launch`` evaluation
generates through :func:`generate_sharded`: each process its own block of (prompt, seed) pairs, the images
gathered once, in order, on every process.

Example:
    >>> gen = PipelineGenerator(pipe, num_inference_steps=25, guidance_scale=4.0)
    >>> images = gen.generate(["a red circle on a plain background"], [0])  # (1, 32, 32, 3) in [0, 1]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from forgetpatch import distributed
from forgetpatch.errors import EvalError, EvalInputError

#: Classifier-free guidance scale used when none is given (as the toy fidelity figures use).
DEFAULT_GUIDANCE_SCALE = 4.0


def check_guidance(value: float, where: str = "guidance_scale") -> float:
    """``value`` as a classifier-free guidance scale: a finite number >= 0 (diffusers draws noise at NaN and
    without guidance at any value <= 1), else :class:`~forgetpatch.errors.EvalInputError` naming ``where``.

    Example:
        >>> check_guidance(float("nan"), "--guidance")
        Traceback (most recent call last):
        forgetpatch.errors.EvalInputError: --guidance must be a finite number >= 0, got nan
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise EvalInputError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


@runtime_checkable
class Generator(Protocol):
    """Makes one image per (prompt, seed); the same pair must always give the same image."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """Return float images ``N x H x W x 3`` in ``[0, 1]``."""
        ...


class PipelineGenerator:
    """Adapts a diffusers text-to-image pipeline to :class:`Generator`.

    Prompts are run in batches; each image gets its own ``torch.Generator`` seeded with its seed,
    so an image does not depend on the batch it is in.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        self.pipe = pipe
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.progress = progress

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        device = getattr(self.pipe, "device", torch.device("cpu"))
        saved = dict(getattr(self.pipe, "_progress_bar_config", {}))
        self.pipe.set_progress_bar_config(disable=True)
        out = []
        try:
            starts = range(0, len(prompts), self.batch_size)
            bar = not self.progress or not distributed.is_main()
            for i in tqdm(starts, desc="generating", unit="batch", disable=bar):
                batch = list(prompts[i : i + self.batch_size])
                gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds[i : i + self.batch_size]]
                result = self.pipe(
                    batch,
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    generator=gens,
                    output_type="np",
                )
                out.append(_finite(np.asarray(result.images, dtype=np.float32), batch, seeds[i : i + len(batch)]))
        finally:
            self.pipe._progress_bar_config = saved
        if not out:
            return np.zeros((0, 0, 0, 3), dtype=np.float32)
        return np.concatenate(out)


def _finite(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """``images``, or :class:`~forgetpatch.errors.EvalError` at the first batch with a NaN or infinite pixel: the
    judge would call such an image "can't tell" and the figures would be measured on nothing."""
    bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        raise EvalError(
            f"the pipeline drew {int(bad.sum())} of {len(images)} images with NaN or infinite pixels (the first: "
            f"{prompts[k]!r}, seed {seeds[k]}), which cannot be judged. A patch applied at a large scale, a float16 "
            "pipeline that overflows or weights with NaN in them do this: measure at scale 1, in float32"
        )
    return images


def generate_sharded(
    generator: Generator, prompts: Sequence[str], seeds: Sequence[int], *, block: int = 1
) -> np.ndarray:
    """``generator.generate(prompts, seeds)``, split over the processes of an ``accelerate launch``.

    Each process generates its contiguous block of the (prompt, seed) pairs, cut at multiples of ``block``
    (:func:`forgetpatch.distributed.share`), and the blocks are gathered once, in order, on every process.
    An image depends only on its prompt and seed, so the result is the single-process one; with ``block`` =
    the generator's batch size every batch is the one a single process runs, so the images are equal bit
    for bit (a different batch can move pixels by ~1e-7). Not launched, this is exactly
    ``generator.generate(prompts, seeds)``.

    Example:
        >>> images = generate_sharded(PipelineGenerator(pipe), prompts, seeds)  # the same on every process
    """
    if not distributed.launched():
        return generator.generate(prompts, seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    mine = distributed.share(len(prompts), block)
    part = None
    if len(mine):
        part = np.asarray(generator.generate([prompts[i] for i in mine], [seeds[i] for i in mine]), np.float32)
    parts = [p for p in distributed.gather([part]) if p is not None]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), dtype=np.float32)


def as_generator(model: Any, **pipeline_kwargs: Any) -> Generator:
    """``model`` itself if it is a :class:`Generator`, else a :class:`PipelineGenerator` around it."""
    if isinstance(model, Generator):
        return model
    if callable(model) and hasattr(model, "set_progress_bar_config"):
        return PipelineGenerator(model, **pipeline_kwargs)
    raise TypeError(
        f"cannot generate images with a {type(model).__name__}: pass a diffusers pipeline or an object "
        "with generate(prompts, seeds) -> images"
    )
