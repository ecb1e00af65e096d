"""Erasure recipes: a YAML file that says what to forget, how, and what to keep.

A recipe names the method, the concepts (a word, or a mapping with ``target`` / ``kind`` / ``guide`` /
``superclass``), what to preserve, and the method's parameters::

    # recipes/toy-no-circle-uce.yaml
    name: toy-no-circle-uce
    base: toy
    method: uce
    paper: true          # as published: no settings from the base
    concepts:
      - target: circle
        kind: object
    params:
      lam: 0.5

Settings a recipe leaves out come from the base model (the toy world's are measured to forget) unless
``paper: true``.

Example:
    >>> recipe = load_recipe("recipes/toy-no-circle-scapre.yaml")
    >>> patch = forgetpatch.erase(pipe, recipe.erase_concepts(), **recipe.erase_kwargs())
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from forgetpatch.errors import MethodError
from forgetpatch.format import Concept, problems, read_bounded


def as_number(value: Any) -> Any:
    """``value``, or the number it spells: YAML 1.1 reads ``1e-3`` (no dot) as the string ``"1e-3"``; inside lists and
    mappings too.

    Example:
        >>> as_number("1e-3"), as_number("x"), as_number(2), as_number({"lr": ["1e-3"]})
        (0.001, 'x', 2, {'lr': [0.001]})
    """
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: as_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_number(v) for v in value]
    return value


#: A recipe is a few lines of YAML; a file past this is not one (and is not read whole).
MAX_RECIPE_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one silently) and aliases
    (``*name``: a few nested ones make a small file expand to gigabytes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not read in a recipe: write the value out",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


#: Fields of a recipe (and ``erase`` arguments) that ``params`` may not set: they would override the recipe's own.
_RECIPE_FIELDS = {"name", "base", "method", "paper", "concepts", "preserve"}


class Recipe(BaseModel):
    """A validated erasure recipe."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    """Patch name; ``None`` lets the method choose one (``scapre-no-circle``)."""
    base: str | None = None
    """The model it was written for: ``"toy"``, a diffusers folder or a Hub id. The CLI uses it when ``--base``
    is not given, and refuses a toy recipe on another base (or the reverse)."""
    method: str = "scapre"
    paper: StrictBool = False
    """Run the method exactly as published instead of filling unset settings from the base
    (:mod:`forgetpatch.methods.defaults`)."""
    concepts: list[Concept] = Field(min_length=1)
    preserve: list[Concept] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", "base")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: give a value, or leave the field out")
        return value

    @field_validator("concepts", "preserve", mode="before")
    @classmethod
    def _words_are_concepts(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            words = [w.strip() for w in value.split(",") if w.strip()]
            raise ValueError(f"{value!r} is one concept; to name several write a list: [{', '.join(words)}]")
        if isinstance(value, (str, dict)):
            value = [value]
        if value is not None and not isinstance(value, list):
            raise ValueError(f"give a concept, or a list of them, not {value!r}")
        return [{"target": v} if isinstance(v, str) else v for v in (value or [])]

    @field_validator("params")
    @classmethod
    def _numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "pipe" in value:
            raise ValueError("pipe is erase's own argument (the pipeline), not a method parameter")
        reserved = sorted(set(value) & _RECIPE_FIELDS)
        if reserved:
            raise ValueError(
                f"{reserved} are the recipe's own fields, not method parameters: set them at the top level "
                f"(e.g. 'method: uce'), not under params"
            )
        return {k: as_number(v) for k, v in value.items()}

    def erase_concepts(self) -> list[Concept]:
        """The concepts to erase."""
        return list(self.concepts)

    def preserved(self) -> list[Concept]:
        """The concepts to preserve."""
        return list(self.preserve)

    def erase_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`forgetpatch.erase` (method, preserve, paper, name, params)."""
        kwargs: dict[str, Any] = {
            "method": self.method, "preserve": self.preserved(), "paper": self.paper, **self.params
        }
        if self.name:
            kwargs["name"] = self.name
        return kwargs


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        MethodError: the file is missing, is not YAML, or does not describe a recipe (the message says
            which field is wrong).

    Example:
        >>> recipe = load_recipe("recipes/toy-no-5-shapes-uce.yaml")
        >>> recipe.method, [c.target for c in recipe.concepts][:2]
        ('uce', ['circle', 'square'])
    """
    path = Path(path)
    if not path.exists():
        raise MethodError(f"recipe {str(path)!r} does not exist")
    if path.is_dir():
        raise MethodError(f"recipe {str(path)!r} is a folder: give a recipe's .yaml file")
    try:
        text = read_bounded(path, MAX_RECIPE_BYTES, lambda why: MethodError(f"not a recipe: {why}")).decode("utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except UnicodeDecodeError as exc:
        raise MethodError(f"recipe {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise MethodError(f"recipe {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise MethodError(f"recipe {str(path)!r} must be a YAML mapping with at least 'concepts'")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MethodError(f"recipe {str(path)!r} is invalid: {problems(exc)}") from None
