"""Fingerprints of base weights, so that a patch made for another model is refused.

A module's fingerprint is its weight's shape plus a sha256 of a fixed, deterministic sample of
its values (:data:`SAMPLE_SIZE` values at evenly spaced flat indices), each value first rounded
to float16. Why this choice:

* **cheap**: hashing 256 values per module costs microseconds, so fingerprinting the ~700
  Linear/Conv layers an ESD-u patch touches on SD 1.5 takes milliseconds, not the seconds a
  full hash of 3.4 GB would;
* **dtype-robust**: a patch made on an fp32 model matches an fp16 copy of the same model,
  because fp32 -> fp16 rounding is deterministic (bf16 copies are not matched: they round differently);
* **discriminating**: fine-tunes and other checkpoints change essentially every weight,
  so 256 samples differ with overwhelming probability.

The *base* weights are fingerprinted even while patches are applied: the ``base_layer`` of a
peft-wrapped module, or the original tensor the loader kept aside before fusing a patch. Beside the
fingerprint the manifest names the base model where the pipeline tells it (:func:`base_model_ref`).

Example:
    >>> from forgetpatch.testing import tiny_sd_pipeline
    >>> fp = fingerprint(tiny_sd_pipeline(), ["unet.conv_in"])
    >>> fp["unet.conv_in"].shape
    [32, 4, 3, 3]
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from forgetpatch.errors import MissingModuleError
from forgetpatch.format.manifest import Family, KeyStepConvention, ModuleFingerprint

#: Components whose modules a patch may target, as they prefix module paths.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
#: Denoiser components: a UNet (SD 1.x/2.x/SDXL) or a transformer (SD3, FLUX).
DENOISERS = ("unet", "transformer")
#: Transformer classes (by name) of the families forgetpatch knows.
TRANSFORMER_FAMILIES: dict[str, Family] = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: How many values of each weight go into its digest.
SAMPLE_SIZE = 256
#: Version tag prefixed to digests, so the scheme can change without silent mismatches.
DIGEST_SCHEME = "f16s256"
#: Attribute the loader sets on a layer whose weight has patches fused into it: the original weight.
ORIGINAL_WEIGHT_ATTR = "_forgetpatch_original_weight"


#: A module path inside a component: dot-separated names of letters, digits and ``_``, none starting with ``_``.
_MODULE_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*")


def split_path(module_path: str) -> tuple[str, str]:
    """``"unet.down_blocks.0.x"`` -> ``("unet", "down_blocks.0.x")``; raises ``ValueError`` on a bad path."""
    component, _, rest = module_path.partition(".")
    if component not in COMPONENTS or not rest:
        raise ValueError(f"module path {module_path!r} must start with one of {', '.join(COMPONENTS)}")
    if not _MODULE_PATH.fullmatch(rest):
        raise ValueError(
            f"module path {module_path!r} is not a module name (dot-separated names of letters, digits and _)"
        )
    return component, rest


def resolve_module(pipe, module_path: str) -> nn.Module:
    """The layer at ``module_path`` in ``pipe`` (unwrapping peft's ``base_layer``).

    Raises :class:`MissingModuleError` when the component or module does not exist or has no weight.
    """
    try:
        component_name, rest = split_path(module_path)
    except ValueError as exc:
        raise MissingModuleError(str(exc)) from None
    component = getattr(pipe, component_name, None)
    if component is None:
        raise MissingModuleError(
            f"the pipeline has no {component_name!r} but the patch targets {module_path!r}; "
            "was the patch made for another model family (e.g. SDXL vs SD 1.5)?"
        )
    try:
        module = component.get_submodule(rest)
    except AttributeError:
        raise MissingModuleError(
            f"module {module_path!r} does not exist in this pipeline; "
            "was the patch made for another architecture (e.g. an SDXL patch on SD 1.5)?"
        ) from None
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise MissingModuleError(f"module {module_path!r} has no weight to patch ({type(module).__name__})")
    return module


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` before any forgetpatch patch was fused into it."""
    original = getattr(module, ORIGINAL_WEIGHT_ATTR, None)
    return original if original is not None else module.weight


@torch.no_grad()
def weight_fingerprint(weight: torch.Tensor) -> ModuleFingerprint:
    """Shape and sampled float16 digest of one weight tensor (see the module docstring)."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    k = min(SAMPLE_SIZE, n)
    # evenly spaced flat indices 0 .. n-1, in exact integer arithmetic (float linspace overflows past 2**24)
    index = (torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)).to(flat.device)
    sample = flat.index_select(0, index).to(device="cpu", dtype=torch.float16).contiguous()
    h = hashlib.sha256()
    h.update(repr(tuple(weight.shape)).encode())
    h.update(sample.view(torch.int16).numpy().tobytes())
    return ModuleFingerprint(shape=list(weight.shape), digest=f"{DIGEST_SCHEME}:{h.hexdigest()}")


def fingerprint(pipe, module_paths: Iterable[str]) -> dict[str, ModuleFingerprint]:
    """Fingerprint the base weights of ``module_paths`` in ``pipe``.

    Example:
        >>> fingerprint(pipe, ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"])
    """
    return {path: weight_fingerprint(base_weight(resolve_module(pipe, path))) for path in module_paths}


def detect_family(pipe, base_model_id: str | None = None) -> Family:
    """Guess the architecture family: ``toy`` / ``sdxl`` / ``sd1`` / ``sd2`` / ``sd3`` / ``flux`` / ``other``.

    UNet families are told apart by the published sizes (a tiny SD-shaped UNet is ``other``); SD3 and FLUX by
    their transformer class, whatever its size. A pipeline can state its family with a ``forgetpatch_family``
    attribute (the toy pipeline does).
    """
    declared = getattr(pipe, "forgetpatch_family", None)
    if declared in ("sd1", "sd2", "sdxl", "sd3", "flux", "toy", "other"):
        return declared
    if base_model_id == "toy":
        return "toy"
    transformer = getattr(pipe, "transformer", None)
    if getattr(pipe, "unet", None) is None and transformer is not None:
        return TRANSFORMER_FAMILIES.get(type(transformer).__name__, "other")
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    if config is None:
        return "other"
    if getattr(pipe, "text_encoder_2", None) is not None or config.get("addition_embed_type") == "text_time":
        return "sdxl" if tuple(config.get("block_out_channels", ())) == (320, 640, 1280) else "other"
    if tuple(config.get("block_out_channels", ())) == (320, 640, 1280, 1280):
        return {768: "sd1", 1024: "sd2"}.get(config.get("cross_attention_dim"), "other")
    return "other"


#: A Hugging Face cache snapshot folder: ``.../models--{org}--{name}/snapshots/{commit}`` (a repo id has no ``--``).
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})[/\\]*$")


def base_model_ref(pipe) -> tuple[str | None, str | None]:
    """The Hub id and revision ``pipe`` was loaded from, as far as the pipeline tells (its ``name_or_path``).

    ``("toy", None)`` for the toy world's pipeline; ``(id, None)`` for a pipeline loaded by Hub id (diffusers keeps
    the id, not the revision); ``(id, commit)`` for one loaded from a Hugging Face cache snapshot folder;
    ``(None, None)`` for any other local folder or a pipeline built in code: a local path means nothing on another
    machine and says more about this one than a published patch should.

    Example:
        >>> pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")  # doctest: +SKIP
        >>> base_model_ref(pipe)  # doctest: +SKIP
        ('runwayml/stable-diffusion-v1-5', None)
    """
    if detect_family(pipe) == "toy":
        return "toy", None
    source = getattr(pipe, "name_or_path", None)
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(source, str) or not source:
        return None, None
    if found := _SNAPSHOT.search(source):
        return found["repo"].replace("--", "/", 1), found["commit"]
    if os.path.exists(source):
        return None, None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None, None
    return source, None


def denoiser_name(pipe) -> str | None:
    """``"unet"`` or ``"transformer"``: the component that denoises (``None`` when the pipeline has neither)."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    return None


def key_step_convention(pipe) -> KeyStepConvention:
    """How key-step fractions are read on ``pipe``: ``"sigma"`` for a flow-matching scheduler (a ``FlowMatch*``
    class, ``use_flow_sigmas`` or ``prediction_type="flow_prediction"``), else ``"timestep"``."""
    scheduler = getattr(pipe, "scheduler", None)
    config = getattr(scheduler, "config", None) or {}
    if (
        "FlowMatch" in type(scheduler).__name__
        or config.get("use_flow_sigmas", False)
        or config.get("prediction_type") == "flow_prediction"
    ):
        return "sigma"
    return "timestep"
