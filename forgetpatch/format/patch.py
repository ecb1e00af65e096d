"""The :class:`Patch` object and its files: reading, writing, digests and integrity checks.

On disk a patch is a folder (the layout of a Hub repo)::

    no-vangogh/
      pytorch_lora_weights.safetensors   # LoRA factors, diffusers/peft keys; header holds the manifest
      forgetpatch.json                   # the same manifest, readable, plus sha256 of every file

or just the ``.safetensors`` file. The safetensors header ``__metadata__`` holds:

* ``forgetpatch``: the manifest as JSON (with an empty ``files``);
* ``lora_adapter_metadata``: only ``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern`` and
  ``alpha_pattern`` per component (``"unet.r"``, ``"text_encoder.target_modules"``, ...), which is
  what diffusers' ``load_lora_weights`` turns into a ``LoraConfig``. Never the whole peft config,
  whose newer fields break older peft;
* ``forgetpatch_sha256``: a checksum over the rest of the metadata and every tensor, so that a
  corrupted single-file patch is detected (safetensors itself has no checksum).

Example:
    >>> patch = read_patch("no-vangogh")            # or "no-vangogh/pytorch_lora_weights.safetensors"
    >>> patch.manifest.concepts[0].target
    'vangogh'
    >>> patch.save("copy")                           # atomic
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from forgetpatch.errors import IntegrityError, ManifestError, PatchFormatError
from forgetpatch.format.fingerprint import COMPONENTS, split_path
from forgetpatch.format.manifest import FORMAT_VERSION, Manifest
from forgetpatch.format.migrate import manifest_version, upgrade

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MANIFEST_NAME = "forgetpatch.json"
#: ``__metadata__`` keys of the weights file.
HEADER_MANIFEST_KEY = "forgetpatch"
HEADER_LORA_KEY = "lora_adapter_metadata"
HEADER_CHECKSUM_KEY = "forgetpatch_sha256"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(b"forgetpatch-file-v1|")
    rest = {k: v for k, v in metadata.items() if k != HEADER_CHECKSUM_KEY}
    h.update(json.dumps(rest, sort_keys=True).encode())
    _hash_tensors(h, tensors)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Patch:
    """One act of forgetting: LoRA factors (``state_dict``) plus their :class:`Manifest`.

    ``state_dict`` keys are diffusers/peft keys ``<component>.<module path>.lora_A.weight`` /
    ``.lora_B.weight`` with component ``unet``, ``text_encoder`` or ``text_encoder_2``.
    Construction checks that keys, shapes and the manifest's target modules and ranks agree.

    Example:
        >>> patch = build_patch(pipe, {"unet.conv_in": (A, B)}, name="demo", method="manual", concepts=["cat"])
        >>> patch.delta("unet.conv_in").shape == pipe.unet.conv_in.weight.shape
        True
    """

    def __init__(self, manifest: Manifest, state_dict: dict[str, torch.Tensor], source: Path | None = None):
        self.manifest = manifest
        self.state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        self.source = source
        """Where the patch was read from, if it was."""
        self._check()

    def __repr__(self) -> str:
        concepts = ", ".join(c.target for c in self.manifest.concepts)
        return (
            f"Patch({self.name!r}, method={self.manifest.method.name!r}, concepts=[{concepts}], "
            f"modules={len(self.manifest.lora.target_modules)}, digest={self.digest[:12]})"
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def target_modules(self) -> list[str]:
        return list(self.manifest.lora.target_modules)

    def rank_of(self, module_path: str) -> int:
        return self.manifest.lora.rank_pattern.get(module_path, self.manifest.lora.rank)

    def alpha_of(self, module_path: str) -> float:
        return self.manifest.lora.alpha_pattern.get(module_path, self.manifest.lora.alpha)

    def scale_of(self, module_path: str) -> float:
        """``alpha / r`` of one module: its delta is ``scale * B @ A``."""
        return self.alpha_of(module_path) / self.rank_of(module_path)

    def _check(self) -> None:
        modules: dict[str, set[str]] = {}
        for key in self.state_dict:
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise PatchFormatError(
                    f"unexpected tensor {key!r}: patches hold only .lora_A/.lora_B weights"
                )
            path = key[: -len(suffix)]
            try:
                split_path(path)
            except ValueError as exc:
                raise PatchFormatError(str(exc)) from None
            modules.setdefault(path, set()).add(suffix)
        if not modules:
            raise PatchFormatError("the patch holds no LoRA weights")
        declared = self.manifest.lora.target_modules
        if set(declared) != set(modules) or len(declared) != len(set(declared)):
            raise PatchFormatError(
                "the manifest's target_modules do not match the LoRA weights in the file "
                f"({len(declared)} declared, {len(modules)} in the weights)"
            )
        for path, suffixes in modules.items():
            if len(suffixes) != 2:
                raise PatchFormatError(f"module {path!r} has only one of lora_A / lora_B")
            A, B = self.state_dict[path + _SUFFIXES[0]], self.state_dict[path + _SUFFIXES[1]]
            r = self.rank_of(path)
            if A.ndim not in (2, 4) or B.ndim != A.ndim or A.shape[0] != r or B.shape[1] != r:
                raise PatchFormatError(
                    f"module {path!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match rank {r}"
                )
            if not (A.is_floating_point() and B.is_floating_point()):
                raise PatchFormatError(f"module {path!r}: LoRA factors must be floating point")
        if self.manifest.lora.rank != max(self.rank_of(p) for p in modules):
            raise PatchFormatError("the manifest's lora.rank is not the largest module rank")

    # --- identity -------------------------------------------------------------------------
    @cached_property
    def digest(self) -> str:
        """A sha256 identifying what the patch *does*: its factors, their scaling and key-step ranges.

        Descriptive fields (name, concepts, metrics, creation time) are left out, so editing a
        model card or adding metrics keeps a patch's identity; lineage entries refer to it.
        """
        h = hashlib.sha256(b"forgetpatch-digest-v1|")
        _hash_tensors(h, self.state_dict)
        lora = self.manifest.lora
        scaling = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "rank_pattern": lora.rank_pattern,
            "alpha_pattern": lora.alpha_pattern,
            "key_steps": [k.model_dump(mode="json") for k in self.manifest.key_steps or []],
        }
        h.update(json.dumps(scaling, sort_keys=True).encode())
        return h.hexdigest()

    # --- the change -----------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module path: (A, B)}`` as stored (conv factors are 4-D, peft layout)."""
        return {
            path: (self.state_dict[path + _SUFFIXES[0]], self.state_dict[path + _SUFFIXES[1]])
            for path in self.manifest.lora.target_modules
        }

    def delta_shape(self, module_path: str) -> tuple[int, ...]:
        """The shape of the weight ``module_path``'s change applies to (without computing it)."""
        A, B = self.state_dict[module_path + _SUFFIXES[0]], self.state_dict[module_path + _SUFFIXES[1]]
        return (B.shape[0], *A.shape[1:])

    def delta(self, module_path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight change ``(alpha / r) * B @ A`` of one module, shaped like its weight."""
        A, B = self.state_dict[module_path + _SUFFIXES[0]], self.state_dict[module_path + _SUFFIXES[1]]
        product = B.reshape(B.shape[0], -1).to(dtype) @ A.reshape(A.shape[0], -1).to(dtype)
        if A.ndim == 4:
            product = product.reshape(B.shape[0], *A.shape[1:])
        return product * self.scale_of(module_path)

    # --- files ----------------------------------------------------------------------------
    def diffusers_lora_metadata(self) -> dict[str, Any]:
        """What goes under ``lora_adapter_metadata``: per component r, lora_alpha, target_modules, patterns."""
        out: dict[str, Any] = {}
        for component in COMPONENTS:
            paths = [p for p in self.manifest.lora.target_modules if split_path(p)[0] == component]
            if not paths:
                continue
            ranks = {split_path(p)[1]: self.rank_of(p) for p in paths}
            alphas = {split_path(p)[1]: self.alpha_of(p) for p in paths}
            r = Counter(ranks.values()).most_common(1)[0][0]
            alpha = Counter(alphas.values()).most_common(1)[0][0]
            out[f"{component}.r"] = r
            out[f"{component}.lora_alpha"] = alpha
            out[f"{component}.target_modules"] = sorted(ranks)
            out[f"{component}.rank_pattern"] = {k: v for k, v in ranks.items() if v != r}
            out[f"{component}.alpha_pattern"] = {k: v for k, v in alphas.items() if v != alpha}
        return out

    def header_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` this patch is written with."""
        manifest = self.manifest.model_copy(update={"files": {}})
        metadata = {
            "format": "pt",
            HEADER_MANIFEST_KEY: manifest.model_dump_json(),
            HEADER_LORA_KEY: json.dumps(self.diffusers_lora_metadata(), sort_keys=True),
        }
        metadata[HEADER_CHECKSUM_KEY] = _checksum(metadata, self.state_dict)
        return metadata

    def save(self, path: str | os.PathLike) -> Path:
        """Write the patch atomically to a folder, or to a single file if ``path`` ends in ``.safetensors``.

        Files are written under temporary names and renamed into place, so a failed write leaves
        neither a partial file nor a partial folder. Other files already in the folder (a model
        card, ...) are kept and listed in ``forgetpatch.json``'s ``files``.

        Example:
            >>> patch.save("patches/no-vangogh")
            PosixPath('patches/no-vangogh')
        """
        path = Path(path)
        tag = uuid.uuid4().hex[:8]
        if path.suffix == ".safetensors":
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{tag}.tmp")
            try:
                save_file(self.state_dict, str(tmp), metadata=self.header_metadata())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return path

        fresh = not path.exists()
        if not fresh and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        work = path.with_name(f".{path.name}.{tag}.tmp") if fresh else path
        staged: list[tuple[Path, Path]] = []
        try:
            work.mkdir(exist_ok=not fresh)
            weights_tmp = work / (f".{WEIGHTS_NAME}.{tag}.tmp" if not fresh else WEIGHTS_NAME)
            staged.append((weights_tmp, work / WEIGHTS_NAME))
            save_file(self.state_dict, str(weights_tmp), metadata=self.header_metadata())
            files = {WEIGHTS_NAME: sha256_file(weights_tmp)}
            for other in sorted(work.iterdir()) if not fresh else []:
                if (
                    other.is_file()
                    and other.name not in (MANIFEST_NAME, WEIGHTS_NAME)
                    and ".tmp" not in other.name
                ):
                    files[other.name] = sha256_file(other)
            manifest = self.manifest.model_copy(update={"files": dict(sorted(files.items()))})
            manifest_tmp = work / (f".{MANIFEST_NAME}.{tag}.tmp" if not fresh else MANIFEST_NAME)
            staged.append((manifest_tmp, work / MANIFEST_NAME))
            manifest_tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
            if fresh:
                os.replace(work, path)
            else:
                for src, dst in staged:
                    os.replace(src, dst)
        except BaseException:
            if fresh:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for src, _ in staged:
                    src.unlink(missing_ok=True)
            raise
        return path


# --- reading ------------------------------------------------------------------------------
def _parse_manifest(raw_json: str, where: str) -> tuple[Manifest, int]:
    try:
        raw = json.loads(raw_json)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"the manifest in {where} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"the manifest in {where} is not a JSON object")
    version = manifest_version(raw)
    raw = upgrade(raw)
    try:
        return Manifest.model_validate(raw), version
    except ValidationError as exc:
        raise ManifestError(f"the manifest in {where} is invalid:\n{exc}") from None


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise PatchFormatError(
            f"{file} is not a valid safetensors file (corrupt, truncated or another format): {exc}. "
            "Patches are never read with pickle; re-download or re-save the patch."
        ) from None
    return tensors, metadata


def _read_file(file: Path) -> tuple[Manifest, dict[str, torch.Tensor], int]:
    tensors, metadata = _read_weights(file)
    if HEADER_MANIFEST_KEY not in metadata:
        raise ManifestError(
            f"{file} has no forgetpatch manifest in its header: it is a plain LoRA, not a forgetpatch patch"
        )
    manifest, version = _parse_manifest(metadata[HEADER_MANIFEST_KEY], f"the header of {file}")
    if version >= 1 and metadata.get(HEADER_CHECKSUM_KEY) != _checksum(metadata, tensors):
        raise IntegrityError(f"{file} is corrupt: its checksum does not match its contents; re-download it")
    return manifest, tensors, version


def verify_folder(folder: str | os.PathLike) -> None:
    """Check every file listed in ``forgetpatch.json``'s ``files`` against its sha256.

    Raises :class:`IntegrityError` naming the first file that is missing or differs.

    Example:
        >>> verify_folder(huggingface_hub.snapshot_download("org/no-vangogh"))
    """
    folder = Path(folder)
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}")
    manifest, _ = _parse_manifest(manifest_file.read_text(errors="replace"), str(manifest_file))
    if not manifest.files:
        raise IntegrityError(f"{manifest_file} lists no file hashes to verify")
    for name, expected in manifest.files.items():
        target = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"{manifest_file} lists a file outside the patch folder: {name!r}")
        if not target.is_file():
            raise IntegrityError(f"{name} is listed in {MANIFEST_NAME} but missing from {folder}")
        if sha256_file(target) != expected:
            raise IntegrityError(
                f"{name} in {folder} does not match its sha256 in {MANIFEST_NAME}; re-download it"
            )


