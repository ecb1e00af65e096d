"""The protocol every unlearning method implements, and the method registry.

Adding a method is one new module in :mod:`forgetpatch.methods` that defines a class following
:class:`Method` and decorates it with :func:`register`, plus its import in ``methods/__init__.py``.
What a method can do is said by its class flags (:data:`FLAGS`), never by a list of method names elsewhere:
callers ask the registered class (``get_method(name).closed_form``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from forgetpatch.errors import ConceptError, MethodError, UnknownMethodError
from forgetpatch.format import DENOISERS, Concept, ConceptKind, ConceptLike, as_concepts

if TYPE_CHECKING:
    from forgetpatch.format import Patch

P = TypeVar("P")

@runtime_checkable
class Method(Protocol):
    """An unlearning method: edits nothing in place, returns a :class:`~forgetpatch.format.Patch`.

    Besides ``name`` and ``version``, three class flags say what the method does; :func:`register` gives a class
    that leaves one out its default (:data:`FLAGS`):

    * ``closed_form``: it computes its patch in closed form (no training), so on a base without its own settings
      each concept is edited inside the prompts of its kind (:mod:`forgetpatch.methods.defaults`). Default False.
    * ``denoisers``: the denoisers it edits, a subset of ``("unet", "transformer")`` (``"transformer"``: SD3 and
      FLUX). Default ``{"unet"}``.
    * ``key_steps``: its patches carry key-step ranges, which ``apply(..., key_steps=True)`` gates to.
      Default False.
    * ``params``: the frozen dataclasses whose fields are its parameters, which :func:`check_params` checks before
      any work. Default ``()``: not checked before the method runs.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    closed_form: ClassVar[bool]
    denoisers: ClassVar[frozenset[str]]
    key_steps: ClassVar[bool]
    params: ClassVar[tuple[type, ...]]

    def erase(
        self,
        pipe: Any,
        concepts: list[Concept],
        *,
        preserve: list[Concept],
        **params: Any,
    ) -> Patch: ...


