"""Every error forgetpatch raises on purpose. Messages say what is wrong and what to do."""

from __future__ import annotations


class ForgetPatchError(Exception):
    """Base class of all forgetpatch errors."""


# --- patch files and manifests -------------------------------------------------------------
class PatchFormatError(ForgetPatchError):
    """A patch file or folder is corrupt, truncated, not safetensors, or has no valid manifest."""


class ManifestError(PatchFormatError):
    """The manifest is missing or does not validate against the schema."""


class UnsupportedFormatVersionError(PatchFormatError):
    """The patch was written by a newer forgetpatch than this one."""


class IntegrityError(PatchFormatError):
    """A file's sha256 does not match the one recorded in ``forgetpatch.json``."""


class UnverifiedPatchError(IntegrityError):
    """A patch carries nothing to verify it by (format v0: no checksum; no or a partial base fingerprint).

    Refused unless the caller opts in with ``allow_unverified=True``.
    """


# --- applying patches ----------------------------------------------------------------------
class ApplyError(ForgetPatchError):
    """A patch cannot be applied to this pipeline; the pipeline is left as it was."""


class FingerprintMismatchError(ApplyError):
    """The patch was made for other base weights than the pipeline's."""


class MissingModuleError(ApplyError):
    """A module the patch targets does not exist in the pipeline (e.g. an SDXL patch on SD 1.5)."""


class FamilyMismatchError(MissingModuleError):
    """The patch was made for another model family (e.g. an SD 1.5 patch on SD3 or FLUX, or the reverse)."""


class AlreadyAppliedError(ApplyError):
    """The same patch is already applied to this pipeline."""


class LineageError(ApplyError):
    """The patch was computed on top of other patches that are not applied (strict mode)."""


class NotAppliedError(ForgetPatchError):
    """``remove`` was asked to take off a patch that is not applied."""


# --- the Hub -------------------------------------------------------------------------------
class HubError(ForgetPatchError):
    """A Hub repo, revision or file cannot be resolved, downloaded or uploaded."""


# --- evaluation ----------------------------------------------------------------------------
class EvalError(ForgetPatchError):
    """An evaluation was given mismatched inputs (e.g. a reference made with other settings)."""


class EvalInputError(EvalError):
    """An evaluation input is missing or malformed: a prompt CSV, a CLIP folder, Inception weights, a folder of
    real images, or a concept the suite cannot score."""


class MissingExtraError(ForgetPatchError):
    """An optional dependency is not installed; the message names the extra that brings it
    (``pip install 'forgetpatch[eval]'``)."""


# --- methods -------------------------------------------------------------------------------
class MethodError(ForgetPatchError):
    """An unlearning method was given input it cannot work with."""


class UnknownMethodError(MethodError):
    """No unlearning method is registered under that name."""


class ConceptError(MethodError):
    """A concept list is empty, a concept tokenizes to nothing, or erase and preserve overlap."""


# --- attacks -------------------------------------------------------------------------------
class AttackError(ForgetPatchError):
    """An attack was asked for something it cannot do (unknown attack, bad budget, a non-toy pipeline)."""
