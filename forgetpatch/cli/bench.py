"""``forgetpatch bench NAME``: run one of the repository's benchmarks (``benchmarks/NAME.py``)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Annotated

import typer


def bench(
    name: Annotated[str | None, typer.Argument(help="Benchmark: apply, closed_form, finetune, ...")] = None,
    args: Annotated[list[str] | None, typer.Argument(help="Arguments passed to the benchmark.")] = None,
    root: Annotated[Path, typer.Option(help="Repository checkout holding benchmarks/.")] = Path("."),
) -> None:
    """Run ``benchmarks/NAME.py`` from a checkout; each prints ratios measured in one run.

    ``forgetpatch bench NAME --help`` shows that benchmark's options.
    """
    folder = root / "benchmarks"
    if name is None or name in ("--help", "-h"):
        found = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        typer.echo("usage: forgetpatch bench NAME [ARGS...]   (NAME --help: the benchmark's options)")
        typer.echo(f"benchmarks in {folder}: {', '.join(found) or 'none (run from a forgetpatch checkout or pass --root)'}")
        return
    stem = name.removesuffix(".py")
    if not stem.isidentifier():  # a name, never a path: nothing outside benchmarks/ runs
        raise typer.BadParameter(f"{name!r} is not a benchmark's name (apply, closed_form, ...)", param_hint="NAME")
    script = folder / f"{stem}.py"
    if not script.is_file():
        found = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        hint = (
            f"available: {', '.join(found)}"
            if found
            else "run it from a forgetpatch checkout (or pass --root)"
        )
        raise typer.BadParameter(f"no benchmark {script}; {hint}", param_hint="NAME")
    sys.argv = [str(script), *(args or [])]
    runpy.run_path(str(script), run_name="__main__")


def register(app: typer.Typer) -> None:
    # the benchmark's own options (and --help) go through to it
    app.command("bench", add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)
