"""The protocol every unlearning method implements, and the method registry.

Adding a method is one new module in :mod:`forgetpatch.methods` that defines a class following
:class:`Method` and decorates it with :func:`register`, plus its import in ``methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from forgetpatch.errors import UnknownMethodError
from forgetpatch.format import Concept, ConceptKind, ConceptLike, as_concepts

if TYPE_CHECKING:
    from forgetpatch.format import Patch


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



def patch_name(method: str, concepts: Sequence[Concept], limit: int = 60) -> str:
    """The default patch name of every method, such as ``"scapre-no-circle-star"`` (slash-free, at most ``limit``
    characters; past it, ``"...-and-3-more"``)."""
    words = "-".join(
        "".join(ch if ch.isalnum() else "_" for ch in c.target.strip().lower()) for c in concepts
    )
    name = f"{method}-no-{words}"
    if len(name) <= limit:
        return name
    head = name[: limit - 14].rsplit("-", 1)[0]
    return f"{head}-and-{len(concepts) - head.count('-') + 1}-more"


# Concepts are defined with the manifest (forgetpatch.format) and used here under the same names.
__all__ = ["Concept", "ConceptKind", "ConceptLike", "Method", "as_concepts", "available_methods", "get_method", "patch_name", "register"]
