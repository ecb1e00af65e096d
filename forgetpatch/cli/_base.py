"""What every CLI verb shares: the ``--base`` option, and the checks made before anything loads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetpatch.errors import ConceptError, ForgetPatchError
from forgetpatch.quiet import quiet_loading

#: Image files the CLI writes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class BaseModelError(ForgetPatchError):
    """``--base`` names no loadable pipeline."""


def is_toy_base(base: str) -> bool:
    """Whether ``--base`` names a toy-world model: ``"toy"``, or a folder holding an export of one."""
    from forgetpatch.toy import is_toy_model

    return base == "toy" or (Path(base).is_dir() and is_toy_model(base))


def load_base(base: str, dtype: str = "float32") -> Any:
    """``"toy"`` -> the shipped toy pipeline; anything else -> ``DiffusionPipeline.from_pretrained(base)``.

    ``base`` may be a local diffusers folder (``save_pretrained`` layout; a toy-world export loads as the toy
    pipeline does, with the world's settings and checks) or a Hub id already in the cache (nothing is downloaded
    when ``HF_HUB_OFFLINE=1``).
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    with quiet_loading():
        from forgetpatch import toy

        if is_toy_base(base):
            return toy.pipeline(dtype=torch_dtype, path=None if base == "toy" else base)
        from diffusers import DiffusionPipeline

        from forgetpatch.hub import is_hub_id, why_local

        if not Path(base).exists() and (why_local(base) or not is_hub_id(base)):
            raise BaseModelError(
                f"base model folder {base!r} not found. A local base is a diffusers folder as "
                "`pipe.save_pretrained(FOLDER)` writes it (model_index.json, unet/, text_encoder/, ...); "
                "a Hub id (org/name) must be in the cache already; or use --base toy"
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(base, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = first if len(first) <= 160 else first[:157] + "..."
            raise BaseModelError(
                f"cannot load base model {base!r}: not a local folder, nor a Hub id in the cache ({first}). "
                "Pass 'toy', a diffusers folder "
                "(`pipe.save_pretrained(FOLDER)` layout) or a Hub id already in the cache"
            ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_toy_concepts(base: str, concepts: Sequence[str]) -> None:
    """On the toy base, every concept must be a word of its world (a shape, colour or texture)."""
    if base != "toy":
        return
    from forgetpatch.toy import vocab

    for word in concepts:
        if (why := vocab.why_not_a_concept(word)) is not None:
            raise ConceptError(why)


def check_image_path(path: Path, option: str = "--output") -> None:
    """An image to write must end in an image extension."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ForgetPatchError(
            f"{option} {str(path)!r} is not an image file name: end it in {' / '.join(IMAGE_SUFFIXES)}"
        )


def check_new_patch_folder(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing patch without ``--force`` (other files in the folder are kept either way)."""
    existing = path.is_file() or (path / "forgetpatch.json").exists()
    if existing and not force:
        raise ForgetPatchError(f"{str(path)!r} already holds a patch: pick another --output, or pass --force to replace it")
