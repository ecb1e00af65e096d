"""Putting patches on diffusers pipelines and taking them off: ``load``, ``apply``, ``remove``, ``applied``.

Example:
    >>> import forgetpatch
    >>> pipe = forgetpatch.apply(pipe, "./no-vangogh")
    >>> forgetpatch.applied(pipe)[0].name
    'no-vangogh'
    >>> forgetpatch.remove(pipe)          # bit-identical to before
"""

from forgetpatch.loader.core import (
    AppliedPatch,
    PatchRef,
    applied,
    apply,
    check_scale,
    load,
    remove,
    unpatched,
)

__all__ = ["AppliedPatch", "PatchRef", "applied", "apply", "check_scale", "load", "remove", "unpatched"]
