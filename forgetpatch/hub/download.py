"""Download a patch from the Hub into the ``huggingface_hub`` cache, verified file by file."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from huggingface_hub import hf_hub_download

from forgetpatch.errors import IntegrityError, ManifestError
from forgetpatch.format import MANIFEST_NAME, WEIGHTS_NAME, verify_folder
from forgetpatch.hub._errors import hub_errors


def split_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``"org/name@rev"`` into ``("org/name", "rev")``; an explicit ``revision`` wins.

    Example:
        >>> split_ref("org/no-vangogh@v1")
        ('org/no-vangogh', 'v1')
    """
    repo_id, sep, rev = ref.partition("@")
    return repo_id, revision if revision is not None else (rev if sep else None)


def _listed_files(manifest_path: Path, where: str) -> list[str]:
    """The file names ``forgetpatch.json`` records hashes for (its ``files`` keys)."""
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8")).get("files")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ManifestError(f"{where}: {MANIFEST_NAME} is not a JSON object: {exc}") from exc
    if not isinstance(files, dict):
        raise ManifestError(f"{where}: {MANIFEST_NAME} has no 'files' table of sha256 hashes")
    outside = [n for n in files if PurePosixPath(n).is_absolute() or ".." in PurePosixPath(n).parts]
    if outside:
        raise IntegrityError(f"{where}: {MANIFEST_NAME} lists files outside the patch: {outside}")
    return [str(name) for name in files]


def _fetch(repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> Path:
    from forgetpatch import __version__

    with hub_errors(repo_id, revision, filename):
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            token=token,
            library_name="forgetpatch",
            library_version=__version__,
        )
    return Path(path)


def download(repo_id: str, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Download the patch in Hub repo ``repo_id`` and return its verified folder in the Hub cache.

    Files go through ``huggingface_hub``'s cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE`` and tokens (``token=``, ``HF_TOKEN``, ``hf auth login``) all apply; offline, the
    patch is resolved from the cache. ``forgetpatch.json`` is fetched first; every file it lists (and
    the weights, always by name) is then fetched at the *same commit*, so a branch moving meanwhile
    cannot mix two versions. Each file is checked against the sha256 recorded in ``forgetpatch.json``.

    Args:
        repo_id: ``"org/name"``; ``"org/name@rev"`` is accepted when ``revision`` is ``None``.
        revision: a branch, tag or commit hash (default: ``main``).
        token: a Hub token, ``False`` for none, ``None`` for the saved / ``HF_TOKEN`` one.

    Returns:
        The snapshot folder (``.../models--org--name/snapshots/<commit>``) holding the patch files.

    Raises:
        HubError: the repo, revision or a file does not exist, is not reachable, or (offline) not cached.
        IntegrityError: a file does not match its recorded sha256.
        ManifestError: ``forgetpatch.json`` is not a valid manifest.

    Example:
        >>> folder = download("org/no-vangogh", revision="v1")
        >>> patch = forgetpatch.format.read_patch(folder)
    """
    repo_id, revision = split_ref(repo_id, revision)
    manifest_path = _fetch(repo_id, MANIFEST_NAME, revision, token)
    snapshot, commit = manifest_path.parent, manifest_path.parent.name
    for name in sorted(
        {WEIGHTS_NAME, *_listed_files(manifest_path, f"{repo_id}@{commit}")} - {MANIFEST_NAME}
    ):
        _fetch(repo_id, name, commit, token)
    verify_folder(snapshot)  # the manifest itself is validated (and migrated) by format
    return snapshot
