"""The scoring prompts: which scenes are generated, with which words, templates and seeds.

Every scoring prompt is one the toy model was never trained on: a held-out (shape, colour,
texture) combination in the canonical template, or any combination in a held-out template
(:data:`~forgetpatch.toy.vocab.HELDOUT_TEMPLATES`).

* The **main set** is balanced: every concept of every kind is shown ``images_per_concept`` times
  or more, each time with other partners (a Latin-square-like design), so one image serves
  UA, IRA, CRA, near-neighbour retention and drift for all three concepts it names.
* The **paraphrase set** of a concept names it by a synonym (``disc`` for ``circle``), or, for a
  concept without synonyms, by its own word in a reworded template.

The sets do not depend on which concepts are erased, so a base model's generation can be reused
for any patch evaluated with the same settings.

Example:
    >>> items = main_prompts(images_per_concept=8)
    >>> len(items), items[0].prompt
    (80, 'a stripes background with a yellow star')
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from forgetpatch.errors import EvalInputError
from forgetpatch.toy import Kind, Scene, vocab

KINDS: tuple[Kind, ...] = ("shape", "colour", "texture")
ALL_CONCEPTS: tuple[str, ...] = (*vocab.SHAPES, *vocab.COLOURS, *vocab.TEXTURES)
#: Seeds of paraphrase items start here (main items use ``seed + index``).
_PARAPHRASE_SEED_BASE = 100_000


@dataclass(frozen=True)
class ScoringPrompt:
    """One image to generate and judge."""

    prompt: str
    seed: int
    scene: Scene
    """What the image should show (the canonical concepts the prompt names)."""
    role: Literal["main", "paraphrase"] = "main"
    concept: str | None = None
    """For paraphrase items: the concept named by a paraphrase."""
    synonym: bool = False
    """For paraphrase items: whether the concept is named by a synonym (else by a reworded template)."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt, self.seed)

    def names(self, concept: str) -> bool:
        return concept in (self.scene.shape, self.scene.colour, self.scene.texture)


def _template_for(scene: Scene, index: int) -> str:
    if vocab.is_heldout(scene):
        return vocab.TRAIN_TEMPLATES[0]
    return vocab.HELDOUT_TEMPLATES[index % len(vocab.HELDOUT_TEMPLATES)]


def main_prompts(images_per_concept: int = 8, seed: int = 0) -> list[ScoringPrompt]:
    """The balanced main set: ``10 * images_per_concept`` prompts (one round per shape).

    Round ``k`` shows every shape once; colours and textures advance by steps coprime with their
    counts, so over the rounds each shape meets different colours and textures. ``seed`` shuffles
    the concept orders and sets the generation seeds (``seed + index``).
    """
    if images_per_concept < 1:
        raise EvalInputError(f"images_per_concept must be >= 1, got {images_per_concept}")
    rng = random.Random(seed)
    shapes, colours, textures = list(vocab.SHAPES), list(vocab.COLOURS), list(vocab.TEXTURES)
    for seq in (shapes, colours, textures):
        rng.shuffle(seq)
    items = []
    for i in range(len(shapes) * images_per_concept):
        k, s = divmod(i, len(shapes))
        scene = Scene(shapes[s], colours[(s + 5 * k) % len(colours)], textures[(s + k) % len(textures)])
        items.append(ScoringPrompt(vocab.prompt(scene, _template_for(scene, k)), seed + i, scene))
    return items


def paraphrase_prompts(concept: str, images_per_concept: int = 8, seed: int = 0) -> list[ScoringPrompt]:
    """``images_per_concept`` prompts naming ``concept`` by a synonym, or by a reworded template.

    Example:
        >>> paraphrase_prompts("circle", 2)[1].prompt
        'disc blue dots'
    """
    kind = vocab.kind_of(concept)
    synonyms = vocab.SYNONYMS.get(concept, ())
    rng = random.Random(f"{seed}|{concept}")
    (kind_a, seq_a), (kind_b, seq_b) = [(k, list(vocab.concepts_of(k))) for k in KINDS if k != kind]
    rng.shuffle(seq_a)
    rng.shuffle(seq_b)
    base = seed + _PARAPHRASE_SEED_BASE + 1000 * ALL_CONCEPTS.index(concept)
    items = []
    for j in range(images_per_concept):
        parts = {
            kind: concept,
            kind_a: seq_a[j % len(seq_a)],
            kind_b: seq_b[(j + j // len(seq_a)) % len(seq_b)],
        }
        scene = Scene(parts["shape"], parts["colour"], parts["texture"])
        word = synonyms[j % len(synonyms)] if synonyms else concept
        if synonyms and vocab.is_heldout(scene):
            template = vocab.TRAIN_TEMPLATES[0]
        else:
            template = vocab.HELDOUT_TEMPLATES[j % len(vocab.HELDOUT_TEMPLATES)]
        text = vocab.prompt(scene, template, **{f"{kind}_word": word})
        items.append(ScoringPrompt(text, base + j, scene, "paraphrase", concept, bool(synonyms)))
    return items
