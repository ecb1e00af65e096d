"""Reading manifests written by older forgetpatch versions, and refusing newer ones.

Format history:

* **v0** (pre-release prototypes): a flat manifest with plain strings instead of typed entries::

      {"format_version": 0, "name": "no-vangogh", "method": "esd-x", "method_params": {...},
       "concepts": ["vangogh"], "preserve": ["monet"], "base_model": "runwayml/stable-diffusion-v1-5",
       "rank": 4, "alpha": 4, "target_modules": ["unet...attn2.to_k", ...],
       "key_steps": [0.0, 0.3] | null, "parent": "<digest>" | null, "created_at": "...",
       "files": {"pytorch_lora_weights.safetensors": "<sha256>", ...}}   # files: in some folders

  Same weights file and key layout as v1, no fingerprint of the base, no header checksum; migrated
  manifests keep their ``files`` table (so a v0 folder's files are still checked) and have no fingerprint,
  so reading or applying them needs ``allow_unverified=True``.
* **v1**: :class:`forgetpatch.format.Manifest`.

Example:
    >>> upgrade({"format_version": 0, "name": "p", "method": "esd-x", "concepts": ["cat"],
    ...          "rank": 2, "alpha": 2, "target_modules": ["unet.conv_in"]})["format_version"]
    1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forgetpatch.errors import ManifestError, UnsupportedFormatVersionError
from forgetpatch.format.manifest import FORMAT_VERSION

#: The keys a v0 manifest has; one with any other is refused, since dropping it could change what the patch does
#: (an ``alpha_pattern`` would scale its modules).
V0_KEYS = frozenset({"format_version", "name", "method", "method_params", "concepts", "preserve", "base_model", "rank",
                     "alpha", "target_modules", "key_steps", "parent", "created_at", "files", "library_version",
                     "metrics"})  # fmt: skip


def _v0_to_v1(old: dict[str, Any]) -> dict[str, Any]:
    def entries(field: str) -> list[dict[str, Any]]:  # v0 wrote lists of words; one word or mapping is one concept
        values = old.get(field)
        values = [values] if isinstance(values, (str, dict)) else values or []
        if not isinstance(values, list):
            raise ManifestError(f"cannot migrate a format v0 manifest: {field} is {values!r}, not a list of concepts")
        return [{"target": v} if isinstance(v, str) else dict(v) for v in values]

    if unknown := sorted(set(old) - V0_KEYS):
        raise ManifestError(
            f"cannot migrate a format v0 manifest with keys v0 never had ({', '.join(map(str, unknown))}): "
            "dropping them could change what the patch does; remake the patch with this forgetpatch"
        )
    key_steps = old.get("key_steps")
    if key_steps is not None and not (isinstance(key_steps, list) and len(key_steps) == 2):
        raise ManifestError(f"cannot migrate a format v0 manifest: key_steps is {key_steps!r}, not [start, end]")
    new: dict[str, Any] = {
        "format": "forgetpatch",
        "format_version": 1,
        "name": old.get("name"),
        "method": {"name": old.get("method"), "params": old.get("method_params") or {}},
        "concepts": entries("concepts"),
        "preserved": entries("preserve"),
        "key_steps": None if key_steps is None else [{"start": key_steps[0], "end": key_steps[1]}],
        "base_model": {"id": old.get("base_model")},
        "lora": {
            "rank": old.get("rank"),
            "alpha": old.get("alpha", old.get("rank")),
            "target_modules": list(old.get("target_modules") or []),
        },
        "lineage": [old["parent"]] if old.get("parent") else [],
        "metrics": old.get("metrics") or {},
        "library_version": old.get("library_version", "0.0"),
        # not the time of migration: the same v0 manifest must migrate to the same v1 one every time
        "created_at": old.get("created_at") or "unknown",
        "files": old.get("files") or {},
    }
    return new


#: ``MIGRATIONS[v]`` turns a version-``v`` manifest dict into a version ``v + 1`` one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1}


def manifest_version(raw: dict[str, Any]) -> int:
    """The ``format_version`` of a raw manifest dict; ``ManifestError`` when absent or not an integer."""
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ManifestError(f"the manifest has no valid integer 'format_version' (got {version!r})")
    return version


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring a raw manifest dict to the current format version (a no-op for v1).

    Raises :class:`UnsupportedFormatVersionError` for manifests newer than this forgetpatch reads.
    """
    version = manifest_version(raw)
    if version > FORMAT_VERSION:
        made_by = raw.get("library_version", "a newer version")
        raise UnsupportedFormatVersionError(
            f"this patch uses patch format v{version}, made by forgetpatch {made_by}; this forgetpatch reads "
            f"up to v{FORMAT_VERSION}. Upgrade: pip install -U forgetpatch"
        )
    while version < FORMAT_VERSION:
        try:
            raw = MIGRATIONS[version](raw)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            raise ManifestError(
                f"cannot migrate a format v{version} manifest ({type(exc).__name__}: {exc}): remake the patch with this "
                "forgetpatch"
            ) from None
        version += 1
    return raw
