"""``Concept``: the one description of a concept, from a recipe or a call through the methods to the manifest.

It lives at the bottom (format) because the manifest records it; methods, recipes and the CLI use the same
class (``forgetpatch.Concept``), so a concept reads the same everywhere and round-trips through a patch.

Example:
    >>> Concept("Van Gogh", kind="style")
    Concept(target='Van Gogh', kind='style', guide=None, superclass=None)
    >>> as_concepts(["circle", Concept("star", guide="cross")])[1].guide
    'cross'
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, get_args

from pydantic import ConfigDict

from forgetpatch.errors import ConceptError

ConceptKind = Literal["object", "style", "nudity", "identity", "other"]


def unprintable(text: str) -> str | None:
    """The first control character or line break in ``text`` (``"\\r"``, ``"\\x1b"``, ``"\\u2028"``), as Python writes
    it, or ``None``: what a concept or a patch name may not hold, since it would break the model card's Markdown or
    the user's terminal. Zero-width and other format characters, which scripts need, are allowed."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return repr(ch)[1:-1]
    return None


@dataclass(frozen=True)
class Concept:
    """A concept to erase or preserve.

    Args:
        target: the words that name it in a prompt, e.g. ``"circle"`` or ``"Van Gogh"``.
        kind: what sort of concept it is; methods pick their presets from it.
        guide: what the concept should turn into (UCE/ScaPre guide, ESD anchor); ``None`` = method default.
        superclass: the broader concept it belongs to (Dynamic Mask's superclass alignment).
    """

    # The manifest and recipes validate it with pydantic: unknown keys are refused there too.
    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    target: str
    kind: ConceptKind = "object"
    guide: str | None = None
    superclass: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise ConceptError(f"a concept needs a non-empty target string, got {self.target!r}")
        if self.kind not in get_args(ConceptKind):
            raise ConceptError(f"concept kind {self.kind!r} is not one of {', '.join(get_args(ConceptKind))}")
        for name in ("guide", "superclass"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConceptError(f"a concept's {name} is a string or None, got {value!r}")
        for name in ("target", "guide", "superclass"):
            value = getattr(self, name)
            if value is not None and (bad := unprintable(value)):
                raise ConceptError(
                    f"a concept's {name} may not contain control characters or line breaks, got {value!r} "
                    f"(with {bad}): name it in one line of plain text"
                )

    @property
    def steered_to(self) -> str | None:
        """What erasing it turns it into: its guide, else its superclass (Dynamic Mask aligns it with that); ``None``
        when neither is named (the method's default: the blank prompt for UCE, ScaPre, ESD and KSCU)."""
        return self.guide if self.guide is not None else self.superclass

    @property
    def key(self) -> str:
        """What two concepts are compared by: the target, trimmed and lower-cased (``"Circle "`` is ``"circle"``)."""
        return self.target.strip().lower()

    @classmethod
    def from_any(cls, value: str | Concept | Mapping[str, Any], kind: ConceptKind = "object") -> Concept:
        """A concept from a word (of ``kind``), a mapping of its fields, or a concept."""
        if isinstance(value, Concept):
            return value
        if isinstance(value, str):
            return cls(target=value, kind=kind)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ConceptError(f"unknown concept fields {unknown}; a concept has target, kind, guide, superclass")
            return cls(**{"kind": kind, **value})
        raise ConceptError(f"a concept is a string, a Concept or a mapping of its fields, not {type(value).__name__}")


ConceptLike = str | Concept | Mapping[str, Any]


def as_concepts(items: ConceptLike | Sequence[ConceptLike] | None, kind: ConceptKind = "object") -> list[Concept]:
    """Normalise words, mappings and :class:`Concept` objects (or one of them) to a list of concepts.

    A single string with commas is refused: it is almost always several concepts meant as a list.
    """
    if items is None:
        return []
    if isinstance(items, str) and "," in items:
        words = [w.strip() for w in items.split(",") if w.strip()]
        raise ConceptError(f"{items!r} is one string; to name several concepts pass a list: {words}")
    if isinstance(items, (str, Concept, Mapping)):
        items = [items]
    if isinstance(items, (set, frozenset)):
        raise ConceptError(f"{items!r} is a set, whose order changes from run to run: pass a list of concepts")
    if not isinstance(items, Iterable) or isinstance(items, (bytes, bytearray)):
        raise ConceptError(f"give a concept (a word, a mapping or a Concept) or a list of them, not {items!r}")
    return [Concept.from_any(c, kind) for c in items]


__all__ = ["Concept", "ConceptKind", "ConceptLike", "as_concepts"]
