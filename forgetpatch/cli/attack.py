"""``forgetpatch attack``: try to bring erased concepts back, and optionally write the answer on the patch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from forgetpatch.cli._base import check_writable, is_toy_base, load_base, plain_console

console = plain_console(width=max(140, Console().width))


def attack_command(
    patches: Annotated[list[str], typer.Argument(help="Patches to attack (folders, files, Hub ids), applied in order.")],
    base: Annotated[
        str, typer.Option(help="Base model: 'toy' or a toy-world model's folder (attacks are scored by the toy judge).")
    ] = "toy",
    concept: Annotated[
        list[str] | None,
        typer.Option("--concept", "-c", help="Erased concept to attack (repeatable); default: the patches'."),
    ] = None,
    attack: Annotated[
        list[str] | None,
        typer.Option("--attack", "-a", help="Attack to run (repeatable); default: all of them."),
    ] = None,
    budget: Annotated[str, typer.Option(help="Budget preset: 'default' or 'tiny' (a quick check).")] = "default",
    seed: Annotated[int, typer.Option(help="Seed of prompts, generation and every attack's draws.")] = 0,
    scale: Annotated[float, typer.Option(help="Patch scale.")] = 1.0,
    key_steps: Annotated[bool, typer.Option("--key-steps", help="Gate patches to their key steps.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    grid: Annotated[Path | None, typer.Option(help="Write the attacked images as a PNG grid here.")] = None,
    grid_all: Annotated[
        bool, typer.Option("--grid-all", help="Put every image in the grid, eight to a row (default: the first eight).")
    ] = False,
    record: Annotated[
        bool,
        typer.Option("--record", help="Write the results into the patch's manifest (one local patch folder)."),
    ] = False,
) -> None:
    """Attack erased concepts: paraphrases, closed-form inversion, prompt search, textual inversion, relearning.

    Prints strict UA before and after each attack with its 95% interval and cost. With --record the results go into the patch's manifest (metrics.robustness; its digest does not change), where the model card, `forgetpatch inspect` and `forgetpatch push` show them.

    Example: forgetpatch attack no-circle/ --concept circle --attack inversion --record
    """  # noqa: E501
    from forgetpatch import apply, attacks
    from forgetpatch.errors import AttackError
    from forgetpatch.eval import check_seed
    from forgetpatch.format import check_recordable
    from forgetpatch.loader import load

    if not is_toy_base(base):
        raise AttackError("attacks are scored by the toy world's judge: use --base toy (or a toy-world model's folder)")
    spend = attacks.Budget.of(budget)
    if grid is not None and grid.suffix.lower() != ".png":
        raise AttackError(f"--grid writes a PNG; give a path ending in .png, not {grid}")
    if grid_all and grid is None:
        raise AttackError("--grid-all says what the grid holds: give --grid PATH.png too")
    for path in (grid, json_out):
        if path is not None:
            check_writable(path, folder=False)
    if record and (len(patches) != 1 or not Path(patches[0]).is_dir() or scale != 1.0 or key_steps):
        raise AttackError(
            "--record writes into one local patch folder, attacked alone as it ships (--scale 1, no --key-steps): "
            "attack that folder by itself (download a Hub patch into a folder of your own first: "
            'huggingface_hub.snapshot_download(repo_id, local_dir="my-patch"))'
        )
    check_seed(seed, error=AttackError)
    if record:
        check_recordable(patches[0])
        check_writable(Path(patches[0]))  # the figures are saved into it after the attacks
    loaded = [load(ref) for ref in patches]
    concepts = list(dict.fromkeys(concept or [c.target for p in loaded for c in p.manifest.concepts]))
    for name in concepts:  # every concept and attack name, before the model loads
        names = attacks.check_request(name, attack)
        if record:
            attacks.check_erases(loaded[0], name)
    pipe = apply(load_base(base), loaded, scale=scale, key_steps=key_steps)
    reports = []
    for name in concepts:
        console.print(Text.assemble(("attacking", "bold"), f" {name} on {', '.join(p.name for p in loaded)} ({budget} budget)"))
        report = attacks.attack(pipe, name, attacks=names, budget=spend, seed=seed)
        console.print(report.table())
        weakest = report.weakest()
        if weakest is not None:
            console.print(
                Text.assemble("weakest against ", (weakest.name, "bold"), f": strict UA {weakest.before} -> "
                              f"{weakest.after} (n {weakest.after.n})")
            )
        reports.append(report)
        if grid is not None:
            path = grid if len(concepts) == 1 else grid.with_name(f"{grid.stem}-{name}{grid.suffix}")
            console.print(f"grid written to {report.save_grid(path, every=grid_all)}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(attacks.robustness_metrics(reports), indent=2))
        console.print(f"figures written to {json_out}")
    if record:
        console.print(f"robustness recorded in {attacks.record(patches[0], reports)} (digest unchanged)")


def register(app: typer.Typer) -> None:
    app.command("attack")(attack_command)
