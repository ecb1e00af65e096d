"""Putting patches on diffusers pipelines and taking them off: ``load``, ``apply``, ``remove``, ``applied``.

Example:
    >>> import forgetpatch
    >>> pipe = forgetpatch.apply(pipe, "./no-vangogh")
    >>> forgetpatch.applied(pipe)[0].name
    'no-vangogh'
    >>> forgetpatch.remove(pipe)          # bit-identical to before
"""

from forgetpatch.format import set_lineage_source
from forgetpatch.loader.adapters import runs_fused
from forgetpatch.loader.core import (
    AppliedPatch,
    PatchRef,
    applied,
    apply,
    check_lineage,
    check_scale,
    load,
    remove,
    ungated,
    unpatched,
)

# A patch built on a pipeline records the patches applied there as its lineage (format.build_patch); format sits
# below the loader, so the loader hands it the way to read them instead of being imported by it.
set_lineage_source(lambda pipe: [entry.digest for entry in applied(pipe)])

__all__ = [
    "AppliedPatch",
    "PatchRef",
    "applied",
    "apply",
    "check_lineage",
    "check_scale",
    "load",
    "remove",
    "runs_fused",
    "ungated",
    "unpatched",
]
