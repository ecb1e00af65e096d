"""Hostile patch files and faults while saving (issue 14).

Every hostile file is written the way a careful forger would: header checksum and sha256 table
consistent, so that what is tested is the check that should catch the file, not a checksum.
Each case ends in a named :class:`~forgetpatch.errors.ForgetPatchError` (never a raw
``KeyError`` / ``ValueError`` / ``RecursionError`` / JSON error) or in exactly the right patch.

dtype policy (documented here and in ``Patch``): LoRA factors may be any real floating dtype
(float64/32/16, bfloat16, float8), cast when applied; integer, bool and complex factors are refused.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import struct
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import forgetpatch
import forgetpatch.format.folder as folder_module
import forgetpatch.format.patch as patch_module
import forgetpatch.loader.core
from forgetpatch.errors import (
    ForgetPatchError,
    IntegrityError,
    ManifestError,
    MissingModuleError,
    PatchFormatError,
    UnsupportedFormatVersionError,
    UnverifiedPatchError,
)
from forgetpatch.format import (
    HEADER_CHECKSUM_KEY,
    HEADER_LORA_KEY,
    HEADER_MANIFEST_KEY,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Patch,
    build_patch,
    read_patch,
    resolve_module,
    sha256_file,
    verify_folder,
)
from forgetpatch.format.patch import _checksum
from forgetpatch.testing import tiny_sd_pipeline

TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "unet.conv_in"
MODULES = [TO_K, CONV]
A_, B_ = ".lora_A.weight", ".lora_B.weight"
MiB = 1 << 20


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def make(pipe, rank: int = 2, seed: int = 0, name: str = "good", modules: list[str] = MODULES) -> Patch:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in modules:
        w = resolve_module(pipe, path).weight
        factors[path] = (
            0.1 * torch.randn(rank, w[0].numel(), generator=g),
            torch.randn(w.shape[0], rank, generator=g),
        )
    return build_patch(pipe, factors, name=name, method="manual", concepts=["cat"], lineage=[])


@pytest.fixture(scope="module")
def good(pipe) -> Patch:
    return make(pipe)


# --- forging files --------------------------------------------------------------------------
def manifest_of(patch: Patch) -> dict:
    return patch.manifest.model_dump(mode="json")


def forge(
    where: Path,
    manifest: dict,
    tensors: dict[str, torch.Tensor],
    *,
    folder: bool = False,
    checksum: bool = True,
    files: dict[str, str] | None = None,
    rewrite: Callable[[str], str] = lambda text: text,
) -> Path:
    """Write a patch from a raw manifest dict with every checksum a forger can compute filled in.

    ``folder``: write ``where/`` with ``forgetpatch.json`` (``files`` = the weights' sha256 unless given).
    ``rewrite``: applied to the manifest's JSON text before it is written (for tokens json.dumps never writes).
    """
    header = {k: v for k, v in manifest.items() if k != "files"}
    metadata = {"format": "pt", HEADER_MANIFEST_KEY: rewrite(json.dumps(header)), HEADER_LORA_KEY: "{}"}
    if checksum:
        metadata[HEADER_CHECKSUM_KEY] = _checksum(metadata, tensors)
    if not folder:
        save_file(tensors, str(where), metadata=metadata)
        return where
    where.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(where / WEIGHTS_NAME), metadata=metadata)
    listed = {WEIGHTS_NAME: sha256_file(where / WEIGHTS_NAME)} if files is None else files
    (where / MANIFEST_NAME).write_text(rewrite(json.dumps({**manifest, "files": listed})))
    return where


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    blob = deepen(json.dumps(header)).encode()
    return struct.pack("<Q", len(blob)) + blob + data


#: JSON nested 5,000 deep (json.dumps cannot write it: it recurses).
DEEP = "[" * 5000 + "]" * 5000


def deepen(text: str) -> str:
    return text.replace('"DEEP"', DEEP)


def _use(patch: Patch) -> None:
    """What applying does with a patch's numbers: every delta, in float32 and float16."""
    for path in patch.target_modules:
        patch.delta(path)
        patch.delta(path, torch.float16)


# --- the cases ------------------------------------------------------------------------------
OK = "ok"
Case = Callable[[Path, Patch], Path]
CASES: list = []


def case(id: str, expected: type[ForgetPatchError] | str, allow_unverified: bool = False):
    def register(build: Case) -> Case:
        CASES.append(pytest.param(build, expected, allow_unverified, id=id))
        return build

    return register


def single(tmp: Path, good: Patch, manifest: dict | None = None, tensors: dict | None = None, **kw) -> Path:
    return forge(tmp / "p.safetensors", manifest or manifest_of(good), tensors or dict(good.state_dict), **kw)


def edit(good: Patch, **changes) -> dict:
    m = manifest_of(good)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = m
        for p in parents:
            target = target[p]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return m


_DROP = object()


def with_tensor(good: Patch, key: str, value: torch.Tensor) -> dict:
    return {**good.state_dict, key: value}


# JSON, sizes, special files
case("manifest-deep-json", ManifestError)(
    lambda t, g: forge(
        t / "p", edit(g, metrics={"x": "DEEP"}), dict(g.state_dict), folder=True, rewrite=deepen
    )
)
case("header-deep-json", ManifestError)(
    lambda t, g: single(t, g, edit(g, metrics={"x": "DEEP"}), rewrite=deepen)
)
case("manifest-over-8MiB", ManifestError)(
    lambda t, g: forge(t / "p", edit(g, metrics={"pad": " " * (9 * MiB)}), dict(g.state_dict), folder=True)
)
case("header-manifest-over-8MiB", ManifestError)(
    lambda t, g: single(t, g, edit(g, metrics={"pad": "x" * (9 * MiB)}))
)


@case("header-length-2**40", PatchFormatError)
def _(t, g):
    (t / "p.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return t / "p.safetensors"


@case("header-32MiB-sparse", PatchFormatError)
def _(t, g):
    with open(t / "p.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 32 * MiB))
        f.truncate(32 * MiB + 8)
    return t / "p.safetensors"


@case("header-length-past-eof", PatchFormatError)
def _(t, g):
    (t / "p.safetensors").write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    return t / "p.safetensors"


@case("manifest-is-dev-zero", ManifestError)
def _(t, g):
    folder = forge(t / "p", manifest_of(g), dict(g.state_dict), folder=True)
    (folder / MANIFEST_NAME).unlink()
    (folder / MANIFEST_NAME).symlink_to("/dev/zero")
    return folder


@case("manifest-is-fifo", ManifestError)
def _(t, g):
    folder = forge(t / "p", manifest_of(g), dict(g.state_dict), folder=True)
    (folder / MANIFEST_NAME).unlink()
    os.mkfifo(folder / MANIFEST_NAME)
    return folder


@case("manifest-invalid-utf8", ManifestError)
def _(t, g):
    folder = forge(t / "p", manifest_of(g), dict(g.state_dict), folder=True)
    text = (folder / MANIFEST_NAME).read_bytes()
    (folder / MANIFEST_NAME).write_bytes(text.replace(b'"good"', b'"go\xffd"'))
    return folder


for _id, _text in [("manifest-not-object", "[1, 2]"), ("manifest-empty", ""), ("manifest-not-json", "{")]:

    @case(_id, ManifestError)
    def _(t, g, text=_text):
        folder = forge(t / "p", manifest_of(g), dict(g.state_dict), folder=True)
        (folder / MANIFEST_NAME).write_text(text)
        return folder


# lineage: the digests of the patches a patch was computed on (a name there matched no patch, silently)
case("lineage-a-name", ManifestError)(lambda t, g: single(t, g, edit(g, lineage=["step-1"])))
case("lineage-upper-case", ManifestError)(lambda t, g: single(t, g, edit(g, lineage=["AB" * 32])))
case("lineage-repeated", ManifestError)(lambda t, g: single(t, g, edit(g, lineage=["ab" * 32, "ab" * 32])))
case("lineage-a-digest", OK)(lambda t, g: single(t, g, edit(g, lineage=["ab" * 32])))
# key-step fractions as strings were read as numbers
case("key-steps-as-strings", ManifestError)(
    lambda t, g: single(t, g, edit(g, key_steps=[{"start": "0.0", "end": "0.5"}]))
)
case("key-steps-as-numbers", OK)(lambda t, g: single(t, g, edit(g, key_steps=[{"start": 0, "end": 0.5}])))

# format versions
case("version-999", UnsupportedFormatVersionError)(lambda t, g: single(t, g, edit(g, format_version=999)))
for _id, _version in [("version-string", "1"), ("version-bool", True), ("version-float", 1.0), ("version-negative", -1),
                      ("version-missing", _DROP)]:  # fmt: skip
    case(_id, ManifestError)(lambda t, g, v=_version: single(t, g, edit(g, format_version=v)))


def v0(good: Patch) -> dict:
    m = good.manifest
    return {
        "format_version": 0, "name": "old", "method": "esd-x", "concepts": ["cat"], "base_model": "sd15",
        "rank": m.lora.rank, "alpha": m.lora.alpha, "target_modules": m.lora.target_modules,
    }  # fmt: skip


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40
    file.write_bytes(bytes(data))


@case("v0-single-file", UnverifiedPatchError)
def _(t, g):
    return single(t, g, v0(g), checksum=False)


@case("v0-flipped-byte", UnverifiedPatchError)
def _(t, g):
    folder = forge(t / "p", v0(g), dict(g.state_dict), folder=True, checksum=False, files={})
    flip_a_byte(folder / WEIGHTS_NAME)
    return folder


case("v0-allowed", OK, allow_unverified=True)(lambda t, g: single(t, g, v0(g), checksum=False))


@case("v0-files-kept-then-tampered", IntegrityError, allow_unverified=True)
def _(t, g):
    folder = forge(t / "p", v0(g), dict(g.state_dict), folder=True, checksum=False)  # v0 with a files table
    flip_a_byte(folder / WEIGHTS_NAME)
    return folder


case("fingerprint-empty", UnverifiedPatchError)(
    lambda t, g: single(t, g, edit(g, base_model__fingerprint={}))
)
case("fingerprint-partial", UnverifiedPatchError)(
    lambda t, g: single(
        t, g, edit(g, base_model__fingerprint={TO_K: manifest_of(g)["base_model"]["fingerprint"][TO_K]})
    )
)
case("fingerprint-empty-allowed", OK, allow_unverified=True)(
    lambda t, g: single(t, g, edit(g, base_model__fingerprint={}))
)

# numbers
for _id, _alpha in [
    ("alpha-nan", float("nan")),
    ("alpha-inf", float("inf")),
    ("alpha-minus-inf", float("-inf")),
]:
    case(_id, ManifestError)(lambda t, g, a=_alpha: single(t, g, edit(g, lora__alpha=a)))


case("alpha-1e400-overflows-to-inf", ManifestError)(
    lambda t, g: single(t, g, edit(g, lora__alpha=1234.5), rewrite=lambda s: s.replace("1234.5", "1e400"))
)


case("alpha-pattern-nan", ManifestError)(
    lambda t, g: single(t, g, edit(g, lora__alpha_pattern={CONV: float("nan")}))
)
case("alpha-huge", PatchFormatError)(lambda t, g: single(t, g, edit(g, lora__alpha=1e30)))


@case("rank-pattern-zero", ManifestError)
def _(t, g):
    m = edit(g, lora__rank_pattern={CONV: 0})
    tensors = with_tensor(g, CONV + A_, torch.zeros(0, 4, 3, 3))
    tensors[CONV + B_] = torch.zeros(32, 0, 1, 1)
    return single(t, g, m, tensors)


case("rank-pattern-negative", ManifestError)(
    lambda t, g: single(t, g, edit(g, lora__rank_pattern={CONV: -2}))
)
case("factor-nan", PatchFormatError)(
    lambda t, g: single(
        t, g, tensors=with_tensor(g, TO_K + A_, torch.full_like(g.state_dict[TO_K + A_], float("nan")))
    )
)
case("factor-inf", PatchFormatError)(
    lambda t, g: single(
        t, g, tensors=with_tensor(g, CONV + B_, torch.full_like(g.state_dict[CONV + B_], float("inf")))
    )
)
case("factors-overflow-on-product", PatchFormatError)(
    lambda t, g: single(t, g, tensors={k: torch.full_like(v, 3e38) for k, v in g.state_dict.items()})
)
case("factors-overflow-float16", PatchFormatError)(
    lambda t, g: single(
        t, g, tensors={k: torch.full_like(v, 60000.0, dtype=torch.float16) for k, v in g.state_dict.items()}
    )
)

# dtypes
case("dtype-int32", PatchFormatError)(
    lambda t, g: single(t, g, tensors={k: v.to(torch.int32) for k, v in g.state_dict.items()})
)
case("dtype-bool", PatchFormatError)(
    lambda t, g: single(t, g, tensors={k: v > 0 for k, v in g.state_dict.items()})
)
for _id, _dtype in [
    ("dtype-float64", torch.float64),
    ("dtype-bfloat16", torch.bfloat16),
    ("dtype-float8", torch.float8_e4m3fn),
]:
    case(_id, OK)(lambda t, g, d=_dtype: single(t, g, tensors={k: v.to(d) for k, v in g.state_dict.items()}))

# shapes
case("shape-rank-mismatch", PatchFormatError)(
    lambda t, g: single(t, g, tensors=with_tensor(g, TO_K + B_, torch.randn(32, 3)))
)
case("shape-3d", PatchFormatError)(
    lambda t, g: single(t, g, tensors=with_tensor(g, TO_K + A_, torch.randn(2, 4, 8)))
)
case("shape-1d", PatchFormatError)(
    lambda t, g: single(t, g, tensors=with_tensor(g, TO_K + A_, torch.randn(2)))
)
case("shape-conv-B-with-3x3-kernel", PatchFormatError)(
    lambda t, g: single(t, g, tensors=with_tensor(g, CONV + B_, torch.randn(32, 2, 3, 3)))
)
case("shape-4d-A-with-2d-B", PatchFormatError)(
    lambda t, g: single(t, g, tensors=with_tensor(g, CONV + B_, torch.randn(32, 2)))
)

# keys and targets
case("key-missing-lora-B", PatchFormatError)(
    lambda t, g: single(t, g, tensors={k: v for k, v in g.state_dict.items() if k != TO_K + B_})
)
case("key-not-lora", PatchFormatError)(
    lambda t, g: single(t, g, tensors=with_tensor(g, "unet.conv_in.weight", torch.zeros(1)))
)
case("targets-duplicated", PatchFormatError)(
    lambda t, g: single(t, g, edit(g, lora__target_modules=[TO_K, CONV, CONV]))
)


def retarget(good: Patch, old: str, new: str) -> tuple[dict, dict]:
    m = manifest_of(good)
    m["lora"]["target_modules"] = [new if p == old else p for p in m["lora"]["target_modules"]]
    m["lora"]["rank_pattern"] = {new if p == old else p: r for p, r in m["lora"]["rank_pattern"].items()}
    m["lora"]["alpha_pattern"] = {new if p == old else p: r for p, r in m["lora"]["alpha_pattern"].items()}
    fp = m["base_model"]["fingerprint"]
    fp[new] = fp.pop(old)
    tensors = {
        k.replace(old + ".", new + ".", 1) if k.startswith(old + ".") else k: v
        for k, v in good.state_dict.items()
    }
    return m, tensors


for _id, _path in [("target-vae", "vae.decoder.conv_in"), ("target-empty-segment", "unet.down_blocks..to_k"),
                   ("target-space", "unet.down blocks.to_k"), ("target-dunder", "unet.__class__")]:  # fmt: skip
    case(_id, PatchFormatError)(lambda t, g, p=_path: single(t, g, *retarget(g, TO_K, p)))


@case("keys-100k", PatchFormatError)
def _(t, g):
    """100,000 tensors (50,000 modules), header written as text: a forgery through save_file takes seconds."""
    entries = ",".join(
        f'"unet.m{i // 2}{(A_, B_)[i % 2]}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(100_000)
    )
    metadata = json.dumps({HEADER_MANIFEST_KEY: json.dumps(manifest_of(g))})
    blob = f'{{"__metadata__":{metadata},{entries}}}'.encode()
    (t / "p.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(400_000))
    return t / "p.safetensors"


# the safetensors container itself
def _raw_case(id: str, header: dict, data: bytes) -> None:
    @case(id, PatchFormatError)
    def _(t, g):
        (t / "p.safetensors").write_bytes(raw_safetensors(header, data))
        return t / "p.safetensors"


_T = {"dtype": "F32", "shape": [2, 2]}
_raw_case(
    "offsets-overlap", {"a": {**_T, "data_offsets": [0, 16]}, "b": {**_T, "data_offsets": [0, 16]}}, bytes(16)
)
_raw_case("offsets-out-of-range", {"a": {**_T, "data_offsets": [0, 1 << 40]}}, bytes(16))
_raw_case("offsets-gap", {"a": {**_T, "data_offsets": [8, 24]}}, bytes(24))
_raw_case("offsets-size-mismatch", {"a": {**_T, "data_offsets": [0, 8]}}, bytes(8))
_raw_case("header-metadata-not-strings", {"__metadata__": {HEADER_MANIFEST_KEY: 5}}, b"")
_raw_case("header-not-an-object", [1, 2], b"")  # type: ignore[arg-type]
_raw_case("header-nested-5000", {"a": "DEEP"}, b"")


@case("pickle-renamed", PatchFormatError)
def _(t, g):
    (t / "p.safetensors").write_bytes(pickle.dumps(dict(g.state_dict)))
    return t / "p.safetensors"


@case("torch-save-renamed", PatchFormatError)
def _(t, g):
    torch.save(dict(g.state_dict), t / "p.safetensors")
    return t / "p.safetensors"


@case("truncated-half", PatchFormatError)
def _(t, g):
    data = single(t, g).read_bytes()
    (t / "q.safetensors").write_bytes(data[: len(data) // 2])
    return t / "q.safetensors"


@case("empty-file", PatchFormatError)
def _(t, g):
    (t / "p.safetensors").write_bytes(b"")
    return t / "p.safetensors"


# folders: the files table, symlinks
for _id, _name in [("files-dotdot", "../x"), ("files-absolute", "/etc/hostname"), ("files-inner-dotdot", "a/../../x"),
                   ("files-backslash", "..\\..\\x"), ("files-nul", "a\x00b"), ("files-empty-name", ""),
                   ("files-newline", "a\nb")]:  # fmt: skip

    @case(_id, IntegrityError)
    def _(t, g, name=_name):
        folder = forge(t / "p", manifest_of(g), dict(g.state_dict), folder=True)
        files = {WEIGHTS_NAME: sha256_file(folder / WEIGHTS_NAME), name: "0" * 64}
        (folder / MANIFEST_NAME).write_text(json.dumps({**manifest_of(g), "files": files}))
        return folder


def _listed_link(t: Path, g: Patch, name: str, target: Path) -> Path:
    folder = forge(t / "p", manifest_of(g), dict(g.state_dict), folder=True)
    (folder / name).symlink_to(target)
    files = {WEIGHTS_NAME: sha256_file(folder / WEIGHTS_NAME), name: sha256_file(target)}
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest_of(g), "files": files}))
    return folder


@case("files-symlink-out-of-folder", IntegrityError)
def _(t, g):
    (t / "secret.txt").write_text("private")
    return _listed_link(t, g, "grid.png", t / "secret.txt")


@case("files-symlink-inside-folder", OK)
def _(t, g):
    folder = t / "p"
    folder.mkdir()
    (folder / "real.png").write_bytes(b"png")
    return _listed_link(t, g, "grid.png", folder / "real.png")


@case("weights-symlink-out-of-folder", IntegrityError)
def _(t, g):
    elsewhere = forge(t / "elsewhere", manifest_of(g), dict(g.state_dict), folder=True)
    folder = t / "p"
    folder.mkdir()
    (folder / WEIGHTS_NAME).symlink_to(elsewhere / WEIGHTS_NAME)
    (folder / MANIFEST_NAME).write_bytes((elsewhere / MANIFEST_NAME).read_bytes())
    return folder


@case("weights-is-a-folder", PatchFormatError)
def _(t, g):
    folder = t / "p"
    (folder / WEIGHTS_NAME).mkdir(parents=True)
    return folder


@pytest.mark.parametrize("build, expected, allow_unverified", CASES)
def test_hostile_file(tmp_path, good, build, expected, allow_unverified):
    path = build(tmp_path, good)
    kwargs = {"allow_unverified": True} if allow_unverified else {}
    if expected == OK:
        patch = read_patch(path, **kwargs)
        assert set(patch.target_modules) == set(good.target_modules)
        dtype = patch.state_dict[TO_K + A_].dtype
        tol = {torch.float8_e4m3fn: 0.3, torch.bfloat16: 0.05}.get(dtype, 1e-5)  # as much as the dtype rounds
        for module in good.target_modules:
            delta = patch.delta(module)
            assert torch.isfinite(delta).all()
            torch.testing.assert_close(delta, good.delta(module), rtol=tol, atol=tol)
        return
    with pytest.raises(expected) as raised:
        _use(read_patch(path, **kwargs))
    message = str(raised.value)
    assert len(message) > 30 and "Traceback" not in message


# --- targets that exist in no pipeline: refused when applied, pipeline untouched ----------------------
@pytest.mark.parametrize(
    "target",
    [
        "unet.down_blocks.0.attentions.0.nope.to_k",
        "unet.down_blocks.0.resnets.0.norm1",
        "text_encoder_2.encoder.layers.0.mlp.fc1",
    ],
    ids=["unknown-module", "groupnorm-not-linear", "component-absent"],
)
def test_targets_that_do_not_fit_are_refused_when_applied(tmp_path, pipe, good, target):
    path = single(tmp_path, good, *retarget(good, TO_K, target))
    patch = read_patch(path)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(MissingModuleError):
        forgetpatch.apply(pipe, patch)
    assert forgetpatch.applied(pipe) == []
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_apply_refuses_a_patch_without_a_full_fingerprint(pipe, good):
    base = good.manifest.base_model
    partial = base.model_copy(update={"fingerprint": {TO_K: base.fingerprint[TO_K]}})
    patch = Patch(good.manifest.model_copy(update={"base_model": partial}), good.state_dict)
    with pytest.raises(UnverifiedPatchError, match=CONV):
        forgetpatch.apply(pipe, patch)
    assert forgetpatch.applied(pipe) == []
    forgetpatch.apply(pipe, patch, allow_unverified=True)
    forgetpatch.remove(pipe)


# --- what a folder lists (and so what push publishes) -----------------------------------------------------
def _folder_with_private_files(tmp_path: Path) -> Path:
    folder = tmp_path / "p"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "table.csv").write_text("a,b\n")
    for name, text in {".env": "HF_TOKEN=hf_secret", "id_rsa": "KEY", "notes.tmp": "mine", "README.md": "# card",
                       "grid.png": "png", "before_after.png": "png"}.items():  # fmt: skip
        (folder / name).write_text(text)
    (tmp_path / "outside.png").write_text("private picture")
    (folder / "samples.png").symlink_to(tmp_path / "outside.png")
    return folder


def test_save_lists_only_the_patch_files_and_names_the_rest(tmp_path, good):
    folder = _folder_with_private_files(tmp_path)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.warns(UserWarning) as caught:
        good.save(folder)
    listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert set(listed) == {WEIGHTS_NAME, "grid.png", "before_after.png"}  # the card stays, unhashed
    message = " ".join(str(w.message) for w in caught)
    for name in (".env", "id_rsa", "notes.tmp", "data", "samples.png"):
        assert name in message
    assert "HF_TOKEN" not in message
    # every user file is still there, untouched
    assert {p: (folder / p).read_bytes() for p in before} == before
    verify_folder(folder)


def test_save_include_ships_declared_files(tmp_path, good):
    folder = _folder_with_private_files(tmp_path)
    with pytest.warns(UserWarning):
        good.save(folder, include=["notes.tmp", "data/table.csv"])
    listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert {"notes.tmp", "data/table.csv"} <= set(listed) and ".env" not in listed
    verify_folder(folder)
    assert read_patch(folder).digest == good.digest
    for bad in ["../outside.png", ".env", "missing.txt", "samples.png", "/etc/hostname"]:
        with pytest.raises(PatchFormatError, match=r"include"):
            good.save(folder, include=[bad])
    assert (
        json.loads((folder / MANIFEST_NAME).read_text())["files"] == listed
    )  # refused before anything changed


def test_save_into_a_symlinked_folder_keeps_the_link(tmp_path, good, pipe):
    real = good.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    other = make(pipe, seed=1, name="other")
    other.save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert read_patch(real).digest == other.digest


# --- faults while overwriting: the old patch or the new one, whole, never a mix --------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_folder(tmp_path, good) -> Path:
    folder = tmp_path / "patches" / "p"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("user notes")
    (folder / ".env").write_text("SECRET=1")
    (folder / "README.md").write_text("# card")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good.save(folder)
    return folder


def _fail_weights(monkeypatch, exc: OSError) -> None:
    real = patch_module.save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise exc

    monkeypatch.setattr(patch_module, "save_file", failing)


def _fail_hash(monkeypatch, exc: OSError) -> None:
    def failing(path):
        raise exc

    monkeypatch.setattr(patch_module, "sha256_file", failing)


def _fail_commit(monkeypatch, exc: OSError) -> None:
    """Fail the step that makes the new patch visible: renaming the manifest into place, or swapping folders."""
    real = os.replace

    def failing_replace(src, dst, *a, **kw):
        if Path(dst).name == MANIFEST_NAME:
            raise exc
        return real(src, dst, *a, **kw)

    def failing_swap(*args):
        raise exc

    monkeypatch.setattr(patch_module.os, "replace", failing_replace)
    if hasattr(patch_module, "_swap"):
        monkeypatch.setattr(patch_module, "_swap", failing_swap)


def _fail_write_text(monkeypatch, exc: OSError) -> None:
    def failing(self, *a, **kw):
        raise exc

    monkeypatch.setattr(Path, "write_text", failing)


FAULTS = {
    "weights-write-enospc": (_fail_weights, OSError(errno.ENOSPC, "No space left on device")),
    "weights-write-read-only": (_fail_weights, PermissionError(errno.EACCES, "Permission denied")),
    "hashing": (_fail_hash, OSError(errno.EIO, "I/O error")),
    "manifest-write": (_fail_write_text, OSError(errno.ENOSPC, "No space left on device")),
    "commit-step": (_fail_commit, OSError(errno.EIO, "I/O error")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_overwrite_that_fails_midway_keeps_the_old_patch(old_folder, pipe, good, monkeypatch, fault):
    before = _snapshot(old_folder)
    siblings = sorted(old_folder.parent.iterdir())
    inject, exc = FAULTS[fault]
    inject(monkeypatch, exc)
    with pytest.raises(OSError) as raised:
        make(pipe, seed=1, name="new").save(old_folder)
    assert raised.value.errno == exc.errno
    monkeypatch.undo()
    assert _snapshot(old_folder) == before
    assert read_patch(old_folder).digest == good.digest
    assert sorted(old_folder.parent.iterdir()) == siblings  # nothing left behind


def test_read_only_folder(old_folder, pipe, good):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; test_overwrite_that_fails_midway covers EACCES")
    before = _snapshot(old_folder)
    old_folder.parent.chmod(0o555)
    old_folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            make(pipe, seed=1, name="new").save(old_folder)
    finally:
        old_folder.chmod(0o755)
        old_folder.parent.chmod(0o755)
    assert _snapshot(old_folder) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs when this machine lets us mount one (root with CAP_SYS_ADMIN), else None."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk(small_disk, tmp_path, good, monkeypatch):
    base = small_disk or tmp_path
    folder = good.save(base / "p")
    before = _snapshot(folder)
    big = Patch(good.manifest.model_copy(update={"metrics": {"pad": "x" * 400_000}}), good.state_dict)
    if small_disk is None:
        _fail_weights(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError) as raised:
        big.save(folder)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _snapshot(folder) == before and read_patch(folder).digest == good.digest
    assert sorted(p.name for p in base.iterdir()) == ["p"]


def _die_inside(monkeypatch_target: object, name: str, *, after: bool, nth: int = 1) -> None:
    """In a forked child: replace ``target.name`` so that its ``nth`` call ends the process (before or after it runs)."""
    real = getattr(monkeypatch_target, name)
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            os._exit(9)
        result = real(*args, **kwargs)
        if calls[0] == nth:
            os._exit(9)
        return result

    setattr(monkeypatch_target, name, dying)


def _partial_weights(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    Path(filename).write_bytes(Path(filename).read_bytes()[:64])
    os._exit(9)


real_save = save_file

#: Where the child dies, and which patch the folder must hold then ("new" once the swap is done).
KILLS: dict[str, tuple[Callable[[], None], str]] = {
    "mid-weights": (lambda: setattr(patch_module, "save_file", _partial_weights), "old"),
    "after-weights": (lambda: _die_inside(patch_module, "save_file", after=True), "old"),
    "after-hashing": (lambda: _die_inside(patch_module, "sha256_file", after=True), "old"),
    # Where renameat2's exchange is missing, the swap takes two renames: the old folder aside, then the new in place
    "fallback-after-first-rename": (lambda: _without_exchange(nth=1), "aside"),
    "fallback-after-second-rename": (lambda: _without_exchange(nth=2), "new"),
    "before-swap": (lambda: _die_inside(patch_module, "_swap", after=False), "old"),
    "after-swap": (lambda: _die_inside(patch_module, "_swap", after=True), "new"),
}


def _without_exchange(nth: int) -> None:
    """In a forked child: the swap as on a system without ``renameat2``, dying after its ``nth`` rename."""
    folder_module._renameat2 = lambda: None
    _die_inside(folder_module.os, "rename", after=True, nth=nth)


def _fork(work: Callable[[], object]) -> int:
    """Run ``work`` in a forked child, which never returns into pytest; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            warnings.simplefilter("ignore")
            work()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def _reap(pid: int, timeout: float = 60.0) -> int:
    """Wait for a child and return its exit code (``-signal`` when a signal ended it); kill it and fail if it
    hangs."""
    deadline = time.monotonic() + timeout
    while (found := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the saving child process hung")
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(found[1])


def _in_child(prepare: Callable[[], None], work: Callable[[], object]) -> int:
    """Run ``work`` after ``prepare`` in a forked child, to its end or its death; its exit code."""
    return _reap(_fork(lambda: (prepare(), work())))


def _old_or_new(folder: Path, old: Patch, new: Patch, user: dict[str, bytes]) -> str:
    patch = read_patch(folder)  # verifies every listed file
    assert patch.digest in (old.digest, new.digest)
    assert {k: (folder / k).read_bytes() for k in user} == user  # user files survived
    return "old" if patch.digest == old.digest else "new"


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_during_overwrite_leaves_old_or_new_patch(old_folder, pipe, good, point):
    new = make(pipe, seed=1, name="new")
    user = {"notes.txt": b"user notes", ".env": b"SECRET=1"}
    prepare, expected = KILLS[point]
    code = _in_child(prepare, lambda: new.save(old_folder))
    assert code == 9, f"the save never reached {point} (exit code {code}): nothing was killed there"
    if expected == "aside":  # swap's documented gap: the old patch, whole, beside the folder's name
        aside = list(old_folder.parent.glob(f".{old_folder.name}.*.old"))
        assert not old_folder.exists() and len(aside) == 1
        assert _old_or_new(aside[0], good, new, user) == "old"
        return
    assert _old_or_new(old_folder, good, new, user) == expected


def test_sigkill_at_random_moments_during_saves(old_folder, pipe, good):
    new = make(pipe, seed=1, name="new")
    user = {"notes.txt": b"user notes", ".env": b"SECRET=1"}

    def save_forever():
        while True:
            new.save(old_folder)
            good.save(old_folder)

    for delay in (0.0, 0.003, 0.007, 0.011, 0.017, 0.023, 0.031, 0.05):
        pid = _fork(save_forever)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
        _old_or_new(old_folder, good, new, user)  # a whole patch, the user's files, after every kill


def test_overwrite_keeps_user_files_and_lists_the_new_weights(old_folder, pipe):
    new = make(pipe, seed=1, name="new")
    with pytest.warns(UserWarning, match=r"\.env"):
        new.save(old_folder)
    assert (old_folder / "notes.txt").read_text() == "user notes"
    assert (old_folder / ".env").read_text() == "SECRET=1"
    assert read_patch(old_folder).digest == new.digest
    assert set(json.loads((old_folder / MANIFEST_NAME).read_text())["files"]) == {WEIGHTS_NAME}