#: The class flags of :class:`Method` and the value a registered class that leaves one out gets.
FLAGS: dict[str, Any] = {"closed_form": False, "denoisers": frozenset({"unet"}), "key_steps": False, "params": ()}

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available to :func:`forgetpatch.erase` under ``cls.name``.

    Refuses a class that does not follow :class:`Method` (a ``name``, a ``version`` and an ``erase``), a flag of the
    wrong type, and a second class under a name already taken. A flag left out gets its default (:data:`FLAGS`).
    """
    missing = [a for a in ("name", "version") if not isinstance(getattr(cls, a, None), str)]
    missing += [] if callable(getattr(cls, "erase", None)) else ["erase"]
    if missing:
        raise TypeError(f"{cls.__name__} is not a forgetpatch method: it lacks {', '.join(missing)} (see Method)")
    for flag in (f for f, default in FLAGS.items() if isinstance(default, bool)):
        if not isinstance(getattr(cls, flag, False), bool):
            raise TypeError(f"{cls.__name__}.{flag} must be True or False, got {getattr(cls, flag)!r}")
    declared = getattr(cls, "params", ())
    if not isinstance(declared, tuple) or not all(dataclasses.is_dataclass(t) for t in declared):
        raise TypeError(f"{cls.__name__}.params must be a tuple of params dataclasses, got {declared!r}")
    denoisers = getattr(cls, "denoisers", FLAGS["denoisers"])
    if not isinstance(denoisers, frozenset) or not denoisers or not denoisers <= set(DENOISERS):
        raise TypeError(f"{cls.__name__}.denoisers must be a non-empty frozenset of {DENOISERS}, got {denoisers!r}")
    taken = _REGISTRY.get(cls.name.lower())
    if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"a method named {cls.name!r} is registered already ({taken.__module__}.{taken.__qualname__})")
    for flag, default in FLAGS.items():
        if flag not in dir(cls):
            setattr(cls, flag, default)
    _REGISTRY[cls.name.lower()] = cls
    return cls


def get_method(name: str) -> Method:
    """Instantiate the method registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name.lower()]()
    except (KeyError, AttributeError):  # AttributeError: not a string (method=None)
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownMethodError(f"unknown method {name!r}; available methods: {known}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def registered() -> list[type]:
    """The registered method classes in the order they were registered (``methods/__init__._METHOD_MODULES``);
    ask their flags what each one does, e.g. ``[m.name for m in registered() if m.closed_form]``."""
    return list(_REGISTRY.values())


def erased_on(pipe: Any) -> list[Concept]:
    """The concepts that the forgetpatch patches on ``pipe`` erased (target and kind), in the order the patches went
    on, each once.

    :func:`forgetpatch.erase` keeps them as they are (still erased) in the patch it makes: it adds them to
    ``preserve`` (``hold=False`` does not), and closed-form methods weight them like the erased concepts
    (``hold_scale``), so that a later patch does not undo an earlier one.

    Example:
        >>> [c.target for c in erased_on(forgetpatch.apply(pipe, ["./no-circle", "./no-star"]))]
        ['circle', 'star']
    """
    from forgetpatch.loader import applied

    seen: dict[str, Concept] = {}
    for entry in applied(pipe):
        for concept in entry.patch.manifest.concepts:
            seen.setdefault(concept.key, Concept(concept.target, kind=concept.kind))
    return list(seen.values())


def check_concepts(concepts: Sequence[Concept], preserve: Sequence[Concept]) -> None:
    """Refuse an empty erase list, a concept given twice, a concept both erased and preserved, or one steered to a
    concept the same patch erases (its prompts would then draw that erased concept). Every method's input check."""
    if not concepts:
        raise ConceptError("nothing to erase: pass at least one concept, e.g. erase(pipe, ['circle'])")
    erased = {c.key for c in concepts}
    twice = sorted(key for key, n in Counter(c.key for c in concepts).items() if n > 1)
    if twice:
        raise ConceptError(f"concepts given more than once: {twice}; give each once")
    overlap = erased & {c.key for c in preserve}
    if overlap:
        raise ConceptError(f"concepts both erased and preserved: {sorted(overlap)}; remove them from one list")
    check_steering(concepts, concepts, by="this patch erases too")


def check_steering(concepts: Sequence[Concept], gone: Sequence[Concept], *, by: str) -> None:
    """Refuse a concept steered (its guide or superclass) to one of ``gone``: its prompts would draw that erased
    concept, in this patch (``gone`` = the concepts it erases) or once applied without the patch on the pipeline that
    erased it (``gone`` = :func:`erased_on`). ``by`` says who erased it, in the message."""
    keys = {c.key for c in gone}
    for c in concepts:
        for role, word in (("guide", c.guide), ("superclass", c.superclass)):
            if word and word.strip().lower() in keys:
                raise ConceptError(
                    f"{c.target!r} is steered to {word!r} (its {role}), which {by}: its prompts would draw the "
                    f"erased {word.strip()}. Steer it to a concept that stays"
                )


#: Parameters every method takes besides its own (``name`` of the patch, ``progress`` bars, ``seed``), and
#: ``erase``'s ``hold``.
COMMON_PARAMS: dict[str, Any] = {"name": str | None, "progress": bool, "seed": int, "hold": bool}


def check_params(method: str, params: Mapping[str, Any]) -> None:
    """:class:`MethodError` naming a parameter ``method`` does not take, or one whose value is not of its declared
    type, before any work: what ``erase`` would refuse after the model loads. Values are checked against each other
    when the method runs, with the base's settings filled in.

    Example:
        >>> check_params("uce", {"lamm": 0.5})
        Traceback (most recent call last):
        MethodError: unknown uce parameter(s) ['lamm']; known: [...]
    """
    declared = {**COMMON_PARAMS}
    for cls in type(get_method(method)).params:  # a key two classes declare is the first one's (the method's own)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            declared.setdefault(f.name, hints.get(f.name, Any))
    if len(declared) == len(COMMON_PARAMS):  # a method that declares none is checked when it runs
        return
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise MethodError(f"unknown {method} parameter(s) {unknown}; known: {sorted(declared)}")
    for key, value in as_declared(declared, params).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise MethodError(f"parameter {key} must be a finite number, got {value!r}")
        if not _is_a(value, declared[key]):
            raise MethodError(
                f"parameter {key} must be {_describe(declared[key])}, got {value!r} ({type(value).__name__})"
            )


def as_declared(hints: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` converted where that loses nothing to the types ``hints`` declares: a whole number where a number
    is declared becomes a float, a list (YAML and JSON have no tuples) where a tuple is, a tuple. Nothing else is
    converted: ``lam=True``, ``robust=2.7`` or ``templates="a {concept}"`` stay as given, for :func:`typed` to
    refuse.

    Example:
        >>> as_declared({"lam": float, "templates": tuple[str, ...]}, {"lam": 1, "templates": ["a {concept}"]})
        {'lam': 1.0, 'templates': ('a {concept}',)}
    """
    out = dict(params)
    for key, value in params.items():
        declared = hints.get(key, Any)
        options = typing.get_args(declared) if typing.get_origin(declared) in (types.UnionType, typing.Union) else ()
        options = options or (declared,)
        if type(value) is int and float in options and int not in options:
            out[key] = float(value)
        elif isinstance(value, list) and any(typing.get_origin(o) is tuple for o in options):
            out[key] = tuple(value)
    return out


def typed(values: P) -> P:
    """``values`` (a method's frozen params dataclass), or :class:`MethodError` naming the first parameter whose value
    is not of its declared type (``--param max_rank=abc`` arrives as a string): every method's type check, made before
    anything loads. An ``int`` passes where a ``float`` is declared; a ``bool`` does not pass for a number."""
    hints = typing.get_type_hints(type(values))
    for f in dataclasses.fields(values):
        value, declared = getattr(values, f.name), hints.get(f.name, Any)
        if isinstance(value, float) and not math.isfinite(value):
            raise MethodError(f"parameter {f.name} must be a finite number, got {value!r}")
        if not _is_a(value, declared):
            raise MethodError(
                f"parameter {f.name} must be {_describe(declared)}, got {value!r} ({type(value).__name__})"
            )
    return values


def _is_a(value: Any, declared: Any) -> bool:
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if declared is Any or isinstance(declared, typing.TypeVar):
        return True
    if declared is type(None):
        return value is None
    if origin in (types.UnionType, typing.Union):
        return any(_is_a(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if declared is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if declared is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin) or (origin is tuple and isinstance(value, list))
    return not isinstance(declared, type) or isinstance(value, declared)


def _describe(declared: Any) -> str:
    if typing.get_origin(declared) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(declared))
    if typing.get_origin(declared) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(declared))
    if declared is type(None):
        return "None"
    origin = typing.get_origin(declared) or declared
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list"}.get(
        origin, f"a {getattr(origin, '__name__', origin)}"
    )


def patch_name(method: str, concepts: Sequence[Concept], limit: int = 60) -> str:
    """The default patch name of every method, such as ``"scapre-no-circle-star"`` (slash-free, at most ``limit``
    characters; past it, ``"...-and-3-more"``)."""
    words = "-".join(
        "".join(ch if ch.isalnum() else "_" for ch in c.key) for c in concepts
    )
    name = f"{method}-no-{words}"
    if len(name) <= limit:
        return name
    head = name[: limit - 14].rsplit("-", 1)[0]
    return f"{head}-and-{len(concepts) - head.count('-') + 1}-more"


# Concepts are defined with the manifest (forgetpatch.format) and used here under the same names.
__all__ = [
    "FLAGS", "Concept", "ConceptKind", "ConceptLike", "Method", "as_concepts", "available_methods", "erased_on",
    "get_method", "patch_name", "register", "registered", "typed",
]
