"""Sequential unlearning on the toy world: erase shapes one after another, measure every one erased so far after
each step (does an earlier one come back?), in-domain and cross-domain retention, and the cost of each step.

Chains (``forgetpatch.methods.chain.erase_chain``, each step computed on the model carrying the steps before it):
Dynamic Mask with and without its distillation term, and without its preservation term too (the ablations), with
the world's superclass "shape", with "cross" named as every shape's superclass, and with each shape's own (the toy
world's settings at the chain recipe's rate, ``dm-toy``; see recipes/toy-chain-5.yaml), stacked UCE and ScaPre on the
toy world's settings, holding the shapes the steps before erased as strongly as they erase (the default), only as
strongly as any preserved shape (``hold_scale=1``, what forgetpatch did on the toy world before holding), or not at all
(``hold=False`` and a preserve list without them, as on a base that preserves nothing), stacked KSCU and
ESD (their recipes' settings), and, as the non-sequential reference, one UCE patch of all shapes at once.
Under each chain, its ceiling: per shape, the strict UA of the base with the shape that chain steers it to in its
word's place, on the same prompts (``forgetpatch.eval.guide_ceiling``): what an exact steering would score.
Figures per chain go to ``OUT/<chain>.json`` with the sizes and shapes they were measured with; a rerun reuses a chain
measured with the same ones, and says so (``--fresh`` measures again: after a change of the toy settings, say).

Run:
    python benchmarks/sequential.py                                      # 5 shapes, every chain
    python benchmarks/sequential.py --shapes circle star triangle --only dm dm-no-distill
    python benchmarks/sequential.py --only dm-toy --shapes circle star triangle hexagon square --images 4 \
        --ua-images 32 --last 16 96                                      # the chain recipe's order (README)
    python benchmarks/sequential.py --only dm-toy dm-toy-no-distill dm-toy-release --images 4 --ua-images 32  # README
    python benchmarks/sequential.py --only dm-toy --shapes circle star triangle hexagon square --images 4 \
        --ua-images 32 --last 16 96 --param steps=300 --out runs/sequential-300   # more steps per concept (README)
    python benchmarks/sequential.py --only dm-cross dm-cross-no-distill --images 4 --ua-images 32
    python benchmarks/sequential.py --only uce uce-hold-1 uce-no-hold scapre scapre-hold-1 uce-at-once --images 4 --ua-images 32
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from forgetpatch import toy
from forgetpatch.cli.erase import parse_params
from forgetpatch.errors import MethodError
from forgetpatch.eval import evaluate, guide_ceiling, steered_to
from forgetpatch.methods import Concept, erase_chain
from forgetpatch.rates import percent, rate_text, wilson
from forgetpatch.recipes import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_params(name: str) -> dict[str, Any]:
    kwargs = load_recipe(RECIPES / f"{name}.yaml").erase_kwargs()
    kwargs.pop("name", None)
    kwargs.pop("preserve", None)
    return kwargs


def chains(shapes: list[str]) -> dict[str, tuple[list[Concept], dict[str, Any]]]:
    plain = [Concept(s) for s in shapes]  # the toy world's settings (forgetpatch.toy.defaults)
    shape = [Concept(s, superclass="shape") for s in shapes]
    # the chain recipe's settings (lr 1e-3: at the one-shape default 2e-3 the triangle and the square end at 50% and
    # 66%); each shape's own superclass from the toy world's settings (toy.defaults.SUPERCLASSES)
    dm_chain = recipe_params("toy-chain-5")
    return {
        "dm": (shape, {"method": "dynamic_mask"}),
        "dm-no-distill": (shape, {"method": "dynamic_mask", "distill_weight": 0.0}),
        "dm-cross": ([Concept(s, superclass="cross") for s in shapes], {"method": "dynamic_mask"}),
        "dm-toy": (plain, dm_chain),
        # the ablations: without distillation (earlier shapes still held by the preservation term, as erase holds
        # them), and without either (what the authors' release trains: its distillation never acts)
        "dm-toy-no-distill": (plain, {**dm_chain, "distill_weight": 0.0}),
        "dm-toy-release": (plain, {**dm_chain, "distill_weight": 0.0, "preserve_weight": 0.0}),
        "dm-toy-lr-2e-3": (plain, {"method": "dynamic_mask"}),  # the one-shape default rate at every step
        "dm-cross-no-distill": (
            [Concept(s, superclass="cross") for s in shapes], {"method": "dynamic_mask", "distill_weight": 0.0}
        ),
        "uce": (plain, {"method": "uce"}),
        "uce-hold-1": (plain, {"method": "uce", "hold_scale": 1.0}),
        # nothing keeps the shapes the steps before erased (as on a base whose defaults preserve nothing)
        "uce-no-hold": (plain, {"method": "uce", "hold": False, "preserve": [s for s in toy.SHAPES if s not in shapes]}),
        "scapre": (plain, {"method": "scapre"}),
        "scapre-hold-1": (plain, {"method": "scapre", "hold_scale": 1.0}),
        "kscu": (plain, recipe_params("toy-no-circle-kscu")),
        "kscu-no-hold": (plain, {**recipe_params("toy-no-circle-kscu"), "hold": False}),
        "esd": (plain, recipe_params("toy-no-circle-esd")),
        "uce-at-once": (plain, {"method": "uce"}),
    }


def measure(pipe: Any, names: list[str], size: tuple[int, int], bases: dict) -> dict[str, Any]:
    """Evaluate ``pipe`` on the shapes ``names`` with ``size`` = (images per concept, per erased concept) against the
    base report of that size: the figures of one row of the table."""
    per_concept, per_erased = size
    report = evaluate(pipe, names, reference=bases[size], images_per_concept=per_concept,
                      images_per_erased=per_erased, progress=False)
    worst = report.worst()
    return {
        "ua": {c: report.concepts[c].scores.ua for c in names},
        "ua_interval": {c: report.concepts[c].scores.interval["ua"] for c in names},
        "images": [per_concept, per_erased],
        "safe": report.worst(safe=True),
        **{k: worst[k] for k in ("ira", "cra", "near")},
        "kept": report.concepts[names[0]].scores.ira_by,  # per shape not erased: the share named as itself
        # per erased shape: the share of its images the judge names it in (the relapse proper: strict UA also counts
        # the judge's abstentions as not forgotten)
        "named": {c: report.concepts[c].scores.split.get("kept") for c in names},
        "drift": report.drift,
    }


def ceiling(targets: dict[str, str], ua_images: int) -> dict[str, Any]:
    """Per shape, what it is steered to and the strict UA of the base with that shape in its word's place."""
    found = guide_ceiling(toy.pipeline(), list(targets), targets, images_per_concept=ua_images)
    return {"steered_to": targets, "ua": found, "images": ua_images}


