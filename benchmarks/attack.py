"""How far each method's patch comes back under attack, on the toy world: strict UA before -> after every attack.

Patches: one concept (circle) with UCE and ScaPre in context (blank guide, and steered to "cross"), ESD, KSCU and
Dynamic Mask (their recipes); five shapes at once with ScaPre (its recipe, steered to "cross") and UCE (in context, steered to
"cross"); the two steered one-shape patches and the two five-shape ones again with two RECE rounds (``robust=2``); ESD again with adversarial
fine-tuning (``esd-adversarial``, its recipe: an inner prompt search every 10 iterations,
:mod:`forgetpatch.methods.adversarial`), ESD-u with a longer inner search (``esd-u-adversarial``), and KSCU
the same way (``kscu-adversarial``, and outside cross-attention with the longer search: ``kscu-noxattn-adversarial``). Each patch is applied alone
to the shipped toy model and attacked with ``forgetpatch.attack`` (same prompts, seeds and budget for all); for a
five-shape patch every shape (or those named by ``--five``) is attacked and the table shows the worst one per
attack. Figures per patch go to ``OUT/<patch>.json`` (a rerun attacks only the concepts not measured yet) and the
attacked images to ``OUT/<patch>.png``; the patch itself is saved to ``OUT/<patch>/`` and reused by a rerun.
``--retention`` also evaluates each patch against the base (``forgetpatch.evaluate``, ``images_per_concept=8``,
the same for every patch): IRA, CRA and near-neighbour retention with n and 95% intervals, and their ratios to the
base's. ``--attacks`` measures only the named attacks (the rest of a row stays empty).

Run:
    python benchmarks/attack.py                          # default budget: about 3 minutes per concept on 2 cores
    python benchmarks/attack.py --only uce-guided --budget tiny
    python benchmarks/attack.py --only esd esd-adversarial --retention   # the robust row beside the plain one
    python benchmarks/attack.py --only kscu kscu-adversarial --retention
    python benchmarks/attack.py --only esd-u-adversarial --retention     # about 15 minutes on 2 cores
    python benchmarks/attack.py --only dynamic-mask dynamic-mask-adversarial --retention
    python benchmarks/attack.py --only uce-5-guided uce-5-guided-rece2 --retention   # five shapes, plain and robust
    python benchmarks/attack.py --only kscu-all-adversarial --budget '{"images": 96}' --seed 1 --out runs/seed1
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import forgetpatch
from forgetpatch import toy
from forgetpatch.attacks import Budget, attack
from forgetpatch.format import MANIFEST_NAME, read_patch
from forgetpatch.methods import Concept
from forgetpatch.rates import interval_text, rate_text
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


def five_from_recipe(name: str, guides: dict[str, str], preserve: list[str], **overrides: Any) -> Callable[[], Any]:
    """Recipe ``name``'s method and settings (``overrides`` replacing some) on the five shapes at once, each steered to
    ``guides[shape]``."""

    def make() -> Any:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        kwargs = {**recipe.erase_kwargs(), "preserve": preserve, **overrides}
        concepts = [Concept(s, guide=guides[s]) for s in FIVE]
        return forgetpatch.erase(toy.pipeline(), concepts, progress=False, **kwargs)

    return make


def in_context(method: str, shapes: list[str], guide: str | None, **params: Any) -> Callable[[], Any]:
    def make() -> Any:
        concepts = [Concept(s, guide=guide) for s in shapes]
        setting = toy.in_context_params(shapes)  # exactly these settings, nothing from the toy defaults
        return forgetpatch.erase(toy.pipeline(), concepts, method=method, paper=True, progress=False, **setting,
                                 **params)

    return make


#: A five-shape fine-tuned patch: every default superclass but the triangle's is erased here, so each shape takes its
#: second choice (forgetpatch.toy.defaults.SUPERCLASSES; the hexagon diamond, which KSCU's one-shape table puts at 0.78
#: against cross's 0.06), and the five's near neighbours that stay are preserved.
FIVE_GUIDES = {"circle": "cross", "square": "rectangle", "triangle": "rectangle", "star": "cross", "hexagon": "diamond"}
FIVE_KEPT = ["ellipse", "ring", "rectangle", "diamond", "cross"]

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
    "uce-5-guided-rece2": (FIVE, in_context("uce", FIVE, "cross", erase_scale=20, robust=2)),
    "scapre-5-guided-rece2": (FIVE, from_recipe_with("toy-no-5-shapes-scapre", robust=2)),
    "uce-guided-rece2": (["circle"], from_recipe("toy-no-circle-robust-uce")),  # uce-guided with robust=2
    "scapre-guided-rece2": (["circle"], in_context("scapre", ["circle"], "cross", erase_scale=12, robust=2)),
    "esd-adversarial": (["circle"], from_recipe("toy-no-circle-robust-esd")),
    "esd-u-adversarial": (["circle"], from_recipe("toy-no-circle-robust-esd-u")),
    "kscu-adversarial": (["circle"], from_recipe("toy-no-circle-robust-kscu")),
    "kscu-noxattn-adversarial": (["circle"], from_recipe("toy-no-circle-robust-kscu-noxattn")),
    "kscu-word-adversarial": (["circle"], from_recipe("toy-no-circle-robust-kscu-word")),
    "kscu-all-adversarial": (["circle"], from_recipe("toy-no-circle-robust-kscu-all")),
    "kscu-all": (["circle"], from_recipe_with("toy-no-circle-robust-kscu-all", adversarial=None)),  # no inner loop
    "dynamic-mask-adversarial": (["circle"], from_recipe("toy-no-circle-robust-dynamic-mask")),
    # the five shapes at once with the robust KSCU recipes, and without their inner loop; 200 iterations per shape (at
    # 200 in all the circles came out lumpy blobs and the triangles stayed triangles: strict UA 0-9% per shape)
    "kscu-noxattn-5-adversarial": (FIVE, five_from_recipe("toy-no-circle-robust-kscu-noxattn", FIVE_GUIDES, FIVE_KEPT,
                                                          iterations=1000)),
    "kscu-noxattn-5": (FIVE, five_from_recipe("toy-no-circle-robust-kscu-noxattn", FIVE_GUIDES, FIVE_KEPT,
                                              iterations=1000, adversarial=None)),  # without the adversarial term
    "kscu-all-5-adversarial": (FIVE, five_from_recipe("toy-no-circle-robust-kscu-all", FIVE_GUIDES, FIVE_KEPT,
                                                      iterations=1000)),
    "kscu-5-adversarial": (FIVE, five_from_recipe("toy-no-circle-robust-kscu", FIVE_GUIDES, FIVE_KEPT, iterations=1000)),
    "kscu-5": (FIVE, five_from_recipe("toy-no-circle-robust-kscu", FIVE_GUIDES, FIVE_KEPT, iterations=1000,
                                      adversarial=None)),
}
#: Images per retained concept of the retention evaluation (as the RECE figures in the README).
RETAIN_IMAGES = 8


def the_patch(name: str, out: Path, figures: dict[str, Any]) -> Any:
    """Patch ``name``: read from ``OUT/<name>/`` when a run saved it, else made (and timed) and saved."""
    folder = out / name
    if (folder / MANIFEST_NAME).exists() and "erase_seconds" in figures:
        return read_patch(folder)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = make_patch(name)
    figures.update(patch=patch.name, erase_seconds=round(time.perf_counter() - started, 1))
    patch.save(folder)
    return patch


def make_patch(name: str) -> Any:
    return PATCHES[name][1]()


@cache
def base_evaluation() -> Any:
    from forgetpatch.eval import evaluate

    return evaluate(toy.pipeline(), ["circle"], images_per_concept=RETAIN_IMAGES, progress=False)


def retention(patch: Any, concepts: list[str]) -> dict[str, Any]:
    """IRA, CRA, near-neighbour retention of ``patch`` (worst erased concept), with n, intervals and base ratios."""
    from forgetpatch.eval import evaluate

    reference = base_evaluation() if concepts == ["circle"] else None
    report = evaluate(forgetpatch.apply(toy.pipeline(), patch), concepts, reference=reference,
                      images_per_concept=RETAIN_IMAGES, progress=False)
    out: dict[str, Any] = {"images_per_concept": RETAIN_IMAGES}
    for rate in ("ira", "cra", "near"):
        measured = [c for c in report.concepts.values() if getattr(c.scores, rate) is not None]
        if not measured:
            continue
        worst = min(measured, key=lambda c: getattr(c.scores, rate))
        base = worst.base
        out[rate] = {
            "value": getattr(worst.scores, rate), "n": worst.scores.n.get(rate), "interval": worst.scores.interval.get(rate),
            "base": None if base is None else getattr(base, rate),
            "base_interval": None if base is None else base.interval.get(rate),
            "ratio": worst.ratios.get(rate), "ratio_interval": worst.ratio_interval.get(rate),
            "concept": worst.concept,
        }
    return out


def measure(
    name: str, out: Path, budget: Budget, attacked: list[str] | None, attacks: list[str] | None = None,
    with_retention: bool = False, seed: int = 0,
) -> dict[str, Any]:
    """Attack patch ``name`` on each of its concepts not yet in ``OUT/<name>.json`` (a rerun adds only those), with
    the attacks' ``seed`` (their prompts, starting points and data)."""
    path = out / f"{name}.json"
    figures = json.loads(path.read_text()) if path.exists() else {"concepts": {}}
    concepts, _ = PATCHES[name]
    if len(concepts) > 1 and attacked:
        concepts = [c for c in concepts if c in attacked]
    todo = [c for c in concepts if c not in figures["concepts"]]
    if with_retention and "retention" not in figures:
        patch = the_patch(name, out, figures)
        figures["retention"] = retention(patch, list(PATCHES[name][0]))
        path.write_text(json.dumps(figures, indent=2))
        print(f"{name}: retention measured", flush=True)
    if not todo:
        return figures
    patch = the_patch(name, out, figures)
    pipe = forgetpatch.apply(toy.pipeline(), patch)
    for concept in todo:
        report = attack(pipe, concept, attacks=attacks, budget=budget, progress=False, seed=seed)
        report.save_grid(out / (f"{name}.png" if len(PATCHES[name][0]) == 1 else f"{name}-{concept}.png"))
        figures["concepts"][concept] = report.to_dict()
        path.write_text(json.dumps(figures, indent=2))
        print(f"{name} / {concept}: attacked", flush=True)
    return figures


