"""The ``forgetpatch`` command line. Each verb group lives in its own module with ``register(app)``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="forgetpatch",
    help="Make diffusion models forget concepts, as small stackable patches.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# One module per verb group; each defines ``register(app: typer.Typer) -> None``.
_VERB_MODULES = ("demo", "inspect", "erase", "apply", "hub", "toy", "keysteps", "evaluate", "attack", "chain", "bench")


def _load_verbs() -> None:
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(f"forgetpatch.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"forgetpatch.cli.{name}":
                continue  # verb group not written yet
            raise
        module.register(app)


_load_verbs()


def main() -> None:
    """Entry point of the ``forgetpatch`` command: forgetpatch errors print as one line, exit code 1."""
    from rich.console import Console

    from forgetpatch.errors import ForgetPatchError

    try:
        app()
    except ForgetPatchError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise SystemExit(1) from None
