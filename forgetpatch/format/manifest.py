"""The patch manifest: a typed, validated description of one act of forgetting (format v1)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from forgetpatch.errors import ManifestError
from forgetpatch.format.concept import Concept, unprintable

FORMAT_NAME = "forgetpatch"
FORMAT_VERSION = 1

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux", "toy", "other"]
#: How a key-step range's fractions are read off the denoiser's timestep (see :class:`KeyStepRange`).
KeyStepConvention = Literal["timestep", "sigma"]


#: Keys of ``Manifest.metrics`` that forgetpatch writes and reads back: a toy-world evaluation
#: (``EvalReport.to_dict()``) and attack results per concept (``AttackReport.to_dict()``).
TOY_EVAL_METRICS = "toy_eval"
ROBUSTNESS_METRICS = "robustness"



def _patch_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a patch's name (it names the adapter, the card's title and the default folder), or
    ``None``: not empty, no slash or backslash, no control character or line break."""
    if not name.strip():
        return "a patch name may not be empty"
    bad = "a slash" if "/" in name else "a backslash" if "\\" in name else unprintable(name)
    if bad:
        return f"patch name {name!r} may not contain {bad}: give it one line of plain text without slashes"
    return None


def check_patch_name(name: Any) -> str:
    """``name``, or :class:`ManifestError` saying why it cannot name a patch (before any work that would make one).

    Example:
        >>> check_patch_name("no-circle")
        'no-circle'
    """
    if not isinstance(name, str):
        raise ManifestError(f"a patch name is a string, got {name!r}")
    problem = _patch_name_problem(name)
    if problem:
        raise ManifestError(problem)
    return name

def problems(exc: ValidationError, limit: int = 5) -> str:
    """pydantic's errors in one line, ``field.path: what is wrong; ...`` (the first ``limit``), for a one-line error.

    Example:
        >>> try:
        ...     KeyStepRange(start=2, end=1)
        ... except ValidationError as exc:
        ...     problems(exc)
        'start: Input should be less than or equal to 1'
    """
    said = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:limit])
    return said + (f" (and {exc.error_count() - limit} more)" if exc.error_count() > limit else "")


