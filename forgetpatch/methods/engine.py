"""Deprecated alias of :mod:`forgetpatch.methods.finetune` (renamed); it goes in the next release.

Importing it warns (``DeprecationWarning``) and gives the very objects of the new module. forgetpatch itself never
imports it.
"""

from __future__ import annotations

import warnings
from typing import Any

from forgetpatch.methods import finetune as _new
from forgetpatch.methods.finetune import *  # noqa: F403
from forgetpatch.methods.finetune import __all__  # noqa: F401

warnings.warn(
    "forgetpatch.methods.engine is deprecated and will be removed in the next release: "
    "import forgetpatch.methods.finetune instead",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    """Names the star import leaves out (private helpers) come from the new module too."""
    return getattr(_new, name)
