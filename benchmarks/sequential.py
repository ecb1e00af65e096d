"""Sequential unlearning on the toy world: erase shapes one after another, measure every one erased so far after
each step (does an earlier one come back?), in-domain and cross-domain retention, and the cost of each step.

Chains (``forgetpatch.methods.chain.erase_chain``, each step computed on the model carrying the steps before it):
Dynamic Mask with and without its distillation term (the ablation), with the world's superclass "shape" and with
"cross" named as the superclass (see recipes/toy-no-circle-dynamic-mask.yaml), UCE steered to "cross" in context, stacked
KSCU and ESD (their recipes' settings), and, as the non-sequential reference, one UCE patch of all shapes at once.
Figures per chain go to ``OUT/<chain>.json``; a rerun skips chains already measured.

Run:
    python benchmarks/sequential.py                                      # 5 shapes, every chain
    python benchmarks/sequential.py --shapes circle star triangle --only dm dm-no-distill
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
from forgetpatch.eval import evaluate
from forgetpatch.methods import Concept, erase_chain
from forgetpatch.recipes import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_params(name: str) -> dict[str, Any]:
    kwargs = load_recipe(RECIPES / f"{name}.yaml").erase_kwargs()
    kwargs.pop("name", None)
    kwargs.pop("preserve", None)
    return kwargs


def chains(shapes: list[str]) -> dict[str, tuple[list[Concept], dict[str, Any]]]:
    cross = [Concept(s, guide="cross") for s in shapes]
    steered = {**toy.in_context_params(shapes), "erase_scale": 20, "paper": True}  # exactly these settings
    shape = [Concept(s, superclass="shape") for s in shapes]
    return {
        "dm": (shape, {"method": "dynamic_mask"}),
        "dm-no-distill": (shape, {"method": "dynamic_mask", "distill_weight": 0.0}),
        "dm-cross": ([Concept(s, superclass="cross") for s in shapes], {"method": "dynamic_mask"}),
        "dm-cross-no-distill": (
            [Concept(s, superclass="cross") for s in shapes], {"method": "dynamic_mask", "distill_weight": 0.0}
        ),
        "uce-guided": (cross, {"method": "uce", **steered}),
        "kscu": ([Concept(s) for s in shapes], recipe_params("toy-no-circle-kscu")),
        "esd": ([Concept(s) for s in shapes], recipe_params("toy-no-circle-esd")),
        "uce-guided-at-once": (cross, {"method": "uce", **steered}),
    }


def run_chain(name: str, concepts: list[Concept], params: dict[str, Any], base, images: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    started = [time.perf_counter()]

    def on_step(k: int, patch: Any, chained: Any) -> None:
        seconds = time.perf_counter() - started[0]
        so_far = [c.target for c in concepts[:k]]
        report = evaluate(chained, so_far, reference=base, images_per_concept=images, progress=False)
        worst = report.worst()
        passes = (patch.manifest.metrics.get("training") or patch.manifest.metrics.get("dynamic_mask") or {})
        rows.append({
            "step": k,
            "ua": {c: report.concepts[c].scores.ua for c in so_far},
            "ira": worst["ira"],
            "cra": worst["cra"],
            "near": worst["near"],
            "drift": report.drift,
            "seconds": round(seconds, 1),
            "unet_passes": (passes.get("unet_passes") or {}).get("total"),
        })
        print(f"{name} step {k}: UA {rows[-1]['ua']}", flush=True)
        started[0] = time.perf_counter()

    method = params.pop("method")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        erase_chain(toy.pipeline(), concepts, method=method, name=name, on_step=on_step, progress=False, **params)
    return {"steps": rows}


def at_once(concepts: list[Concept], params: dict[str, Any], base, images: int) -> dict[str, Any]:
    """The non-sequential reference: one patch of every concept, measured once (reported as the last step)."""
    import forgetpatch

    started = time.perf_counter()
    method = params.pop("method")
    patch = forgetpatch.erase(toy.pipeline(), concepts, method=method, progress=False, **params)
    seconds = time.perf_counter() - started
    names = [c.target for c in concepts]
    report = evaluate(forgetpatch.apply(toy.pipeline(), patch), names, reference=base, images_per_concept=images,
                      progress=False)
    worst = report.worst()
    row = {"step": len(concepts), "ua": {c: report.concepts[c].scores.ua for c in names},
           **{k: worst[k] for k in ("ira", "cra", "near")}, "drift": report.drift, "seconds": round(seconds, 1),
           "unet_passes": None}
    return {"steps": [row]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["circle", "star", "triangle", "square", "hexagon"])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--images", type=int, default=16, help="images per concept of every report")
    parser.add_argument("--out", type=Path, default=Path("runs/sequential"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = evaluate(toy.pipeline(), args.shapes, images_per_concept=args.images, progress=False)
    todo = chains(args.shapes)
    results = {}
    for name in args.only or list(todo):
        path = args.out / f"{name}.json"
        if not path.exists():
            concepts, params = todo[name]
            run = at_once if name.endswith("-at-once") else run_chain
            figures = run(concepts, dict(params), base, args.images) if run is at_once else run(
                name, concepts, dict(params), base, args.images
            )
            path.write_text(json.dumps(figures, indent=2))
        results[name] = json.loads(path.read_text())
    table = Table(title=f"strict UA of each shape erased so far after every step ({args.images} images per concept)")
    for col in ("chain", "step", *args.shapes, "IRA/b", "CRA/b", "near/b", "drift", "step s", "UNet passes"):
        table.add_column(col, justify="left" if col == "chain" else "right")
    for name, figures in results.items():
        for row in figures["steps"]:
            table.add_row(
                name, str(row["step"]),
                *(f"{row['ua'][s]:.0%}" if s in row["ua"] else "" for s in args.shapes),
                *(f"{row[k]:.0%}" if row[k] is not None else "-" for k in ("ira", "cra", "near")),
                f"{row['drift']:.3f}", f"{row['seconds']:.0f}", str(row["unet_passes"] or "-"),
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
