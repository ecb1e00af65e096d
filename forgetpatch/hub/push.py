"""Publish a patch to the Hub: the patch files and a generated model card, in one commit."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from forgetpatch.errors import ForgetPatchError, HubError
from forgetpatch.format import CARD_NAME, MANIFEST_NAME, WEIGHTS_NAME, Patch, read_patch
from forgetpatch.hub._errors import hub_errors
from forgetpatch.hub.card import render_card
from forgetpatch.hub.download import check_repo_id, check_revision


def _upload_set(folder: Path, files: dict[str, str]) -> list[str]:
    """The files of a patch folder to upload: the manifest, the weights and everything it lists."""
    names = sorted({MANIFEST_NAME, WEIGHTS_NAME, *files})
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise HubError(f"{folder} is not a complete patch folder: missing {', '.join(missing)}")
    return names


def _read_from_folder(patch: Patch) -> bool:
    """Whether ``patch`` is as it was read from a patch folder (its ``source``), unchanged since."""
    source = Path(patch.source) if patch.source is not None else None
    if source is None or not (source / MANIFEST_NAME).is_file():
        return False
    try:
        saved = read_patch(source)
    except ForgetPatchError:
        return False
    return saved.digest == patch.digest and saved.manifest.model_dump() == patch.manifest.model_dump()


def _is_public(api: HfApi, repo_id: str) -> bool:
    """Whether ``repo_id`` exists and is public (``False`` when there is no such repo yet)."""
    try:
        return not api.repo_info(repo_id).private
    except RepositoryNotFoundError:
        return False


def _repacked(patch: Patch, folder: Path, keep: list[str], out: Path) -> Path:
    """Re-save a patch into ``out`` with only the listed files ``keep`` (not the card, no hidden file).

    The Hub's README.md is the model card, which people edit on the website; it is therefore not
    one of the hashed patch files.
    """
    out.mkdir()
    for name in keep:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, out / name)
    return patch.save(out, include=keep)


def _publishable(patch: Patch) -> tuple[list[str], list[str]]:
    """The files a patch folder lists besides weights, manifest and card: those pushed, and the hidden ones (never)."""
    listed = [n for n in patch.manifest.files if n not in (CARD_NAME, MANIFEST_NAME, WEIGHTS_NAME)]
    hidden = [n for n in listed if any(part.startswith(".") for part in n.split("/"))]
    return [n for n in listed if n not in hidden], hidden


def push(
    patch_or_folder: Patch | str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    license: str | None = None,
) -> str:
    """Upload a patch and its model card to Hub repo ``repo_id`` in one commit; returns the repo URL.

    The repo is created if needed (``private`` applies then), and so is the branch ``revision``
    (default ``main``). A folder is verified against its ``forgetpatch.json`` first, so a damaged
    patch is never published, and only the files it lists are uploaded (see ``Patch.save``); a hidden
    file listed by an older forgetpatch (``.env``) is left out, with a warning. The model card
    (``README.md``) is generated from the manifest by :func:`render_card`; a ``README.md`` in the
    folder is replaced by it (the card is not one of the hashed patch files, so editing it on the Hub
    keeps downloads verifiable).

    Args:
        patch_or_folder: a :class:`~forgetpatch.format.Patch` or a folder written by ``Patch.save``; a patch
            read from a folder and unchanged is pushed as that folder (its listed files, its parents' names).
        repo_id: ``"org/name"`` (:class:`HubError` before any work or request otherwise).
        private: create the repo private; an existing public repo is refused (:class:`HubError`), never
            published to as if it were private.
        revision: branch to commit to; created from ``main`` when missing. An invalid name (``../x``,
            ``a b``) raises :class:`HubError` before any request.
        token: a Hub token with write access; ``None`` uses the saved / ``HF_TOKEN`` one.
        commit_message: defaults to ``"Upload forgetpatch patch <name>"``.
        license: the card's license; defaults to the base model family's.

    Example:
        >>> url = push("no-vangogh/", "org/no-vangogh")
        >>> pipe = forgetpatch.apply(pipe, "org/no-vangogh")
    """
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    if isinstance(patch_or_folder, Patch) and _read_from_folder(patch_or_folder):
        patch_or_folder = Path(patch_or_folder.source)  # its folder's listed files and its siblings' names go too
    with tempfile.TemporaryDirectory(prefix="forgetpatch-push-") as tmp:
        out = Path(tmp) / "patch"
        if isinstance(patch_or_folder, Patch):
            folder = patch_or_folder.save(out)
        else:
            folder = Path(patch_or_folder)
            if not (folder / MANIFEST_NAME).is_file():
                raise HubError(
                    f"{folder} is not a patch folder (no {MANIFEST_NAME}); write one with Patch.save"
                )
            patch = read_patch(folder)  # verifies every file: a damaged patch is never published
            keep, hidden = _publishable(patch)
            if hidden:
                warnings.warn(
                    f"{folder}: not pushed, hidden files are never published: {', '.join(hidden)}",
                    UserWarning,
                    stacklevel=2,
                )
            if hidden or CARD_NAME in patch.manifest.files:
                folder = _repacked(patch, folder, keep, out)
        patch = read_patch(folder)
        return _commit(patch, folder, repo_id, private, revision, token, commit_message, license)


def _commit(
    patch: Patch,
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    token: str | bool | None,
    commit_message: str | None,
    license: str | None,
) -> str:
    manifest = patch.manifest
    names = _upload_set(folder, manifest.files)
    card = render_card(patch, repo_id, folder=folder, license=license)
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in names]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode()))
    with hub_errors(repo_id, revision, upload=True):
        if private and _is_public(api, repo_id):
            raise HubError(
                f"Hub repo {repo_id} exists and is public, and private=True (--private) only makes a new repo "
                "private: make it private on the Hub first (its Settings), or push without it"
            )
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload forgetpatch patch {manifest.name}",
            revision=revision,
        )
    return str(repo_url) if revision in (None, "main") else f"{repo_url}/tree/{revision}"
