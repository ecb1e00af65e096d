"""The ``--base`` option every CLI verb shares: the toy model or a diffusers pipeline."""

from __future__ import annotations

from typing import Any

import typer


def load_base(base: str, dtype: str = "float32") -> Any:
    """``"toy"`` -> the shipped toy pipeline; anything else -> ``DiffusionPipeline.from_pretrained(base)``.

    ``base`` may be a local diffusers folder or a Hub id already in the cache (nothing is downloaded
    when ``HF_HUB_OFFLINE=1``).
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    if base == "toy":
        from forgetpatch import toy

        return toy.pipeline(dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(base, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(
            f"cannot load base model {base!r}: {exc}; pass 'toy', a diffusers folder or a cached Hub id",
            param_hint="--base",
        ) from None
