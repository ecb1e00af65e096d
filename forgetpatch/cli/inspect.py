"""``forgetpatch inspect REF``: show a patch's manifest as a readable table."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from forgetpatch.cli._base import plain_console
from forgetpatch.format import ROBUSTNESS_METRICS, TOY_EVAL_METRICS
from forgetpatch.hub import parent_names, readable, robustness_summary, short_value, summary_rows


def _size(patch) -> str:
    n = sum(t.numel() * t.element_size() for t in patch.state_dict.values())
    for unit in ("B", "kB", "MB", "GB"):  # decimal units, as file sizes are shown (a 207 kB file read "186.0 KB")
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def patch_table(patch) -> Table:
    """A compact table of what people look at first: concepts, method, key steps, base, rank, size, lineage by
    name, the measured figures summarised (``--json`` prints everything)."""
    m = patch.manifest
    table = Table(title=f"patch {m.name}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")

    def concepts(entries) -> str:
        return (
            "\n".join(
                f"{c.target} ({c.kind})"
                + (f" -> {c.guide}" if c.guide else "")
                + (f", superclass {c.superclass}" if c.superclass else "")
                for c in entries
            )
            or "-"
        )

    table.add_row("concepts erased", concepts(m.concepts))
    table.add_row("preserved", ", ".join(c.target for c in m.preserved) or "-")
    params = ", ".join(f"{k}={short_value(v, code=str)}" for k, v in m.method.params.items())
    table.add_row("method", f"{m.method.name} v{m.method.version}" + (f" ({params})" if params else ""))
    steps = [
        f"{k.start:.2f}-{k.end:.2f}"
        + (f" [{k.concept}]" if k.concept else "")
        + (f" ({len(k.timesteps)} timesteps, {k.scheduler})" if k.timesteps else "")
        for k in m.key_steps or []
    ]
    table.add_row("key steps", "\n".join(steps) or "all (always on)")
    base = m.base_model
    table.add_row(
        "base model",
        f"{base.id or 'unknown'}"
        + (f"@{base.revision}" if base.revision else "")
        + f" (family {base.family}, {len(base.fingerprint)} modules fingerprinted)",
    )
    components = sorted({t.split(".", 1)[0] for t in m.lora.target_modules})
    error = m.lora.reconstruction_error
    table.add_row(
        "lora",
        f"rank {m.lora.rank}, alpha {m.lora.alpha:g}, {len(m.lora.target_modules)} modules in "
        f"{', '.join(components)}" + (f", reconstruction error {error:.2e}" if error is not None else ""),
    )
    table.add_row("size", _size(patch))
    table.add_row("digest", patch.digest[:16])
    table.add_row("lineage", "\n".join(f"{n} ({d[:12]})" if n else d for n, d in parent_names(patch)) or "-")
    rows = summary_rows(m.metrics)
    unreadable = readable(m.metrics)[1]
    odd = "recorded in a shape forgetpatch does not read (--json shows it)"
    table.add_row("measured", "\n".join(f"{r['what']}: {r['patched']} (base {r['base']})" for r in rows)
                  or (odd if TOY_EVAL_METRICS in unreadable else "not measured (forgetpatch eval PATCH --record)"))
    if not robustness_summary(m.metrics):
        table.add_row("robustness", odd if ROBUSTNESS_METRICS in unreadable
                      else "not measured (forgetpatch attack PATCH --record)")  # fmt: skip
    others = [k for k in m.metrics if k not in (TOY_EVAL_METRICS, ROBUSTNESS_METRICS)]
    table.add_row("other metrics", ", ".join(k.replace("_", " ") for k in others) + " (--json for all)" if others else "-")
    table.add_row(
        "created", f"{m.created_at} by forgetpatch {m.library_version} (format v{m.format_version})"
    )
    return table


def inspect(
    ref: Annotated[str, typer.Argument(help="Patch folder, .safetensors file or Hub id org/name[@rev].")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest as JSON.")] = False,
    allow_unverified: Annotated[
        bool, typer.Option("--allow-unverified", help="Show a patch that cannot be verified (old format).")
    ] = False,
) -> None:
    """Show what a patch erases, how, where on the trajectory, for which base model, and its lineage."""
    from forgetpatch.loader import load

    patch = load(ref, allow_unverified=allow_unverified)
    if as_json:
        typer.echo(patch.manifest.model_dump_json(indent=2))
    else:
        plain_console().print(patch_table(patch))


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
