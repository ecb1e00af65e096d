"""``forgetpatch chain``: sequential unlearning from one recipe, one patch per concept, measured after every step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from forgetpatch.cli._base import load_base, plain_console
from forgetpatch.format import check_patch_name
from forgetpatch.rates import rate_text

console = plain_console(width=max(140, Console().width))


def chain_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe whose concepts are erased one after another, in order.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for step-1 ... step-N and reports/.")],
    base: Annotated[
        str | None,
        typer.Option(help="'toy', a diffusers pipeline folder, or a cached Hub id (default: the recipe's base: or toy)."),
    ] = None,
    images: Annotated[
        int, typer.Option(help="Toy world: images per concept of the report after each step (0: no reports).")
    ] = 8,
    force: Annotated[bool, typer.Option("--force", help="Write into an output folder that already has steps.")] = False,
) -> None:
    """Erase a recipe's concepts one after another: step k is computed on the model carrying steps 1..k-1.

    Writes OUTPUT/step-1 ... step-N (each patch's lineage names the steps before it) and, on the toy world, a report after every step of every concept erased so far (does an earlier one come back?). Apply the last step with its parents: forgetpatch.apply(pipe, "OUTPUT/step-N", with_lineage=True).
    """  # noqa: E501
    from forgetpatch.cli._base import check_toy_concepts, check_writable
    from forgetpatch.cli.erase import _choose_base
    from forgetpatch.errors import ForgetPatchError
    from forgetpatch.methods import check_concepts, check_params, erase_chain
    from forgetpatch.recipes import load_recipe

    # Everything is checked before the model loads, as erase does.
    spec = load_recipe(recipe)
    if images < 0:
        raise ForgetPatchError(f"--images must be >= 0, got {images}")
    check_writable(output, holds="step-1 ... step-N")
    existing = sorted(output.glob("step-*")) if output.is_dir() else []
    if existing and not force:
        raise ForgetPatchError(f"{output} already holds {len(existing)} chain steps; pass --force or another -o")
    chosen_base = _choose_base(base, spec, recipe)
    concepts, kept = spec.erase_concepts(), spec.preserved()
    check_toy_concepts(chosen_base, [c.target for c in [*concepts, *kept]])
    check_concepts(concepts, kept)  # duplicates, a concept both erased and preserved
    kwargs = spec.erase_kwargs()
    method = kwargs.pop("method")
    check_params(method, {k: v for k, v in kwargs.items() if k not in ("preserve", "paper")})
    name = check_patch_name(kwargs.pop("name", None) or spec.name or f"{method}-chain")
    pipe = load_base(chosen_base)
    if existing:  # --force: the earlier chain goes, once the input is checked and the base loads, so an
        _remove_old(output)  # interrupted run leaves steps of this chain only
    measure = images > 0 and getattr(pipe, "forgetpatch_family", None) == "toy"
    reference = None
    rows: list[dict[str, Any]] = []

    def on_step(k: int, patch: Any, chained: Any) -> None:
        nonlocal reference
        folder = patch.save(output / f"step-{k}")
        console.print(Text.assemble((f"step {k}", "bold"), f": {patch.name} -> {folder} (lineage: "
                                    f"{len(patch.manifest.lineage)} patch{'' if len(patch.manifest.lineage) == 1 else 'es'})"))
        if not measure:
            return
        from forgetpatch.eval import evaluate

        if reference is None:  # after the first step: bad settings fail there, before anything is generated
            from forgetpatch.loader import unpatched

            console.print(Text.assemble(("base", "bold"), f" {chosen_base}: generating and judging the reference"))
            reference = evaluate(unpatched(chained), [c.target for c in concepts], images_per_concept=images,
                                 progress=False)  # fmt: skip

        so_far = [c.target for c in concepts[:k]]
        report = evaluate(chained, so_far, reference=reference, images_per_concept=images, progress=False)
        console.print(report.table())
        (output / "reports").mkdir(parents=True, exist_ok=True)
        (output / "reports" / f"step-{k}.json").write_text(json.dumps(report.to_dict(), indent=2))
        rows.append({"step": k, **{c: rate_text(report.concepts[c].scores.ua, report.concepts[c].scores.interval.get("ua"))
                                   for c in so_far}})

    erase_chain(pipe, concepts, method=method, name=name, on_step=on_step, **kwargs)
    if rows:
        from rich.table import Table

        table = Table(title="strict UA of every concept erased so far, after each step (relapse shows as a drop)")
        table.add_column("step")
        for c in concepts:
            table.add_column(c.target, justify="right")
        for row in rows:
            table.add_row(str(row["step"]), *(row.get(c.target, "") for c in concepts))
        console.print(table)
    console.print(
        f"apply the chain: forgetpatch.apply(pipe, {str(output / f'step-{len(concepts)}')!r}, with_lineage=True)"
    )


def register(app: typer.Typer) -> None:
    app.command("chain")(chain_command)


def _remove_old(output: Path) -> None:
    """With --force, before the work: the steps (and their reports) of the chain already in ``output``. Removed after
    the run, as before, a run interrupted between them left new steps beside old ones, which read as one chain."""
    import shutil

    for folder in sorted(output.glob("step-*")):
        if folder.name.removeprefix("step-").isdigit() and (folder / "forgetpatch.json").is_file():
            shutil.rmtree(folder)
            (output / "reports" / f"{folder.name}.json").unlink(missing_ok=True)
            console.print(f"removed {folder} (a step of the chain --force replaces)")
