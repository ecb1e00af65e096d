"""The fine-tuning engine shared by the methods that train (ESD, KSCU, later Dynamic Mask).

One UNet is held. The *student* is that UNet with trainable weights on a scope of modules; the
*teacher* (the frozen base model) is the same UNet with the trainable part switched off:

* ``mode="lora"``: a peft LoRA adapter is injected on the scope; the teacher pass disables it.
  The adapter's factors are the patch.
* ``mode="full"``: the scope's weight tensors are trained directly; the teacher pass swaps in frozen
  copies (``torch.func.functional_call``). The weight change is compressed to LoRA by truncated SVD
  and the reconstruction error recorded. Biases stay frozen (a LoRA cannot carry them).

Scopes: ``"xattn"`` = the cross-attention linears (``attn2.to_q/to_k/to_v/to_out.0``, ESD-x);
``"noxattn"`` = every ``Linear``/``Conv2d`` outside ``attn2`` (ESD-u).

The loss is a pluggable callable ``objective(engine, iteration) -> loss``; it gets ``x_t`` from
:meth:`FinetuneEngine.sample_xt` (DDIM with the model being edited, classifier-free guidance) or
anywhere else. Training is seeded (every iteration draws from its own generator, so a resumed run
reproduces an uninterrupted one), checkpoints every ``checkpoint_every`` iterations, shows a progress bar
with the loss and the run's expected duration, counts UNet passes, and goes through ``accelerate``.

Several processes (``accelerate launch --num_processes N``, see :mod:`forgetpatch.distributed`): every iteration
trains on ``config.batch_size`` samples (default 1), the objective called once per sample with
:attr:`FinetuneEngine.sample` set to the sample's index in the batch. :meth:`FinetuneEngine.generator` seeds
from ``(seed, iteration, stream, sample)``, never from the process, and trajectory reuse is kept per sample.
Launched, each process runs its contiguous share of the batch's samples (:func:`forgetpatch.distributed.share`),
the gradients of ``loss / batch_size`` are summed over the processes (one all-reduce, no DDP wrapper) and
every process takes the same Adam step. The update is therefore the one a single process makes with the same
``batch_size``, up to float summation order: ``batch_size=N`` on N processes gives the 1-process patch N
times faster per step (``batch_size`` below N leaves processes idle). The recorded losses are the batch means,
the recorded UNet passes the sum over processes; the weights, the factors and the returned Patch are the same
on every process, and only process 0 writes checkpoints (a caller writes the patch there:
``if forgetpatch.distributed.is_main(): patch.save(...)``). A method with its own loop (Dynamic Mask) splits its
batches the same way and sums its gradients with :meth:`FinetuneEngine.reduce_gradients`. A single process with
``batch_size=1`` is bit-identical to the engine before this split.

Example:
    >>> cfg = FinetuneConfig(scope="xattn", iterations=100, lr=1e-4)
    >>> with FinetuneEngine(pipe, cfg) as engine:
    ...     c, empty = engine.encode("circle"), engine.encode("")
    ...     def objective(engine, it):
    ...         x, t = engine.sample_xt("circle", c, empty, step=10, generator=engine.generator(it))
    ...         return torch.nn.functional.mse_loss(engine.student(x, t, c), engine.teacher(x, t, empty))
    ...     engine.train(objective)
    ...     factors, errors = engine.factors()
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from forgetpatch import distributed, progress
from forgetpatch.errors import MethodError
from forgetpatch.methods import checkpoint, flow
from forgetpatch.methods.base import patch_name, typed

P = TypeVar("P")
Scope = Literal["xattn", "noxattn", "all"]
Mode = Literal["lora", "full"]
Objective = Callable[["FinetuneEngine", int], torch.Tensor]

#: peft ``target_modules`` regex of the ESD-x scope (full match against the module name).
XATTN_REGEX = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
_ADAPTER = "forgetpatch_train"


def scope_modules(unet: nn.Module, scope: Scope) -> list[str]:
    """Names (inside ``unet``) of the modules a scope trains.

    Example:
        >>> scope_modules(pipe.unet, "xattn")[:2]
        ['down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q', '...attn2.to_k']
    """
    if flow.denoiser_family(unet) is not None:  # an SD3 / FLUX transformer
        return flow.scope_modules(unet, scope)
    if scope == "all":
        return scope_modules(unet, "xattn") + scope_modules(unet, "noxattn")
    if scope == "xattn":
        import re

        pattern = re.compile(XATTN_REGEX)
        names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    elif scope == "noxattn":
        names = [
            n
            for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and "attn2" not in n.split(".")
        ]
    else:
        raise MethodError(f"unknown training scope {scope!r}; use 'xattn' (ESD-x), 'noxattn' (ESD-u) or 'all'")
    if not names:
        raise MethodError(f"the UNet has no modules in scope {scope!r}")
    return names


@dataclass
class Cond:
    """UNet conditioning for one prompt: text states, plus SDXL's pooled text / time ids."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    @staticmethod
    def cat(*conds: Cond) -> Cond:
        added = None
        if conds[0].added is not None:
            added = {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}  # type: ignore[index]
        return Cond(torch.cat([c.hidden for c in conds]), added)

    def with_noise(self, scale: float, generator: torch.Generator) -> Cond:
        noise = torch.randn(self.hidden.shape, generator=generator, dtype=self.hidden.dtype)
        return Cond(self.hidden + scale * noise.to(self.hidden.device), self.added)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Cond:
        added = None if self.added is None else {k: v.to(device, dtype) for k, v in self.added.items()}
        return Cond(self.hidden.to(device, dtype), added)


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str, latent_size: int) -> Cond:
    """UNet conditioning of one prompt for an SD or SDXL pipeline (SDXL adds pooled text + time ids).

    Example:
        >>> cond = encode_prompt(pipe, "a red circle", latent_size=16)
        >>> cond.hidden.shape  # (1, tokens, cross_attention_dim)
    """
    if flow.family(pipe) is not None:
        return flow.encode_prompt(pipe, prompt)
    device = pipe.text_encoder.device
    if hasattr(pipe, "text_encoder_2"):
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        side = latent_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=hidden.dtype, device=device)
        return Cond(hidden, {"text_embeds": pooled, "time_ids": time_ids})
    hidden, _ = pipe.encode_prompt(prompt, device, 1, False)
    return Cond(hidden)


