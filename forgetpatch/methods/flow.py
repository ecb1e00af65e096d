"""Flow-matching support of the fine-tuning engine: SD3 and FLUX transformers instead of a UNet.

SD3 (``StableDiffusion3Pipeline``) and FLUX (``FluxPipeline``) are trained with rectified flow:

    x_sigma = (1 - sigma) x_0 + sigma eps,        v = eps - x_0 = d x_sigma / d sigma,

and the transformer predicts ``v``. Sampling integrates ``x <- x + (sigma_next - sigma) v`` (Euler, the
``FlowMatchEulerDiscreteScheduler`` of both pipelines) over the pipeline's own sigma grid (its ``shift``; FLUX's
``1 .. 1/N`` grid and resolution-dependent ``mu`` when the scheduler shifts dynamically). Timesteps are
``t = 1000 sigma`` as the scheduler states them (FLUX's transformer takes ``t / 1000`` and multiplies back).

For a fixed ``x_sigma``, ``v = (eps - x_sigma) / (1 - sigma)`` is the same affine function of ``eps`` for every
prompt, so any affine guidance combination (ESD's ``a - eta (c - a)``, KSCU's targets) means the same in either
parametrisation: the ESD / KSCU objectives are used unchanged on velocities (their loss scale differs by
``1 / (1 - sigma)^2``).

Conditioning: the pipeline's ``encode_prompt`` (SD3: CLIP-L || CLIP-G rows then T5 rows; FLUX: T5 rows) and the
pooled CLIP projection (``pooled_projections``). FLUX: latents are packed 2 x 2 (``(B, (h/2)(w/2), 4C)``), image
ids are the pipeline's ``_prepare_latent_image_ids``, text ids are zeros; a guidance-distilled FLUX
(``guidance_embeds``) gets the engine's ``guidance_scale`` through its guidance embedding and samples with the
conditional prediction alone (no classifier-free guidance), as ``FluxPipeline`` does; SD3 and an undistilled FLUX
sample with classifier-free guidance.

Training scopes on a transformer: ``"xattn"`` = every attention linear of the joint (and FLUX single-stream)
blocks, where text and image tokens meet (``attn.to_q/to_k/to_v/to_out.0/add_q_proj/add_k_proj/add_v_proj/
to_add_out``); ``"noxattn"`` = every other ``Linear`` / ``Conv2d`` of the transformer; ``"all"`` = both.

Key steps on a flow schedule: fraction ``1 - t / 1000 = 1 - sigma`` (:data:`KEY_STEP_CONVENTION`), the loader's
``1 - t / T`` with ``T = 1000``: a sigma fraction, not a step-index fraction (the shift bends the grid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from forgetpatch.errors import MethodError
from forgetpatch.format import TRANSFORMER_FAMILIES

if TYPE_CHECKING:
    from forgetpatch.methods.finetune import Cond, FinetuneEngine

FlowFamily = Literal["sd3", "flux"]

#: Transformer classes the flow path knows, by class name (the format's family table, one definition).
TRANSFORMERS: dict[str, FlowFamily] = TRANSFORMER_FAMILIES  # type: ignore[assignment]
#: How a key-step range on a flow-matching schedule is expressed (recorded in the manifest).
KEY_STEP_CONVENTION = "sigma: fraction = 1 - sigma, timestep t = 1000 sigma (FlowMatchEulerDiscreteScheduler)"
#: peft ``target_modules`` regex of the transformer ``"xattn"`` scope.
JOINT_ATTENTION_REGEX = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)


def family(pipe: Any) -> FlowFamily | None:
    """``"sd3"`` / ``"flux"`` for a flow-matching transformer pipeline, ``None`` for a UNet one.

    Raises:
        MethodError: the pipeline has a transformer of a kind this module does not know.
    """
    if getattr(pipe, "unet", None) is not None:
        return None
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    name = type(transformer).__name__
    if (found := denoiser_family(transformer)) is None:
        raise MethodError(
            f"{type(pipe).__name__} has a {name}; forgetpatch's methods support UNet pipelines (SD 1.x/2.x/SDXL) "
            f"and the flow-matching transformers {sorted(TRANSFORMERS)} (SD3, FLUX)"
        )
    return found


def denoiser_family(denoiser: nn.Module) -> FlowFamily | None:
    """``"sd3"`` / ``"flux"`` for a flow-matching transformer (by its class, :data:`TRANSFORMERS`), else ``None``."""
    return TRANSFORMERS.get(type(denoiser).__name__)


def default_latent_size(pipe: Any) -> int:
    """Latent side the pipeline samples at by default (SD3: the transformer's ``sample_size``; FLUX:
    ``default_sample_size``)."""
    size = getattr(pipe.transformer.config, "sample_size", None) or getattr(pipe, "default_sample_size", 128)
    return int(size)


@dataclass(frozen=True)
class FlowSchedule:
    """A sampling trajectory of a flow-matching scheduler."""

    timesteps: list[float]
    """``t = 1000 sigma`` per step, noisiest first (``N`` values)."""
    sigmas: list[float]
    """``N + 1`` values, ending at 0 (the clean sample)."""
    mu: float | None
    """The dynamic shift used, if the scheduler shifts by resolution."""


def schedule(pipe: Any, num_inference_steps: int, latent_size: int) -> FlowSchedule:
    """The sigmas the pipeline itself would sample ``num_inference_steps`` steps with at ``latent_size``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    which = family(pipe)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    patch = int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
    tokens = (latent_size // 2) ** 2 if which == "flux" else (latent_size // patch) ** 2
    kwargs: dict[str, Any] = {}
    if which == "flux":
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = None
    if scheduler.config.get("use_dynamic_shifting", False):
        config = scheduler.config
        mu = float(
            calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        )
        kwargs["mu"] = mu
    scheduler.set_timesteps(num_inference_steps, **kwargs)
    return FlowSchedule(
        timesteps=[float(t) for t in scheduler.timesteps],
        sigmas=[float(s) for s in scheduler.sigmas],
        mu=mu,
    )


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str) -> Cond:
    """Transformer conditioning of one prompt: text rows (``hidden``) and the pooled projection."""
    from forgetpatch.methods.finetune import Cond

    device = pipe.text_encoder.device
    if family(pipe) == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    else:
        hidden, pooled, _ = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1)
    return Cond(hidden, {"pooled_projections": pooled})


