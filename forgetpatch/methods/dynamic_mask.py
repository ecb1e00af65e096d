"""Dynamic Mask + Concept-Aware Loss (seed 002): masked fine-tuning that forgets concepts one after another.

Trainable: the cross-attention linears ``attn2.to_q / to_k / to_v / to_out.0`` (full weights), each under an
element-wise binary gradient mask (on SD3 / FLUX: the joint attention's projections, ``flow.JOINT_ATTENTION_REGEX``).
For each concept ``c`` with superclass ``s``, in sequence:

1. **data**: latents the pipeline as given (the teacher) generates for the concept and for its superclass in each
   of ``templates`` (``"a photo of {concept}"``; the toy world's own prompt forms there), image ``i`` in template
   ``i mod len(templates)``; every term below conditions an image on its own template;
2. **warm-up**: ``warmup`` steps of the plain denoising loss on the concept's latents, accumulating ``|grad|`` per
   element without updating; the mask keeps the top ``keep`` share of each matrix;
3. **concept-aware loss**, one ``t`` for both terms, ``eps*`` the student::

       L_forget = | eps*(x_t^c, t, c) - sg[eps*(x_t^c, t, s)] |^2
       L        = L_forget + super_weight | eps*(x_t^s, t, s) - noise |^2 + distill_weight L_distill

   (on SD3 / FLUX the denoiser predicts a velocity: ``x_t = (1 - sigma) x_0 + sigma noise`` at a step of the
   pipeline's own sigma grid, ``t = 1000 sigma``, and the denoising target is ``noise - x_0``);

4. **distillation**: a teacher frozen at the start of the concept (the weights after the concepts before it,
   with any patches the pipeline carried) holds the student's predictions on the superclass latents under the
   prompts of every concept forgotten before (in this call and in the patches on the pipeline) and of the
   superclass: ``L_distill = mean_p | eps*(x_t^s, t, p) - eps_teacher(x_t^s, t, p) |^2``. The authors' release
   computes this term and then overwrites it, so there it never acts; here it is added to the loss
   (``distill_weight=0`` gives the release's behaviour, the ablation);
   **preservation** (not in the paper; only with ``preserve``): one preserved word ``q`` per step, in turn (the
   superclass is never one: it has its own terms), on the concept's ``x_t``, held to the same teacher:
   ``preserve_weight | eps*(x_t^c, t, q) - eps_teacher(x_t^c, t, q) |^2``, as KSCU's optional term. The forget term
   moves predictions on the concept's images, and that is where a near neighbour's prompt moves with it (on the toy
   world, circle -> square took "ellipse" and "ring" along: near-neighbour retention 0.66 of the base without the
   term, 1.00 with it). On a chain ``forgetpatch.erase`` adds what the patches on the pipeline erased to
   ``preserve`` (``hold``), so each earlier concept is also held on the new concept's images: where the square's
   step would otherwise pull the circle, already turned into squares, along with it;
5. **dynamic mask**: every ``update_every`` steps during the first ``update_until`` of training, the
   ``n = turnover * 0.5 (1 + cos(pi * epoch / epochs)) * active`` active elements with the smallest ``|grad|``
   accumulated since the last update are dropped and the ``n`` inactive ones with the largest are added;
6. Adam with a one-cycle cosine learning rate; at each epoch's end the trainable weights are kept if the epoch's
   mean ``L_forget`` is the lowest so far, and the best epoch's weights are the result.

Several processes (``accelerate launch --num_processes N``): each generates its share of the training images (every
image from its own seed) and all get all; every step, each process draws the whole batch (the same draws
everywhere), computes the terms on its share of the samples, and the gradients are summed over the processes before
the mask scores and masks them, so every process takes the same step on the same gradient: the 1-process patch up
to float summation order, with ``batch`` (and ``images``) at least ``N``. UNet passes are counted per process.

The change (masked, full weight) is stored as a truncated SVD at ``energy``; rank and measured reconstruction error
go into the manifest. Masked-out elements do not move: their gradient is zeroed and, after every optimizer step,
they are put back (Adam's momentum would otherwise move elements dropped from the mask).

Example:
    >>> patch = forgetpatch.erase(pipe, Concept("circle", superclass="shape"), method="dynamic_mask", steps=100)
    >>> patch.manifest.metrics["dynamic_mask"]["circle"]["best_epoch"]
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from forgetpatch import distributed
from forgetpatch.errors import MethodError
from forgetpatch.methods.adversarial import AdversarialParam, Adversary, adversary_for
from forgetpatch.methods.base import (
    Concept,
    as_declared,
    check_concepts,
    erased_on,
    patch_name,
    register,
    typed,
)
from forgetpatch.methods.finetune import Cond, FinetuneEngine, check_trainable, denoising_target, make_config


@dataclass(frozen=True)
class DynamicMaskParams:
    """Dynamic Mask's settings: the paper's (SD 1.4). A base may supply its own (the toy world's:
    :data:`forgetpatch.toy.defaults.METHOD_SETTINGS`)."""

    steps: int = 500
    """Training steps per concept."""
    epochs: int = 10
    """Epochs per concept: the turnover schedule's clock and the best-epoch selection."""
    warmup: int = 50
    keep: float = 0.5
    """Share of each matrix's elements the mask starts with."""
    turnover: float = 0.2
    update_every: int = 100
    update_until: float = 0.8
    lr: float = 3e-6
    batch: int = 2
    super_weight: float = 0.25
    distill_weight: float = 1.0
    preserve_weight: float = 0.25
    """Weight of the optional preservation term, used only when ``preserve`` is given (not in the paper)."""
    images: int = 16
    """Latents generated per prompt (concept and superclass) for training."""
    templates: tuple[str, ...] = ("a photo of {concept}",)
    """Prompt forms with a ``{concept}`` slot the concept, its superclass and earlier concepts are put in."""
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    latent_size: int = 0
    """Latent side the training images are generated and trained at (0 = the pipeline's default)."""
    energy: float = 0.999
    """Share of the change's spectral energy the stored factorisation keeps."""
    seed: int = 0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> DynamicMaskParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known - {"name", "progress"})
        if unknown:
            raise MethodError(f"unknown Dynamic Mask parameter(s) {unknown}; known: {sorted(known)}")
        given = as_declared(typing.get_type_hints(cls), {k: v for k, v in params.items() if k in known})
        values = typed(replace(cls(), **given))
        counts = ("steps", "epochs", "warmup", "update_every", "batch", "images", "num_inference_steps")
        if any(getattr(values, k) < 1 for k in counts) or values.steps < values.epochs:
            raise MethodError(f"{', '.join(counts)} must be >= 1 and steps >= epochs")
        if values.latent_size < 0:
            raise MethodError(f"latent_size must be >= 0 (0: the pipeline's default), got {values.latent_size}")
        if not 0 < values.keep <= 1 or not 0 <= values.turnover < 1 or values.lr <= 0:
            raise MethodError("Dynamic Mask needs 0 < keep <= 1, 0 <= turnover < 1 and lr > 0")
        if min(values.distill_weight, values.super_weight, values.preserve_weight) < 0:
            raise MethodError("distill_weight, super_weight and preserve_weight must be >= 0")
        bad = [t for t in values.templates if t.count("{concept}") != 1] if values.templates else ["(none)"]
        if bad:
            raise MethodError(f"every template needs exactly one {{concept}} slot: {bad}")
        return values


