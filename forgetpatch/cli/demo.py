"""``forgetpatch demo``: the main job on the built-in toy world, end to end.

Erase a concept from the toy Stable Diffusion, save the patch, apply it, measure forgetting and
retention against the base model, record the figures in the patch, and write a before/after grid.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from forgetpatch.cli._base import plain_console

console = plain_console(width=max(120, Console().width))  # the report table needs the room


def demo(
    concept: Annotated[
        list[str] | None, typer.Option("--concept", "-c", help="Toy concept to erase (repeatable).")
    ] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="Unlearning method.")] = "scapre",
    out: Annotated[
        Path, typer.Option("--output", "--out", "-o", help="Folder for the patch, grid and report.")
    ] = Path("forgetpatch-demo"),
    images: Annotated[int, typer.Option(min=1, help="Images per concept in the evaluation.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
    paper: Annotated[
        bool,
        typer.Option(
            "--paper",
            help="Run the method exactly as published (closed form: only each word's own token) instead of "
            "the toy world's settings that forget (forgetpatch.toy.defaults).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a patch an earlier demo wrote in --output.")] = False,
) -> None:
    """Erase a shape from the toy model, apply the patch, and measure what it forgot and kept."""
    import forgetpatch
    from forgetpatch.cli._base import (
        check_image_path,
        check_new_patch_folder,
        check_toy_concepts,
        check_writable,
        load_base,
    )
    from forgetpatch.eval import evaluate, save_report_grid

    concepts = concept or ["circle"]
    check_toy_concepts("toy", concepts)
    forgetpatch.methods.check_concepts(forgetpatch.methods.as_concepts(concepts), [])  # a repeat, before the work
    forgetpatch.methods.get_method(method)  # an unknown method is named before anything runs
    check_writable(out, holds="the patch, grid and report")
    check_image_path(out / "grid.png", "the grid")  # the last step's outputs, checked before the first
    folder = out / f"no-{'-'.join(concepts)}"
    check_new_patch_folder(folder, force)
    pipe = load_base("toy")
    console.print(Text.assemble(("1/4", "bold"), f" base fidelity on the toy world ({images} images per concept)"))
    base = evaluate(pipe, concepts, images_per_concept=images, num_inference_steps=steps)

    closed_form = forgetpatch.methods.get_method(method).closed_form
    tuned = pipe.forgetpatch_defaults(method, concepts, closed_form=closed_form, held=[])
    setting = (" as published (--paper)" if paper else " (the toy world's settings: forgetpatch.toy.defaults)"
               if tuned else " (the method's own settings: the toy world has none for these)")  # fmt: skip
    console.print(Text.assemble(("2/4", "bold"), f" erasing {', '.join(concepts)} with {method}{setting}"))
    start = time.perf_counter()
    patch = forgetpatch.erase(pipe, concepts, method=method, paper=paper)
    erase_s = time.perf_counter() - start

    console.print(Text.assemble(("3/4", "bold"), " applying the patch and measuring forgetting and retention"))
    forgetpatch.apply(pipe, patch)
    report = evaluate(pipe, concepts, reference=base, images_per_concept=images, num_inference_steps=steps)
    forgetpatch.remove(pipe)

    console.print(Text.assemble(("4/4", "bold"), " writing the patch, report and grid"))
    patch.manifest.metrics.update({"toy_eval": report.to_dict(), "erase_seconds": round(erase_s, 2)})
    folder.mkdir(parents=True, exist_ok=True)
    grid = save_report_grid(report, out / "grid.png")
    shutil.copyfile(grid, folder / "grid.png")  # the patch ships its grid: the model card shows it
    patch.save(folder)
    console.print(report.table())
    console.print(f"patch: {folder}\ngrid:  {grid}\nerase time: {erase_s:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
