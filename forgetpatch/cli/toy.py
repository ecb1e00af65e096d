"""``forgetpatch toy ...``: train the toy world's model, draw grids, measure fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

toy_app = typer.Typer(
    help="The built-in toy world: train its Stable Diffusion, draw grids, measure fidelity."
)


@toy_app.command()
def train(
    steps: Annotated[int, typer.Option(min=1, help="Total UNet steps (the cosine schedule's horizon).")] = 30000,
    out: Annotated[
        Path, typer.Option("--output", "--out", "-o", help="Run directory for the checkpoint.")
    ] = Path("runs/toy"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the checkpoint in --out.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    export: Annotated[bool, typer.Option("--export", help="Afterwards, ship the EMA weights into the package.")] = False,
) -> None:
    """Train (or resume training) the toy pipeline; --export ships it as the package's weights."""
    from forgetpatch.quiet import quiet_loading

    with quiet_loading():  # diffusers' and transformers' import-time notices
        from forgetpatch.toy import PIPELINE_DIR, TrainConfig
        from forgetpatch.toy import train_pipeline as run

    trainer = run(out, TrainConfig(steps=steps), resume=resume, device=device)
    if export:
        trainer.export(PIPELINE_DIR)
        typer.echo(f"exported step {trainer.step} to {PIPELINE_DIR}")


@toy_app.command("export")
def export_(
    run: Annotated[Path, typer.Argument(help="Run directory holding checkpoint.pt.")] = Path("runs/toy"),
    to: Annotated[
        Path | None, typer.Option("--output", "--to", "-o", help="Directory to write (default: the package's weights).")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Raw weights instead of the EMA ones.")] = False,
) -> None:
    """Export a run's weights as a pipeline (by default, ship them as the package's toy pipeline)."""
    from forgetpatch.quiet import quiet_loading

    with quiet_loading():  # diffusers' and transformers' import-time notices
        from forgetpatch.toy import PIPELINE_DIR
        from forgetpatch.toy import train_main as main

    main(["--export", str(run), str(to or PIPELINE_DIR), *(["--raw"] if raw else [])])


@toy_app.command()
def grid(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt(s); repeat for several rows.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write.")] = Path("grid.png"),
    n: Annotated[int, typer.Option("--images", "--n", min=1, help="Images per prompt (seeds 0..n-1).")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    weights: Annotated[
        Path | None, typer.Option(help="A pipeline export other than the shipped one.")
    ] = None,
) -> None:
    """Draw ``n`` images per prompt with the shipped toy pipeline into one PNG (a row per prompt)."""
    from forgetpatch.cli._base import check_image_path
    from forgetpatch.eval import check_guidance
    from forgetpatch.toy import generate, pipeline, save_sheet

    check_image_path(output)  # before the images, not after them
    check_guidance(guidance, "--guidance")
    prompts = [p for p in prompt for _ in range(n)]
    seeds = [s for _ in prompt for s in range(n)]
    images = generate(pipeline(path=weights), prompts, seeds, steps=steps, guidance=guidance)
    typer.echo(str(save_sheet(images, output, columns=n)))


@toy_app.command()
def fidelity(
    n: Annotated[int, typer.Option("--images", "--n", min=1, help="Number of held-out prompts (seeds 0..n-1).")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    weights: Annotated[
        Path | None, typer.Option(help="A pipeline export other than the shipped one.")
    ] = None,
    templates: Annotated[str, typer.Option(help="heldout (reworded) or train templates.")] = "heldout",
    grid_png: Annotated[Path | None, typer.Option("--grid", help="Also save the images as a PNG.")] = None,
) -> None:
    """Judge accuracy (shape / colour / texture) of the shipped pipeline on held-out combinations."""
    from forgetpatch.cli._base import check_image_path
    from forgetpatch.errors import ForgetPatchError
    from forgetpatch.eval import check_guidance
    from forgetpatch.toy import fidelity_with_images, load_judge, pipeline, save_sheet

    if templates not in ("heldout", "train"):
        raise ForgetPatchError(f"--templates {templates!r}: choose heldout (reworded prompts) or train")
    if grid_png is not None:
        check_image_path(grid_png, "--grid")
    check_guidance(guidance, "--guidance")
    scores, images = fidelity_with_images(
        pipeline(path=weights), load_judge(), n=n, steps=steps, guidance=guidance, templates=templates
    )
    typer.echo(" ".join(f"{k}={v:.3f}" if k != "n" else f"n={int(v)}" for k, v in scores.items()))
    if grid_png is not None:
        typer.echo(str(save_sheet(images, grid_png)))


def register(app: typer.Typer) -> None:
    app.add_typer(toy_app, name="toy")