def superclass_of(concept: Concept) -> str:
    """The concept's superclass (a base may supply one: each toy shape gets its own, ``toy.defaults.SUPERCLASSES``)."""
    if concept.superclass:
        return concept.superclass
    raise MethodError(
        f"Dynamic Mask aligns {concept.target!r} with its superclass: name it, e.g. "
        f"Concept({concept.target!r}, superclass='fish') (command line: --superclass fish; recipe: "
        "{target: ..., superclass: fish})"
    )


def fill(template: str, word: str) -> str:
    """``template`` with ``word`` in its ``{concept}`` slot (spaces tidied)."""
    return " ".join(template.replace("{concept}", word).split())


@torch.no_grad()
def generate_latents(pipe: Any, prompts: list[str], settings: DynamicMaskParams, seed: int) -> torch.Tensor:
    """One latent per prompt, generated by the pipeline as it is, in its denoiser's layout (FLUX: packed). Launched,
    each process generates its share of the prompts (every image its own seed, whoever makes it) and all get all."""
    mine = distributed.share(len(prompts))  # launched: this process's part, gathered below
    generators = [torch.Generator().manual_seed(seed * 7919 + i) for i in mine]
    size = {}
    if settings.latent_size:
        side = settings.latent_size * int(getattr(pipe, "vae_scale_factor", 8))
        size = {"height": side, "width": side}
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        out = pipe(
            [prompts[i] for i in mine],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            output_type="latent",
            **size,
        )
    finally:
        pipe._progress_bar_config = saved
    return torch.cat(distributed.gather([out.images.float().cpu()]))


