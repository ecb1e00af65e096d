"""``forgetpatch erase``: make a base model forget concepts and write the patch folder.

Example:
    $ forgetpatch erase --base toy --method scapre --concept circle --concept star -o no-circle-star/
    $ forgetpatch erase --base ./sd15 --recipe recipes/toy-no-5-shapes-uce.yaml -o no-5-shapes/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from forgetpatch.cli._base import load_base
from forgetpatch.errors import ForgetPatchError, MethodError

_out = Console()
_err = Console(stderr=True)


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["erase_scale=2", "spectral_gate=true"]`` -> ``{"erase_scale": 2, "spectral_gate": True}``."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"--param takes key=value (e.g. --param erase_scale=2), got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


def erase_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Patch folder to write.")],
    base: Annotated[
        str, typer.Option(help="'toy', a diffusers pipeline folder, or a cached Hub id.")
    ] = "toy",
    method: Annotated[
        str | None, typer.Option(help="Unlearning method (default: the recipe's, else scapre).")
    ] = None,
    concept: Annotated[
        list[str] | None, typer.Option("--concept", "-c", help="A concept to erase (repeat).")
    ] = None,
    kind: Annotated[
        str, typer.Option(help="Kind of the --concept concepts: object, style, nudity, identity, other.")
    ] = "object",
    guide: Annotated[str | None, typer.Option(help="Guide prompt for the --concept concepts.")] = None,
    preserve: Annotated[
        list[str] | None, typer.Option("--preserve", "-p", help="A concept to keep (repeat).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe YAML (method, concepts, preserve, params).")
    ] = None,
    param: Annotated[list[str] | None, typer.Option(help="Method parameter key=value (repeat).")] = None,
    name: Annotated[str | None, typer.Option(help="Patch name (default: derived from the concepts).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for methods that draw noise.")] = None,
) -> None:
    """Erase concepts from a base model and save the change as a patch folder."""
    from forgetpatch.methods import erase
    from forgetpatch.recipes import ConceptSpec, load_recipe

    try:
        spec = load_recipe(recipe) if recipe else None
        if concept:
            concepts = [ConceptSpec(target=c, kind=kind, guide=guide).to_concept() for c in concept]
        elif spec is not None:
            concepts = spec.erase_concepts()
        else:
            raise MethodError("nothing to erase: give --concept (repeatable) or --recipe")
        if preserve:
            kept = [ConceptSpec(target=p, kind=kind).to_concept() for p in preserve]
        else:
            kept = spec.preserved() if spec else []
        params = {**(spec.params if spec else {}), **parse_params(param or [])}
        if seed is not None:
            params["seed"] = seed
        patch_name = name or (spec.name if spec else None)
        if patch_name:
            params["name"] = patch_name
        chosen = method or (spec.method if spec else "scapre")
        pipe = load_base(base)
        patch = erase(pipe, concepts, method=chosen, preserve=kept, **params)
        folder = patch.save(output)
    except (ForgetPatchError, ValueError) as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    lora = patch.manifest.lora
    error = f"{lora.reconstruction_error:.2e}" if lora.reconstruction_error is not None else "n/a"
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    _out.print(
        f"[green]wrote[/green] {folder}  ({patch.name}: {chosen}, {len(concepts)} concept(s), "
        f"{len(lora.target_modules)} layers, rank <= {lora.rank}, max reconstruction error {error}, "
        f"{size / 1e6:.2f} MB)"
    )


def register(app: typer.Typer) -> None:
    """Add ``erase`` to the ``forgetpatch`` command."""
    app.command("erase")(erase_command)