def adapter_name(name: str) -> str:
    """The adapter name a patch called ``name`` takes in diffusers / peft, which refuse ``.`` and other characters in
    it: each character but letters, digits, ``_`` and ``-`` becomes ``_`` (``apply`` adds ``_2``... to a name taken).

    Example:
        >>> adapter_name("no.circle v1.0")
        'no_circle_v1_0'
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "patch"


#: A patch's digest (:attr:`Patch.digest`), as lineage entries name parents.
_DIGEST = re.compile(r"[0-9a-f]{64}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class KeyStepRange(_Model):
    """Where on the denoising trajectory a patch was trained, and may be gated to at inference.

    ``start``/``end`` are fractions of the trajectory's noise level: 0.0 is pure noise (the first sampling
    step), 1.0 the clean end. ``convention`` says which noise level:

    * ``"timestep"`` (DDPM-style schedulers, SD 1.x/2.x/SDXL): fraction ``1 - t / T`` for a timestep ``t`` of a
      scheduler with ``T`` training steps;
    * ``"sigma"`` (flow-matching schedulers, SD3/FLUX): fraction ``1 - sigma``, where ``x = (1 - sigma) x0 +
      sigma noise`` at the step (the sigma *after* the scheduler's shift; the timestep is ``t = sigma T``).
      It is a noise-level fraction, not a step-index one: SD3's ``shift=3`` spends most steps at high sigma.

    The loader gates on the timestep each denoiser call gets, so any step count works; a range is gated only on
    a pipeline whose scheduler uses its convention.
    """

    start: float = Field(ge=0.0, le=1.0, strict=True)
    end: float = Field(ge=0.0, le=1.0, strict=True)
    """(Numbers, not strings: ``"0.5"`` is refused, as every number of a manifest written by hand should be.)"""
    timesteps: list[int | FiniteFloat] = Field(default_factory=list)
    """The scheduler timesteps training actually used (e.g. ``[701, 681, ..., 1]``; flow matching: ``1000 sigma``)."""
    scheduler: str = "DDIMScheduler"
    num_inference_steps: int | None = None
    num_train_timesteps: int = 1000
    concept: str | None = None
    """The concept this range belongs to, when ranges differ per concept."""
    convention: KeyStepConvention = "timestep"
    """What the fractions measure (see above); ``"timestep"`` for ranges written before conventions were named."""

    @model_validator(mode="after")
    def _ordered(self) -> KeyStepRange:
        if self.start > self.end:
            raise ValueError(f"key-step range start {self.start} is after its end {self.end}")
        return self

    def identity(self) -> dict[str, Any]:
        """What a patch digest hashes of this range (the default convention is left out, so digests of ranges
        written before conventions were named do not change)."""
        data = self.model_dump(mode="json")
        if data["convention"] == "timestep":
            del data["convention"]
        return data


class ModuleFingerprint(_Model):
    shape: list[int]
    digest: str
    """Hex digest of the module's base weight values (see :func:`forgetpatch.format.fingerprint`)."""


class BaseModelInfo(_Model):
    id: str | None = None
    """Hub id or local name of the base model, e.g. ``"runwayml/stable-diffusion-v1-5"`` or ``"toy"``."""
    revision: str | None = None
    family: Family = "other"
    fingerprint: dict[str, ModuleFingerprint] = Field(default_factory=dict)
    """Per targeted module path (``unet.down_blocks.0...attn2.to_k``): shape and digest of base weights."""


class MethodInfo(_Model):
    name: str
    version: str = "1"
    params: dict[str, Any] = Field(default_factory=dict)


#: A LoRA rank (at least 1) and a LoRA alpha (finite: NaN or infinity would make non-finite images).
Rank = Annotated[int, Field(ge=1)]
Alpha = Annotated[float, Field(allow_inf_nan=False)]


class LoraInfo(_Model):
    rank: Rank
    """The largest rank of any module."""
    alpha: Alpha
    target_modules: list[str]
    """Full module paths with their component prefix (``unet.`` / ``text_encoder.`` / ``text_encoder_2.``)."""
    rank_pattern: dict[str, Rank] = Field(default_factory=dict)
    alpha_pattern: dict[str, Alpha] = Field(default_factory=dict)
    reconstruction_error: FiniteFloat | None = None
    """Worst relative Frobenius error ``|dW - BA| / |dW|`` over modules (0 for exact low-rank changes)."""
    reconstruction_errors: dict[str, FiniteFloat] = Field(default_factory=dict)


class Manifest(_Model):
    """Everything forgetpatch knows about a patch; stored in the weights header and in ``forgetpatch.json``."""

    format: Literal["forgetpatch"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    method: MethodInfo
    concepts: list[Concept] = Field(min_length=1)
    preserved: list[Concept] = Field(default_factory=list)
    key_steps: list[KeyStepRange] | None = None
    base_model: BaseModelInfo
    lora: LoraInfo
    lineage: list[str] = Field(default_factory=list)
    """Digests of the patches this one was computed on top of, in application order."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    library_version: str = "0.1.0"
    files: dict[str, str] = Field(default_factory=dict)
    """sha256 of every file in the patch folder (``forgetpatch.json`` only; empty in the weights header)."""

    @field_validator("lineage")
    @classmethod
    def _digests(cls, v: list[str]) -> list[str]:
        for entry in v:
            if not isinstance(entry, str) or not _DIGEST.fullmatch(entry):
                raise ValueError(
                    f"lineage entry {entry!r} is not a patch digest (64 lowercase hexadecimal characters): lineage "
                    "lists the digests of the patches this one was computed on (Patch.digest), in order"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"lineage lists a patch twice: {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        problem = _patch_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v