def cell(figures: dict[str, Any], attack_name: str) -> str:
    """The worst concept's UA after ``attack_name`` with its interval (and which concept, for several), and the share
    of its images the judge names as the concept (surely back; not in runs from before stop 45) and whose geometric fit
    is the concept (not in runs from before stop 46)."""
    rows = [(c, r["attacks"].get(attack_name)) for c, r in figures["concepts"].items()]
    rows = [(c, a) for c, a in rows if a is not None]
    if not rows:
        return "-"
    concept, worst = min(rows, key=lambda ca: ca[1]["ua_after"])
    where = f" {concept}" if len(rows) > 1 else ""
    named = "" if worst.get("named_after") is None else f", named {worst['named_after']:.0%}"
    fitted = "" if worst.get("fitted_after") is None else f", fitted {worst['fitted_after']:.0%}"
    return f"{rate_text(worst['ua_after'], worst['interval'])}{where}{named}{fitted}"


def before(figures: dict[str, Any]) -> str:
    def first(attacks: dict[str, Any]) -> dict[str, Any]:  # paraphrase's before is on its own 16 scenes only
        return next((a for name, a in attacks.items() if name != "paraphrase"), next(iter(attacks.values())))

    concept, first = min(
        ((c, first(r["attacks"])) for c, r in figures["concepts"].items()),
        key=lambda ca: ca[1]["ua_before"],
    )
    where = f" {concept}" if len(figures["concepts"]) > 1 else ""
    return f"{rate_text(first['ua_before'], first['interval_before'])}{where}"


