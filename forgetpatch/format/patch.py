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

A patch that carries nothing to verify it by (format v0: no checksum; a manifest without a base
fingerprint for every module) is refused with :class:`UnverifiedPatchError` unless the caller passes
``allow_unverified=True``.

Example:
    >>> patch = read_patch("no-vangogh")            # or "no-vangogh/pytorch_lora_weights.safetensors"
    >>> patch.manifest.concepts[0].target
    'vangogh'
    >>> patch.save("copy")                           # atomic
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from forgetpatch.errors import HubError, IntegrityError, ManifestError, PatchFormatError, UnverifiedPatchError
from forgetpatch.format.fingerprint import COMPONENTS, split_path
from forgetpatch.format.folder import (
    carry_over,
    entries,
    identity,
    inside,
    is_hidden,
    name_problem,
    read_bounded,
    swap,
    writer_lock,
)
from forgetpatch.format.manifest import FORMAT_VERSION, Manifest, problems
from forgetpatch.format.migrate import manifest_version, upgrade

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MANIFEST_NAME = "forgetpatch.json"
#: The model card: a file of the patch when present (``push`` generates it).
CARD_NAME = "README.md"
#: ``__metadata__`` keys of the weights file.
HEADER_MANIFEST_KEY = "forgetpatch"
HEADER_LORA_KEY = "lora_adapter_metadata"
HEADER_CHECKSUM_KEY = "forgetpatch_sha256"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
#: A before/after image, listed with the patch without being asked (``grid.png``, ``before_after.jpg``,
#: ``comparison-3x3.webp``; not ``afternoon.jpg``).
GRID_NAME = re.compile(
    r"(grid|before|after|comparison|samples?)([_.-][\w.-]*)?\.(png|jpe?g|webp)", re.IGNORECASE
)

