"""What the loader needs to know per pipeline family: the denoiser, its timestep, and which patches fit.

Families: UNet pipelines (SD 1.x/2.x/SDXL, DDPM-style schedulers) and the flow-matching transformer
pipelines ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``) and ``FluxPipeline``
(``FluxTransformer2DModel``). Patches go on through diffusers' own LoRA loaders in every family
(``StableDiffusionLoraLoaderMixin``, ``SD3LoraLoaderMixin``, ``FluxLoraLoaderMixin``).

Key steps. A range's fractions measure the noise level (:class:`~forgetpatch.format.KeyStepRange`), in the
convention its manifest names: ``"timestep"`` (``1 - t / T``, DDPM timesteps) or ``"sigma"`` (``1 - sigma``,
flow matching, after the scheduler's shift). The gate reads the timestep each denoiser call gets:

* UNet: ``t`` in ``[0, T)``: fraction ``1 - t / T``;
* SD3: the scheduler's ``t = sigma T``: fraction ``1 - t / T = 1 - sigma``;
* FLUX: ``FluxPipeline`` hands the transformer ``t / 1000``: fraction ``1 - 1000 t' / T = 1 - sigma``.

``T`` is the scheduler's ``num_train_timesteps``. A range is gated only on a pipeline whose scheduler uses its
convention (a DDPM range on a flow-matching scheduler measures another quantity).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from forgetpatch.errors import ApplyError, FamilyMismatchError
from forgetpatch.format import (
    COMPONENTS,
    DENOISERS,
    TRANSFORMER_FAMILIES,
    Patch,
    denoiser_name,
    detect_family,
    key_step_convention,
    split_path,
)

#: Families told apart with confidence: a patch made for one is refused on another.
KNOWN_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
_FAMILY_NAMES = {
    "sd1": "SD 1.x",
    "sd2": "SD 2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux": "FLUX",
    "toy": "the toy world",
    "other": "an unrecognised family",
}
#: Units of the timestep a transformer's pipeline passes it, as a multiple of the scheduler's (FLUX: t / 1000).
_TIMESTEP_UNITS: dict[str, float] = {"FluxTransformer2DModel": 1000.0}
#: Positional index of ``timestep`` in the denoiser's ``forward`` (when not passed by keyword).
_TIMESTEP_POSITION = {"unet": 1, "transformer": 3}


def denoiser(pipe) -> tuple[str, nn.Module]:
    """``(component name, module)`` of the pipeline's denoiser (a UNet or an SD3 / FLUX transformer)."""
    name = denoiser_name(pipe)
    if name is None:
        raise ApplyError(
            f"{type(pipe).__name__} has neither a `unet` nor a `transformer`; forgetpatch patches diffusers "
            "pipelines of SD 1.x/2.x/SDXL (UNet), SD3 and FLUX (transformer)"
        )
    return name, unwrap(getattr(pipe, name))


def unwrap(module):
    """The module itself under ``torch.compile``'s wrapper (``pipe.unet = torch.compile(pipe.unet)``): adapters, hooks
    and forgetpatch's bookkeeping live on it, and the wrapper runs it, hooks included."""
    return getattr(module, "_orig_mod", module) if isinstance(module, nn.Module) else module


def describe(pipe) -> str:
    """``"SD3 (StableDiffusion3Pipeline)"``: the family of ``pipe`` for messages."""
    return f"{_FAMILY_NAMES.get(detect_family(pipe), 'an unrecognised family')} ({type(pipe).__name__})"


def timestep_of(module: nn.Module, component: str, args: tuple, kwargs: dict[str, Any]) -> float | None:
    """The (first) timestep a denoiser forward is called with, or ``None`` when it has none."""
    if "timestep" in kwargs:
        value = kwargs["timestep"]
    else:
        position = _TIMESTEP_POSITION.get(component, 1)
        value = args[position] if len(args) > position else None
    if value is None:
        return None
    return float(torch.as_tensor(value).reshape(-1)[0])


def noise_fraction(module: nn.Module, timestep: float, num_train_timesteps: int) -> float:
    """Trajectory fraction of a denoiser call at ``timestep``: ``1 - t / T`` in the scheduler's units."""
    return 1.0 - timestep * _TIMESTEP_UNITS.get(type(module).__name__, 1.0) / num_train_timesteps