def kept(figures: dict[str, Any], rate: str) -> str:
    """Retention ``rate`` with its interval, and its ratio to the base's."""
    r = (figures.get("retention") or {}).get(rate)
    if not r or r["value"] is None:
        return "-"
    bounds = f" {interval_text(r['ratio_interval'])}" if r.get("ratio_interval") else ""
    ratio = "" if r["ratio"] is None else f" ({r['ratio']:.2f}{bounds} of base)"
    return f"{rate_text(r['value'], r['interval'])} n{r['n']}{ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(PATCHES), default=list(PATCHES))
    parser.add_argument("--budget", default="default", help="'default', 'tiny', or a JSON dict of Budget fields")
    parser.add_argument("--out", type=Path, default=Path("runs/attack-bench"))
    parser.add_argument("--five", nargs="+", default=FIVE, help="which shapes of a five-shape patch to attack")
    parser.add_argument("--attacks", nargs="+", default=None, help="attack only these (default: all)")
    parser.add_argument("--retention", action="store_true", help="also measure IRA, CRA and near retention")
    parser.add_argument("--seed", type=int, default=0, help="the attacks' seed (prompts, starting points, data); "
                        "their spread across seeds is as large as recipes' differences: compare on several, each "
                        "with its own --out (the patch is made again there, the same one for the same recipe)")
    args = parser.parse_args()
    budget = Budget.of(json.loads(args.budget) if args.budget.startswith("{") else args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, args.out, budget, args.five, args.attacks, args.retention, args.seed)
               for name in args.only}
    table = Table(
        title=f"strict UA of the erased shape before -> after each attack (n {budget.images} per attack; "
        f"paraphrase: worst of the rewordings, {budget.paraphrase_images} images each; 'named': the share the judge "
        "names as the erased shape, the rest of what UA misses it cannot tell; 'fitted': the share whose geometric fit "
        "is the erased shape, a second opinion not learned)"
    )
    for col in ("patch", "erase s", "UA before", *COLUMNS, "attack s", "IRA", "CRA", "near"):
        table.add_column(col, justify="left" if col == "patch" else "right")
    for name, figures in results.items():
        seconds = sum(a["seconds"] for r in figures["concepts"].values() for a in r["attacks"].values())
        table.add_row(
            name, f"{figures['erase_seconds']:.0f}", before(figures), *(cell(figures, a) for a in COLUMNS),
            f"{seconds:.0f}", *(kept(figures, r) for r in ("ira", "cra", "near")),
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