# Bounds checked before anything is parsed, so a hostile file cannot take unbounded memory or time.
#: Largest ``forgetpatch.json`` (and manifest in a weights header) read; real ones are a few hundred KB.
MAX_MANIFEST_BYTES = 8 << 20
#: Largest safetensors header read (it holds the manifest, the LoRA metadata and one entry per tensor).
MAX_HEADER_BYTES = 16 << 20
#: Most tensors in a patch: 16,384 modules, far more than every layer of SDXL and its two text encoders.
MAX_TENSORS = 32_768
#: Deepest nesting of a manifest's JSON (forgetpatch writes about 6).
MAX_JSON_DEPTH = 64
#: Largest change a patch may make to one weight entry: float16's largest value. A bigger change gives
#: non-finite images in half precision and is no unlearning edit in any precision.
MAX_DELTA = float(torch.finfo(torch.float16).max)


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
    Construction checks that keys, shapes and the manifest's target modules and ranks agree, and
    that every factor is finite and no module's change can exceed :data:`MAX_DELTA` per weight
    (:class:`PatchFormatError` otherwise). Factors may have any real floating dtype (float64/32/16,
    bfloat16, float8), cast when applied; integer, bool and complex factors are refused.

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

    def unfingerprinted(self) -> list[str]:
        """Target modules whose base weights the manifest records no fingerprint of (nothing to check them by)."""
        recorded = self.manifest.base_model.fingerprint
        return [p for p in self.manifest.lora.target_modules if p not in recorded]

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
            if (
                A.ndim not in (2, 4)
                or B.ndim != A.ndim
                or A.shape[0] != r
                or B.shape[1] != r
                or B.shape[2:] not in ((), (1, 1))
                or A.numel() == 0
                or B.numel() == 0
            ):
                raise PatchFormatError(
                    f"module {path!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match rank {r} "
                    "(lora_A is (r, in) or (r, c, kh, kw); lora_B is (out, r) or (out, r, 1, 1))"
                )
            if not (A.is_floating_point() and B.is_floating_point()):
                raise PatchFormatError(f"module {path!r}: LoRA factors must be floating point")
            self._check_size(path, A, B)
        if self.manifest.lora.rank != max(self.rank_of(p) for p in modules):
            raise PatchFormatError("the manifest's lora.rank is not the largest module rank")

    def _check_size(self, path: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Refuse non-finite factors, and changes that can exceed :data:`MAX_DELTA` in any entry.

        ``|delta[i, j]| <= |alpha / r| * |B[i, :]| * |A[:, j]|`` (Cauchy-Schwarz), so the bound is cheap
        and, for factors from an SVD, close to the largest row norm of the change itself.
        """
        a, b = A.reshape(A.shape[0], -1).double(), B.reshape(B.shape[0], -1).double()
        # row / column norms as square sums: a.norm(dim=0) is ~20x slower on CPU, and apply reads every patch. In
        # double no float32 or float16 value squares to infinity, so a sum is infinite or NaN (max() keeps NaN)
        # exactly when a factor holds a NaN or an infinity
        b_rows, a_columns = float(b.square().sum(1).max()), float(a.square().sum(0).max())
        if not (math.isfinite(b_rows) and math.isfinite(a_columns)):
            raise PatchFormatError(
                f"module {path!r}: its LoRA factors hold NaN or infinite values, which make non-finite images; "
                "the patch is corrupt: re-download or re-make it"
            )
        scale = self.scale_of(path)
        bound = abs(scale) * math.sqrt(b_rows * a_columns)
        if not math.isfinite(bound) or bound > MAX_DELTA:
            raise PatchFormatError(
                f"module {path!r}: its change can reach {bound:.3g} per weight (alpha / r = {scale:.3g}), "
                f"beyond {MAX_DELTA:.0f} (float16's range), which makes non-finite images; refusing the patch"
            )

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
            "key_steps": [k.identity() for k in self.manifest.key_steps or []],
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

    @torch.no_grad()
    def add_delta(self, module_path: str, weight: torch.Tensor, *, scale: float = 1.0) -> None:
        """Add ``scale`` times the change of one module into ``weight`` (float32, shaped like the module's weight), in
        place: one multiply-add (``addmm_``), no ``out x in`` change formed first (which, allocated afresh per
        module, was most of a fused ``apply``'s time)."""
        A, B = self.state_dict[module_path + _SUFFIXES[0]], self.state_dict[module_path + _SUFFIXES[1]]
        alpha = scale * self.scale_of(module_path)
        if not weight.is_contiguous():
            weight.add_(self.delta(module_path).to(weight.device) * scale)
            return
        flat = weight.view(weight.shape[0], -1)
        flat.addmm_(B.reshape(B.shape[0], -1).to(weight), A.reshape(A.shape[0], -1).to(weight), alpha=alpha)

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

    def _write_weights(self, file: Path) -> None:
        save_tensors(self.state_dict, file, metadata=self.header_metadata())

    def save(self, path: str | os.PathLike, *, include: Iterable[str] = ()) -> Path:
        """Write the patch atomically to a folder, or to a single file if ``path`` ends in ``.safetensors``.

        A folder lists in ``forgetpatch.json``'s ``files`` (and ``push`` publishes) only the patch's own
        files: the weights, the manifest, a before/after image (``grid.png``, ``before_after.jpg``, ...) and
        the files named in ``include`` (relative paths of files already in the folder, e.g. a method's
        figures). A model card ``README.md`` stays beside them, unlisted: it is not hashed, so editing it
        never makes the patch fail its checks (``push`` renders a fresh one). Anything else in the folder
        (``.env``, notes, ...) is left where it is, unlisted, and named in a warning; hidden files and links
        are never listed.

        Saving over an existing folder writes the new patch, with the other entries of the old folder,
        into a sibling folder and swaps the two in one step: after any failure, a kill included, the
        folder holds the old patch or the new one, whole, and the user's files.

        Raises:
            PatchFormatError: ``include`` names something that is not a plain file inside the folder.
            ManifestError: a value in ``manifest.metrics`` or ``manifest.method.params`` is NaN or infinite (JSON would
                store it as null) or not a plain Python value (a NumPy or torch number).
            OSError: the files cannot be written (nothing changed then).

        Example:
            >>> patch.save("patches/no-vangogh", include=["loss_curve.csv"])
            PosixPath('patches/no-vangogh')
        """
        # the metrics and params dicts are changed in place, past the manifest's validation
        _check_plain(self.manifest.metrics)
        _check_plain(self.manifest.method.params, "method.params")
        path = Path(path)
        if path.suffix == ".safetensors":
            return self._save_file(path)
        path = Path(os.path.abspath(path))
        if path.is_symlink():
            path = path.resolve()  # replace the folder the link points to; the link stays
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        if os.path.ismount(path):
            raise OSError(
                errno.EBUSY,
                f"{path} is a mount point: Patch.save replaces a patch folder as a whole (to be atomic) and "
                "cannot replace a mount point; save into a folder inside it",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        cwd = os.getcwd()
        with writer_lock(path):  # another writer (a save, a recording of figures) waits: none loses the other's
            listed, left_out = _own_files(path, include)
            work = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            replacing = path.exists()
            try:
                work.mkdir()
                if replacing:
                    carry_over(path, work, skip={WEIGHTS_NAME, MANIFEST_NAME})
                self._write_weights(work / WEIGHTS_NAME)
                files = {name: sha256_file(work / name) for name in [WEIGHTS_NAME, *listed]}
                stale = _stale_images(path, files, self.digest) if replacing else []
                files = {name: digest for name, digest in files.items() if name not in stale}
                manifest = self.manifest.model_copy(update={"files": dict(sorted(files.items()))})
                (work / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
                if replacing:
                    shutil.copystat(path, work)
                    _swap(work, path)  # work now holds the old folder
                else:
                    os.rename(work, path)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            shutil.rmtree(work, ignore_errors=True)
        if Path(cwd).is_relative_to(path):
            os.chdir(cwd)  # the working directory was in the folder just replaced: move into the new one
        if stale:
            warnings.warn(
                f"{path}: {', '.join(stale)} shows the patch this one replaced (the same image, a patch that does otherwise), so it is "
                f"not listed with this one (never pushed); make a new one, e.g. forgetpatch eval {path} --grid "
                f"{path / stale[0]}",
                UserWarning,
                stacklevel=2,
            )
        if left_out:
            warnings.warn(
                f"{path}: left out of the patch (not listed in {MANIFEST_NAME}, never pushed): "
                f"{', '.join(left_out)}. A patch lists only its weights, manifest, {CARD_NAME}, a before/after "
                "image and the files passed as include=[...]",
                UserWarning,
                stacklevel=2,
            )
        return path

    def _save_file(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self._write_weights(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def save_tensors(tensors: dict[str, torch.Tensor], file: str | os.PathLike, *, metadata: dict[str, str]) -> Path:
    """Write a safetensors file with the permissions the user's umask gives (safetensors writes owner-only), I/O errors
    (a full disk, ...) raised as :class:`OSError`. Not atomic by itself: write to a temporary name and replace.

    The same tensors and metadata give the same bytes in every process: safetensors writes ``__metadata__`` in a
    random order per process (safetensors issue #584), so its keys are put in sorted order afterwards, in place.

    Example:
        >>> save_tensors({"w": torch.zeros(2)}, "out.safetensors", metadata={"format": "pt"})
    """
    file = Path(file)
    try:
        save_file(tensors, str(file), metadata=metadata)
        _sort_metadata(file)
        os.chmod(file, 0o666 & ~_umask())
    except SafetensorError as exc:  # safetensors reports I/O errors as its own type
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, f"could not write {file}: {os.strerror(code)}", str(file)) from exc
    return file


def _sort_metadata(file: Path) -> None:
    """Rewrite the header of the safetensors ``file`` with its ``__metadata__`` keys sorted, in place. The header keeps
    its length (the same keys and values, compact JSON; spaces pad it as safetensors pads), so no tensor moves."""
    with open(file, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > size:  # never seen: another JSON writer's escapes; the file stays valid as it is
            return
        f.seek(8)
        f.write(canonical.ljust(size, b" "))


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else briefly set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Exchanges two folders in one step (a module name, so that tests can fail or kill it).
_swap = swap


def _own_files(folder: Path, include: Iterable[str]) -> tuple[list[str], list[str]]:
    """The files of ``folder`` a patch saved there lists besides its weights, and the entries it leaves out.

    Raises :class:`PatchFormatError` when ``include`` names anything but a plain file inside the folder.
    """
    included = sorted(set(include))
    for name in included:
        problem = name_problem(name) or ("a hidden file" if is_hidden(name) else None)
        target = folder / name
        if problem is None and (target.is_symlink() or not target.is_file() or not inside(target, folder)):
            problem = "not a plain file (links are never listed) in the folder"
        if problem:
            raise PatchFormatError(
                f"include names {name!r}: {problem}. include lists files already inside {folder} "
                "to ship with the patch"
            )
    own, left_out = set(included), []
    for entry in entries(folder):
        name = entry.name
        if name in (WEIGHTS_NAME, MANIFEST_NAME) or name in own:
            continue
        plain = entry.is_file() and not entry.is_symlink() and not is_hidden(name)
        if plain and GRID_NAME.fullmatch(name):
            own.add(name)
        elif not (plain and name == CARD_NAME) and not any(n.startswith(name + "/") for n in included):
            left_out.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return sorted(own - {CARD_NAME}), left_out  # the card stays beside the patch, never hashed: people edit it


def _stale_images(folder: Path, files: dict[str, str], digest: str) -> list[str]:
    """The before/after images among ``files`` (name -> sha256) that the patch in ``folder`` listed unchanged while it
    does something else than the patch of ``digest`` (:attr:`Patch.digest`: figures recorded into it keep it): they
    show that patch, not the one replacing it. Nothing when the old patch cannot be read."""
    from forgetpatch.errors import ForgetPatchError

    images = sorted(n for n in files if GRID_NAME.fullmatch(n))
    if not images:  # nothing to compare: the old patch is not read (and its weights not hashed) again
        return []
    try:
        old = read_patch(folder, allow_unverified=True)
    except (ForgetPatchError, OSError):
        return []
    if old.digest == digest:
        return []
    return [n for n in images if old.manifest.files.get(n) == files[n]]


# --- reading ------------------------------------------------------------------------------
def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (counted up to just past :data:`MAX_JSON_DEPTH`)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_JSON_DEPTH:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_manifest(raw_json: str | bytes, where: str) -> tuple[Manifest, int]:
    if len(raw_json) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"the manifest in {where} is over {MAX_MANIFEST_BYTES:,} bytes; it is not a patch manifest"
        )
    try:
        text = raw_json.decode("utf-8") if isinstance(raw_json, bytes) else raw_json
        raw = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"the manifest in {where} is not UTF-8 text ({exc})") from None
    except RecursionError:
        raise ManifestError(
            f"the manifest in {where} nests deeper than JSON can be read; it is not a patch manifest"
        ) from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ManifestError(f"the manifest in {where} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"the manifest in {where} is not a JSON object")
    if _depth(raw) > MAX_JSON_DEPTH:
        raise ManifestError(
            f"the manifest in {where} nests deeper than {MAX_JSON_DEPTH} levels; it is not a patch manifest"
        )
    version = manifest_version(raw)
    raw = upgrade(raw)
    try:
        return Manifest.model_validate(raw), version
    except ValidationError as exc:
        raise ManifestError(f"the manifest in {where} is invalid: {problems(exc)}") from None


def _load_manifest(file: Path) -> tuple[Manifest, int]:
    """Read, migrate and validate ``forgetpatch.json``; its version as written."""
    if not os.path.lexists(file):
        raise ManifestError(f"{file.parent} has no {MANIFEST_NAME}")
    return _parse_manifest(read_bounded(file, MAX_MANIFEST_BYTES, ManifestError), str(file))


def read_manifest(file: str | os.PathLike) -> Manifest:
    """The manifest in a ``forgetpatch.json`` file: size-bounded, migrated to the current format and validated.

    Raises :class:`ManifestError` (:class:`UnsupportedFormatVersionError` for a newer format).

    Example:
        >>> read_manifest("no-vangogh/forgetpatch.json").files
        {'pytorch_lora_weights.safetensors': '3f1c...'}
    """
    return _load_manifest(Path(file))[0]


def listed_files(manifest: Manifest, where: str) -> list[str]:
    """The file names ``manifest`` records hashes for; :class:`IntegrityError` when one is not a file of the folder."""
    for name in manifest.files:
        problem = name_problem(name)
        if problem:
            raise IntegrityError(f"{where} lists a file {problem}: {name!r}")
    return list(manifest.files)


def _read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, its size checked (from the 8-byte length prefix) before it is read.

    Raises ``ValueError`` saying what is wrong.
    """
    with open(file, "rb") as f:
        prefix = f.read(8)
        size = os.fstat(f.fileno()).st_size
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or length > size - 8:
            raise ValueError("its header is cut short: truncated, or another format")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"its header is {length:,} bytes; a patch's is at most {MAX_HEADER_BYTES:,}")
        blob = f.read(length)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        header = None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise ValueError(f"it holds {count:,} tensors; a patch has at most {MAX_TENSORS:,}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its metadata is not a table of strings")
    return header


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        metadata = _read_header(file).get("__metadata__") or {}
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise PatchFormatError(
            f"{file} is not a valid safetensors patch file (corrupt, truncated or another format): {exc}. "
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


def _verify_files(folder: Path, manifest: Manifest, allow_unverified: bool) -> None:
    where = folder / MANIFEST_NAME
    names = listed_files(manifest, str(where))
    if not names:
        message = f"{where} lists no file hashes to verify (a format v0 patch?)"
        if not allow_unverified:
            raise UnverifiedPatchError(f"{message}; pass allow_unverified=True to use it anyway")
        logger.warning("%s; used anyway (allow_unverified=True)", message)
        return
    root = folder.parent.parent if in_hub_cache(folder) else folder  # a snapshot links into the repo's blobs/
    for name in names:
        if name == CARD_NAME:  # listed by earlier versions; a card is edited by people and verifies nothing
            continue
        target = folder / name
        if not target.is_file():
            raise IntegrityError(f"{name} is listed in {MANIFEST_NAME} but missing from {folder}")
        if not inside(target, root):
            raise IntegrityError(
                f"{name} in {folder} is a link to {target.resolve()}, outside the patch folder; "
                "a patch holds its own files, never links out of its folder"
            )
        if sha256_file(target) != manifest.files[name]:
            raise IntegrityError(
                f"{name} in {folder} does not match its sha256 in {MANIFEST_NAME}: it changed after the patch was "
                + ("downloaded; re-download it" if root != folder else "saved; get the patch again from its source")
            )


def verify_folder(folder: str | os.PathLike, *, allow_unverified: bool = False) -> None:
    """Check every file listed in ``forgetpatch.json``'s ``files`` against its sha256.

    Raises :class:`IntegrityError` naming the first file that is missing, differs, or is a link out of
    the folder (a Hub cache snapshot's links into its repo's blobs are fine), and
    :class:`UnverifiedPatchError` when no file is listed, unless ``allow_unverified``.

    Example:
        >>> verify_folder(huggingface_hub.snapshot_download("org/no-vangogh"))
    """
    folder = Path(folder)
    manifest, _ = _load_manifest(folder / MANIFEST_NAME)
    _verify_files(folder, manifest, allow_unverified)


def require_verifiable(patch: Patch, *, allow_unverified: bool = False, unchecked: str | None = None) -> None:
    """Refuse a patch that cannot be verified, unless ``allow_unverified`` (then log a warning).

    A patch is verifiable when its manifest records a base-model fingerprint for every module it
    targets (so a patch for another base is refused when applied). ``unchecked`` adds a reason found
    when reading (e.g. a format v0 file without checksum).

    Raises:
        UnverifiedPatchError: what cannot be verified, and how to opt in.
    """
    reasons = [unchecked] if unchecked else []
    missing = patch.unfingerprinted()
    if missing:
        reasons.append(
            f"its manifest records no base-model fingerprint for {len(missing)} of its "
            f"{len(patch.target_modules)} modules (first: {missing[0]}), so a base it was not made for goes unnoticed"
        )
    if not reasons:
        return
    message = f"patch {patch.name!r} cannot be verified: " + "; ".join(reasons)
    if not allow_unverified:
        raise UnverifiedPatchError(
            f"{message}. Re-make it with this forgetpatch, or pass allow_unverified=True to use it anyway."
        )
    logger.warning("%s; used anyway (allow_unverified=True)", message)


def read_patch(path: str | os.PathLike, *, allow_unverified: bool = False) -> Patch:
    """Read a patch from a folder or a single ``.safetensors`` file.

    Older format versions are migrated; newer ones raise :class:`UnsupportedFormatVersionError`. A patch that a
    save replaces while it is read is read again (a few times, a little later each time), so a reader gets one
    version whole, never files of two.
    Corrupt, truncated or non-safetensors files raise :class:`PatchFormatError` (never unpickled);
    a folder's files are checked against the hashes in ``forgetpatch.json``. A patch that cannot be
    verified (format v0 without checksum, or no base fingerprint for some module) raises
    :class:`UnverifiedPatchError` unless ``allow_unverified=True``.

    Example:
        >>> patch = read_patch("patches/no-vangogh")
        >>> old = read_patch("patches/made-in-2023", allow_unverified=True)   # format v0: logs a warning
    """
    path = Path(path)
    if path.name == MANIFEST_NAME and path.is_file():
        raise PatchFormatError(f"{path} is a patch's manifest: give its folder, {str(path.parent)!r}")
    for attempt in range(_READ_ATTEMPTS):
        before = identity(path)
        try:
            patch = _read(path, allow_unverified)
        except (PatchFormatError, OSError):
            if attempt + 1 < _READ_ATTEMPTS and identity(path) != before:
                time.sleep(0.01 * 2**attempt)  # replaced by a save while it was read: read the new one
                continue
            raise
        if identity(path) == before:
            return patch
        time.sleep(0.01 * 2**attempt)
    raise PatchFormatError(f"{path} was replaced {_READ_ATTEMPTS} times while it was read; read it again when done")


def in_hub_cache(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a snapshot in a Hugging Face cache (``.../snapshots/<commit>`` beside ``blobs/``)."""
    folder = Path(os.path.abspath(folder))
    return folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir()


def check_recordable(folder: str | os.PathLike) -> None:
    """:class:`~forgetpatch.errors.HubError` when figures must not be recorded into ``folder``: a Hub cache snapshot,
    whose files are the cache's copy of a commit (every later load of that id and revision would read the figures).

    Example:
        >>> check_recordable("no-circle")
    """
    if in_hub_cache(folder):
        raise HubError(
            f"{folder} is a snapshot in the Hugging Face cache: recording there would change the cache's copy of a "
            "Hub commit. Copy the patch into a folder of your own first (huggingface_hub.snapshot_download(repo_id, "
            'local_dir="my-patch")) and record into that folder'
        )


def record_metrics(folder: str | os.PathLike, update: Callable[[Patch], dict[str, Any]]) -> Path:
    """Add ``update(patch)`` to the metrics of the patch in ``folder`` and save it; its digest does not change.

    The folder's writer lock is held from the read to the save, so two recordings at once (``eval --record`` and
    ``attack --record`` in two terminals) each keep the other's figures. ``update`` sees the patch as it is now and may
    raise to refuse; then nothing is written.

    Example:
        >>> record_metrics("no-circle", lambda patch: {"my_benchmark": {"ua": 0.94}})
    """
    check_recordable(folder)
    folder = Path(folder)
    target = folder.resolve() if folder.is_symlink() else Path(os.path.abspath(folder))  # the folder save replaces
    with writer_lock(target):
        patch = read_patch(folder)
        patch.manifest.metrics.update(update(patch))  # save refuses a NaN or infinite figure, before writing
        patch.save(folder)
    return folder


def _check_plain(value: Any, where: str = "metrics") -> None:
    """:class:`ManifestError` naming the first value in ``value`` that JSON would not store as it is: a NaN or infinite
    number (stored as null, a figure silently lost), or anything but a string, number, bool, None, list or dict (a
    NumPy or torch number, which the manifest cannot write)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ManifestError(f"{where} is {value}: record finite numbers (None where there is no figure)")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float)):
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise ManifestError(f"{where} is a {kind}: record plain Python values (float(x), int(x), x.item(), x.tolist())")


#: Reads of a patch that a save replaced meanwhile (its files by path would mix the two versions) are made again.
_READ_ATTEMPTS = 8


def _read(path: Path, allow_unverified: bool) -> Patch:
    hashed = False
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise PatchFormatError(f"{path} has no {WEIGHTS_NAME}; is it a forgetpatch patch folder?")
        manifest_file = path / MANIFEST_NAME
        if not os.path.lexists(manifest_file):
            manifest, tensors, version = _read_file(weights)
        else:
            manifest, _ = _load_manifest(manifest_file)
            _verify_files(path, manifest, allow_unverified)
            header_manifest, tensors, version = _read_file(weights)
            ours = manifest.model_dump(mode="json", exclude={"files"})
            if ours != header_manifest.model_dump(mode="json", exclude={"files"}):
                raise ManifestError(
                    f"{manifest_file} disagrees with the manifest in {WEIGHTS_NAME}'s header; "
                    "edit patches with Patch.save, not by hand"
                )
            hashed = WEIGHTS_NAME in manifest.files
    elif path.is_file():
        manifest, tensors, version = _read_file(path)
    else:
        raise PatchFormatError(f"no patch at {path}: not a folder or a .safetensors file")
    patch = Patch(manifest, tensors, source=path)
    unchecked = "its weights carry no checksum (format v0)" if version == 0 and not hashed else None
    require_verifiable(patch, allow_unverified=allow_unverified, unchecked=unchecked)
    return patch


__all__ = [
    "record_metrics",
    "CARD_NAME",
    "check_recordable",
    "in_hub_cache",
    "FORMAT_VERSION",
    "GRID_NAME",
    "HEADER_CHECKSUM_KEY",
    "HEADER_LORA_KEY",
    "HEADER_MANIFEST_KEY",
    "MANIFEST_NAME",
    "MAX_DELTA",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MAX_TENSORS",
    "WEIGHTS_NAME",
    "Patch",
    "listed_files",
    "read_manifest",
    "read_patch",
    "require_verifiable",
    "sha256_file",
    "verify_folder",
]