def run_chain(
    name: str, concepts: list[Concept], params: dict[str, Any], bases: dict, images: int, ua_images: int,
    last: tuple[int, int] | None = None,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    targets: dict[str, str] = {}
    started = [time.perf_counter()]

    def on_step(k: int, patch: Any, chained: Any) -> None:
        seconds = time.perf_counter() - started[0]
        size = last if last and k == len(concepts) else (images, ua_images)
        targets.update(steered_to(patch.manifest.concepts))
        passes = (patch.manifest.metrics.get("training") or patch.manifest.metrics.get("dynamic_mask") or {})
        rows.append({
            "step": k,
            **measure(chained, [c.target for c in concepts[:k]], size, bases),
            "seconds": round(seconds, 1),
            "unet_passes": (passes.get("unet_passes") or {}).get("total"),
        })
        print(f"{name} step {k}: UA {rows[-1]['ua']}", flush=True)
        started[0] = time.perf_counter()

    method = params.pop("method")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        erase_chain(toy.pipeline(), concepts, method=method, name=name, on_step=on_step, progress=False, **params)
    return {"steps": rows, "ceiling": ceiling(targets, (last or (images, ua_images))[1])}


def at_once(
    concepts: list[Concept], params: dict[str, Any], bases: dict, images: int, ua_images: int,
    last: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The non-sequential reference: one patch of every concept, measured once (reported as the last step)."""
    import forgetpatch

    started = time.perf_counter()
    method = params.pop("method")
    patch = forgetpatch.erase(toy.pipeline(), concepts, method=method, progress=False, **params)
    seconds = time.perf_counter() - started
    size = last or (images, ua_images)
    figures = measure(forgetpatch.apply(toy.pipeline(), patch), [c.target for c in concepts], size, bases)
    row = {"step": len(concepts), **figures, "seconds": round(seconds, 1), "unet_passes": None}
    return {"steps": [row], "ceiling": ceiling(steered_to(patch.manifest.concepts), size[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["circle", "star", "triangle", "square", "hexagon"])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--images", type=int, default=16, help="images per concept of every report")
    parser.add_argument("--ua-images", type=int, default=None, help="images per erased concept for UA (default --images)")
    parser.add_argument("--last", type=int, nargs=2, metavar=("IMAGES", "UA_IMAGES"), default=None,
                        help="measure the last step with more images (per concept, per erased concept)")
    parser.add_argument("--out", type=Path, default=Path("runs/sequential"))
    parser.add_argument("--fresh", action="store_true", help="measure every chain again, even one already in --out")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a method parameter set on every chain measured (e.g. steps=300 for dm-toy)")
    args = parser.parse_args()
    try:
        extra = parse_params(args.param)
    except MethodError as exc:
        parser.error(str(exc))
    if taken := sorted(set(extra) & {"method", "name", "preserve", "progress", "on_step"}):
        parser.error(f"--param {taken[0]}: the chain sets it; give method parameters only")
    args.out.mkdir(parents=True, exist_ok=True)
    ua_images = args.ua_images or args.images
    sizes = {(args.images, ua_images), *([tuple(args.last)] if args.last else [])}
    bases = {
        size: evaluate(toy.pipeline(), args.shapes, images_per_concept=size[0], images_per_erased=size[1], progress=False)
        for size in sizes
    }
    todo = chains(args.shapes)
    results = {}
    measured_with = {"shapes": args.shapes, "images": args.images, "ua_images": ua_images, "last": args.last,
                     **({"params": extra} if extra else {})}
    for name in args.only or list(todo):
        path = args.out / f"{name}.json"
        stored = json.loads(path.read_text()) if path.exists() and not args.fresh else None
        if stored is not None and stored.get("measured_with") == measured_with:
            Console().print(f"{name}: reusing {path} (--fresh to measure again)")
        else:
            concepts, params = todo[name]
            params = {**params, **extra}
            run = at_once if name.endswith("-at-once") else run_chain
            last = tuple(args.last) if args.last else None
            figures = run(concepts, dict(params), bases, args.images, ua_images, last) if run is at_once else run(
                name, concepts, dict(params), bases, args.images, ua_images, last
            )
            stored = {**figures, "measured_with": measured_with}
            path.write_text(json.dumps(stored, indent=2))
        results[name] = stored
    table = Table(title=f"strict UA of each shape erased so far after every step ({ua_images} images per shape; "
                        f"retention on {args.images} per concept)")
    for col in ("chain", "step", *args.shapes, "IRA/b", "CRA/b", "near/b", "drift", "step s", "UNet passes"):
        table.add_column(col, justify="left" if col == "chain" else "right")
    for name, figures in results.items():
        for row in figures["steps"]:
            table.add_row(
                name, str(row["step"]),
                *(rate_text(row["ua"][s], row.get("ua_interval", {}).get(s)) if s in row["ua"] else ""
                  for s in args.shapes),
                *(f"{percent(row[k])} (lower bound {percent((row.get('safe') or {}).get(k), down=True)})" if row[k] is not None
                  else "-" for k in ("ira", "cra", "near")),
                f"{row['drift']:.3f}", f"{row['seconds']:.0f}", str(row["unet_passes"] or "-"),
            )
        if top := figures.get("ceiling"):
            to, ua = top["steered_to"], top["ua"]
            n = top.get("images", ua_images)
            shown = (f"{rate_text(ua[s], wilson(round(ua[s] * n), n))} {to[s] or 'blank'}" if s in ua else ""
                     for s in args.shapes)
            table.add_row(f"{name}: ceiling", "", *shown)
    Console(width=200).print(table)
    for name, figures in results.items():
        last = figures["steps"][-1]
        if "kept" in last:  # chains measured before this was recorded have none
            shown = ", ".join(f"{shape} {percent(share)}" for shape, share in last["kept"].items())
            Console(width=200).print(f"{name}, after step {last['step']}: each kept shape named as itself ({last['images'][0]} "
                                     f"images each): {shown}")
        if "named" in last:
            n = last["images"][1]
            shown = ", ".join(f"{shape} {rate_text(share, wilson(round(share * n), n))}"
                              for shape, share in last["named"].items())
            Console(width=200).print(f"{name}, after step {last['step']}: each erased shape named as itself, the concept "
                                     f"back ({n} images each): {shown}")


if __name__ == "__main__":
    main()
