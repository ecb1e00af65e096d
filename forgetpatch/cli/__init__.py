"""The ``forgetpatch`` command line. Each verb group lives in its own module with ``register(app)``.

A forgetpatch error is one red line on stderr and exit code 1, from every verb (:func:`one_line_errors`);
``forgetpatch --debug VERB ...`` (or ``FORGETPATCH_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup


class _FlagsTakeNoValue:
    """Help without a type beside flags: typer (0.29) prints ``--fuse <bool>``, as if the flag took a value."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.get_params(ctx):  # type: ignore[attr-defined]
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        super().format_help(ctx, formatter)  # type: ignore[misc]


class Command(_FlagsTakeNoValue, TyperCommand):
    """Every verb's command class."""


class Group(_FlagsTakeNoValue, TyperGroup):
    """Every verb group's class (``forgetpatch``, ``forgetpatch toy``)."""


app = typer.Typer(
    name="forgetpatch",
    cls=Group,
    help="Make diffusion models forget concepts, as small stackable patches.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# One module per verb group; each defines ``register(app: typer.Typer) -> None``.
_VERB_MODULES = ("demo", "inspect", "erase", "apply", "hub", "toy", "keysteps", "evaluate", "attack", "chain", "bench")


_DEBUG = {"on": os.environ.get("FORGETPATCH_DEBUG", "") not in ("", "0")}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """Make diffusion models forget concepts, as small stackable patches."""
    _DEBUG["on"] = _DEBUG["on"] or debug


def _print_error(exc: BaseException | str) -> None:
    from rich.text import Text

    from forgetpatch.cli._base import plain_console

    plain_console(stderr=True, highlight=False, soft_wrap=True).print(Text.assemble(("error:", "bold red"), f" {exc}"))


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a verb so that a forgetpatch error, or an error of the system on a path (a full disk, a read-only
    folder), prints as one line and exits with 1 (unless ``--debug``); huggingface_hub's retry chatter is not
    shown either (``--debug`` shows it)."""
    from forgetpatch.errors import ForgetPatchError
    from forgetpatch.quiet import quiet_hub

    @functools.wraps(command)
    def verb(*args: Any, **kwargs: Any) -> Any:
        try:
            with contextlib.nullcontext() if _DEBUG["on"] else quiet_hub():
                return command(*args, **kwargs)
        except ForgetPatchError as exc:
            if _DEBUG["on"]:
                raise
            _print_error(exc)
            raise typer.Exit(1) from None
        except OSError as exc:  # writing or reading a path the user gave: a full disk, a read-only folder, ...
            if _DEBUG["on"] or exc.filename is None:
                raise
            where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
            hint = "check the path and that you can write there; --debug shows where"
            _print_error(f"{exc.strerror or exc}: {where} ({hint})")
            raise typer.Exit(1) from None

    return verb


def _wrap_verbs(group: typer.Typer) -> None:
    for info in group.registered_commands:
        if info.callback is not None:
            info.callback = one_line_errors(info.callback)
        if info.cls in (None, TyperCommand):
            info.cls = Command
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            sub.typer_instance.info.cls = sub.typer_instance.info.cls or Group
            _wrap_verbs(sub.typer_instance)


def _load_verbs() -> None:
    for name in _VERB_MODULES:
        importlib.import_module(f"forgetpatch.cli.{name}").register(app)
    _wrap_verbs(app)


_load_verbs()


def main() -> None:
    """Entry point of the ``forgetpatch`` command: forgetpatch errors print as one line, exit code 1."""
    from forgetpatch.errors import ForgetPatchError

    try:
        app()
    except ForgetPatchError as exc:
        if _DEBUG["on"]:
            raise
        _print_error(exc)
        raise SystemExit(1) from None
