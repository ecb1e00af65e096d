"""Which shape a fine-tuning erasure should steer each toy shape to: strict UA per (shape, steered-to shape).

For every pair: erase the shape alone with ``--method`` on the toy world's settings (``forgetpatch.toy.defaults``)
but the given shape to steer to (Dynamic Mask's superclass, KSCU's and ESD's anchor, the concept's ``guide``), apply
the patch, and measure strict UA on ``--ua-images`` prompts of the shape (the same prompts and seeds for every pair)
with its 95% interval, beside the pair's ceiling: the strict UA of the base with the steered-to shape in the shape's
word's place, on the same prompts (``forgetpatch.eval.guide_ceiling``, what an exact steering would score). The best
shape per erased shape is what ``forgetpatch.toy.defaults.SUPERCLASSES`` lists first (chosen with Dynamic Mask).
About a minute per pair on one CPU thread with Dynamic Mask, half that with KSCU, two with ESD (every pair: half an
hour with Dynamic Mask).

Run:
    python benchmarks/superclass.py                                   # the pairs SUPERCLASSES was chosen from
    python benchmarks/superclass.py --pairs circle:square circle:cross --ua-images 96
    python benchmarks/superclass.py --method kscu --pairs circle:square --param g=0.25 --param g=1 --ua-images 96
"""

from __future__ import annotations

import argparse
import itertools
import json

from rich.console import Console
from rich.table import Table

import forgetpatch
from forgetpatch import Concept, toy
from forgetpatch.cli.erase import parse_params
from forgetpatch.errors import MethodError
from forgetpatch.eval import evaluate, guide_ceiling
from forgetpatch.rates import rate_text, wilson

#: The pairs measured for ``SUPERCLASSES``: every shape against cross and two or three other shapes it could become.
PAIRS = (
    "circle:square", "circle:cross", "circle:triangle", "circle:rectangle", "hexagon:square", "hexagon:cross",
    "hexagon:triangle", "star:cross", "star:triangle", "triangle:cross", "triangle:square", "triangle:rectangle",
    "square:triangle", "square:cross", "square:rectangle", "ellipse:rectangle", "ellipse:cross", "ellipse:square",
    "ring:square", "ring:cross", "ring:triangle", "diamond:triangle", "diamond:cross", "diamond:square",
    "rectangle:square", "rectangle:cross", "rectangle:triangle", "cross:square", "cross:triangle", "cross:star",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="SHAPE:STEERED_TO pairs")
    parser.add_argument("--method", choices=["dynamic_mask", "kscu", "esd"], default="dynamic_mask")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a method parameter over the toy settings; a key given twice is measured both ways")
    parser.add_argument("--ua-images", type=int, default=64, help="UA images per shape")
    args = parser.parse_args()
    if bad := [pair for pair in args.pairs if pair.count(":") != 1 or "" in pair.split(":")]:
        parser.error(f"pairs are SHAPE:STEERED_TO, e.g. circle:square; got {bad}")
    by_key: dict[str, list[object]] = {}
    try:
        for item in args.param:  # one at a time: a key given twice is two settings, not an overwrite
            for key, value in parse_params([item]).items():
                by_key.setdefault(key, []).append(value)
    except MethodError as exc:
        parser.error(str(exc))
    settings = [dict(zip(by_key, values, strict=True)) for values in itertools.product(*by_key.values())]
    field = "superclass" if args.method == "dynamic_mask" else "guide"
    table = Table("shape", field, "params", "strict UA [95%]", "n", "ceiling",
                  title=f"{args.method}, one shape, toy settings")  # fmt: skip
    for pair, params in itertools.product(args.pairs, settings):
        shape, _, steer_to = pair.partition(":")
        patch = forgetpatch.erase(toy.pipeline(), [Concept(shape, **{field: steer_to})], method=args.method,
                                  progress=False, **params)  # fmt: skip
        report = evaluate(forgetpatch.apply(toy.pipeline(), patch), [shape], images_per_concept=1,
                          images_per_erased=args.ua_images, progress=False, geometry=False)  # fmt: skip
        scores = report.concepts[shape].scores
        shown = json.dumps(params) if params else "(toy settings)"
        ceiling = guide_ceiling(toy.pipeline(), [shape], steer_to, images_per_concept=args.ua_images)[shape]
        table.add_row(shape, steer_to, shown, rate_text(scores.ua, scores.interval["ua"]), str(scores.n["ua"]),
                      rate_text(ceiling, wilson(round(ceiling * args.ua_images), args.ua_images)))  # fmt: skip
        Console().print(f"{shape} -> {steer_to} {shown}: {rate_text(scores.ua, scores.interval['ua'])}")
    Console().print(table)


if __name__ == "__main__":
    main()
