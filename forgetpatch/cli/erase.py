"""``forgetpatch erase``: make a base model forget concepts and write the patch folder.

Example:
    $ forgetpatch erase --base toy --method scapre --concept circle --concept star -o no-circle-star/
    $ forgetpatch erase --recipe recipes/toy-no-5-shapes-uce.yaml -o no-5-shapes/
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
import yaml
from rich.text import Text

from forgetpatch.cli._base import (
    check_new_patch_folder,
    check_toy_concepts,
    is_toy_base,
    load_base,
    plain_console,
)
from forgetpatch.errors import MethodError
from forgetpatch.format import Concept, ConceptKind, check_patch_name
from forgetpatch.recipes import as_number

_out = plain_console()
#: The real-weight suite that scores a concept of each kind (``forgetpatch eval --suite``).
_SUITES = {"object": "objects", "style": "styles", "nudity": "nudity"}


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["erase_scale=2", "spectral_gate=true"]`` -> ``{"erase_scale": 2, "spectral_gate": True}``."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"--param takes key=value (e.g. --param erase_scale=2), got {item!r}")
        params[key.strip()] = as_number(yaml.safe_load(value))
    return params


def erase_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Patch folder to write.")],
    base: Annotated[
        str | None,
        typer.Option(help="'toy', a diffusers pipeline folder, or a cached Hub id (default: the recipe's, else toy)."),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Unlearning method (default: the recipe's, else scapre).")
    ] = None,
    concept: Annotated[
        list[str] | None, typer.Option("--concept", "-c", help="A concept to erase (repeat).")
    ] = None,
    kind: Annotated[
        str, typer.Option(help="Kind of the --concept concepts: object, style, nudity, identity, other.")
    ] = "object",
    guide: Annotated[str | None, typer.Option(help="Guide prompt for the --concept concepts.")] = None,
    superclass: Annotated[
        str | None,
        typer.Option(help="Superclass of the --concept concepts, e.g. 'fish' (Dynamic Mask aligns each with it)."),
    ] = None,
    preserve: Annotated[list[str] | None, typer.Option("--preserve", help="A concept to keep (repeat).")] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe YAML (method, concepts, preserve, params).")
    ] = None,
    param: Annotated[list[str] | None, typer.Option(help="Method parameter key=value (repeat).")] = None,
    name: Annotated[str | None, typer.Option(help="Patch name (default: derived from the concepts).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for methods that draw noise.")] = None,
    paper: Annotated[
        bool,
        typer.Option(
            "--paper",
            help="Run the method exactly as published (closed form: the bare word's token, no templates), not "
            "with the base's settings that forget (forgetpatch.methods.defaults).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing patch at --output.")] = False,
) -> None:
    """Erase concepts from a base model and save the change as a patch folder.

    Every setting left unset comes from the base (on the toy world, settings measured to forget) or the
    method's published defaults; --paper runs the method exactly as its paper states it.
    """
    from forgetpatch.methods import check_concepts, check_params, erase
    from forgetpatch.recipes import load_recipe

    # Everything is checked before the model loads.
    if kind not in get_args(ConceptKind):
        raise MethodError(f"--kind {kind!r} is not a concept kind; choose one of {', '.join(get_args(ConceptKind))}")
    spec = load_recipe(recipe) if recipe else None
    chosen_base = _choose_base(base, spec, recipe)
    if concept:
        concepts = [Concept(target=c, kind=kind, guide=guide, superclass=superclass) for c in concept]
    elif spec is not None:
        concepts = spec.erase_concepts()
    else:
        raise MethodError("nothing to erase: give --concept (repeatable) or --recipe")
    kept = [Concept(target=p, kind=kind) for p in preserve] if preserve else (spec.preserved() if spec else [])
    check_toy_concepts(chosen_base, [c.target for c in [*concepts, *kept]])
    check_concepts(concepts, kept)
    params = {**(spec.params if spec else {}), **parse_params(param or [])}
    if seed is not None:
        params["seed"] = seed
    patch_name = name or (spec.name if spec else None)
    if patch_name:
        params["name"] = check_patch_name(patch_name)
    chosen = method or (spec.method if spec else "scapre")
    check_params(chosen, params)  # an unknown method, parameter or type is named here, before the model loads
    check_new_patch_folder(output, force)

    pipe = load_base(chosen_base)
    start = time.perf_counter()
    patch = erase(pipe, concepts, method=chosen, preserve=kept, paper=paper or bool(spec and spec.paper), **params)
    seconds = time.perf_counter() - start
    from forgetpatch import distributed

    if not distributed.is_main():  # under accelerate launch every process has the patch; process 0 writes it
        return
    folder = patch.save(output)
    lora = patch.manifest.lora
    error = f"{lora.reconstruction_error:.2e}" if lora.reconstruction_error is not None else "n/a"
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) if folder.is_dir() else folder.stat().st_size
    _out.print(Text.assemble(
        ("wrote", "green"),
        f" {folder}  ({patch.name}: {chosen}, {len(concepts)} concept(s) in {seconds:.0f} s, "
        f"{len(lora.target_modules)} layers, rank <= {lora.rank}, max reconstruction error {error}, "
        f"{size / 1e6:.2f} MB)",
    ))
    probe = concepts[0].target
    if is_toy_base(chosen_base):
        measure = f"forgetpatch eval --base {chosen_base} {folder} --grid grid.png"
    else:  # the toy judge cannot read this model's images: a real-weight suite (README: Evaluating on real weights)
        suite = _SUITES.get(patch.manifest.concepts[0].kind, "objects|styles|nudity")
        clip = "" if suite == "nudity" else " --clip CLIP_FOLDER"
        measure = f"forgetpatch eval --base {chosen_base} {folder} --suite {suite}{clip}"
    draw = f'forgetpatch apply --base {chosen_base} {folder} -p "a {probe}" -o out.png'
    _out.print(Text.assemble("next: measure it with ", (measure, "bold"), ", or draw with it: ", (draw, "bold")))


def _choose_base(base: str | None, spec: Any, recipe: Path | None) -> str:
    """``--base``, else the recipe's ``base:``, else the toy world; a toy recipe on another base (or the reverse)
    is refused, since its settings were made for that model."""
    written_for = getattr(spec, "base", None)
    if base is None:
        return written_for or "toy"
    if written_for and (written_for == "toy") != (base == "toy"):
        raise MethodError(
            f"recipe {str(recipe)!r} is written for base {written_for!r}, not {base!r}: drop --base to use "
            f"{written_for!r}, or use a recipe written for {base!r}"
        )
    return base


def register(app: typer.Typer) -> None:
    """Add ``erase`` to the ``forgetpatch`` command."""
    app.command("erase")(erase_command)
