"""How far each method's patch comes back under attack, on the toy world: strict UA before -> after every attack.

Patches: one concept (circle) with UCE and ScaPre in context (blank guide, and steered to "cross"), ESD, KSCU and
Dynamic Mask (their recipes); five shapes at once with ScaPre (its recipe, steered to "cross") and UCE (in context, steered to
"cross"); the two steered one-shape patches again with two RECE rounds (``robust=2``). Each patch is applied alone
to the shipped toy model and attacked with ``forgetpatch.attack`` (same prompts, seeds and budget for all); for a
five-shape patch every shape (or those named by ``--five``) is attacked and the table shows the worst one per
attack. Figures per patch go to ``OUT/<patch>.json`` (a rerun attacks only the concepts not measured yet) and the
attacked images to ``OUT/<patch>.png``.

Run:
    python benchmarks/attack.py                          # default budget: about 3 minutes per concept on 2 cores
    python benchmarks/attack.py --only uce-guided --budget tiny
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import forgetpatch
from forgetpatch import toy
from forgetpatch.attacks import Budget, attack
from forgetpatch.methods import Concept
from forgetpatch.recipes import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
FIVE = ["circle", "square", "triangle", "star", "hexagon"]
COLUMNS = ("paraphrase", "inversion", "prompt_search_soft", "prompt_search_hard", "textual_inversion", "relearning")


def from_recipe(name: str) -> Callable[[], Any]:
    def make() -> Any:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        return forgetpatch.erase(toy.pipeline(), recipe.erase_concepts(), progress=False, **recipe.erase_kwargs())

    return make


def from_recipe_with(name: str, **overrides: Any) -> Callable[[], Any]:
    def make() -> Any:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        kwargs = {**recipe.erase_kwargs(), **overrides}
        return forgetpatch.erase(toy.pipeline(), recipe.erase_concepts(), progress=False, **kwargs)

    return make


def in_context(method: str, shapes: list[str], guide: str | None, **params: Any) -> Callable[[], Any]:
    def make() -> Any:
        concepts = [Concept(s, guide=guide) for s in shapes]
        setting = toy.in_context_params(shapes)  # exactly these settings, nothing from the toy defaults
        return forgetpatch.erase(toy.pipeline(), concepts, method=method, paper=True, progress=False, **setting,
                                 **params)

    return make


PATCHES: dict[str, tuple[list[str], Callable[[], Any]]] = {
    "uce-blank": (["circle"], in_context("uce", ["circle"], None)),
    "uce-guided": (["circle"], from_recipe("toy-no-circle-uce-guided")),
    "scapre-blank": (["circle"], in_context("scapre", ["circle"], None)),
    "scapre-guided": (["circle"], in_context("scapre", ["circle"], "cross", erase_scale=12)),
    "scapre-defaults": (["circle"], from_recipe("toy-no-circle-scapre")),
    "esd": (["circle"], from_recipe("toy-no-circle-esd")),
    "kscu": (["circle"], from_recipe("toy-no-circle-kscu")),
    "dynamic-mask": (["circle"], from_recipe("toy-no-circle-dynamic-mask")),
    "scapre-5-guided": (FIVE, from_recipe("toy-no-5-shapes-scapre")),
    "uce-5-guided": (FIVE, in_context("uce", FIVE, "cross", erase_scale=20)),
    "uce-guided-rece2": (["circle"], from_recipe_with("toy-no-circle-uce-guided", robust=2)),
    "scapre-guided-rece2": (["circle"], in_context("scapre", ["circle"], "cross", erase_scale=12, robust=2)),
}


def measure(name: str, out: Path, budget: Budget, attacked: list[str] | None) -> dict[str, Any]:
    """Attack patch ``name`` on each of its concepts not yet in ``OUT/<name>.json`` (a rerun adds only those)."""
    path = out / f"{name}.json"
    figures = json.loads(path.read_text()) if path.exists() else {"concepts": {}}
    concepts, make = PATCHES[name]
    if len(concepts) > 1 and attacked:
        concepts = [c for c in concepts if c in attacked]
    todo = [c for c in concepts if c not in figures["concepts"]]
    if not todo:
        return figures
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = make()
    figures.update(patch=patch.name, erase_seconds=round(time.perf_counter() - started, 1))
    pipe = forgetpatch.apply(toy.pipeline(), patch)
    for concept in todo:
        report = attack(pipe, concept, budget=budget, progress=False)
        report.save_grid(out / (f"{name}.png" if len(PATCHES[name][0]) == 1 else f"{name}-{concept}.png"))
        figures["concepts"][concept] = report.to_dict()
        path.write_text(json.dumps(figures, indent=2))
        print(f"{name} / {concept}: attacked", flush=True)
    return figures


def cell(figures: dict[str, Any], attack_name: str) -> str:
    """The worst concept's UA after ``attack_name`` with its interval (and which concept, for several)."""
    rows = [(c, r["attacks"].get(attack_name)) for c, r in figures["concepts"].items()]
    rows = [(c, a) for c, a in rows if a is not None]
    if not rows:
        return "-"
    concept, worst = min(rows, key=lambda ca: ca[1]["ua_after"])
    lo, hi = worst["interval"]
    where = f" {concept}" if len(rows) > 1 else ""
    return f"{worst['ua_after']:.0%} [{lo:.0%}-{hi:.0%}]{where}"


def before(figures: dict[str, Any]) -> str:
    concept, first = min(
        ((c, next(iter(r["attacks"].values()))) for c, r in figures["concepts"].items()),
        key=lambda ca: ca[1]["ua_before"],
    )
    lo, hi = first["interval_before"]
    where = f" {concept}" if len(figures["concepts"]) > 1 else ""
    return f"{first['ua_before']:.0%} [{lo:.0%}-{hi:.0%}]{where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(PATCHES), default=list(PATCHES))
    parser.add_argument("--budget", default="default", help="'default', 'tiny', or a JSON dict of Budget fields")
    parser.add_argument("--out", type=Path, default=Path("runs/attack-bench"))
    parser.add_argument("--five", nargs="+", default=FIVE, help="which shapes of a five-shape patch to attack")
    args = parser.parse_args()
    budget = Budget.of(json.loads(args.budget) if args.budget.startswith("{") else args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, args.out, budget, args.five) for name in args.only}
    table = Table(
        title=f"strict UA of the erased shape before -> after each attack (n {budget.images} per attack; "
        f"paraphrase: worst of the rewordings, {budget.paraphrase_images} images each)"
    )
    for col in ("patch", "erase s", "UA before", *COLUMNS, "attack s"):
        table.add_column(col, justify="left" if col == "patch" else "right")
    for name, figures in results.items():
        seconds = sum(a["seconds"] for r in figures["concepts"].values() for a in r["attacks"].values())
        table.add_row(
            name, f"{figures['erase_seconds']:.0f}", before(figures), *(cell(figures, a) for a in COLUMNS),
            f"{seconds:.0f}",
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
