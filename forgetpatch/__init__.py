"""forgetpatch: make text-to-image diffusion models forget concepts, as small stackable patches.

Example:
    >>> import forgetpatch
    >>> pipe = forgetpatch.toy.pipeline()                      # the built-in toy Stable Diffusion
    >>> patch = forgetpatch.erase(pipe, ["circle"], method="scapre")
    >>> pipe = forgetpatch.apply(pipe, patch)                  # or "org/no-circle", "./no-circle"
    >>> forgetpatch.remove(pipe)                               # weights bit-identical to before
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> the module that defines them; imported on first use so that
# `import forgetpatch` stays fast and each subsystem loads only when needed.
_EXPORTS = {
    "load": "forgetpatch.loader",
    "apply": "forgetpatch.loader",
    "remove": "forgetpatch.loader",
    "applied": "forgetpatch.loader",
    "Patch": "forgetpatch.format",
    "Manifest": "forgetpatch.format",
    "erase": "forgetpatch.methods",
    "Concept": "forgetpatch.methods",
    "available_methods": "forgetpatch.methods",
    "push": "forgetpatch.hub",
    "evaluate": "forgetpatch.eval",
    "attack": "forgetpatch.attacks",
}
_SUBMODULES = {"toy", "errors", "testing", "distributed", "format", "loader", "hub", "methods", "eval", "attacks"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"forgetpatch.{name}")
    raise AttributeError(f"module 'forgetpatch' has no attribute {name!r}")
