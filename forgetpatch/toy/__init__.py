"""The toy world: a renderer, its vocabulary, a small Stable Diffusion trained on it, and a judge.

Every forgetting method is measured here: the pipeline is a real diffusers
``StableDiffusionPipeline`` (same code paths as SD 1.5), trained by
:mod:`forgetpatch.toy.train` and shipped with the package; the judge reads shape, colour and
texture back from generated images.

Example:
    >>> import forgetpatch.toy as toy
    >>> pipe = toy.pipeline()
    >>> images = pipe("a red circle on a dots background", num_inference_steps=25,
    ...               output_type="np").images
    >>> toy.load_judge().classify(images)[0]["shape"]  # a shape, "none", or None: it can't tell
    'circle'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from forgetpatch.errors import ForgetPatchError
from forgetpatch.lazy import lazy_exports
from forgetpatch.toy.defaults import erase_defaults
from forgetpatch.toy.degrade import NO_SHAPE, UNCLEAR, Verdict
from forgetpatch.toy.render import IMAGE_SIZE, render, render_batch, shape_mask
from forgetpatch.toy.vocab import (
    COLOURS,
    ERASE_TEMPLATES,
    FILLER_WORDS,
    HELDOUT_TEMPLATES,
    NEAR_NEIGHBOURS,
    ORDER_TEMPLATES,
    PARTIAL_TEMPLATES,
    SHAPE_SUPERCLASS,
    SHAPES,
    SYNONYMS,
    TEXTURES,
    TRAIN_TEMPLATES,
    Kind,
    Scene,
    all_scenes,
    all_words,
    concepts_of,
    heldout_scenes,
    is_heldout,
    kind_of,
    prompt,
    train_scenes,
    why_not_a_concept,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from forgetpatch.toy.judge import ToyJudge

#: Where the shipped pipeline lives (``save_pretrained`` layout).
PIPELINE_DIR = Path(__file__).parent / "weights" / "pipeline"

#: Names imported on first use -> (submodule, its name for it): training, fidelity and the judge need diffusers or
#: the judge's network, which ``import forgetpatch.toy`` does not load. ``train_pipeline`` is
#: :func:`forgetpatch.toy.train.train` and ``train_main`` its command line (``python -m forgetpatch.toy.train``).
_LAZY = {
    "JUDGE_WEIGHTS": ("judge", "JUDGE_WEIGHTS"),
    "TrainConfig": ("train", "TrainConfig"),
    "train_pipeline": ("train", "train"),
    "train_main": ("train", "main"),
    "generate": ("fidelity", "generate"),
    "fidelity_with_images": ("fidelity", "fidelity_with_images"),
    "save_sheet": ("fidelity", "save_sheet"),
}
__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "COLOURS",
    "ERASE_TEMPLATES",
    "FILLER_WORDS",
    "HELDOUT_TEMPLATES",
    "IMAGE_SIZE",
    "JUDGE_WEIGHTS",
    "NEAR_NEIGHBOURS",
    "NO_SHAPE",
    "PARTIAL_TEMPLATES",
    "PIPELINE_DIR",
    "SHAPES",
    "SHAPE_SUPERCLASS",
    "SYNONYMS",
    "TEXTURES",
    "ORDER_TEMPLATES",
    "TRAIN_TEMPLATES",
    "TrainConfig",
    "UNCLEAR",
    "Verdict",
    "Kind",
    "Scene",
    "all_scenes",
    "all_words",
    "concepts_of",
    "erase_defaults",
    "fidelity_with_images",
    "generate",
    "heldout_scenes",
    "in_context_params",
    "is_heldout",
    "is_toy_model",
    "kind_of",
    "load_judge",
    "pipeline",
    "prompt",
    "render",
    "render_batch",
    "save_sheet",
    "shape_mask",
    "train_main",
    "train_pipeline",
    "train_scenes",
]


def pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> StableDiffusionPipeline:
    """The toy world's trained ``StableDiffusionPipeline``, loaded offline from the shipped weights.

    Images are ``IMAGE_SIZE`` (32) pixels square. ``path`` loads another export instead (one
    written by ``python -m forgetpatch.toy.train --export RUN DIR``).

    Example:
        >>> pipe = pipeline()
        >>> pipe("a blue star on a grid background", num_inference_steps=25).images[0]  # doctest: +SKIP
    """
    from forgetpatch.quiet import quiet_loading

    with quiet_loading():
        from diffusers import StableDiffusionPipeline

    from forgetpatch.toy.train import CHECKPOINT

    directory = Path(path) if path is not None else PIPELINE_DIR
    if (directory / CHECKPOINT).is_file():
        raise ForgetPatchError(
            f"{directory} is a training run, not a pipeline: export it first (forgetpatch toy export {directory} "
            "-o DIR) and give DIR"
        )
    if not (directory / "model_index.json").exists():
        raise ForgetPatchError(
            f"the toy pipeline's weights are missing from {directory}; train them with "
            "`python -m forgetpatch.toy.train --out runs/toy` then export with "
            f"`python -m forgetpatch.toy.train --export runs/toy {PIPELINE_DIR}`"
            if path is None else f"{directory} is not a pipeline export (no model_index.json): give a folder that "
            "forgetpatch toy export wrote"
        )
    if path is not None and not is_toy_model(directory):
        raise ForgetPatchError(
            f"{directory} is not a toy-world model (its UNet's {', '.join(_ARCHITECTURE)} differ from the toy "
            "world's): the judge cannot read its images; load it with diffusers, and measure it with a suite "
            "(forgetpatch eval --suite)"
        )
    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(directory, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.forgetpatch_family = "toy"  # patches made on it record base family "toy"
    pipe.forgetpatch_defaults = erase_defaults  # what forgetpatch.erase uses for settings left unset
    pipe.forgetpatch_unknown_concept = why_not_a_concept  # forgetpatch.erase refuses words outside the world
    return pipe.to(device)


#: The UNet settings every toy-world model shares: a model with other ones draws images the judge cannot read.
_ARCHITECTURE = ("sample_size", "in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def is_toy_model(model: Any) -> bool:
    """Whether ``model`` (a pipeline, or a diffusers folder) is a toy-world model: the shipped one, or another of its
    architecture (an export of ``python -m forgetpatch.toy.train``), whose images the judge can read.

    Example:
        >>> is_toy_model(pipeline()), is_toy_model(PIPELINE_DIR)
        (True, True)
        >>> from forgetpatch.testing import tiny_sd_pipeline
        >>> is_toy_model(tiny_sd_pipeline())
        False
    """
    if getattr(model, "forgetpatch_family", None) == "toy":
        return True
    if isinstance(model, (str, Path)):
        file = Path(model) / "unet" / "config.json"
        try:
            config = json.loads(file.read_text()) if file.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # not a readable diffusers config: not the toy's
            return False
    else:
        config = getattr(getattr(model, "unet", None), "config", None)
    if not hasattr(config, "get"):
        return False
    shipped = json.loads((PIPELINE_DIR / "unet" / "config.json").read_text())
    same = lambda v, w: (list(v) if isinstance(v, (list, tuple)) else v) == w  # noqa: E731
    return all(same(config.get(k), shipped.get(k)) for k in _ARCHITECTURE)


def in_context_params(shapes: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Closed-form (UCE / ScaPre) settings that edit toy shapes where the toy model reads them.

    Each shape is edited inside :data:`ERASE_TEMPLATES` at its own token and every later one
    (``tokens="trailing"``), and the shapes not erased are preserved in the same prompts. On the toy
    model, whose 2-layer text encoder spreads a word over every later token, editing only the bare word's
    token forgets little (``benchmarks/closed_form.py --part toy`` measures both).

    Example:
        >>> params = in_context_params(["circle"])
        >>> params["tokens"], params["preserve"][:2]
        ('trailing', ['ellipse', 'ring'])
    """
    not_shapes = [s for s in shapes if s not in SHAPES]
    if not_shapes:
        raise ForgetPatchError(f"in-context settings are for toy shapes; {not_shapes} are not shapes")
    return {
        "tokens": "trailing",
        "templates": list(ERASE_TEMPLATES),
        "preserve": [s for s in SHAPES if s not in shapes],
    }


def load_judge(version: str = "v2", *, path: str | Path | None = None, device: str = "cpu") -> ToyJudge:
    """A shipped judge by version (``"v2"``, which abstains, or the first, ``"v1"``), or one saved at ``path``
    (see :mod:`forgetpatch.toy.judge`).

    Example:
        >>> load_judge().classify(images)[0]["shape"]    # a shape, "none", or None: can't tell  # doctest: +SKIP
    """
    from forgetpatch.toy.judge import load_judge as _load

    return _load(version, path=path, device=device)
