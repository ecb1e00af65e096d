"""``forgetpatch keysteps``: where on the denoising trajectory does a concept get decided?

    $ forgetpatch keysteps --base toy --concept circle -o out/keysteps-circle/
    $ forgetpatch keysteps --base toy --concept red --guide "a shape" --steps 25 --num-images 32 -o out/red/

Writes ``keysteps.json`` / ``.csv`` / ``.md`` / ``.png`` and prints the table, the rise of the curve
and where the KSCU preset's start step sits on it. Pass the folder to KSCU
(``--param key_step_analysis=out/keysteps-circle``) to store the result in the patch's metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from forgetpatch.cli._base import plain_console
from forgetpatch.errors import MethodError

_out = plain_console()


def keysteps_command(
    concept: Annotated[
        str, typer.Option("--concept", "-c", help="The concept to analyse (a toy-world word).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the table and plot.")],
    base: Annotated[str, typer.Option(help="Base model; only 'toy' ships a judge.")] = "toy",
    guide: Annotated[
        str, typer.Option(help="Prompt used from the switch step on ('' = unconditional).")
    ] = "",
    num_images: Annotated[int, typer.Option("--images", "--num-images", min=1, help="Images per switch step.")] = 16,
    steps: Annotated[int, typer.Option(min=1, help="DDIM sampling steps E.")] = 50,
    every: Annotated[int, typer.Option(min=1, help="Test every n-th switch step (1 = all).")] = 1,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of the first image.")] = 0,
) -> None:
    """Switch the prompt from the concept to the guide at each step k; plot how often the concept survives."""
    from forgetpatch.cli._base import check_writable, load_base
    from forgetpatch.eval import analyze, check_guidance, compare_with_preset, toy_detector, toy_prompts
    from forgetpatch.methods import KSCU_PRESETS
    from forgetpatch.toy import vocab

    if base != "toy":
        raise MethodError("key-step analysis needs a judge of the images; only --base toy ships one")
    if every < 1:
        raise MethodError(f"--every must be >= 1, got {every}")
    check_guidance(guidance, "--guidance")
    check_writable(output, holds="the table and plot")  # before the analysis, not after it
    try:
        kind = vocab.kind_of(concept)
        pipe = load_base(base)
        curve = analyze(
            pipe,
            concept,
            detector=toy_detector(concept),
            guide=guide,
            prompts=toy_prompts(concept),
            num_images=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance,
            switch_steps=sorted({*range(0, steps + 1, every), steps}),
            seed=seed,
        )
    except (KeyError, ValueError) as exc:  # an unknown concept, settings the analysis cannot use
        raise MethodError(str(exc.args[0]) if exc.args else str(exc)) from exc
    folder = curve.save(output)
    task = "object" if kind == "shape" else "style"
    preset = compare_with_preset(curve, KSCU_PRESETS[task].start)
    _out.print(curve.table())
    low, high = curve.rise()
    _out.print(
        f"presence rises past 10% of its top at k={low} and 90% at k={high} (of {steps}); "
        f"KSCU {task} preset starts at {KSCU_PRESETS[task].start}/50 = {preset['preset_start_fraction']:.2f}, "
        f"where switching already leaves the concept in {preset['presence_switching_at_preset_start']:.0%} "
        f"of images (top {preset['max_presence']:.0%})"
    )
    _out.print(Text.assemble(("wrote", "green"), f" {folder}/keysteps.png, .json, .csv, .md"))


def register(app: typer.Typer) -> None:
    """Add ``keysteps`` to the ``forgetpatch`` command."""
    app.command("keysteps")(keysteps_command)
