"""Make the person-labelled judge set: images from the toy base model and from patched models.

Run from the repository root (about 10 minutes on 2 CPU cores, KSCU and ESD training included):

    OMP_NUM_THREADS=2 python tests/data/make_judge_set.py --out runs/judge-set
    OMP_NUM_THREADS=2 python tests/data/make_judge_set.py --split calibration --out runs/judge-calibration
    OMP_NUM_THREADS=2 python tests/data/make_judge_set.py --split train --out runs/judge-train
    OMP_NUM_THREADS=2 python tests/data/make_judge_set.py --split train2 --out runs/judge-train2

It writes ``images.npz`` (``images``: N x 32 x 32 x 3 uint8) and ``sources.json`` (per image: model,
prompt, seed, the shape the prompt names), then the labelling sheets: ``sheet-NN.png`` (20 images each,
enlarged, numbered in a shuffled order, without prompt or model; ``order.json`` maps a sheet number to an
image) and ``reference.png`` (clean renders of the ten shapes). Labels are added by eye afterwards
(``judge_labels.json`` says how); the seeds (7,000,000 and up) are never used by the tests or the
evaluation's scoring prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import forgetpatch
from forgetpatch import toy
from forgetpatch.eval.prompts import main_prompts, paraphrase_prompts
from forgetpatch.methods import Concept
from forgetpatch.recipes import load_recipe
from forgetpatch.toy.fidelity import generate

SEED0 = 7_000_000
#: Per split: first seed and share of each model's image count.
SPLITS = {
    "test": (SEED0, 1.0),
    "calibration": (SEED0 + 500_000, 0.5),
    "train": (SEED0 + 1_000_000, 2.0),
    "train2": (SEED0 + 1_500_000, 2.0),
}
FIVE = ["circle", "square", "triangle", "star", "hexagon"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def in_context(shapes: list[str], guide: str | None, method: str, **extra) -> tuple[list, dict]:
    params = {**toy.in_context_params(shapes), "method": method, **extra}
    params["preserve"] = [s for s in params["preserve"] if s != guide] + ([guide] if guide else [])
    return [Concept(s, guide=guide) for s in shapes], params


def recipe(name: str) -> tuple[list, dict]:
    r = load_recipe(RECIPES / f"{name}.yaml")
    return r.erase_concepts(), r.erase_kwargs()


#: (model name, how to erase, shapes its prompts name, images)
MODELS = [
    ("base", None, list(toy.SHAPES), 60),
    ("uce-1-blank", lambda: in_context(["circle"], None, "uce"), ["circle"], 30),
    ("scapre-1-blank", lambda: recipe("toy-no-circle-scapre"), ["circle"], 40),
    ("scapre-1-guided", lambda: in_context(["circle"], "cross", "scapre"), ["circle"], 30),
    ("uce-5-guided", lambda: in_context(FIVE, "cross", "uce"), FIVE, 35),
    ("scapre-5-blank", lambda: in_context(FIVE, None, "scapre", erase_scale=12), FIVE, 35),
    ("scapre-5-guided", lambda: recipe("toy-no-5-shapes-scapre"), FIVE, 40),
    ("kscu-1", lambda: recipe("toy-no-circle-kscu"), ["circle"], 35),
    ("esd-1", lambda: recipe("toy-no-circle-esd"), ["circle"], 35),
]


def prompts_naming(shapes: list[str], n: int, offset: int, seed0: int = SEED0) -> list[tuple[str, int, str]]:
    """``n`` (prompt, seed, shape) rows naming ``shapes`` in turn: scoring-prompt wordings, fresh seeds."""
    pool = {s: [it for it in main_prompts(8, seed=offset) if it.names(s)] for s in shapes}
    for s in shapes:
        pool[s] += paraphrase_prompts(s, 4, seed=offset)
    rows = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        item = pool[shape][(i // len(shapes)) % len(pool[shape])]
        rows.append((item.prompt, seed0 + offset * 1000 + i, shape))
    return rows


def write_sheets(images: np.ndarray, out: Path, size: int = 160, columns: int = 5, rows: int = 4) -> None:
    """Numbered labelling sheets in a shuffled order, and a reference sheet of clean renders."""
    order = np.random.default_rng(123).permutation(len(images))
    (out / "order.json").write_text(json.dumps([int(i) for i in order]))
    font = ImageFont.load_default(size=18)
    per = columns * rows
    for sheet in range(-(-len(images) // per)):
        canvas = Image.new("RGB", (columns * (size + 8), rows * (size + 26)), "white")
        draw = ImageDraw.Draw(canvas)
        for k, pos in enumerate(range(sheet * per, min(len(images), (sheet + 1) * per))):
            r, c = divmod(k, columns)
            draw.text((c * (size + 8) + 4, r * (size + 26) + 2), f"#{pos}", fill="black", font=font)
            tile = Image.fromarray(images[order[pos]]).resize((size, size), Image.LANCZOS)
            canvas.paste(tile, (c * (size + 8) + 4, r * (size + 26) + 24))
        canvas.save(out / f"sheet-{sheet:02d}.png")
    canvas = Image.new("RGB", (10 * 128, 3 * 128 + 30), "white")
    draw = ImageDraw.Draw(canvas)
    for i, shape in enumerate(toy.SHAPES):
        draw.text((i * 128 + 4, 2), shape, fill="black", font=font)
        for j, (colour, texture) in enumerate([("red", "plain"), ("blue", "dots"), ("green", "stripes")]):
            tile = Image.fromarray(toy.render(toy.Scene(shape, colour, texture), seed=j + 5))
            canvas.paste(tile.resize((120, 120), Image.LANCZOS), (i * 128 + 4, 28 + j * 128))
    canvas.save(out / "reference.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/judge-set"))
    parser.add_argument(
        "--split",
        choices=sorted(SPLITS),
        default="test",
        help="test: the set the judge is measured on; calibration: its threshold is chosen on; train: "
        "and train2: person-labelled images it is fine-tuned on (each split its own seeds)",
    )
    args = parser.parse_args()
    seed0, share = SPLITS[args.split]
    args.out.mkdir(parents=True, exist_ok=True)
    images, sources = [], []
    for k, (name, make, shapes, n) in enumerate(MODELS):
        start = time.perf_counter()
        pipe = toy.pipeline()
        if make is not None:
            concepts, kwargs = make()
            patch = forgetpatch.erase(pipe, concepts, **kwargs)
            forgetpatch.apply(pipe, patch)
        rows = prompts_naming(shapes, round(n * share), offset=k + 1, seed0=seed0)
        out = generate(pipe, [p for p, _, _ in rows], [s for _, s, _ in rows])
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        sources += [{"model": name, "prompt": p, "seed": s, "prompt_shape": sh} for p, s, sh in rows]
        print(f"{name}: {len(rows)} images in {time.perf_counter() - start:.0f} s", flush=True)
    np.savez_compressed(args.out / "images.npz", images=np.concatenate(images))
    (args.out / "sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    write_sheets(np.concatenate(images), args.out)


if __name__ == "__main__":
    main()
