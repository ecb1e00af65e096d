"""``forgetpatch apply``: generate an image with patches applied to a base pipeline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from forgetpatch.cli._base import check_image_path, check_patches_flags, load_base

#: Smallest side of a written image: the toy world's 32-pixel images are enlarged (nearest) to be seen.
MIN_SIDE = 256


def apply(
    patches: Annotated[
        list[str], typer.Argument(help="Patch folders, .safetensors files or Hub ids, in order.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image to write (.png, .jpg or .webp).")] = Path("out.png"),
    base: Annotated[str, typer.Option(help="'toy', a diffusers pipeline folder or a Hub id in the cache (org/name[@revision]).")] = "toy",
    key_steps: Annotated[
        bool, typer.Option("--key-steps", help="Gate patches to their key-step ranges.")
    ] = False,
    fuse: Annotated[bool, typer.Option("--fuse", help="Merge patches into the weights.")] = False,
    scale: Annotated[float, typer.Option(help="Strength of every patch (> 0).")] = 1.0,
    strict: Annotated[bool, typer.Option(help="Refuse patches whose lineage parents are missing.")] = True,
    with_lineage: Annotated[
        bool, typer.Option("--with-lineage", help="First apply each patch's parents, found in the folders beside it.")
    ] = False,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also write the unpatched image next to it (*.base.png).")
    ] = False,
    allow_unverified: Annotated[
        bool,
        typer.Option("--allow-unverified", help="Apply patches whose files or base model cannot be verified (old format)."),
    ] = False,
) -> None:
    """Apply PATCHES to a base pipeline and draw PROMPT.

    Example: forgetpatch apply --base toy ./no-circle --prompt "a red circle" -o out.png --key-steps
    """
    import torch

    import forgetpatch
    from forgetpatch.loader import check_lineage, check_scale

    # Everything is checked before the model loads.
    check_image_path(output)
    check_scale(scale)
    loaded = [forgetpatch.load(ref, allow_unverified=allow_unverified) for ref in patches]
    check_patches_flags(loaded, key_steps=key_steps, fuse=fuse)
    if strict and not with_lineage:
        check_lineage(loaded)  # the base loads without patches: every parent must be given before its child

    pipe = load_base(base)
    settings = {"scale": scale, "fuse": fuse, "key_steps": key_steps, "strict": strict, "with_lineage": with_lineage,
                "allow_unverified": allow_unverified}  # fmt: skip
    forgetpatch.apply(pipe, loaded, **settings)  # every check of the patches against the model, before any image

    def draw(path: Path) -> None:
        generator = torch.Generator().manual_seed(seed)
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
        factor = max(1, math.ceil(MIN_SIDE / min(image.size)))
        if factor > 1:
            from PIL import Image

            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("patches", ", ".join(p.name for p in forgetpatch.applied(pipe)))
        if path.suffix.lower() == ".png":
            image.save(path, pnginfo=info)
        else:
            image.save(path)

    output.parent.mkdir(parents=True, exist_ok=True)
    if compare:  # taken off exactly, drawn, put back
        on = forgetpatch.applied(pipe)
        forgetpatch.remove(pipe)
        draw(output.with_suffix(".base.png"))
        typer.echo(f"base image: {output.with_suffix('.base.png')}")
        forgetpatch.apply(pipe, [entry.patch for entry in on], **{**settings, "with_lineage": False})
    names = ", ".join(p.name for p in forgetpatch.applied(pipe))
    draw(output)
    typer.echo(f"patched image ({names}): {output}  [{prompt!r}]")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
