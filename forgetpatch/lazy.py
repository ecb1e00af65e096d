"""Names a package exports but imports on first use (their submodule is heavy to import).

Example:
    >>> __getattr__ = lazy_exports(__name__, {"analyze": ("keysteps", "analyze")})   # in a package's __init__
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``names`` maps an exported name to ``(submodule, attribute)``,
    imported on first use and then kept in the package's namespace."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = names[name]
        value = getattr(importlib.import_module(f"{package}.{module}"), attr)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_exports"]
