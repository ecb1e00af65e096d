"""Which superclass Dynamic Mask should align each toy shape with: strict UA per (shape, superclass).

For every pair: erase the shape alone with Dynamic Mask on the toy world's settings (``forgetpatch.toy.defaults``)
but the given superclass, apply the patch, and measure strict UA on ``--ua-images`` prompts of the shape (the same
prompts and seeds for every pair) with its 95% interval. The best superclass per shape is what
``forgetpatch.toy.defaults.SUPERCLASSES`` lists first. About a minute per pair on one CPU thread (every pair: half
an hour).

Run:
    python benchmarks/superclass.py                                   # the pairs SUPERCLASSES was chosen from
    python benchmarks/superclass.py --pairs circle:square circle:cross --ua-images 96
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

import forgetpatch
from forgetpatch import Concept, toy
from forgetpatch.eval import evaluate

#: The pairs measured for ``SUPERCLASSES``: every shape against cross and two or three other shapes it could become.
PAIRS = (
    "circle:square", "circle:cross", "circle:triangle", "circle:rectangle", "hexagon:square", "hexagon:cross",
    "hexagon:triangle", "star:cross", "star:triangle", "triangle:cross", "triangle:square", "square:triangle",
    "square:cross", "ellipse:rectangle", "ellipse:cross", "ellipse:square", "ring:square", "ring:cross",
    "ring:triangle", "diamond:triangle", "diamond:cross", "diamond:square", "rectangle:square", "rectangle:cross",
    "rectangle:triangle", "cross:square", "cross:triangle", "cross:star",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="SHAPE:SUPERCLASS pairs")
    parser.add_argument("--ua-images", type=int, default=64, help="UA images per shape")
    args = parser.parse_args()
    if bad := [pair for pair in args.pairs if pair.count(":") != 1 or "" in pair.split(":")]:
        parser.error(f"pairs are SHAPE:SUPERCLASS, e.g. circle:square; got {bad}")
    table = Table("shape", "superclass", "strict UA [95%]", "n", title="Dynamic Mask, one shape, toy settings")
    for pair in args.pairs:
        shape, _, superclass = pair.partition(":")
        patch = forgetpatch.erase(toy.pipeline(), [Concept(shape, superclass=superclass)], method="dynamic_mask",
                                  progress=False)  # fmt: skip
        report = evaluate(forgetpatch.apply(toy.pipeline(), patch), [shape], images_per_concept=1,
                          images_per_erased=args.ua_images, progress=False, geometry=False)  # fmt: skip
        scores = report.concepts[shape].scores
        low, high = scores.interval["ua"]
        table.add_row(shape, superclass, f"{scores.ua:.0%} [{low:.0%}-{high:.0%}]", str(scores.n["ua"]))
        Console().print(f"{shape} -> {superclass}: {scores.ua:.0%} [{low:.0%}-{high:.0%}]")
    Console().print(table)


if __name__ == "__main__":
    main()
