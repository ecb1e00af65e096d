"""Export a patch as a single kohya-style LoRA file, the format AUTOMATIC1111 and ComfyUI load."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from forgetpatch.errors import PatchFormatError
from forgetpatch.format import Patch, read_patch, save_tensors

#: forgetpatch component prefix -> kohya prefix (SDXL's two text encoders are te1 / te2).
_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
#: Module paths with no kohya name diffusers' reader maps back (it drops them, logging "unexpected keys").
_UNNAMED = ("unet.add_embedding.",)


def kohya_name(module_path: str, *, two_text_encoders: bool = False) -> str:
    """The kohya name of a diffusers module path.

    Example:
        >>> kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k'
    """
    component, _, rest = module_path.partition(".")
    if component not in _PREFIXES or not rest:
        raise PatchFormatError(f"cannot export module {module_path!r}: unknown component {component!r}")
    prefix = "lora_te1" if component == "text_encoder" and two_text_encoders else _PREFIXES[component]
    return f"{prefix}_{rest.replace('.', '_')}"


def export_kohya(patch_or_folder: Patch | str | Path, out_file: str | Path) -> Path:
    """Write the patch as one kohya-format safetensors file (A1111 / ComfyUI / ``load_lora_weights``).

    Keys are ``lora_unet_<module>.lora_down.weight`` (= ``A``), ``.lora_up.weight`` (= ``B``) and
    ``.alpha``. Those tools scale a module by ``alpha / rank``; forgetpatch scales it by the patch's
    (possibly per-module) ``alpha / rank``. The export folds the patch's own scale into ``lora_up`` and
    gives every module one rank, the patch's largest (smaller factors padded with zero rows of ``A`` and
    columns of ``B``, which change no product), with ``alpha`` = that rank: diffusers' reader of kohya files
    keeps one ``alpha`` per file and scaled modules of another rank wrongly (by up to 15% on a ScaPre patch),
    and tools that ignore ``alpha`` agree too. Modules the kohya format cannot name for diffusers (SDXL's
    ``add_embedding``, which its reader drops with only a log line) and SD3 / FLUX transformers are refused:
    load the patch folder instead. The manifest is kept in the metadata under ``forgetpatch_source_manifest``.
    A patch with key steps warns: those tools cannot gate a LoRA to a range of steps, so the file acts at every step
    (as ``forgetpatch.apply`` does without ``key_steps=True``).

    Example:
        >>> export_kohya("no-vangogh/", "no-vangogh.safetensors")
        >>> pipe.load_lora_weights("no-vangogh.safetensors")  # same weights as forgetpatch.apply
    """
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors" or out_file.is_dir():
        raise PatchFormatError(f"the export is one file: give a path ending in .safetensors, not {str(out_file)!r}")
    patch = patch_or_folder if isinstance(patch_or_folder, Patch) else read_patch(patch_or_folder)
    manifest, factors = patch.manifest, patch.factors()
    two_te = any(m.startswith("text_encoder_2.") for m in factors)
    dropped = sorted(m for m in factors if m.startswith(_UNNAMED))
    if dropped:
        raise PatchFormatError(
            f"cannot export {dropped[0]} (and {len(dropped) - 1} more) as kohya: diffusers' reader of kohya files "
            "drops these modules; load the patch folder itself (forgetpatch.apply, or load_lora_weights on the "
            "folder's pytorch_lora_weights.safetensors)"
        )
    if manifest.key_steps:
        ranges = ", ".join(f"{r.start:g}-{r.end:g}" for r in manifest.key_steps)
        warnings.warn(
            f"{manifest.name} has key steps ({ranges} of the trajectory) and the kohya file acts at every step: "
            "AUTOMATIC1111, ComfyUI and load_lora_weights cannot gate a LoRA to steps; "
            "forgetpatch.apply(pipe, folder, key_steps=True) can",
            UserWarning,
            stacklevel=2,
        )
    rank = max(a.shape[0] for a, _ in factors.values())
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in sorted(factors.items()):
        scale, pad = patch.scale_of(module), rank - a.shape[0]
        name = kohya_name(module, two_text_encoders=two_te)
        up = (b.double() * scale).to(b.dtype) if scale != 1 else b
        out[f"{name}.lora_down.weight"] = torch.cat([a, a.new_zeros(pad, *a.shape[1:])]).contiguous()
        out[f"{name}.lora_up.weight"] = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], 1).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)

    header = manifest.model_copy(update={"files": {}})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),  # alpha = rank in every module, see above
        "ss_base_model_version": _BASE_VERSIONS.get(manifest.base_model.family, "unknown"),
        "ss_output_name": manifest.name,
        "forgetpatch_source_manifest": json.dumps(header.model_dump(mode="json")),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial-{os.getpid()}")
    try:  # a reader never sees half a file: written aside, then put in place
        save_tensors(out, partial, metadata=metadata)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file