@dataclass
class FinetuneConfig:
    """Settings of one training run (all methods that train share them).

    Args:
        scope: ``"xattn"`` (attn2 linears), ``"noxattn"`` (every Linear/Conv2d outside attn2) or ``"all"`` (both).
        mode: ``"lora"`` (train a peft adapter) or ``"full"`` (train weights, compress by SVD).
        rank: LoRA rank (``mode="lora"``), or the SVD rank of the compressed patch (``mode="full"``).
        energy: for ``mode="full"``, keep this fraction of spectral energy instead of a fixed rank.
        lr: Adam learning rate.
        iterations: optimizer steps.
        batch_size: samples per optimizer step (the loss is their mean); under ``accelerate launch`` the
            processes split them, so ``batch_size`` = number of processes keeps every process busy.
        num_inference_steps: DDIM steps of the trajectory sampler (E).
        guidance_scale: classifier-free guidance of the trajectory sampler.
        latent_size: side of the latents trained on; ``None`` = the UNet's ``sample_size``.
        checkpoint_dir: where to write / resume training state; ``None`` = no checkpoints.
        checkpoint_every: iterations between checkpoints.
        mixed_precision: passed to ``accelerate`` (``"no"``, ``"bf16"``, ``"fp16"``).
    """

    scope: Scope = "xattn"
    mode: Mode = "lora"
    rank: int = 8
    energy: float | None = None
    lr: float = 1e-5
    iterations: int = 1000
    batch_size: int = 1
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    latent_size: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    mixed_precision: str = "no"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("lora", "full"):
            raise MethodError(f"unknown training mode {self.mode!r}; use 'lora' or 'full'")
        if self.iterations < 1 or self.rank < 1 or self.num_inference_steps < 2:
            raise MethodError(
                f"iterations ({self.iterations}) and rank ({self.rank}) must be >= 1 and "
                f"num_inference_steps ({self.num_inference_steps}) >= 2"
            )
        if not 0 < self.lr < math.inf:
            raise MethodError(f"learning rate must be a positive finite number, got {self.lr}")
        if self.checkpoint_every < 1:
            raise MethodError(f"checkpoint_every must be >= 1 (iterations between checkpoints), got {self.checkpoint_every}")
        if self.batch_size < 1:
            raise MethodError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Passes:
    """UNet passes a run made (a batched call counts once; CFG sampling is one call per step)."""

    sample_forward: int = 0
    teacher_forward: int = 0
    student_forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.sample_forward + self.teacher_forward + self.student_forward + self.backward

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def denoiser_of(pipe: Any) -> str:
    """The component the fine-tuning engine trains: ``"unet"``, or ``"transformer"`` on SD3 / FLUX."""
    return "unet" if flow.family(pipe) is None else "transformer"