@dataclass(frozen=True)
class ConceptData:
    """Generated latents of one concept and of its superclass; image ``i`` is in template ``i mod T``."""

    concept: torch.Tensor
    superclass: torch.Tensor

    @staticmethod
    def make(pipe: Any, concept: str, superclass: str, settings: DynamicMaskParams, seed: int) -> ConceptData:
        forms = [settings.templates[i % len(settings.templates)] for i in range(settings.images)]
        return ConceptData(
            generate_latents(pipe, [fill(t, concept) for t in forms], settings, seed),
            generate_latents(pipe, [fill(t, superclass) for t in forms], settings, seed + 100),
        )


class GradientMask:
    """Element-wise masks on the trainable weights: after each backward, ``|grad|`` is accumulated and the gradients
    are masked (:meth:`absorb`), and masked-out elements are put back after every optimizer step."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        self.score = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self._before: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def absorb(self) -> None:
        """Add each gradient's ``|grad|`` to the scores, then mask it. Called once the step's gradient is whole (a
        launch sums it over the processes first), so every process scores and masks the same gradient."""
        for name, p in self.params.items():
            if p.grad is not None:
                self.score[name] += p.grad.abs().float()
                p.grad.mul_(self.masks[name])

    def reset_scores(self) -> None:
        for score in self.score.values():
            score.zero_()

    def init_top(self, keep: float) -> None:
        """Keep the top ``keep`` share of each matrix by accumulated ``|grad|``."""
        for name, score in self.score.items():
            k = max(1, int(round(keep * score.numel())))
            top = torch.topk(score.flatten(), k).indices
            mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
            mask[top] = True
            self.masks[name] = mask.view_as(score)

    def turn_over(self, rate: float) -> int:
        """Swap ``rate * active`` elements per matrix (weakest active out, strongest inactive in); returns how many."""
        swapped = 0
        for name, score in self.score.items():
            mask = self.masks[name].flatten()
            active, inactive = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
            n = min(int(rate * active.numel()), inactive.numel())
            if n < 1:
                continue
            flat = score.flatten()
            drop = active[torch.topk(flat[active], n, largest=False).indices]
            add = inactive[torch.topk(flat[inactive], n).indices]
            mask = mask.clone()
            mask[drop], mask[add] = False, True
            self.masks[name] = mask.view_as(score)
            swapped += n
        return swapped

    def before_step(self) -> None:
        self._before = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def after_step(self) -> None:
        for name, p in self.params.items():
            p.copy_(torch.where(self.masks[name], p, self._before[name]))

    def density(self) -> float:
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())


def _timestep(engine: FinetuneEngine, generator: torch.Generator) -> int | float:
    """A training timestep: uniform over the scheduler's ``T`` (UNet), or a step of the pipeline's own sigma grid,
    ``t = 1000 sigma`` (SD3 / FLUX)."""
    if engine.flow is None:
        return int(torch.randint(int(engine.scheduler.config.num_train_timesteps), (1,), generator=generator))
    return engine.timesteps[int(torch.randint(len(engine.timesteps), (1,), generator=generator))]


def _noised(engine: FinetuneEngine, latents: torch.Tensor, t: int | float, generator: torch.Generator):
    """``(x_t, target)``: the latents noised to ``t`` and what the denoiser should predict there: for a UNet what its
    scheduler's ``prediction_type`` names (the noise; the velocity for v-prediction models such as SD 2.1 768; the
    clean latents for ``"sample"``), for SD3 / FLUX the velocity ``noise - x_0`` on the flow line
    ``x_t = (1 - sigma) x_0 + sigma noise``."""
    noise = torch.randn(latents.shape, generator=generator)
    if engine.flow is None:
        steps = torch.full((len(latents),), int(t))
        x_t = engine.scheduler.add_noise(latents, noise, steps)
        target = denoising_target(engine.scheduler, latents, noise, steps)
    else:
        sigma = t / 1000.0
        x_t, target = (1 - sigma) * latents + sigma * noise, noise - latents
    return x_t.to(engine.device, engine.unet.dtype), target.to(engine.device, engine.unet.dtype)


def train_concept(
    engine: FinetuneEngine,
    concept: str,
    superclass: str,
    earlier: list[str],
    data: ConceptData,
    settings: DynamicMaskParams,
    index: int,
    progress: bool,
    adversary: Adversary | None = None,
    preserved: Sequence[str] = (),
) -> dict[str, Any]:
    """One concept of the sequence: warm-up, mask, masked training with the concept-aware loss, distillation and
    (with ``preserved`` words) preservation, best epoch kept. Returns what the manifest records for it.

    With an ``adversary`` (adversarial fine-tuning, :mod:`forgetpatch.methods.adversarial`) the forget term also
    aligns the conditionings its inner prompt search finds for the concept word (the term is the mean over the
    concept's prompts and them); the superclass and distillation terms are unchanged."""
    params = dict(engine.trainable())
    mask = GradientMask(params)
    teacher = engine.snapshot()
    engine.optimizer.state.clear()  # each concept starts Adam afresh, as a chain's steps do (not the last one's moments)
    templates = settings.templates
    kept = [*earlier, superclass]
    guarded = [w for w in preserved if w != superclass] if settings.preserve_weight > 0 else []
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    # Launched, every process draws the whole batch (the same draws) and trains its share of the samples; each
    # term is a mean over the batch, so the share's mean weighted by `part` sums to it over the processes.
    mine = list(distributed.share(settings.batch))
    part = len(mine) / settings.batch

    def cond(word: str, picks: torch.Tensor) -> Cond:
        """``word`` in the template of each picked image."""
        return Cond.cat(*[engine.encode(fill(templates[int(i) % len(templates)], word)) for i in picks])

    def draw(latents: torch.Tensor, t: int | float | None = None):
        """``(x_t, target, t, picks)`` of this process's samples of a batch drawn from ``latents``."""
        picks = torch.randint(len(latents), (settings.batch,), generator=generator)
        if t is None:
            t = _timestep(engine, generator)
        x_t, target = _noised(engine, latents[picks], t, generator)
        return x_t[mine], target[mine], t, picks[mine]

    def backward(loss: torch.Tensor) -> None:
        """The step's whole gradient (summed over the processes when launched), scored and masked."""
        engine.accelerator.backward(loss * part)
        engine.passes.backward += 1
        if distributed.launched():
            engine.reduce_gradients()
        mask.absorb()

    # 1-2. warm-up: accumulate |grad| of the plain denoising loss, no update; then the top-`keep` mask
    for _ in range(settings.warmup):
        x_t, target, t, picks = draw(data.concept)
        engine.optimizer.zero_grad(set_to_none=True)  # the scores see this loss's gradient only
        backward(F.mse_loss(engine.student(x_t, t, cond(concept, picks)).float(), target.float()))
    mask.init_top(settings.keep)
    mask.reset_scores()
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        engine.optimizer, max_lr=settings.lr, total_steps=settings.steps, anneal_strategy="cos"
    )
    per_epoch = settings.steps // settings.epochs
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    epoch_losses: list[float] = []
    swaps: list[int] = []
    forget_sum, forget_n, distill_first, distill_last = 0.0, 0, None, None
    preserve_first, preserve_last = None, None
    shown = progress and distributed.is_main()  # launched: one bar, process 0's
    bar = tqdm(range(settings.steps), desc=f"dynamic mask: {concept}", disable=not shown, leave=False)
    for step in bar:
        epoch = min(step // per_epoch, settings.epochs - 1)
        x_c, _, t, picks_c = draw(data.concept)
        x_s, target_s, _, picks_s = draw(data.superclass, t)  # the same t for both terms
        aligned = engine.current(x_c, t, cond(superclass, picks_c))  # sg[eps*(x_t^c, t, s)]: no gradient
        engine.passes.student_forward += 1
        found = adversary.conds(engine, index * settings.steps + step, concept) if adversary is not None else []
        if found:
            expanded = [Cond.cat(*[f] * len(x_c)) for f in found]
            both = engine.student(torch.cat([x_c] * (1 + len(found))), t, Cond.cat(cond(concept, picks_c), *expanded))
            forget = sum(F.mse_loss(s.float(), aligned.float()) for s in both.chunk(1 + len(found))) / (1 + len(found))
        else:
            forget = F.mse_loss(engine.student(x_c, t, cond(concept, picks_c)).float(), aligned.float())
        denoise = F.mse_loss(engine.student(x_s, t, cond(superclass, picks_s)).float(), target_s.float())
        loss = forget + settings.super_weight * denoise
        if settings.distill_weight > 0:  # every kept word on every superclass latent, in its template
            x_k = torch.cat([x_s] * len(kept))
            c_k = Cond.cat(*[cond(word, picks_s) for word in kept])
            wanted = engine.with_weights(teacher, x_k, t, c_k)
            distill = F.mse_loss(engine.student(x_k, t, c_k).float(), wanted.float())
            loss = loss + settings.distill_weight * distill
            distill_last = part * float(distill.detach())
            distill_first = distill_last if distill_first is None else distill_first
        if guarded:  # one preserved word a step, on the concept's x_t, held to the teacher
            c_q = cond(guarded[step % len(guarded)], picks_c)
            wanted = engine.with_weights(teacher, x_c, t, c_q)
            preservation = F.mse_loss(engine.student(x_c, t, c_q).float(), wanted.float())
            loss = loss + settings.preserve_weight * preservation
            preserve_last = part * float(preservation.detach())
            preserve_first = preserve_last if preserve_first is None else preserve_first
        engine.optimizer.zero_grad(set_to_none=True)
        backward(loss)
        mask.before_step()
        engine.optimizer.step()
        mask.after_step()
        schedule.step()
        forget_sum, forget_n = forget_sum + part * float(forget.detach()), forget_n + 1
        bar.set_postfix(forget=f"{float(forget.detach()):.4g}", refresh=False)
        if (step + 1) % settings.update_every == 0 and step + 1 < settings.update_until * settings.steps:
            rate = settings.turnover * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
            swaps.append(mask.turn_over(rate))
            mask.reset_scores()
        if step + 1 == settings.steps or ((step + 1) % per_epoch == 0 and (step + 1) // per_epoch < settings.epochs):
            # an epoch ends (the last one takes the steps epochs do not divide evenly)
            mean = distributed.sum_values({"forget": forget_sum})["forget"] / max(1, forget_n)
            epoch_losses.append(round(mean, 6))
            if best is None or mean < best[0]:
                best = (mean, len(epoch_losses) - 1, engine.snapshot())
            forget_sum, forget_n = 0.0, 0
    assert best is not None
    engine.restore(best[2])
    losses = {"distill_loss_first": distill_first, "distill_loss_last": distill_last,
              "preserve_loss_first": preserve_first, "preserve_loss_last": preserve_last}  # fmt: skip
    losses |= distributed.sum_values({k: v for k, v in losses.items() if v is not None})  # the batch's, launched
    return {
        "superclass": superclass,
        "distilled_on": kept,
        "forget_loss_by_epoch": epoch_losses,
        "best_epoch": best[1],
        "mask_density": round(mask.density(), 4),
        "turned_over": swaps,
        "distill_loss_first": losses["distill_loss_first"],
        "distill_loss_last": losses["distill_loss_last"],
        "preserved_on": guarded,
        "preserve_loss_first": losses["preserve_loss_first"],
        "preserve_loss_last": losses["preserve_loss_last"],
    }


@register
class DynamicMask:
    """Dynamic Mask + Concept-Aware Loss: masked full-weight fine-tuning of cross-attention, one concept after
    another, with a distillation term that keeps earlier concepts forgotten."""

    name: ClassVar[str] = "dynamic_mask"
    version: ClassVar[str] = "1"
    closed_form: ClassVar[bool] = False
    denoisers: ClassVar[frozenset[str]] = frozenset({"unet", "transformer"})
    """A UNet's cross-attention, or an SD3 / FLUX transformer's joint attention (``flow.JOINT_ATTENTION_REGEX``)."""
    key_steps: ClassVar[bool] = False
    params: ClassVar[tuple[type, ...]] = (DynamicMaskParams, AdversarialParam)

    @classmethod
    def compute_deltas(
        cls, pipe: Any, concepts: list[Concept], *, preserve: list[Concept] = (), **params: Any
    ) -> dict[str, torch.Tensor]:
        """The full (masked, not factorised) weight changes ``{path: W' - W}``, for tests and analysis."""
        settings = DynamicMaskParams.from_dict(params)
        deltas, _, _ = cls._train(pipe, concepts, list(preserve), settings, params.get("progress", True), raw=True)
        return deltas

    @staticmethod
    def _train(pipe, concepts, preserve, settings, progress, raw=False, adversarial=None):
        """Train the sequence; ``(factors, errors, records)``, or ``(deltas, {}, records)`` with ``raw``."""
        check_concepts(concepts, preserve)
        supers = [superclass_of(c) for c in concepts]
        world = distributed.world_size()
        if min(settings.batch, settings.images) < world:
            raise MethodError(
                f"launched on {world} processes, Dynamic Mask splits each step's batch and the generated images "
                f"between them: set batch and images to at least {world} (batch={settings.batch}, "
                f"images={settings.images})"
            )
        check_trainable(pipe)  # before the training images are generated
        earlier = [c.target for c in erased_on(pipe)]  # the distillation keeps them forgotten
        adversary = adversary_for(adversarial, pipe, [c.target for c in concepts])  # checked before the images
        data = [
            ConceptData.make(pipe, c.target, s, settings, settings.seed + 1000 * i)
            for i, (c, s) in enumerate(zip(concepts, supers, strict=True))
        ]
        config = make_config(scope="xattn", mode="full", lr=settings.lr, iterations=settings.steps,
                             energy=settings.energy, seed=settings.seed, progress=progress,
                             latent_size=settings.latent_size or None)
        records: dict[str, Any] = {}
        preserved = [p.target for p in preserve]
        with FinetuneEngine(pipe, config) as engine:
            # the training images above: one UNet call (guidance batched) per sampling step, concept and superclass
            engine.passes.sample_forward += 2 * settings.num_inference_steps * len(concepts)
            engine.model.train()
            for i, (concept, superclass) in enumerate(zip(concepts, supers, strict=True)):
                records[concept.target] = train_concept(
                    engine, concept.target, superclass, earlier, data[i], settings, i, progress, adversary, preserved
                )
                earlier = [*earlier, concept.target]
            engine.model.eval()
            if raw:
                factors, errors = engine.changes(), {}
            else:
                factors, errors = engine.factors()
            records["unet_passes"] = engine.passes.as_dict()
        if adversary is not None:
            records["adversarial"] = adversary.record
        return factors, errors, records

    def erase(self, pipe: Any, concepts: list[Concept], *, preserve: list[Concept], **params: Any):
        """Erase ``concepts`` in order and return the change as a Patch (the pipeline is left unchanged).

        Params: any :class:`DynamicMaskParams` field (``steps`` per concept, ``lr``, ``distill_weight``...), plus
        ``name``, ``progress`` and ``adversarial`` (adversarial fine-tuning,
        :class:`~forgetpatch.methods.adversarial.Adversarial`; off by default). ``preserve`` is held by the
        preservation term (``preserve_weight``; not in the paper). On a pipeline carrying fused patches the teacher
        is that patched model and the distillation also keeps their concepts forgotten (and, unless
        ``forgetpatch.erase(..., hold=False)``, so does the preservation term); the patch's lineage names them.
        """
        from forgetpatch.format import MethodInfo, build_patch

        params = dict(params)
        adversarial = params.pop("adversarial", None)
        settings = DynamicMaskParams.from_dict(params)
        started = time.perf_counter()
        factors, errors, records = self._train(
            pipe, concepts, preserve, settings, params.get("progress", True), adversarial=adversarial
        )
        records["wall_time_s"] = round(time.perf_counter() - started, 2)
        return build_patch(
            pipe,
            factors,
            name=params.get("name") or patch_name(self.name, concepts),
            method=MethodInfo(name=self.name, version=self.version),
            concepts=concepts,
            preserved=preserve,
            params={**asdict(settings), **({"adversarial": records["adversarial"]["settings"]}
                                            if "adversarial" in records else {})},
            reconstruction_errors=errors,
            metrics={"dynamic_mask": records},
        )
