"""``forgetpatch apply``: generate an image with patches applied to a base pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forgetpatch.cli._base import load_base
from forgetpatch.errors import ForgetPatchError


def apply(
    patches: Annotated[
        list[str], typer.Argument(help="Patch folders, .safetensors files or Hub ids, in order.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("out.png"),
    base: Annotated[str, typer.Option(help="'toy' or a local diffusers pipeline folder.")] = "toy",
    key_steps: Annotated[
        bool, typer.Option("--key-steps", help="Gate patches to their key-step ranges.")
    ] = False,
    fuse: Annotated[bool, typer.Option("--fuse", help="Merge patches into the weights.")] = False,
    scale: Annotated[float, typer.Option(help="Strength of every patch.")] = 1.0,
    strict: Annotated[bool, typer.Option(help="Refuse patches whose lineage parents are missing.")] = True,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    compare: Annotated[
        bool, typer.Option(help="Also write the unpatched image next to it (*.base.png).")
    ] = False,
) -> None:
    """Apply PATCHES to a base pipeline and draw PROMPT, e.g.

    forgetpatch apply --base toy ./no-circle --prompt "a red circle" -o out.png --key-steps
    """
    import torch

    import forgetpatch

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        generator = torch.Generator().manual_seed(seed)
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]

    output.parent.mkdir(parents=True, exist_ok=True)
    if compare:
        path = output.with_suffix(".base.png")
        draw().save(path)
        typer.echo(f"base image: {path}")
    try:
        forgetpatch.apply(pipe, patches, scale=scale, fuse=fuse, key_steps=key_steps, strict=strict)
    except ForgetPatchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    names = ", ".join(p.name for p in forgetpatch.applied(pipe))
    draw().save(output)
    typer.echo(f"patched image ({names}): {output}")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