def read_patch(path: str | os.PathLike) -> Patch:
    """Read a patch from a folder or a single ``.safetensors`` file.

    Older format versions are migrated; newer ones raise :class:`UnsupportedFormatVersionError`.
    Corrupt, truncated or non-safetensors files raise :class:`PatchFormatError` (never unpickled);
    a folder's files are checked against the hashes in ``forgetpatch.json``.

    Example:
        >>> patch = read_patch("patches/no-vangogh")
    """
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise PatchFormatError(f"{path} has no {WEIGHTS_NAME}; is it a forgetpatch patch folder?")
        manifest_file = path / MANIFEST_NAME
        if not manifest_file.is_file():
            manifest, tensors, _ = _read_file(weights)
            return Patch(manifest, tensors, source=path)
        text = manifest_file.read_text(errors="replace")
        manifest, version = _parse_manifest(text, str(manifest_file))
        if version >= 1:
            verify_folder(path)
        header_manifest, tensors, _ = _read_file(weights)
        ours = manifest.model_dump(mode="json", exclude={"files"})
        if ours != header_manifest.model_dump(mode="json", exclude={"files"}):
            raise ManifestError(
                f"{manifest_file} disagrees with the manifest in {WEIGHTS_NAME}'s header; "
                "edit patches with Patch.save, not by hand"
            )
        return Patch(manifest, tensors, source=path)
    if path.is_file():
        manifest, tensors, _ = _read_file(path)
        return Patch(manifest, tensors, source=path)
    raise PatchFormatError(f"no patch at {path}: not a folder or a .safetensors file")


__all__ = [
    "FORMAT_VERSION",
    "HEADER_CHECKSUM_KEY",
    "HEADER_LORA_KEY",
    "HEADER_MANIFEST_KEY",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "Patch",
    "read_patch",
    "sha256_file",
    "verify_folder",
]
