"""``forgetpatch eval``: measure what patches make the toy model forget, and what it keeps."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from forgetpatch.cli._base import load_base as _load_base

console = Console(width=max(120, Console().width))  # the report table needs the room


def _cache_dir() -> Path:
    root = (
        os.environ.get("FORGETPATCH_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forgetpatch"
    )
    return Path(root) / "eval"


def _base_key(pipe: Any, concepts: list[str], settings: dict[str, Any]) -> str:
    """Digest of the base weights, the judge, the erased concepts and the settings: names a cached base report
    (a report judged by another judge is never reused)."""
    from forgetpatch.toy.judge import JUDGE_WEIGHTS

    digest = hashlib.sha256(json.dumps([sorted(concepts), settings], sort_keys=True).encode())
    for judge_file in (JUDGE_WEIGHTS, JUDGE_WEIGHTS.with_suffix(".json")):
        digest.update(judge_file.read_bytes())
    for component in ("text_encoder", "unet", "vae"):
        for name, tensor in sorted(getattr(pipe, component).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _concepts_of(patches: list[str]) -> list[str]:
    from forgetpatch import load

    return [c.target for ref in patches for c in load(ref).manifest.concepts]


def eval_command(
    patches: Annotated[
        list[str] | None, typer.Argument(help="Patches to apply (folders, files, Hub ids).")
    ] = None,
    base: Annotated[
        str, typer.Option(help="Base model: 'toy' or a diffusers folder of a toy-world model.")
    ] = "toy",
    concept: Annotated[
        list[str] | None,
        typer.Option("--concept", "-c", help="Erased concept (repeatable); default: the patches'."),
    ] = None,
    images: Annotated[int, typer.Option(help="Images per concept.")] = 8,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale (default: the eval default).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of prompts and generation.")] = 0,
    scale: Annotated[float, typer.Option(help="Patch scale.")] = 1.0,
    key_steps: Annotated[bool, typer.Option("--key-steps", help="Gate patches to their key steps.")] = False,
    grid: Annotated[Path | None, typer.Option(help="Write a before/after PNG grid here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    cache: Annotated[
        bool,
        typer.Option(
            help="Reuse the base model's images from ~/.cache/forgetpatch/eval (FORGETPATCH_CACHE)."
        ),
    ] = True,
) -> None:
    """Evaluate forgetting on the toy world: UA, IRA, CRA, near neighbours, paraphrase leakage, drift.

    Without patches it evaluates the base model alone (fidelity, and how well it draws the concepts).
    """
    from forgetpatch.eval import DEFAULT_GUIDANCE_SCALE, EvalReport, evaluate, save_report_grid

    patches = patches or []
    if grid is not None and not patches:
        raise typer.BadParameter("a before/after grid needs at least one PATCH", param_hint="--grid")
    concepts = list(concept or []) or (_concepts_of(patches) if patches else [])
    settings = {
        "images_per_concept": images,
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": DEFAULT_GUIDANCE_SCALE if guidance is None else guidance,
    }
    pipe = _load_base(base)
    cached = _cache_dir() / f"base-{_base_key(pipe, concepts, settings)}.npz" if cache else None
    if cached is not None and cached.exists():
        report = EvalReport.load(cached)
        console.print(f"[bold]base[/] {base}: images reused from {cached}")
    else:
        console.print(f"[bold]base[/] {base}: generating and judging")
        report = evaluate(pipe, concepts, **settings)
        if cached is not None:
            report.save(cached)
    if patches:
        from forgetpatch import apply

        pipe = apply(pipe, patches, scale=scale, key_steps=key_steps)
        console.print(f"[bold]patched[/] with {', '.join(patches)}")
        report = evaluate(pipe, concepts, reference=report, **settings)
    console.print(report.table())
    console.print(
        "fidelity on retained prompts: "
        + ", ".join(f"{k} {v:.0%}" for k, v in report.accuracy.items())
        + f"  ({report.seconds:.1f} s for {len(report.items)} images)"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"figures written to {json_out}")
    if grid is not None:
        console.print(f"grid written to {save_report_grid(report, grid)}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