def check_trainable(pipe: Any) -> None:
    """:class:`MethodError` saying what to do, before any training, when the fine-tuning engine cannot train the
    pipeline's denoiser (:func:`denoiser_of`) into a patch of the pipeline as loaded:

    * peft adapters on it (the user's LoRA or forgetpatch's unfused patches): the engine trains its own adapter;
    * ``pipe.fuse_qkv_projections()`` on: attention runs on fused copies, so ``to_q`` / ``to_k`` / ``to_v`` get no
      gradient and the fused layers are not in the base model a patch is applied to;
    * weights in half precision: Adam's small updates round away (bfloat16) or the loss overflows (float16).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from forgetpatch.loader import applied, runs_fused

    component = denoiser_of(pipe)
    denoiser: nn.Module = getattr(pipe, component)
    name = "UNet" if component == "unet" else "transformer"
    if any(isinstance(m, BaseTunerLayer) for m in denoiser.modules()):
        if any(not e.fused for e in applied(pipe)):
            how = "apply forgetpatch's patches with fuse=True, or remove them (forgetpatch.remove(pipe))"
        else:
            how = "fuse your LoRA into the weights and unload it (pipe.fuse_lora(); pipe.unload_lora_weights())"
        raise MethodError(
            f"the pipeline's {name} carries peft adapters, and this method trains its own adapter on a {name} "
            f"without any: {how} before erasing"
        )
    if any(runs_fused(m) for m in denoiser.modules()):
        raise MethodError(
            "pipe.fuse_qkv_projections() is on: attention runs on fused copies of to_q / to_k / to_v, which a patch "
            "of the base model does not reach; call pipe.unfuse_qkv_projections() before erasing (fuse them again "
            "after applying the patch)"
        )
    dtype = next(denoiser.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        raise MethodError(
            f"the pipeline's {name} is in {str(dtype).removeprefix('torch.')}: fine-tuning methods train in float32 "
            "(half-precision updates round away or overflow). Erase on the pipeline loaded in float32 "
            "(dtype=torch.float32); the patch then applies to your half-precision pipeline"
        )


class FinetuneEngine:
    """Frozen teacher + trainable student on one UNet; a context manager that restores the pipeline.

    Use it in a ``with`` block: on exit (also on error or Ctrl-C) the UNet gets its original modules,
    weights, ``requires_grad`` flags and device back, so the caller's pipeline is unchanged.
    """

    def __init__(self, pipe: Any, config: FinetuneConfig, *, run: Mapping[str, Any] | None = None) -> None:
        from accelerate import Accelerator

        self.pipe, self.config = pipe, config
        self.run = dict(run or {})
        """What is trained (:func:`run_identity`): a checkpoint written for another run is refused, not resumed."""
        self.flow = flow.family(pipe)  # None: a UNet with DDIM; "sd3" / "flux": a flow-matching transformer
        self.component = denoiser_of(pipe)
        self.unet: nn.Module = getattr(pipe, self.component)
        check_trainable(pipe)
        if self.flow is None:
            self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            self.scheduler.set_timesteps(config.num_inference_steps)
            self.timesteps: list[int] = ddim_timesteps(pipe, config.num_inference_steps)
            self.latent_size = config.latent_size or int(self.unet.config.sample_size)
        else:  # flow matching: the pipeline's own Euler sigmas, t = 1000 sigma (methods/flow.py)
            self.scheduler = pipe.scheduler
            self.latent_size = config.latent_size or flow.default_latent_size(pipe)
            trajectory = flow.schedule(pipe, config.num_inference_steps, self.latent_size)
            self.timesteps, self.sigmas = trajectory.timesteps, trajectory.sigmas  # type: ignore[assignment]
        self.module_names = scope_modules(self.unet, config.scope)
        self.passes = Passes()
        self.losses: list[float] = []
        self.iteration = 0
        self._cache: dict[str, Any] | None = None
        self.sample = 0  # index in the batch of the sample being trained on (see the module docstring)
        self._caches: dict[int, dict[str, Any] | None] = {}  # the trajectory caches of the other samples
        self._cond_cache: dict[str, Cond] = {}
        self._requires_grad = {n: p.requires_grad for n, p in self.unet.named_parameters()}
        self._device = next(self.unet.parameters()).device
        self._training = self.unet.training
        self._closed = False
        self._had_peft_config = hasattr(self.unet, "peft_config")
        self.unet.requires_grad_(False)
        self._frozen: dict[str, torch.Tensor] = {}
        self.model: nn.Module = self.unet
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
        )
        try:
            params = self._make_trainable()
            self.optimizer = torch.optim.Adam(params, lr=config.lr)
            if self.accelerator.num_processes > 1:  # no DDP: train() sums the gradients of its own split
                self.model = self.unet.to(self.accelerator.device)
                self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
            else:
                self.model, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        except BaseException:
            self.close()  # nothing half-done: the pipeline gets its UNet back
            raise
        self.device = self.accelerator.device

    def _make_trainable(self) -> list[nn.Parameter]:
        config = self.config
        if config.mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=config.rank,
                lora_alpha=config.rank,
                target_modules=self.module_names,
                init_lora_weights=True,
            )
            with torch.random.fork_rng(devices=[]):  # seeded LoRA init, caller's RNG untouched
                torch.manual_seed(config.seed)
                inject_adapter_in_model(lora, self.unet, adapter_name=_ADAPTER)
            params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
            return params
        params = []
        for name in self.module_names:
            weight = self.unet.get_submodule(name).weight
            self._frozen[f"{name}.weight"] = weight.detach().clone()
            weight.requires_grad_(True)
            params.append(weight)
        return params

    # --- context management ------------------------------------------------------------------
    def __enter__(self) -> FinetuneEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the pipeline its UNet back as it was (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.unet = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        if self.config.mode == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            for name, module in list(self.unet.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    parent_name, _, child = name.rpartition(".")
                    parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                    setattr(parent, child, module.get_base_layer())
            if not self._had_peft_config and hasattr(self.unet, "peft_config"):
                del self.unet.peft_config
        else:
            with torch.no_grad():
                for name, frozen in self._frozen.items():
                    self.unet.get_parameter(name).copy_(frozen)
        for name, p in self.unet.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, False))
        self.unet.to(self._device)
        self.unet.train(self._training)
        setattr(self.pipe, self.component, self.unet)
        self.accelerator.free_memory()

    # --- conditioning ------------------------------------------------------------------------
    def encode(self, prompt: str) -> Cond:
        """Text conditioning of ``prompt`` (cached), on the training device."""
        if prompt not in self._cond_cache:
            cond = encode_prompt(self.pipe, prompt, self.latent_size)
            self._cond_cache[prompt] = cond.to(self.device, dtype=self.unet.dtype)
        return self._cond_cache[prompt]

    # --- UNet passes -------------------------------------------------------------------------
    def _unet(self, model: nn.Module, x: torch.Tensor, t: int, cond: Cond, **overrides: Any) -> torch.Tensor:
        if self.flow is not None:
            return flow.predict(self, model, x, t, cond, **overrides)
        steps = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
        kwargs = {"encoder_hidden_states": cond.hidden, "return_dict": False}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = cond.added
        if overrides:
            return torch.func.functional_call(model, overrides["params"], (x, steps), kwargs, strict=False)[0]
        return model(x, steps, **kwargs)[0]

    def student(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        """Noise prediction of the model being edited, with gradients to the trainable weights."""
        self.passes.student_forward += 1
        return self._unet(self.model, x, t, self._expand(cond, x))

    @torch.no_grad()
    def teacher(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        """Noise prediction of the frozen base model (adapter disabled / frozen weights swapped in)."""
        self.passes.teacher_forward += 1
        cond = self._expand(cond, x)
        unet = self.accelerator.unwrap_model(self.model)
        if self.config.mode == "full":
            return self._unet(unet, x, t, cond, params=self._frozen)
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            return self._unet(unet, x, t, cond)
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @torch.no_grad()
    def with_weights(self, weights: dict[str, torch.Tensor], x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        """Noise prediction with the trainable weights replaced by ``weights`` (``mode="full"``; e.g. a teacher
        snapshot taken mid-run, see :meth:`snapshot`)."""
        if self.config.mode != "full":
            raise MethodError("with_weights needs mode='full' (trained weight tensors)")
        self.passes.teacher_forward += 1
        return self._unet(self.accelerator.unwrap_model(self.model), x, t, self._expand(cond, x), params=weights)

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable tensors as they are now, keyed as :meth:`with_weights` takes them."""
        return {name: p.detach().clone() for name, p in self.trainable().items()}

    @torch.no_grad()
    def restore(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`snapshot` back into the trainable tensors."""
        params = self.trainable()
        for name, value in weights.items():
            params[name].copy_(value)

    @torch.no_grad()
    def current(self, x: torch.Tensor, t: int, cond: Cond) -> torch.Tensor:
        """Noise prediction of the model being edited, without gradients (for sampling)."""
        return self._unet(self.accelerator.unwrap_model(self.model), x, t, self._expand(cond, x))

    @staticmethod
    def _expand(cond: Cond, x: torch.Tensor) -> Cond:
        if cond.hidden.shape[0] == x.shape[0]:
            return cond
        return Cond.cat(*([cond] * x.shape[0]))

    # --- trajectories ------------------------------------------------------------------------
    def generator(self, iteration: int, stream: int = 0) -> torch.Generator:
        """A CPU generator seeded from ``(seed, iteration, stream, sample)``: resuming replays the same draws.

        ``sample`` is :attr:`sample`, the index in the batch (0 outside training): each sample of a batch gets
        its own draws, and the same ones whichever process trains it, so a launch on N processes draws
        exactly what one process draws.
        """
        return torch.Generator().manual_seed(
            self.config.seed * 1_000_003 + iteration * 7919 + stream + self.sample * 104_729
        )

    def noise(self, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
        if self.flow is not None:
            return flow.noise(self, generator, batch)
        shape = (batch, self.unet.config.in_channels, self.latent_size, self.latent_size)
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (x * self.scheduler.init_noise_sigma).to(self.device, self.unet.dtype)

    def denoise_step(self, x: torch.Tensor, step: int, cond: Cond, uncond: Cond) -> torch.Tensor:
        """One DDIM step (index ``step`` of E) with the edited model and classifier-free guidance."""
        if self.flow is not None:
            return flow.denoise_step(self, x, step, cond, uncond)
        t = self.timesteps[step]
        self.passes.sample_forward += 1
        both = self.current(torch.cat([x, x]), t, Cond.cat(self._expand(uncond, x), self._expand(cond, x)))
        e_u, e_c = both.chunk(2)
        eps = e_u + self.config.guidance_scale * (e_c - e_u)
        return self.scheduler.step(eps, t, x).prev_sample

    def sample_xt(
        self,
        key: Hashable,
        cond: Cond,
        uncond: Cond,
        step: int,
        *,
        generator: torch.Generator,
        reuse: bool = True,
    ) -> tuple[torch.Tensor, int]:
        """``x_t`` at sampling-step index ``step`` (0 = pure noise) and its timestep ``t``.

        Samples with the model being edited from fresh noise, or, when ``reuse`` and the last call
        had the same ``key`` at an earlier or equal step, continues that trajectory.
        """
        if not 0 <= step < len(self.timesteps):
            raise MethodError(f"sampling step {step} is outside [0, {len(self.timesteps) - 1}]")
        cache = self._cache
        if reuse and cache is not None and cache["key"] == key and cache["step"] <= step:
            x, start = cache["latent"], cache["step"]
        else:
            x, start = self.noise(generator), 0
        for i in range(start, step):
            x = self.denoise_step(x, i, cond, uncond)
        self._cache = {"key": key, "step": step, "latent": x}
        return x, self.timesteps[step]

    # --- training ----------------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.Tensor]:
        unet = self.accelerator.unwrap_model(self.model)
        return {n: p for n, p in unet.named_parameters() if p.requires_grad}

    def train(self, objective: Objective, iterations: int | None = None) -> list[float]:
        """Run ``objective`` for ``iterations`` optimizer steps (resuming from a checkpoint if any)."""
        total = iterations or self.config.iterations
        self._maybe_resume()
        self.model.train()
        bar = progress.bar(
            total=total,
            initial=self.iteration,
            desc="fine-tune",
            disable=not self.config.progress or not self.accelerator.is_local_main_process,
        )
        try:
            while self.iteration < total:
                it = self.iteration
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._accumulate(objective, it)
                self.optimizer.step()
                self.losses.append(loss)
                self.iteration += 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.losses[-1]:.4g}", refresh=False)
                every = self.config.checkpoint_every
                if self.config.checkpoint_dir and (self.iteration % every == 0 or self.iteration == total):
                    self.save_checkpoint()
        finally:
            bar.close()
            self.model.eval()
        return self.losses

    def _accumulate(self, objective: Objective, iteration: int) -> float:
        """Gradients of the batch at ``iteration``: this process's samples (all of them unless launched), each
        backward of ``loss / batch_size``, then summed over the processes. Returns the batch's mean loss, the
        same on every process."""
        size = self.config.batch_size
        total, bad = 0.0, None
        for sample in distributed.share(size):
            self._use_sample(sample)
            with self.accelerator.autocast():
                loss = objective(self, iteration)
            if not torch.isfinite(loss):
                bad = loss.item()
                break
            self.accelerator.backward(loss if size == 1 else loss / size)
            self.passes.backward += 1
            total += float(loss.detach())
        self._use_sample(0)
        if self.accelerator.num_processes > 1:
            sums = distributed.sum_values({"loss": total, "bad": float(bad is not None)})
            total = sums["loss"]
            if sums["bad"] and bad is None:
                bad = float("nan")
            if bad is None:
                self.reduce_gradients()
        if bad is not None:
            raise MethodError(f"loss became {bad} at iteration {iteration}; lower the learning rate")
        return total / size

    def reduce_gradients(self) -> None:
        """Sum the trainable gradients over the processes; a tensor no process reached keeps no gradient (as
        in a single process, so Adam skips it alike)."""
        params = list(self.trainable().values())
        reached = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum_([reached, *(p.grad for p in params)])
        for p, hit in zip(params, reached.tolist(), strict=True):
            if not hit:
                p.grad = None

    def _use_sample(self, sample: int) -> None:
        """Make ``sample`` the current one: its trajectory cache in ``_cache``, its draws from :meth:`generator`."""
        if sample != self.sample:
            self._caches[self.sample] = self._cache
            self._cache = self._caches.pop(sample, None)
            self.sample = sample

    def total_passes(self) -> Passes:
        """The UNet passes of the whole run: :attr:`passes`, summed over the processes under a launch (every
        process must call it then)."""
        if self.accelerator.num_processes == 1:
            return self.passes
        return Passes(**{k: int(v) for k, v in distributed.sum_values(asdict(self.passes)).items()})

    # --- checkpoints (file layout, atomic write, settings check: methods/checkpoint.py) ---------
    def _cpu_caches(self) -> dict[int, dict[str, Any]]:
        """The trajectory caches this process holds, by sample, latents on the CPU."""
        caches = {**self._caches, self.sample: self._cache}
        return {s: {**c, "latent": c["latent"].detach().cpu()} for s, c in caches.items() if c is not None}

    def _state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "caches": self._cpu_caches(),
            "losses": list(self.losses),
            "passes": asdict(self.passes),
            "config": self._settings(),
        }

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint records and a resumed run must match: the settings and the run (what is trained)."""
        return {**checkpoint.settings(asdict(self.config)), "run": self.run}

    def save_checkpoint(self) -> Path | None:
        """Write the training state to ``checkpoint_dir`` (atomically); process 0 only. Under a launch every
        process calls it (as :meth:`train` does): the trajectory caches and pass counts are gathered first."""
        if not self.config.checkpoint_dir:
            return None
        shared: dict[str, Any] = {}
        if self.accelerator.num_processes > 1:
            shared["caches"] = dict(distributed.gather(list(self._cpu_caches().items())))
            shared["passes"] = asdict(self.total_passes())
        if not self.accelerator.is_main_process:
            return None
        return checkpoint.save(self.config.checkpoint_dir, {**self._state(), **shared})

    def _maybe_resume(self) -> None:
        if not self.config.checkpoint_dir or self.iteration:
            return
        state = checkpoint.load(self.config.checkpoint_dir, self._settings())
        if state is None:
            return
        with torch.no_grad():
            params = self.trainable()
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        mine = set(distributed.share(self.config.batch_size))  # the samples this process trains
        self._caches = {
            s: {**c, "latent": c["latent"].to(self.device)}
            for s, c in state["caches"].items()
            if c is not None and s in mine
        }
        self._cache = self._caches.pop(self.sample, None)
        self.losses = list(state["losses"])
        # The passes are the run's total; process 0 carries them on, the others count from 0 (total_passes sums).
        self.passes = Passes(**state["passes"]) if self.accelerator.is_main_process else Passes()
        self.iteration = int(state["iteration"])

    # --- the patch ---------------------------------------------------------------------------
    @torch.no_grad()
    def changes(self) -> dict[str, torch.Tensor]:
        """``mode="full"``: the weight changes so far, ``{"<component>.<module>": W - W_start}`` (``unet`` or ``transformer``) (float32, CPU; unchanged
        modules left out)."""
        if self.config.mode != "full":
            raise MethodError("changes() needs mode='full'; a LoRA run's change is its factors()")
        unet = self.accelerator.unwrap_model(self.model)
        out = {}
        for name in self.module_names:
            delta = (unet.get_submodule(name).weight.detach() - self._frozen[f"{name}.weight"]).float().cpu()
            if delta.any():
                out[f"{self.component}.{name}"] = delta
        return out

    @torch.no_grad()
    def factors(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """LoRA factors ``{"<component>.<module>": (A, B)}`` (``delta W = B @ A``) and reconstruction errors.

        Conv2d factors follow peft's layout: ``A`` is ``(r, in, kh, kw)``, ``B`` is ``(out, r, 1, 1)``.
        """
        unet = self.accelerator.unwrap_model(self.model)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        errors: dict[str, float] = {}
        changes = self.changes() if self.config.mode == "full" else {}
        for name in self.module_names:
            module = unet.get_submodule(name)
            if self.config.mode == "lora":
                scale = module.scaling[_ADAPTER]
                a = module.lora_A[_ADAPTER].weight.detach().float().cpu()
                b = module.lora_B[_ADAPTER].weight.detach().float().cpu() * scale
                if not b.any():
                    continue
                factors[f"{self.component}.{name}"] = (a.contiguous(), b.contiguous())
                errors[f"{self.component}.{name}"] = 0.0
            else:
                from forgetpatch.lowrank import factorize

                delta = changes.get(f"{self.component}.{name}")
                if delta is None:
                    continue
                low = factorize(
                    delta.reshape(delta.shape[0], -1),
                    rank=None if self.config.energy else self.config.rank,
                    energy=self.config.energy,
                )
                a, b = low.A, low.B
                if delta.ndim == 4:
                    a = a.reshape(a.shape[0], *delta.shape[1:])
                    b = b.reshape(*b.shape, 1, 1)
                factors[f"{self.component}.{name}"] = (a.contiguous(), b.contiguous())
                errors[f"{self.component}.{name}"] = float(low.rel_error)
        if not factors:
            raise MethodError("training changed no weights; raise iterations or the learning rate")
        return factors, errors


def ddim_timesteps(pipe: Any, num_inference_steps: int) -> list[int]:
    """The timesteps of a DDIM trajectory of ``num_inference_steps`` with ``pipe``'s scheduler config."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]


def key_step_fraction(t: int, num_train_timesteps: int = 1000) -> float:
    """Trajectory fraction of timestep ``t`` (0.0 = noisiest step, 1.0 = last), as the loader gates."""
    return min(1.0, max(0.0, 1.0 - t / num_train_timesteps))


def run_identity(pipe: Any, *, method: str, concepts: list[Any], preserve: list[Any], params: dict[str, Any]) -> dict:
    """What a fine-tuning run trains, as plain data a checkpoint records: the method, its concepts and settings, and
    the model it starts from (its Hub id, a sampled digest of its denoiser's weights, the digests of the patches on
    it). A checkpoint of another erasure in the same ``checkpoint_dir`` is then refused instead of resumed into the
    wrong patch: another base folder too, which a local path does not name (``base_model_ref`` is ``None`` there)."""
    from forgetpatch.format import base_model_ref, weight_fingerprint
    from forgetpatch.loader import applied

    weights = hashlib.sha256()
    for key, tensor in sorted(getattr(pipe, denoiser_of(pipe)).state_dict().items()):
        weights.update(f"{key}={weight_fingerprint(tensor).digest};".encode())
    return {
        "method": method,
        "concepts": [asdict(c) for c in concepts],
        "preserve": [asdict(c) for c in preserve],
        "params": params,
        "base": list(base_model_ref(pipe)),
        "weights": weights.hexdigest(),
        "patches": [entry.digest for entry in applied(pipe)],
    }


def train_patch(
    pipe: Any,
    config: FinetuneConfig,
    objective: Objective,
    *,
    method: str,
    version: str = "1",
    concepts: list[Any],
    preserve: list[Any],
    params: dict[str, Any],
    key_steps: list[Any] | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
) -> Any:
    """Train ``objective`` with a :class:`FinetuneEngine` and package the result as a Patch.

    The pipeline is restored before the patch is built, so fingerprints are of the base weights.
    Metrics record the losses, UNet passes (summed over processes) and wall time of the run. Under
    ``accelerate launch`` every process returns the same Patch; save it on process 0 only
    (:func:`forgetpatch.distributed.is_main`).
    """
    import time

    from forgetpatch.format import MethodInfo, build_patch

    started = time.perf_counter()
    identity = run_identity(pipe, method=method, concepts=concepts, preserve=preserve, params=params)
    with FinetuneEngine(pipe, config, run=identity) as engine:
        engine.train(objective)
        factors, errors = engine.factors()
        losses, passes = engine.losses, engine.total_passes().as_dict()
    run = {
        "wall_time_s": round(time.perf_counter() - started, 2),
        "unet_passes": passes,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_curve": losses[:: max(1, len(losses) // 50)],
    }
    return build_patch(
        pipe,
        factors,
        name=name or patch_name(method, concepts),
        method=MethodInfo(name=method, version=version),
        concepts=concepts,
        preserved=preserve,
        key_steps=key_steps,
        params={**params, **{k: v for k, v in asdict(config).items() if k not in checkpoint.IGNORED}},
        reconstruction_errors=errors,
        metrics={**(metrics or {}), "training": run},
    )


#: The UNet prediction types :func:`denoising_target` makes targets for.
PREDICTS = ("epsilon", "v_prediction", "sample")


def denoising_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """What a UNet whose scheduler is ``scheduler`` should predict for ``latents`` noised with ``noise`` at ``steps``:
    the noise, the velocity (v-prediction models such as SD 2.1 768) or the clean latents (``"sample"``), as its
    ``prediction_type`` says.

    Example:
        >>> target = denoising_target(pipe.scheduler, latents, noise, torch.full((len(latents),), 500))
    """
    predicts = scheduler.config.get("prediction_type", "epsilon")
    if predicts not in PREDICTS:
        raise MethodError(f"denoising targets are made for UNets that predict {', '.join(PREDICTS)}, not {predicts!r}")
    if predicts == "v_prediction":  # DDPM's formula, for the schedulers without one (PNDM, DPM-Solver, UniPC, ...)
        with_velocity = scheduler if hasattr(scheduler, "get_velocity") else DDPMScheduler.from_config(scheduler.config)
        return with_velocity.get_velocity(latents, noise, steps)
    return latents if predicts == "sample" else noise


def split_params(cls: type[P], params: Mapping[str, Any], method: str) -> tuple[P, dict[str, Any]]:
    """A fine-tuning method's keyword parameters split into its own frozen params dataclass ``cls`` and the
    engine's (:class:`FinetuneConfig` fields, returned as a dict); a key that is neither is named in the error.

    Example:
        >>> settings, engine = split_params(ESDParams, {"eta": 2.0, "rank": 8}, "ESD")
        >>> settings.eta, engine
        (2.0, {'rank': 8})
    """
    own = {f.name for f in fields(cls)}
    engine = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(params) - own - engine)
    if unknown:
        raise MethodError(
            f"unknown {method} parameter(s) {unknown}; {method}'s own: {sorted(own)}; the fine-tuning engine's: "
            f"{sorted(engine - own)}"
        )
    return typed(cls(**{k: v for k, v in params.items() if k in own})), {k: v for k, v in params.items() if k not in own}


def make_config(**kwargs: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from keyword parameters, naming any unknown ones."""
    known = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MethodError(f"unknown fine-tuning parameters {unknown}; known: {sorted(known)}")
    return typed(FinetuneConfig(**kwargs))


__all__ = [
    "PREDICTS",
    "XATTN_REGEX",
    "Cond",
    "FinetuneConfig",
    "FinetuneEngine",
    "Objective",
    "Passes",
    "ddim_timesteps",
    "denoising_target",
    "key_step_fraction",
    "encode_prompt",
    "make_config",
    "patch_name",
    "scope_modules",
    "split_params",
    "train_patch",
]
