"""Download a patch from the Hub into the ``huggingface_hub`` cache, verified file by file.

Also the one reader of references for the whole package: :func:`split_ref` (``org/name@rev``),
:func:`is_hub_id` and :func:`why_local` (is a string that names nothing local a path or a Hub id?), used by the
loader for patches, the CLI for base models and the card for ``base_model``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from forgetpatch.errors import HubError, IntegrityError, UnverifiedPatchError
from forgetpatch.format import MANIFEST_NAME, WEIGHTS_NAME, listed_files, read_manifest, verify_folder
from forgetpatch.hub._errors import hub_errors

#: What git refuses in a ref name (``git check-ref-format``): control characters, space, ``~^:?*[\``,
#: ``..``, ``//`` and ``@{``.
_BAD_IN_REVISION = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|//|@\{")
MAX_REVISION_LENGTH = 255


def check_revision(revision: str) -> str:
    """``revision`` if it is a valid branch, tag or commit name (git's ref-name rules); else :class:`HubError`.

    Checked before any request, so that no hostile name (``../../x``) reaches the Hub client, which
    writes a file named after the revision in its cache.

    Example:
        >>> check_revision("refs/pr/1")
        'refs/pr/1'
    """
    parts = revision.split("/") if isinstance(revision, str) else []
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > MAX_REVISION_LENGTH
        or revision == "@"
        or _BAD_IN_REVISION.search(revision)
        or revision.startswith(("/", "-"))
        or revision.endswith(("/", "."))
        or any(part.startswith(".") or part.endswith(".lock") for part in parts)
    ):
        raise HubError(
            f"{revision!r} is not a valid revision: give a branch, tag or commit hash (git ref-name rules: "
            "no '..', '//', '@{', spaces, control characters or ~^:?*[\\; not empty; no leading '/', '-' or '.'; "
            "no trailing '/', '.' or '.lock'; at most 255 characters)"
        )
    return revision


#: A Hub repo id: ``org/name`` (letters, digits, ``_``, ``.``, ``-``; the org starts with a letter or digit).
HUB_ID = re.compile(r"\A[A-Za-z0-9][\w.-]*/[\w.-]+\Z")


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` is shaped like ``org/name`` or ``org/name@revision`` (the revision is not checked here).

    Example:
        >>> is_hub_id("org/no-vangogh@v1"), is_hub_id("./no-vangogh"), is_hub_id("a/b/c")
        (True, False, False)
    """
    return isinstance(ref, str) and bool(HUB_ID.match(ref.partition("@")[0]))


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub repo id ``org/name`` (checked by huggingface_hub too), else :class:`HubError`.

    Example:
        >>> check_repo_id("org/no-vangogh")
        'org/no-vangogh'
    """
    if not (isinstance(repo_id, str) and HUB_ID.match(repo_id)):
        raise HubError(
            f"{repo_id!r} is not a Hub repo id: give 'org/name' (the user or organisation it goes under, a slash, "
            "then the repo's name)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{repo_id!r} is not a Hub repo id: {exc}") from None
    return repo_id


def why_local(ref: str | os.PathLike) -> str:
    """Why a reference that names nothing on disk is a local path and not a Hub id; ``""`` when it may be a
    Hub id. Written as a path (``./x``, ``/x``, ``~/x``), naming a file (``x.safetensors``), more than one ``/``,
    or ``folder/x`` where ``folder`` exists here.

    Example:
        >>> why_local("./no-cat"), why_local("org/no-cat")
        ('it is written as a local path', '')
    """
    if not isinstance(ref, str):
        return "a Path object is never looked up on the Hub"
    repo, _, revision = ref.partition("@")
    if ref.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.isabs(ref) or (os.sep != "/" and os.sep in ref):
        return "it is written as a local path"
    if ref.endswith((".safetensors", ".json")):
        return "it names a file"
    if repo.count("/") > 1:
        return "it is a path: a Hub id has one '/' ('org/name')"
    first = repo.split("/")[0]
    if "/" in repo and Path(first).is_dir():
        return (
            f"not tried on the Hub because {first!r} is a local folder; to fetch the Hub repo of that "
            f"name, use forgetpatch.load(forgetpatch.hub.download({repo!r}"
            + (f", revision={revision!r}" if revision else "")
            + "))"
        )
    return ""


def split_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``"org/name@rev"`` into ``("org/name", "rev")``; an explicit ``revision`` wins.

    The revision is checked with :func:`check_revision` (:class:`HubError` when invalid).

    Example:
        >>> split_ref("org/no-vangogh@v1")
        ('org/no-vangogh', 'v1')
    """
    repo_id, sep, rev = ref.partition("@")
    chosen = revision if revision is not None else (rev if sep else None)
    return repo_id, None if chosen is None else check_revision(chosen)


#: A full commit id, the name of a Hub cache snapshot folder.
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _fetch(repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> Path:
    from forgetpatch import __version__

    with hub_errors(repo_id, revision, filename):
        try:
            path = Path(hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token,
                library_name="forgetpatch",
                library_version=__version__,
            ))
        except HFValidationError:
            raise  # a repo id or revision the client refuses: hub_errors says which
        except ValueError as exc:  # the client refusing what the Hub answered, e.g. a commit id that is a path
            raise HubError(
                f"the Hub's answer for {repo_id}@{revision or 'main'} (file {filename!r}) was refused: {exc}"
            ) from exc
    commit = path.parents[len(Path(filename).parts) - 1].name  # snapshots/<commit>/<filename>
    if not _COMMIT.fullmatch(commit):
        raise HubError(
            f"the Hub answered {repo_id}@{revision or 'main'} with commit {commit!r}, which is not a commit id (40 hex "
            "digits); refusing it"
        )
    return path


def download(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    allow_unverified: bool = False,
) -> Path:
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
        allow_unverified: accept a patch whose ``forgetpatch.json`` lists no file hashes (format v0).

    Returns:
        The snapshot folder (``.../models--org--name/snapshots/<commit>``) holding the patch files.

    Raises:
        HubError: the revision is not a valid name, or the repo, revision or a file does not exist, is not
            reachable, or (offline) not cached.
        IntegrityError: a file does not match its recorded sha256, or is listed outside the patch.
        UnverifiedPatchError: no file hash is recorded, and ``allow_unverified`` is not set.
        ManifestError: ``forgetpatch.json`` is not a valid manifest.

    Example:
        >>> folder = download("org/no-vangogh", revision="v1")
        >>> patch = forgetpatch.format.read_patch(folder)
    """
    repo_id, revision = split_ref(repo_id, revision)
    manifest_path = _fetch(repo_id, MANIFEST_NAME, revision, token)
    snapshot, commit = manifest_path.parent, manifest_path.parent.name
    names = listed_files(read_manifest(manifest_path), f"{repo_id}@{commit}: {MANIFEST_NAME}")
    for name in sorted({WEIGHTS_NAME, *names} - {MANIFEST_NAME}):
        _fetch(repo_id, name, commit, token)
    try:
        verify_folder(snapshot, allow_unverified=allow_unverified)
    except UnverifiedPatchError:  # nothing to verify by: not a corrupt copy
        raise
    except IntegrityError as exc:  # the cache is never fetched again by itself: say how to get a fresh copy
        raise type(exc)(
            f"{exc} (the cached copy of {repo_id}@{commit[:12]}, which is not fetched again while it is there: "
            f"delete {snapshot.parent.parent} and load again online; if it happens again, the repo itself is corrupt)"
        ) from exc
    return snapshot
