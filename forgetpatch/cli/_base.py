"""What every CLI verb shares: the ``--base`` option, and the checks made before anything loads."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetpatch.errors import ConceptError, ForgetPatchError
from forgetpatch.quiet import quiet_loading

#: Image files the CLI writes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class BaseModelError(ForgetPatchError):
    """``--base`` names no loadable pipeline."""


def plain_console(**kwargs: Any) -> Any:
    """A rich ``Console`` that prints text as given: user text (paths, patch names, concepts, error messages) is never
    read as markup (a path with ``[exp1]`` lost it, one with ``[/]`` crashed the command). Style a part with
    ``rich.text.Text.assemble(("wrote", "green"), f" {path}")``."""
    from rich.console import Console

    return Console(markup=False, **kwargs)


def base_folder(base: str) -> Path | None:
    """The local folder ``--base`` names: a folder, or the cached snapshot of a Hub id (``org/name[@revision]``);
    ``None`` for anything else (nothing is downloaded)."""
    if Path(base).is_dir():
        return Path(base)
    from forgetpatch.hub import is_hub_id, split_ref, why_local

    if why_local(base) or not is_hub_id(base):
        return None
    from huggingface_hub import snapshot_download

    try:
        repo_id, revision = split_ref(base)
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError, ForgetPatchError):  # not in the cache, or not a valid id / revision
        return None


def is_toy_base(base: str) -> bool:
    """Whether ``--base`` names a toy-world model: ``"toy"``, or a folder or cached Hub id holding an export of one."""
    from forgetpatch.toy import is_toy_model

    return base == "toy" or ((folder := base_folder(base)) is not None and is_toy_model(folder))


def load_base(base: str, dtype: str = "float32") -> Any:
    """``"toy"`` -> the shipped toy pipeline; anything else -> ``DiffusionPipeline.from_pretrained(base)``.

    ``base`` may be a local diffusers folder (``save_pretrained`` layout) or a Hub id already in the cache, with
    ``@revision`` to pin one (nothing is downloaded when ``HF_HUB_OFFLINE=1``); a toy-world export, in a folder or
    the cache, loads as the toy pipeline does, with the world's settings and checks.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    with quiet_loading():
        from forgetpatch import toy

        if is_toy_base(base):
            return toy.pipeline(dtype=torch_dtype, path=None if base == "toy" else base_folder(base))
        from diffusers import DiffusionPipeline

        from forgetpatch.hub import is_hub_id, split_ref, why_local

        if not Path(base).exists() and (why_local(base) or not is_hub_id(base)):
            raise BaseModelError(
                f"base model folder {base!r} not found. A local base is a diffusers folder as "
                "`pipe.save_pretrained(FOLDER)` writes it (model_index.json, unet/, text_encoder/, ...); "
                "a Hub id (org/name) must be in the cache already; or use --base toy"
            )
        try:
            if (folder := base_folder(base)) is not None:  # a cached id loads from its snapshot: patches record the commit
                pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype)
            else:
                repo_id, revision = split_ref(base)
                pipe = DiffusionPipeline.from_pretrained(repo_id, revision=revision, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = first if len(first) <= 160 else first[:157] + "..."
            raise BaseModelError(
                f"cannot load base model {base!r}: not a local folder, nor a Hub id in the cache ({first}). "
                "Pass 'toy', a diffusers folder "
                "(`pipe.save_pretrained(FOLDER)` layout) or a Hub id already in the cache"
            ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_toy_concepts(base: str, concepts: Sequence[str]) -> None:
    """On a toy-world base, every concept must be a word of its world (a shape, colour or texture)."""
    if not is_toy_base(base):
        return
    from forgetpatch.toy import vocab

    for word in concepts:
        if (why := vocab.why_not_a_concept(word)) is not None:
            raise ConceptError(why)


def check_image_path(path: Path, option: str = "--output") -> None:
    """An image to write must end in an image extension, and be writable (:func:`check_writable`)."""
    check_writable(path, folder=False)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ForgetPatchError(
            f"{option} {str(path)!r} is not an image file name: end it in {' / '.join(IMAGE_SUFFIXES)}"
        )


def check_patches_flags(loaded: Sequence[Any], *, key_steps: bool, fuse: bool = False) -> None:
    """The patches given to one command, against its flags: each once, ``--key-steps`` only with patches that
    record key steps, and not together with ``--fuse``."""
    from forgetpatch.errors import ApplyError

    seen: dict[str, str] = {}
    for patch in loaded:
        if patch.digest in seen:
            raise ApplyError(f"patch {patch.name!r} is given twice (as {seen[patch.digest]!r} too): give it once")
        seen[patch.digest] = patch.name
    if key_steps and fuse:
        raise ApplyError("--key-steps gates patches step by step, which a fused patch cannot be: drop --fuse or --key-steps")
    if key_steps and not any(p.manifest.key_steps for p in loaded):
        names = ", ".join(p.name for p in loaded) or "no patch"
        raise ApplyError(f"--key-steps: {names} record no key-step ranges (only KSCU patches do); drop --key-steps")


def check_writable(path: Path, *, folder: bool = True, holds: str | None = None) -> None:
    """Refuse, before anything slow, an output path that cannot be written: one under an existing file, a folder
    where a file is wanted (``folder=False``), a file where a folder for ``holds`` is wanted (``holds="the table and
    plot"``), or one whose nearest existing folder refuses a new file (permissions, a read-only or immutable folder:
    tried by creating and removing one)."""
    for parent in path.parents:
        if parent.is_file():
            raise ForgetPatchError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not folder and path.is_dir():
        raise ForgetPatchError(f"cannot write {str(path)!r}: it is a folder; give a file name")
    if holds is not None and path.exists() and not path.is_dir():
        raise ForgetPatchError(f"{str(path)!r} is a file: -o is a folder for {holds}")
    # a save replaces a folder beside it, and a file is written beside it first: what counts is the parent folder
    where = next((p for p in path.absolute().parents if p.is_dir()), None)
    if where is not None:
        try:
            tempfile.TemporaryFile(dir=where).close()
        except OSError as exc:
            raise ForgetPatchError(
                f"cannot write {str(path)!r}: {where} does not take new files ({exc.strerror}); pick another path"
            ) from None


def check_new_patch_folder(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing patch without ``--force`` (other files in the folder are kept either way), and
    an output that cannot be a patch: a file that is not ``.safetensors``, or a path under a file."""
    check_writable(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise ForgetPatchError(
            f"{str(path)!r} is a file, not a patch: --output is a folder to create, or a .safetensors file"
        )
    existing = path.is_file() or (path / "forgetpatch.json").exists()
    if existing and not force:
        raise ForgetPatchError(f"{str(path)!r} already holds a patch: pick another --output, or pass --force to replace it")
