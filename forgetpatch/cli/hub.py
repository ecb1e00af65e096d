"""``forgetpatch push`` and ``forgetpatch export``: publish a patch, or convert it for other tools."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from forgetpatch.cli._base import plain_console
from forgetpatch.errors import ForgetPatchError

_err = plain_console(stderr=True, soft_wrap=True)


class ExportFormat(str, Enum):
    kohya = "kohya"


def push_command(
    folder: Annotated[Path, typer.Argument(help="Patch folder (written by Patch.save / forgetpatch erase).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo, 'org/name'.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (created if missing).")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN / saved login).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    license: Annotated[
        str | None, typer.Option(help="Model card license (default: the base model's).")
    ] = None,
) -> None:
    """Upload a patch folder and a generated model card to the Hub, in one commit.

    Prints the patch's recorded attack results first (`forgetpatch attack --record`), or warns that it has none.
    """
    from forgetpatch.hub import push

    _print_robustness(folder)
    url = push(
        folder,
        repo_id,
        private=private,
        revision=revision,
        token=token,
        commit_message=message,
        license=license,
    )
    typer.echo(url)


def _print_robustness(folder: Path) -> None:
    """Tell the publisher how robust the patch is known to be, on stderr (stdout stays the URL)."""
    from forgetpatch.format import read_patch
    from forgetpatch.hub import robustness_summary

    if not folder.is_dir():
        return  # push says what is wrong with the folder
    rows = robustness_summary(read_patch(folder).manifest.metrics)
    if not rows:
        _err.print(Text.assemble(
            ("warning:", "yellow"),
            " no attack results recorded: nobody knows how easily the concept comes back; "
            f"run `forgetpatch attack {folder} --record` first (toy-world patches)",
        ))
        return
    _err.print("robustness recorded on the patch (strict UA before -> after each attack):")
    for r in rows:
        seen = [f"{what}: {r[key]}" for key, what in (("named", "named as the concept"), ("fitted", "fitted as it"))
                if r.get(key, "-") != "-"]
        also = f" ({'; '.join(seen)})" if seen else ""
        _err.print(f"  {r['concept']} / {r['attack']}: {r['before']} -> {r['after']}{also}")


def export_command(
    folder: Annotated[Path, typer.Argument(help="Patch folder to export.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (.safetensors).")],
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="Target format.")
    ] = ExportFormat.kohya,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a patch as a single LoRA file other tools load (kohya: AUTOMATIC1111, ComfyUI)."""
    from forgetpatch.cli._base import check_writable
    from forgetpatch.format import read_patch
    from forgetpatch.hub import export_kohya

    patch = read_patch(folder)
    check_writable(output, folder=False)
    if output.exists() and not force:
        raise ForgetPatchError(f"{str(output)!r} exists: pick another --output, or pass --force to replace it")
    typer.echo(str(export_kohya(patch, output)))


def register(app: typer.Typer) -> None:
    """Add ``push`` and ``export`` to the ``forgetpatch`` command."""
    app.command("push")(push_command)
    app.command("export")(export_command)
