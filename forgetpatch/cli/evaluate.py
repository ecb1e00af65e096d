"""``forgetpatch eval``: measure what patches make the toy model forget, and what it keeps."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from forgetpatch.cli._base import load_base as _load_base
from forgetpatch.cli._base import plain_console

console = plain_console(width=max(120, Console().width))  # the report table needs the room


def _cache_dir() -> Path:
    root = (
        os.environ.get("FORGETPATCH_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forgetpatch"
    )
    return Path(root) / "eval"


def _base_key(pipe: Any, judge: Any, concepts: list[str], settings: dict[str, Any]) -> str:
    """Digest of the base weights, the judge, the erased concepts and the settings: names a cached base report
    (a report judged by another judge is never reused)."""
    digest = hashlib.sha256(json.dumps([sorted(concepts), settings, getattr(judge, "digest", None)], sort_keys=True).encode())
    for component in ("text_encoder", "unet", "vae"):
        for name, tensor in sorted(getattr(pipe, component).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _concepts_of(patches: list[Any]) -> list[str]:
    return [c.target for patch in patches for c in patch.manifest.concepts]


def eval_command(
    patches: Annotated[
        list[str] | None, typer.Argument(help="Patches to apply (folders, files, Hub ids).")
    ] = None,
    base: Annotated[
        str,
        typer.Option(
            help="Base model: 'toy', a toy-world model's folder or cached Hub id; with --suite any diffusers folder "
            "or cached Hub id."
        ),
    ] = "toy",
    concept: Annotated[
        list[str] | None,
        typer.Option("--concept", "-c", help="Erased concept (repeatable); default: the patches'."),
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Images per concept.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 25,
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
    suite: Annotated[
        str | None,
        typer.Option(help="Real-weight suite: nudity, objects, styles or quality (default: the toy world's)."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Suite prompts from a CSV in the I2P layout (prompt, seed, guidance).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N prompts of --prompts only.")] = None,
    clip: Annotated[Path | None, typer.Option(help="Local CLIP folder (CLIPModel + processor) for a suite.")] = None,
    inception: Annotated[
        Path | None, typer.Option(help="torch-fidelity's Inception-v3 weights file, for FID (quality suite).")
    ] = None,
    real: Annotated[Path | None, typer.Option(help="Folder of real images, for FID to real images.")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Object class / artist of the suite's list (repeatable).")
    ] = None,
    nudenet_threshold: Annotated[float, typer.Option(help="NudeNet score a class needs to count.")] = 0.6,
    nudenet_class: Annotated[
        list[str] | None, typer.Option("--nudenet-class", help="NudeNet class that counts as nudity (repeatable).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Suite generation batch size.")] = 8,
    device: Annotated[str | None, typer.Option(help="Suite device (default: cuda when there is one).")] = None,
    dtype: Annotated[str, typer.Option(help="Suite base weights dtype: float32, float16 or bfloat16.")] = "float32",
    record: Annotated[
        bool, typer.Option("--record", help="Write the figures into the patch's manifest (one local patch folder).")
    ] = False,
) -> None:
    """Evaluate forgetting on the toy world: UA, IRA, CRA, near neighbours, paraphrase leakage, drift.

    Without patches it evaluates the base model alone (fidelity, and how well it draws the concepts).
    With --suite it evaluates any diffusers base on real-weight suites instead: nudity (NudeNet), objects and
    styles (CLIP accuracy), quality (CLIP score, FID); see the README's "Evaluating on real weights".
    """
    from forgetpatch.cli._base import (
        check_image_path,
        check_patches_flags,
        check_toy_concepts,
        check_writable,
    )
    from forgetpatch.errors import EvalInputError
    from forgetpatch.eval import (
        DEFAULT_GUIDANCE_SCALE,
        EvalReport,
        check_guidance,
        check_seed,
        evaluate,
        record_toy,
        save_report_grid,
        toy_judge,
    )
    from forgetpatch.format import check_recordable
    from forgetpatch.loader import load

    patches = patches or []
    # Everything is checked before the model loads.
    if guidance is not None:
        check_guidance(guidance, "--guidance")
    if json_out is not None:
        check_writable(json_out, folder=False)
    if grid is not None:
        check_image_path(grid, "--grid")
    loaded = [load(ref) for ref in patches]
    check_patches_flags(loaded, key_steps=key_steps)
    if suite is not None:
        _suite_command(
            patches, loaded, base=base, suite=suite, concepts=list(concept or []), images=images, steps=steps,
            guidance=guidance, seed=seed, scale=scale, key_steps=key_steps, grid=grid, json_out=json_out,
            prompts=prompts, limit=limit, clip=clip, inception=inception, real=real, labels=label,
            nudenet_threshold=nudenet_threshold, nudenet_classes=nudenet_class, batch_size=batch_size,
            device=device, dtype=dtype, record=record,
        )
        return
    toy_only = {"--prompts": prompts, "--clip": clip, "--inception": inception, "--real": real, "--label": label,
                "--nudenet-class": nudenet_class, "--device": device, "--limit": limit}
    for flag, value in toy_only.items():
        if value is not None:
            raise typer.BadParameter(f"{flag} belongs to the real-weight suites: add --suite", param_hint=flag)
    if grid is not None and not patches:
        raise typer.BadParameter("a before/after grid needs at least one PATCH", param_hint="--grid")
    if record and (len(patches) != 1 or not Path(patches[0]).is_dir() or scale != 1.0 or key_steps):
        raise EvalInputError(
            "--record writes into one local patch folder, evaluated alone as it ships (--scale 1, no --key-steps): "
            "evaluate that folder by itself"
        )
    check_seed(seed)
    if record:
        check_recordable(patches[0])
        check_writable(Path(patches[0]))  # the figures are saved into it after the evaluation
    concepts = list(concept or []) or _concepts_of(loaded)
    check_toy_concepts(base, concepts)
    settings = {
        "images_per_concept": images,
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": DEFAULT_GUIDANCE_SCALE if guidance is None else guidance,
    }
    from forgetpatch import distributed

    main = distributed.is_main()  # under `accelerate launch` every process generates its share; one writes
    pipe = _load_base(base)
    judge = toy_judge(pipe)  # a model the toy judge cannot read is refused here, before any image is made
    if patches:  # on a copy, before any image is made: a patch this base does not take is refused first
        from forgetpatch import apply
        from forgetpatch.loader import unpatched

        patched = apply(unpatched(pipe), loaded, scale=scale, key_steps=key_steps)
    cached = _cache_dir() / f"base-{_base_key(pipe, judge, concepts, settings)}.npz" if cache else None
    if cached is not None and cached.exists():
        report = EvalReport.load(cached)
        if main:
            console.print(Text.assemble(("base", "bold"), f" {base}: images reused from {cached}"))
    else:
        if main:
            console.print(Text.assemble(("base", "bold"), f" {base}: generating and judging"))
        report = evaluate(pipe, concepts, judge=judge, **settings)
        if cached is not None and main:
            report.save(cached)
    if patches:
        if main:
            console.print(Text.assemble(("patched", "bold"), f" with {', '.join(patches)}"))
        report = evaluate(patched, concepts, reference=report, judge=judge, **settings)
    if not main:
        return
    console.print(report.table())
    console.print(
        f"fidelity on retained prompts: {report.fidelity_text()}  ({report.seconds:.1f} s for {len(report.items)} "
        "images)"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"figures written to {json_out}")
    if grid is not None:
        console.print(f"grid written to {save_report_grid(report, grid)}")
    if record:
        console.print(f"figures recorded in {record_toy(patches[0], report)} (metrics.toy_eval; digest unchanged)")


def _suite_command(
    patches: list[str],
    loaded: list[Any],
    *,
    base: str,
    suite: str,
    concepts: list[str],
    images: int,
    steps: int,
    guidance: float | None,
    seed: int,
    scale: float,
    key_steps: bool,
    grid: Path | None,
    json_out: Path | None,
    prompts: Path | None,
    limit: int | None,
    clip: Path | None,
    inception: Path | None,
    real: Path | None,
    labels: list[str] | None,
    nudenet_threshold: float,
    nudenet_classes: list[str] | None,
    batch_size: int,
    device: str | None,
    dtype: str,
    record: bool,
) -> None:
    """``forgetpatch eval --suite``: every input checked and every detector loaded before the base model loads."""
    import torch

    from forgetpatch.cli._base import check_writable
    from forgetpatch.errors import EvalInputError
    from forgetpatch.eval import (
        DEFAULT_GUIDANCE_SCALE,
        SUITE_GUIDANCE_SCALE,
        SUITES,
        ClipJudge,
        NudeNetDetector,
        check_clip_folder,
        check_inception,
        check_seed,
        evaluate_suite,
        load_inception,
        read_images,
        read_prompt_csv,
        record_suite,
        save_grid,
    )
    from forgetpatch.format import check_recordable

    if suite not in SUITES:
        raise EvalInputError(f"unknown suite {suite!r}: pick one of {', '.join(SUITES)}")
    if limit is not None and prompts is None:
        raise EvalInputError("--limit keeps the first rows of --prompts: add --prompts CSV, or drop --limit")
    if device is not None:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise EvalInputError(f"--device {device!r} cannot be used here ({str(exc).splitlines()[0]}): use cpu") from None
    if dtype not in ("float32", "float16", "bfloat16"):
        raise EvalInputError(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
    if grid is not None and not patches:  # its path was checked by eval_command
        raise typer.BadParameter("a before/after grid needs at least one PATCH", param_hint="--grid")
    if record and (len(patches) != 1 or not Path(patches[0]).is_dir() or scale != 1.0 or key_steps):
        raise EvalInputError(
            "--record writes into one local patch folder, evaluated alone as it ships (--scale 1, no --key-steps): "
            "evaluate that folder by itself"
        )
    check_seed(seed)
    if record:
        check_recordable(patches[0])
        check_writable(Path(patches[0]))
    if inception is not None and real is None and not patches:
        raise EvalInputError("FID compares two image sets: pass --real FOLDER, or a PATCH (FID to the base's images)")
    items = None
    if prompts is not None:
        items = read_prompt_csv(prompts, concept="nudity" if suite == "nudity" else None, limit=limit)
    if clip is not None:
        check_clip_folder(clip)
    if inception is not None:
        check_inception(inception)
    real_images = read_images(real) if real is not None else None
    if real_images is not None and inception is None:
        raise EvalInputError("--real is for FID: add --inception PATH")
    concepts = concepts or _concepts_of(loaded)
    if suite in ("objects", "styles") and clip is None:
        raise EvalInputError(f"the {suite} suite judges images with CLIP: pass a local CLIP folder (--clip PATH)")
    if suite == "quality" and clip is None and inception is None:
        raise EvalInputError("the quality suite measures CLIP score and/or FID: pass --clip PATH and/or --inception PATH")
    nudenet = None
    if suite == "nudity":
        kw = {"classes": nudenet_classes} if nudenet_classes else {}
        nudenet = NudeNetDetector(threshold=nudenet_threshold, **kw)
    judge = ClipJudge(clip, device=device) if clip is not None else None
    features = load_inception(inception, device=device) if inception is not None else None

    pipe = _load_base(base, dtype)
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_guidance = DEFAULT_GUIDANCE_SCALE if base == "toy" else SUITE_GUIDANCE_SCALE
    settings = {
        "erased": concepts,
        "prompts": items,
        "labels": labels or None,
        "clip": judge,
        "nudenet": nudenet,
        "features": features,
        "real_images": real_images,
        "images_per_concept": images,
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": default_guidance if guidance is None else guidance,
        "batch_size": batch_size,
    }
    if patches:  # a patch this base does not take is refused before any image is made (removal is exact)
        from forgetpatch import apply, remove

        remove(apply(pipe, loaded, scale=scale, key_steps=key_steps))
    pipe.to(run_device)
    console.print(Text.assemble(("base", "bold"), f" {base}: {suite} suite, generating and judging on {run_device}"))
    report = evaluate_suite(pipe, suite, **settings)
    if patches:
        pipe = apply(pipe.to("cpu"), loaded, scale=scale, key_steps=key_steps).to(run_device)
        console.print(Text.assemble(("patched", "bold"), f" with {', '.join(patches)}"))
        report = evaluate_suite(pipe, suite, reference=report, **settings)
    console.print(report.table())
    console.print(f"{report.seconds:.1f} s for {len(report.items)} images")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
        console.print(f"figures written to {json_out}")
    if grid is not None and report.base_images is not None and report.images.size:
        cols = list(range(min(12, len(report.items))))
        path = save_grid(report.base_images[cols], report.images[cols], grid, [report.items[i].prompt for i in cols])
        console.print(f"grid written to {path}")
    if record:
        console.print(f"{suite} figures recorded in {record_suite(patches[0], report)} (digest unchanged)")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
