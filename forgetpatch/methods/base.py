"""The protocol every unlearning method implements, and the method registry.

Adding a method is one new module in :mod:`forgetpatch.methods` that defines a class following
:class:`Method` and decorates it with :func:`register`, plus its import in ``methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from forgetpatch.errors import ConceptError, UnknownMethodError

if TYPE_CHECKING:
    from forgetpatch.format import Patch

ConceptKind = Literal["object", "style", "nudity", "identity", "other"]


@dataclass(frozen=True)
class Concept:
    """A concept to erase or preserve.

    Args:
        target: the words that name it in a prompt, e.g. ``"circle"`` or ``"Van Gogh"``.
        kind: what sort of concept it is; methods pick their presets from it.
        guide: what the concept should turn into (UCE/ScaPre guide, ESD anchor); ``None`` = method default.
        superclass: the broader concept it belongs to (Dynamic Mask's superclass alignment).
    """

    target: str
    kind: ConceptKind = "object"
    guide: str | None = None
    superclass: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise ConceptError(f"a concept needs a non-empty target string, got {self.target!r}")


ConceptLike = str | Concept


def as_concepts(
    items: ConceptLike | Sequence[ConceptLike] | None, kind: ConceptKind = "object"
) -> list[Concept]:
    """Normalise strings / :class:`Concept` objects (or one of them) to a list of concepts."""
    if items is None:
        return []
    if isinstance(items, str) and "," in items:
        words = [w.strip() for w in items.split(",") if w.strip()]
        raise ConceptError(f"{items!r} is one string; to name several concepts pass a list: {words}")
    if isinstance(items, (str, Concept)):
        items = [items]
    return [c if isinstance(c, Concept) else Concept(target=c, kind=kind) for c in items]


@runtime_checkable
class Method(Protocol):
    """An unlearning method: edits nothing in place, returns a :class:`~forgetpatch.format.Patch`."""

    name: ClassVar[str]
    version: ClassVar[str]

    def erase(
        self,
        pipe: Any,
        concepts: list[Concept],
        *,
        preserve: list[Concept],
        **params: Any,
    ) -> Patch: ...


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available to :func:`forgetpatch.erase` under ``cls.name``.

    Refuses a class that does not follow :class:`Method` (a ``name``, a ``version`` and an ``erase``) and a second
    class under a name already taken.
    """
    missing = [a for a in ("name", "version") if not isinstance(getattr(cls, a, None), str)]
    missing += [] if callable(getattr(cls, "erase", None)) else ["erase"]
    if missing:
        raise TypeError(f"{cls.__name__} is not a forgetpatch method: it lacks {', '.join(missing)} (see Method)")
    taken = _REGISTRY.get(cls.name.lower())
    if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"a method named {cls.name!r} is registered already ({taken.__module__}.{taken.__qualname__})")
    _REGISTRY[cls.name.lower()] = cls
    return cls


def get_method(name: str) -> Method:
    """Instantiate the method registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name.lower()]()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownMethodError(f"unknown method {name!r}; available methods: {known}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)