def distilled(transformer: nn.Module) -> bool:
    """Whether the transformer takes guidance as an input (FLUX-dev) instead of classifier-free guidance."""
    return bool(getattr(transformer.config, "guidance_embeds", False))


def noise(engine: FinetuneEngine, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Pure noise (``sigma = 1``) in the transformer's latent layout (packed 2 x 2 for FLUX)."""
    shape = latent_shape(engine.unet, engine.latent_size, batch)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(engine.device, engine.unet.dtype)


def transformer_kwargs(
    transformer: nn.Module, x: torch.Tensor, t: float, cond: Cond, latent_size: int, guidance: float
) -> dict[str, Any]:
    """Keyword arguments of one SD3 / FLUX transformer call at ``t = 1000 sigma`` (``x`` in its latent layout)."""
    batch, device = x.shape[0], x.device
    kwargs: dict[str, Any] = {
        "hidden_states": x,
        "encoder_hidden_states": cond.hidden,
        "pooled_projections": cond.added["pooled_projections"] if cond.added else None,
        "return_dict": False,
    }
    if denoiser_family(transformer) == "flux":
        side = latent_size // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        kwargs["img_ids"] = ids.reshape(-1, 3).to(device, x.dtype)
        kwargs["txt_ids"] = torch.zeros(cond.hidden.shape[1], 3, device=device, dtype=x.dtype)
        kwargs["timestep"] = torch.full((batch,), t / 1000.0, device=device, dtype=x.dtype)
        if distilled(transformer):
            kwargs["guidance"] = torch.full((batch,), guidance, device=device, dtype=x.dtype)
    else:
        kwargs["timestep"] = torch.full((batch,), t, device=device, dtype=x.dtype)
    return kwargs


def latent_shape(transformer: nn.Module, latent_size: int, batch: int = 1) -> tuple[int, ...]:
    """Shape of a batch of latents in the transformer's layout (FLUX: packed 2 x 2)."""
    channels = int(transformer.config.in_channels)
    if denoiser_family(transformer) == "flux":
        if latent_size % 2:
            raise MethodError(f"FLUX packs latents 2 x 2: latent_size must be even, got {latent_size}")
        return (batch, (latent_size // 2) ** 2, channels)
    return (batch, channels, latent_size, latent_size)


def predict(engine: FinetuneEngine, model: nn.Module, x: torch.Tensor, t: float, cond: Cond, **overrides: Any):
    """The transformer's velocity prediction at timestep ``t = 1000 sigma`` (``params=`` swaps weights in)."""
    kwargs = transformer_kwargs(engine.unet, x, t, cond, engine.latent_size, engine.config.guidance_scale)
    if overrides:
        return torch.func.functional_call(model, overrides["params"], (), kwargs, strict=False)[0]
    return model(**kwargs)[0]


def denoise_step(engine: FinetuneEngine, x: torch.Tensor, step: int, cond: Cond, uncond: Cond) -> torch.Tensor:
    """One Euler step ``x + (sigma_{k+1} - sigma_k) v`` with the model being edited (CFG unless distilled)."""
    from forgetpatch.methods.finetune import Cond

    t, sigma, sigma_next = engine.timesteps[step], engine.sigmas[step], engine.sigmas[step + 1]
    engine.passes.sample_forward += 1
    if distilled(engine.unet):
        v = engine.current(x, t, cond)
    else:
        both = engine.current(torch.cat([x, x]), t, Cond.cat(engine._expand(uncond, x), engine._expand(cond, x)))
        v_u, v_c = both.chunk(2)
        v = v_u + engine.config.guidance_scale * (v_c - v_u)
    return (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)


def scope_modules(transformer: nn.Module, scope: str) -> list[str]:
    """Names (inside the transformer) of the modules a training scope covers (see the module docstring)."""
    if scope == "all":
        return scope_modules(transformer, "xattn") + scope_modules(transformer, "noxattn")
    pattern = re.compile(JOINT_ATTENTION_REGEX)
    layers = [(n, m) for n, m in transformer.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if scope == "xattn":
        names = [n for n, m in layers if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    elif scope == "noxattn":
        names = [n for n, _ in layers if not pattern.fullmatch(n)]
    else:
        raise MethodError(f"unknown training scope {scope!r}; use 'xattn' (ESD-x), 'noxattn' (ESD-u) or 'all'")
    if not names:
        raise MethodError(f"the transformer has no modules in scope {scope!r}")
    return names


__all__ = [
    "JOINT_ATTENTION_REGEX",
    "KEY_STEP_CONVENTION",
    "TRANSFORMERS",
    "FlowSchedule",
    "default_latent_size",
    "denoise_step",
    "denoiser_family",
    "distilled",
    "encode_prompt",
    "family",
    "latent_shape",
    "noise",
    "predict",
    "schedule",
    "scope_modules",
    "transformer_kwargs",
]
