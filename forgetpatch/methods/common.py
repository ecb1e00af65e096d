"""Deprecated alias of :mod:`forgetpatch.methods.closed_form` (renamed); it goes in the next release.

Importing it warns (``DeprecationWarning``) and gives the very objects of the new module. forgetpatch itself never
imports it.
"""

from __future__ import annotations

import warnings
from typing import Any

from forgetpatch.methods import closed_form as _new
from forgetpatch.methods.closed_form import *  # noqa: F403
from forgetpatch.methods.closed_form import __all__  # noqa: F401

warnings.warn(
    "forgetpatch.methods.common is deprecated and will be removed in the next release: "
    "import forgetpatch.methods.closed_form instead",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    """Names the star import leaves out (private helpers) come from the new module too."""
    return getattr(_new, name)
