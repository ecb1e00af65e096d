"""Patch format v1: the manifest schema, :class:`Patch` files, fingerprints and low-rank factors.

Example:
    >>> from forgetpatch.format import build_patch, factorize, read_patch
    >>> low = factorize(delta)                                   # full change -> LoRA factors
    >>> patch = build_patch(pipe, {"unet.conv_in": (low.A, low.B)}, name="demo",
    ...                     method="manual", concepts=["cat"])
    >>> read_patch(patch.save("demo")).digest == patch.digest
    True
"""

from forgetpatch.format.build import LineageSource, build_patch, set_lineage_source
from forgetpatch.format.concept import Concept, ConceptKind, ConceptLike, as_concepts
from forgetpatch.format.fingerprint import (
    COMPONENTS,
    DENOISERS,
    ORIGINAL_WEIGHT_ATTR,
    TRANSFORMER_FAMILIES,
    base_model_ref,
    base_weight,
    denoiser_name,
    detect_family,
    fingerprint,
    key_step_convention,
    resolve_module,
    split_path,
    weight_fingerprint,
)
from forgetpatch.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ROBUSTNESS_METRICS,
    TOY_EVAL_METRICS,
    BaseModelInfo,
    Family,
    KeyStepConvention,
    KeyStepRange,
    LoraInfo,
    Manifest,
    MethodInfo,
    ModuleFingerprint,
    check_patch_name,
)
from forgetpatch.format.migrate import MIGRATIONS, upgrade
from forgetpatch.format.patch import (
    CARD_NAME,
    GRID_NAME,
    HEADER_CHECKSUM_KEY,
    HEADER_LORA_KEY,
    HEADER_MANIFEST_KEY,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Patch,
    listed_files,
    read_manifest,
    read_patch,
    record_metrics,
    require_verifiable,
    save_tensors,
    sha256_file,
    verify_folder,
)
from forgetpatch.lowrank import LowRank, factorize

__all__ = [
    "ROBUSTNESS_METRICS",
    "TOY_EVAL_METRICS",
    "CARD_NAME",
    "COMPONENTS",
    "DENOISERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GRID_NAME",
    "HEADER_CHECKSUM_KEY",
    "HEADER_LORA_KEY",
    "HEADER_MANIFEST_KEY",
    "MANIFEST_NAME",
    "MIGRATIONS",
    "ORIGINAL_WEIGHT_ATTR",
    "TRANSFORMER_FAMILIES",
    "WEIGHTS_NAME",
    "BaseModelInfo",
    "Concept",
    "ConceptLike",
    "as_concepts",
    "ConceptKind",
    "Family",
    "KeyStepConvention",
    "KeyStepRange",
    "LineageSource",
    "LoraInfo",
    "LowRank",
    "Manifest",
    "MethodInfo",
    "ModuleFingerprint",
    "Patch",
    "base_model_ref",
    "base_weight",
    "build_patch",
    "check_patch_name",
    "denoiser_name",
    "detect_family",
    "factorize",
    "fingerprint",
    "key_step_convention",
    "listed_files",
    "read_manifest",
    "read_patch",
    "record_metrics",
    "require_verifiable",
    "resolve_module",
    "save_tensors",
    "set_lineage_source",
    "sha256_file",
    "split_path",
    "upgrade",
    "verify_folder",
    "weight_fingerprint",
]
