"""Every toy recipe measured the same way: strict UA with its interval beside the old readings.

For each ``recipes/toy-*.yaml``: erase on the shipped toy model, apply the patch, evaluate against the base
(the same prompts and seeds for every recipe), and print the worst erased concept's strict UA with its 95%
interval, what became of the concept's images (replaced / empty / unclear), the shipped judge's top-1 UA
(never abstaining), the first judge's UA (``load_judge("v1")``, how UA was read before), retention as a
share of the base, the judge-vs-geometric-fit disagreement, and the worst concept's ceiling: the strict UA of the
base when the shape the patch steers it to replaces its word in the same prompts (``forgetpatch.eval.guide_ceiling``:
what an exact steering would score; a patch can land above it, as the steering need not be exact).

Run:
    python benchmarks/recipes.py                      # UA on 32 images per erased shape, retention on 8
    python benchmarks/recipes.py --ua-images 96 --images 16 --only toy-no-circle-uce-guided
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

import forgetpatch
from forgetpatch import toy
from forgetpatch.eval import evaluate, guide_ceiling, rejudge, steered_to
from forgetpatch.rates import percent as pct
from forgetpatch.rates import rate_text, wilson
from forgetpatch.recipes import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def lowest_ratio(report, key: str) -> str:
    """The lowest ratio to the base of retention ``key`` over the erased concepts, with its 95% interval."""
    rated = [c for c in report.concepts.values() if c.ratios[key] is not None]
    if not rated:
        return "-"
    worst = min(rated, key=lambda c: c.ratios[key])
    return rate_text(worst.ratios[key], worst.ratio_interval.get(key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="retention images per concept")
    parser.add_argument("--ua-images", type=int, default=32, help="UA images per erased concept")
    parser.add_argument("--only", nargs="+", default=None, help="recipe names (default: every toy recipe)")
    args = parser.parse_args()
    names = args.only or sorted(p.stem for p in RECIPES.glob("toy-*.yaml"))
    recipes = {name: load_recipe(RECIPES / f"{name}.yaml") for name in names}
    erased_all = sorted({c.target for r in recipes.values() for c in r.concepts})
    kw = dict(images_per_concept=args.images, images_per_erased=args.ua_images, progress=False)
    base = evaluate(toy.pipeline(), erased_all, **kw)
    v1 = toy.load_judge("v1")
    table = Table(title=f"toy recipes: UA on {args.ua_images} images per erased shape, retention on {args.images}")
    columns = ("recipe", "worst", "UA strict [95%]", "repl/empty/unclear", "UA top-1", "UA v1", "IRA/b", "CRA/b",
               "near/b", "judge!=fit", "ceiling", "erase s")
    for col in columns:
        table.add_column(col, justify="left" if col in ("recipe", "worst") else "right")
    for name, recipe in recipes.items():
        erased = [c.target for c in recipe.concepts]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch = forgetpatch.erase(toy.pipeline(), recipe.erase_concepts(), progress=False, **recipe.erase_kwargs())
        erase_s = time.perf_counter() - start
        report = evaluate(forgetpatch.apply(toy.pipeline(), patch), erased, reference=base, **kw)
        old = rejudge(report, v1)
        concept, worst = min(report.concepts.items(), key=lambda kv: kv[1].scores.ua)
        s, lo_hi = worst.scores, worst.scores.interval["ua"]
        d = report.disagreement()
        to = steered_to(patch.manifest.concepts)[concept]
        ceiling = guide_ceiling(toy.pipeline(), [concept], {concept: to}, images_per_concept=args.ua_images)[concept]
        table.add_row(
            name,
            concept,
            rate_text(s.ua, lo_hi),
            "/".join(pct(s.split[k]) for k in ("replaced", "empty", "unclear")),
            pct(s.ua_top1),
            pct(old.concepts[concept].scores.ua),
            *(lowest_ratio(report, k) for k in ("ira", "cra", "near")),
            rate_text(d["rate"], d["interval"], d["n"]) if d else "-",
            f"{to or 'blank'} {rate_text(ceiling, wilson(round(ceiling * args.ua_images), args.ua_images))}",
            f"{erase_s:.0f}",
        )
        print(f"{name}: measured", flush=True)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
