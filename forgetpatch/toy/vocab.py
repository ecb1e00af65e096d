"""The toy world's concepts, words and prompts.

Three kinds of concept, as UnlearnCanvas has objects and styles: **shapes** (objects), **colours**
and **textures** (styles). Shapes come in near-neighbour families (circle / ellipse / ring,
square / rectangle / diamond, ...) so a precise method can be checked for sparing the neighbour.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Literal

Kind = Literal["shape", "colour", "texture"]

SHAPES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "ring",
    "square",
    "rectangle",
    "diamond",
    "triangle",
    "star",
    "cross",
    "hexagon",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (245, 120, 190),
}
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "grid", "checker")

#: Shapes a precise method must spare when the key is erased.
NEAR_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "circle": ("ellipse", "ring"),
    "ellipse": ("circle", "ring"),
    "ring": ("circle", "ellipse"),
    "square": ("rectangle", "diamond"),
    "rectangle": ("square", "diamond"),
    "diamond": ("square", "rectangle"),
    "triangle": ("diamond", "star"),
    "star": ("cross", "triangle"),
    "cross": ("star", "square"),
    "hexagon": ("circle", "square"),
}

#: Other words for a concept; the model is trained on them, so forgetting must cover them.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc",),
    "ellipse": ("oval",),
    "ring": ("donut",),
    "square": ("box",),
    "rectangle": ("oblong",),
    "diamond": ("rhombus",),
    "triangle": ("wedge",),
    "star": ("pentagram",),
    "cross": ("plus",),
    "hexagon": ("hex",),
    "purple": ("violet",),
    "stripes": ("striped",),
    "checker": ("checkerboard",),
}

#: The generic word whose images may show any shape: the superclass of every shape.
SHAPE_SUPERCLASS = "shape"

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {texture} background",
    "{colour} {shape} on {texture} background",
    "a {shape} in {colour} on a {texture} background",
    "a picture of a {colour} {shape} with a {texture} background",
)
#: More word orders (texture first, bare words), trained on with probability ``p_reorder`` so the text
#: encoder learns that order does not change the scene. Disjoint from :data:`HELDOUT_TEMPLATES`: neither
#: held-out wording (nor the bare shape-colour-texture order) is ever trained on.
ORDER_TEMPLATES: tuple[str, ...] = (
    "on a {texture} background a {colour} {shape}",
    "the {texture} background of a picture of a {shape} in {colour}",
    "{texture} {colour} {shape}",
    "{colour} {shape} {texture}",
)
#: Prompts that leave a kind out (its images then show any concept of that kind); trained on.
PARTIAL_TEMPLATES: tuple[str, ...] = (
    "a {shape}",
    "a {colour} {shape}",
    "a {shape} on a {texture} background",
)
#: Reworded prompts used only for scoring, never for training.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a {texture} background with a {colour} {shape}",
    "{shape} {colour} {texture}",
)

FILLER_WORDS = ("a", "an", "on", "in", "of", "with", "picture", "background", "photo", "the", "and")


def kind_of(word: str) -> Kind:
    """The kind of a canonical concept name, e.g. ``kind_of("circle") == "shape"``."""
    if word in SHAPES:
        return "shape"
    if word in COLOURS:
        return "colour"
    if word in TEXTURES:
        return "texture"
    raise KeyError(f"{word!r} is not a toy-world concept; known: {', '.join(SHAPES + tuple(COLOURS) + TEXTURES)}")


def why_not_a_concept(word: str) -> str | None:
    """``None`` when ``word`` is a toy-world concept, else a one-line message saying what to name instead."""
    if word in SHAPES or word in COLOURS or word in TEXTURES:
        return None
    canonical = [c for c, words in SYNONYMS.items() if word in words]
    hint = f" ({word!r} is a synonym of {canonical[0]!r}: name {canonical[0]!r})" if canonical else ""
    return (
        f"{word!r} is not a toy-world concept{hint}; name a shape ({', '.join(SHAPES)}), a colour "
        f"({', '.join(COLOURS)}) or a texture ({', '.join(TEXTURES)})"
    )


def concepts_of(kind: Kind) -> tuple[str, ...]:
    return {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES}[kind]


def all_words() -> list[str]:
    """Every word the toy tokenizer spells as one token."""
    words = [*SHAPES, *COLOURS, *TEXTURES, SHAPE_SUPERCLASS, *FILLER_WORDS]
    words += [s for syns in SYNONYMS.values() for s in syns]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    shape: str
    colour: str
    texture: str

    def of(self, kind: Kind) -> str:
        return {"shape": self.shape, "colour": self.colour, "texture": self.texture}[kind]


def is_heldout(scene: Scene) -> bool:
    """About 1 in 8 (shape, colour, texture) combinations is never trained on, chosen by a hash."""
    key = f"{scene.shape}|{scene.colour}|{scene.texture}".encode()
    return hashlib.sha256(key).digest()[0] % 8 == 0


def all_scenes() -> list[Scene]:
    return [Scene(s, c, t) for s, c, t in itertools.product(SHAPES, COLOURS, TEXTURES)]


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_heldout(s)]


def heldout_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_heldout(s)]


def prompt(
    scene: Scene,
    template: str = TRAIN_TEMPLATES[0],
    *,
    shape_word: str | None = None,
    colour_word: str | None = None,
    texture_word: str | None = None,
) -> str:
    """Write ``scene`` as a prompt; the ``*_word`` arguments substitute a synonym or the superclass."""
    return template.format(
        shape=shape_word or scene.shape,
        colour=colour_word or scene.colour,
        texture=texture_word or scene.texture,
    )


#: Prompt forms with a ``{concept}`` slot for the shape, for closed-form methods that edit a shape inside
#: the prompts it is used in (``templates=``): the bare ``"a {concept}"``, then training word orders
#: (:data:`TRAIN_TEMPLATES` and :data:`ORDER_TEMPLATES`, never the held-out ones) filled with colours and
#: textures in turn. Every colour and texture appears in each of the two main forms, so preserving the
#: other shapes in the same prompts keeps colours and textures too; the other orders reach the concept
#: where it is followed, or preceded, by other words.
_FILLS = tuple(zip(COLOURS, TEXTURES * len(COLOURS), strict=False))
ERASE_TEMPLATES: tuple[str, ...] = (
    "a {concept}",
    *(f"a {colour} {{concept}} on a {texture} background" for colour, texture in _FILLS),
    *(f"a {{concept}} in {colour} on a {texture} background" for colour, texture in _FILLS),
    *(f"{texture} {colour} {{concept}}" for colour, texture in _FILLS[::2]),
    *(f"{colour} {{concept}} {texture}" for colour, texture in _FILLS[1::2]),
    *(f"on a {texture} background a {colour} {{concept}}" for colour, texture in _FILLS[::2]),
)
#: The same for a colour (``{concept}`` in the colour's place): every shape in the two main forms, textures in turn.
_SHAPE_FILLS = tuple(zip(SHAPES, TEXTURES * len(SHAPES), strict=False))
COLOUR_ERASE_TEMPLATES: tuple[str, ...] = (
    "a {concept} shape",
    *(f"a {{concept}} {shape} on a {texture} background" for shape, texture in _SHAPE_FILLS),
    *(f"a {shape} in {{concept}} on a {texture} background" for shape, texture in _SHAPE_FILLS[::2]),
    *(f"{texture} {{concept}} {shape}" for shape, texture in _SHAPE_FILLS[1::2]),
)
#: And for a texture (``{concept}`` in the background's place): every shape, colours in turn.
_COLOURED = tuple(zip(SHAPES, tuple(COLOURS) * len(SHAPES), strict=False))
TEXTURE_ERASE_TEMPLATES: tuple[str, ...] = (
    "a {concept} background",
    *(f"a {colour} {shape} on a {{concept}} background" for shape, colour in _COLOURED),
    *(f"{{concept}} {colour} {shape}" for shape, colour in _COLOURED[::2]),
    *(f"{colour} {shape} {{concept}}" for shape, colour in _COLOURED[1::2]),
)
#: Each kind's prompt forms for a closed-form edit.
KIND_ERASE_TEMPLATES = {"shape": ERASE_TEMPLATES, "colour": COLOUR_ERASE_TEMPLATES, "texture": TEXTURE_ERASE_TEMPLATES}