def check_family(pipe, patch: Patch) -> None:
    """Raise :class:`FamilyMismatchError` when ``patch`` was made for another family than ``pipe``'s.

    Two signs, checked before any module is looked up: the recorded families are both known and differ, or
    the patch targets a denoiser the pipeline does not have (a ``unet.`` patch on SD3 / FLUX, whose
    denoiser is ``transformer``, or the reverse; this also covers tiny test pipelines of family ``other``).
    """
    made_for = patch.manifest.base_model.family
    family = detect_family(pipe)
    targets = {split_path(path)[0] for path in patch.target_modules}
    wrong = sorted(c for c in targets & set(DENOISERS) if not isinstance(getattr(pipe, c, None), nn.Module))
    if (made_for in KNOWN_FAMILIES and family in KNOWN_FAMILIES and made_for != family) or wrong:
        if wrong:
            has = denoiser_name(pipe)
            why = f"it changes the {wrong[0]}, and this pipeline's denoiser is " + (
                f"a {has}" if has else "missing"
            )
        else:
            why = f"its manifest records family {made_for!r}, this pipeline is {family!r}"
        target = {"unet": "a UNet model", "transformer": "a transformer model"}
        made = (
            _FAMILY_NAMES[made_for]
            if made_for in KNOWN_FAMILIES
            else target.get(wrong[0] if wrong else "", "another family")
        ) + (f" ({base})" if (base := patch.manifest.base_model.id) else "")
        raise FamilyMismatchError(
            f"patch {patch.name!r} was made for {made} and cannot go on "
            f"{describe(pipe)}: {why}. Apply it to a pipeline of the family it was made for, or make a patch "
            "for this model (forgetpatch.erase on this pipeline)."
        )


def check_loadable(pipe, patch: Patch) -> None:
    """Raise :class:`ApplyError` when diffusers' LoRA loader of ``pipe`` cannot load a component the patch
    changes (e.g. FLUX's T5 ``text_encoder_2``): loaded unfused, that part would be silently dropped."""
    loadable = set(getattr(pipe, "_lora_loadable_modules", COMPONENTS))
    present = {c for c in (split_path(path)[0] for path in patch.target_modules) if getattr(pipe, c, None) is not None}
    targets = sorted(present - loadable)  # an absent component is refused as a missing module, later
    if targets:
        raise ApplyError(
            f"patch {patch.name!r} changes {targets[0]}, which {type(pipe).__name__}.load_lora_weights cannot "
            f"load LoRA into (it loads {', '.join(sorted(loadable))}). Apply it with fuse=True."
        )


def gating_refusal(pipe, conventions: Iterable[str]) -> str | None:
    """Why key-step ranges in ``conventions`` cannot be gated on ``pipe``'s scheduler, or ``None`` when they can."""
    scheduler = getattr(pipe, "scheduler", None)
    name = type(scheduler).__name__
    if "EDM" in name:  # EDM schedulers hand the denoiser c_noise = log(sigma) / 4, neither a timestep nor a sigma
        return (
            f"this pipeline's {name} hands the denoiser log(sigma) / 4, not a DDPM timestep or a flow sigma, so "
            "gating would switch at the wrong noise levels"
        )
    convention = key_step_convention(pipe)
    if wrong := sorted(set(conventions) - {convention}):
        return (
            f"its key-step ranges are in the {wrong[0]!r} convention, but this pipeline's {name} needs "
            f"{convention!r} ranges: gating would switch at the wrong noise levels"
        )
    return None


def check_key_steps(pipe, patch: Patch) -> None:
    """Raise :class:`ApplyError` when ``patch``'s key-step ranges cannot be gated on ``pipe``'s scheduler: another
    convention, or an EDM scheduler (checked when gating is asked for, and again at every gated call)."""
    ranges = patch.manifest.key_steps or []
    if ranges and (why := gating_refusal(pipe, {r.convention for r in ranges})):
        made = f" (made with {ranges[0].scheduler})" if ranges[0].scheduler else ""
        raise ApplyError(
            f"patch {patch.name!r} cannot be gated to its key steps{made}: {why}. Apply it without "
            "key_steps=True (always on), or use a scheduler of the kind it was made with."
        )


__all__ = [
    "KNOWN_FAMILIES",
    "TRANSFORMER_FAMILIES",
    "check_family",
    "check_key_steps",
    "gating_refusal",
    "check_loadable",
    "denoiser",
    "describe",
    "noise_fraction",
    "timestep_of",
]
