"""``forgetpatch chain``: sequential unlearning from one recipe, one patch per concept, measured after every step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from forgetpatch.cli._base import load_base

console = Console(width=max(140, Console().width))


def chain_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe whose concepts are erased one after another, in order.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for step-1 ... step-N and reports/.")],
    base: Annotated[str, typer.Option(help="'toy', a diffusers pipeline folder, or a cached Hub id.")] = "toy",
    images: Annotated[
        int, typer.Option(help="Toy world: images per concept of the report after each step (0: no reports).")
    ] = 8,
    force: Annotated[bool, typer.Option("--force", help="Write into an output folder that already has steps.")] = False,
) -> None:
    """Erase a recipe's concepts one after another: step k is computed on the model carrying steps 1..k-1.

    Writes OUTPUT/step-1 ... step-N (each patch's lineage names the steps before it) and, on the toy world, a report after every step of every concept erased so far (does an earlier one come back?). Apply the last step with its parents: forgetpatch.apply(pipe, "OUTPUT/step-N", with_lineage=True).
    """  # noqa: E501
    from forgetpatch.errors import ForgetPatchError
    from forgetpatch.methods import erase_chain
    from forgetpatch.recipes import load_recipe

    spec = load_recipe(recipe)
    if images < 0:
        raise ForgetPatchError(f"--images must be >= 0, got {images}")
    existing = sorted(output.glob("step-*")) if output.is_dir() else []
    if existing and not force:
        raise ForgetPatchError(f"{output} already holds {len(existing)} chain steps; pass --force or another -o")
    concepts = spec.erase_concepts()
    pipe = load_base(base)
    measure = images > 0 and getattr(pipe, "forgetpatch_family", None) == "toy"
    reference = None
    if measure:
        from forgetpatch.eval import evaluate

        console.print(f"[bold]base[/] {base}: generating and judging the reference")
        reference = evaluate(pipe, [c.target for c in concepts], images_per_concept=images, progress=False)
    kwargs = spec.erase_kwargs()
    method = kwargs.pop("method")
    name = kwargs.pop("name", None) or spec.name or f"{method}-chain"
    rows: list[dict[str, Any]] = []

    def on_step(k: int, patch: Any, chained: Any) -> None:
        folder = patch.save(output / f"step-{k}")
        console.print(f"[bold]step {k}[/]: {patch.name} -> {folder} (lineage: {len(patch.manifest.lineage)} patches)")
        if reference is None:
            return
        from forgetpatch.eval import evaluate

        so_far = [c.target for c in concepts[:k]]
        report = evaluate(chained, so_far, reference=reference, images_per_concept=images, progress=False)
        console.print(report.table())
        (output / "reports").mkdir(parents=True, exist_ok=True)
        (output / "reports" / f"step-{k}.json").write_text(json.dumps(report.to_dict(), indent=2))
        rows.append({"step": k, **{c: report.concepts[c].scores.ua for c in so_far}})

    erase_chain(pipe, concepts, method=method, name=name, on_step=on_step, **kwargs)
    if rows:
        from rich.table import Table

        table = Table(title="strict UA of every concept erased so far, after each step (relapse shows as a drop)")
        table.add_column("step")
        for c in concepts:
            table.add_column(c.target, justify="right")
        for row in rows:
            table.add_row(str(row["step"]), *(f"{row[c.target]:.0%}" if c.target in row else "" for c in concepts))
        console.print(table)
    console.print(
        f"apply the chain: forgetpatch.apply(pipe, {str(output / f'step-{len(concepts)}')!r}, with_lineage=True)"
    )


def register(app: typer.Typer) -> None:
    app.command("chain")(chain_command)
