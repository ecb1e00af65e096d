"""KSCU, Key Step Concept Unlearning: ESD fine-tuning restricted to the denoising steps that matter.

Only the *key steps* of the sampler decide whether a concept appears, so KSCU trains on those
alone: sampling-step indices ``[S, E-1]`` of a DDIM trajectory with ``E = 50`` steps, starting at a
per-task ``S`` that creeps up by one after every 8 full passes (capped at ``S < 0.9 E``). The loss is
ESD's plus a small *leakage* term on the unconditional branch:

    target_cond   = eps(x_t, "") - g * (eps(x_t, c) - eps(x_t, ""))                  g = 1
    target_uncond = eps(x_t, "") - lam1(t) * (eps(x_t, c) - eps(x_t, ""))            lam1(t) = (1000 - t) * 2e-5
    L = || eps*(x_t, c~) - target_cond ||^2 + lam2 * || eps*(x_t, "") - target_uncond ||^2   lam2 = 1e-4

where ``c~`` is the concept embedding, replaced in the last 5% of iterations by a random paraphrase
plus Gaussian noise of scale 1e-5. The patch records the trained range in ``manifest.key_steps`` so
``forgetpatch.apply(pipe, patch, key_steps=True)`` can switch it on only there.

On SD3 / FLUX (flow matching, :mod:`forgetpatch.methods.flow`) the trajectory is the pipeline's own Euler sigma grid
(its shift) with ``E`` steps and the same step-index table; the loss is the same on velocities, with
``lam1 = (1000 - t) * 2e-5 = 0.02 (1 - sigma)``. The recorded range uses ``t = 1000 sigma`` and the fraction
``1 - sigma`` (``scheduler="FlowMatchEulerDiscreteScheduler"``); ``metrics["key_steps"]`` names that convention
and lists the grid's sigmas and the trained ones.

Example:
    >>> patch = forgetpatch.erase(pipe, "circle", method="kscu")                    # object preset
    >>> patch = forgetpatch.erase(pipe, Concept("Van Gogh", kind="style"), method="kscu")
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from forgetpatch.errors import MethodError
from forgetpatch.format import KeyStepRange
from forgetpatch.methods import flow
from forgetpatch.methods.adversarial import Adversarial, Adversary, adversary_for
from forgetpatch.methods.base import Concept, ConceptKind, check_concepts, register
from forgetpatch.methods.finetune import (
    Cond,
    FinetuneConfig,
    FinetuneEngine,
    Scope,
    ddim_timesteps,
    key_step_fraction,
    make_config,
    split_params,
    train_patch,
)

#: Steps of the reference trajectory the start steps are given in (E).
REFERENCE_STEPS = 50


@dataclass(frozen=True)
class Preset:
    """KSCU's settings for one task kind (SD 1.4 in the paper; start step out of 50)."""

    iterations: int
    start: int
    scope: Scope
    iterations_several: int | None = None
    """Iterations when erasing several concepts at once, if different."""


PRESETS: dict[str, Preset] = {
    "nudity": Preset(750, 14, "noxattn"),
    "object": Preset(750, 14, "noxattn"),
    "style": Preset(500, 24, "xattn"),
    "identity": Preset(200, 40, "xattn", iterations_several=750),
    "other": Preset(750, 14, "noxattn"),
}


class Entry(NamedTuple):
    """One training iteration of the key-step table."""

    concept: int
    step: int
    start: int


@dataclass(frozen=True)
class KeyStepTable:
    """Which (concept, sampling step) each iteration trains on.

    Passes go through the concepts in turn, each over steps ``start .. num_steps - 1`` in order (so
    consecutive entries continue one trajectory); after every ``creep_every`` full passes the start
    grows by one, never reaching ``cap * num_steps``.

    Example:
        >>> table = KeyStepTable(num_steps=50, start=14, n_concepts=1)
        >>> table.entries(40)[35:37]
        [Entry(concept=0, step=49, start=14), Entry(concept=0, step=14, start=14)]
    """

    num_steps: int = REFERENCE_STEPS
    start: int = 14
    n_concepts: int = 1
    creep_every: int = 8
    cap: float = 0.9

    def __post_init__(self) -> None:
        if self.n_concepts < 1:
            raise MethodError("the key-step table needs at least one concept")
        if not 0 <= self.start <= self.max_start:
            raise MethodError(
                f"key-step start {self.start} must lie in [0, {self.max_start}] "
                f"(below {self.cap} x {self.num_steps} steps)"
            )

    @property
    def max_start(self) -> int:
        """The largest start allowed: ``S < cap * E``."""
        return math.ceil(self.cap * self.num_steps) - 1

    def entries(self, iterations: int) -> list[Entry]:
        out: list[Entry] = []
        start, passes = self.start, 0
        while len(out) < iterations:
            for concept in range(self.n_concepts):
                out.extend(Entry(concept, k, start) for k in range(start, self.num_steps))
            passes += 1
            if passes % self.creep_every == 0:
                start = min(start + 1, self.max_start)
        return out[:iterations]


def scaled_start(start_of_50: int, num_steps: int) -> int:
    """A preset start step (given out of 50) on a trajectory of ``num_steps`` steps."""
    return round(start_of_50 * num_steps / REFERENCE_STEPS)


def leakage_weight(t: int, num_train_timesteps: int = 1000) -> float:
    """``lam1(t) = (T - t) * 2e-5``: the leakage term pulls harder at late (low-noise) steps."""
    return (num_train_timesteps - t) * 2e-5


_TEMPLATES = (
    "a photo of {}",
    "an image of {}",
    "a picture of a {}",
    "a painting of {}",
    "{} on a background",
    "the {}",
)


def paraphrase(target: str, rng: random.Random) -> str:
    """A random rewording of the concept prompt ``target`` (templated, shuffled, a dropped word, noise chars).

    Example:
        >>> paraphrase("circle", random.Random(0))
        'iq a painting of circle'
    """
    base = rng.choice(_TEMPLATES).format(target)
    how = rng.randrange(4)
    words = base.split()
    concept_words = set(target.lower().split())
    if how == 1:
        rng.shuffle(words)
        return " ".join(words)
    if how == 2:
        droppable = [i for i, w in enumerate(words) if w.lower() not in concept_words]
        if droppable:
            del words[rng.choice(droppable)]
        return " ".join(words)
    if how == 3:
        junk = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 5)))
        return f"{junk} {base}" if rng.random() < 0.5 else f"{base} {junk}"
    return base


class KSCUObjective:
    """The KSCU loss over a :class:`KeyStepTable`.

    Args:
        concepts: concepts to erase (a ``guide`` replaces the empty anchor prompt of the conditional
            target; the leakage target always uses the empty prompt, as it constrains that branch).
        table: the key-step table; ``iterations`` entries are drawn from it.
        iterations: total iterations (the last ``augment_fraction`` of them are augmented).
        g, lam2: guidance strength of the conditional target and weight of the leakage term.
        augment_fraction, noise_scale: paraphrase window and embedding-noise scale.
        preserve, preserve_weight: not part of KSCU (methods.md has no preservation term): when concepts
            to preserve are given, each iteration also pulls the student's prediction for one of them
            (in turn) on the same ``x_t`` towards the frozen teacher's, weighted ``preserve_weight``.
            Without ``preserve`` the loss is exactly the paper's.
        adversary: adversarial fine-tuning (:mod:`forgetpatch.methods.adversarial`): the conditional target also
            applies to the conditionings its inner prompt search finds (that term is the mean over ``c~`` and
            them); the leakage and preservation terms are unchanged. ``None``: no adversarial term.
    """

    def __init__(
        self,
        concepts: list[Concept],
        table: KeyStepTable,
        iterations: int,
        *,
        g: float = 1.0,
        lam2: float = 1e-4,
        augment_fraction: float = 0.05,
        noise_scale: float = 1e-5,
        seed: int = 0,
        preserve: list[Concept] | None = None,
        preserve_weight: float = 1.0,
        adversary: Adversary | None = None,
    ) -> None:
        self.concepts, self.table, self.g, self.lam2 = concepts, table, g, lam2
        self.adversary = adversary
        self.preserve, self.preserve_weight = list(preserve or []), preserve_weight
        self.entries = table.entries(iterations)
        self.augment_from = iterations - math.ceil(augment_fraction * iterations)
        self.noise_scale, self.seed = noise_scale, seed
        self.last_prompt: str | None = None

    def augmented(self, iteration: int) -> bool:
        return iteration >= self.augment_from

    def prompt_for(self, iteration: int) -> str:
        """The prompt whose embedding is ``c~`` at ``iteration`` (a paraphrase in the last 5%)."""
        target = self.concepts[self.entries[iteration].concept].target
        if not self.augmented(iteration):
            return target
        return paraphrase(target, random.Random(self.seed * 100_003 + iteration))

    def __call__(self, engine: FinetuneEngine, iteration: int) -> torch.Tensor:
        entry = self.entries[iteration]
        concept = self.concepts[entry.concept]
        generator = engine.generator(iteration)
        c, empty = engine.encode(concept.target), engine.encode("")
        x, t = engine.sample_xt(entry.concept, c, empty, entry.step, generator=generator, reuse=True)
        # One batched teacher pass: eps(x, ""), eps(x, c), with a guide eps(x, guide) as the anchor, and
        # with concepts to preserve eps(x, p) for one of them.
        kept = (
            self.preserve[iteration % len(self.preserve)] if self.preserve and self.preserve_weight else None
        )
        kept_cond = [engine.encode(kept.target)] if kept is not None else []
        extra = ([engine.encode(concept.guide)] if concept.guide else []) + kept_cond
        conds = [empty, c, *extra]
        outs = engine.teacher(torch.cat([x] * len(conds)), t, Cond.cat(*conds)).float().chunk(len(conds))
        e_empty, e_concept = outs[0], outs[1]
        e_anchor = outs[2] if concept.guide else e_empty
        target_cond = e_anchor - self.g * (e_concept - e_anchor)
        T = engine.scheduler.config.num_train_timesteps
        target_uncond = e_empty - leakage_weight(t, T) * (e_concept - e_empty)
        self.last_prompt = self.prompt_for(iteration)
        c_tilde = c
        if self.augmented(iteration):
            c_tilde = engine.encode(self.last_prompt).with_noise(self.noise_scale, generator)
        found = self.adversary.conds(engine, iteration, concept.target) if self.adversary is not None else []
        m = len(found)
        student_conds = [c_tilde, *found, empty, *kept_cond]
        n = len(student_conds)
        s_out = engine.student(torch.cat([x] * n), t, Cond.cat(*student_conds)).chunk(n)
        erase = F.mse_loss(s_out[0].float(), target_cond)
        if found:
            erase = (erase + sum(F.mse_loss(s.float(), target_cond) for s in s_out[1 : 1 + m])) / (1 + m)
        loss = erase + self.lam2 * F.mse_loss(s_out[1 + m].float(), target_uncond)
        if kept_cond:
            loss = loss + self.preserve_weight * F.mse_loss(s_out[2 + m].float(), outs[-1])
        return loss


def rise_steps(
    switch_steps: Sequence[int], presence: Sequence[float], low: float = 0.1, high: float = 0.9
) -> tuple[int | None, int | None]:
    """First switch steps where a key-step curve's presence reaches ``low`` and ``high`` of its maximum."""
    top = max(presence) if presence else 0.0
    if top <= 0:
        return None, None

    def first(level: float) -> int | None:
        return next((k for k, p in zip(switch_steps, presence, strict=True) if p >= level * top), None)

    return first(low), first(high)


def preset_check(analysis: Mapping[str, Any], start_step: int, num_steps: int = REFERENCE_STEPS) -> dict[str, Any]:
    """Where a start step (out of ``num_steps``) sits on a measured key-step curve, given as data: ``analysis``
    has ``presence``, ``switch_steps`` and ``num_inference_steps`` (what
    ``forgetpatch.eval.keysteps.analyze(...).to_dict()`` writes).

    Returns the curve's rise steps as fractions, the start's fraction, and the presence measured when switching
    at the start (how much of the concept is already decided before it).
    """
    switch, presence = list(analysis["switch_steps"]), list(analysis["presence"])
    e = int(analysis["num_inference_steps"])
    low, high = rise_steps(switch, presence)
    frac = start_step / num_steps
    k = round(frac * e)
    nearest = min(switch, key=lambda s: abs(s - k)) if switch else None
    return {
        "preset_start_fraction": frac,
        "rise_10_fraction": None if low is None else low / e,
        "rise_90_fraction": None if high is None else high / e,
        "presence_switching_at_preset_start": presence[switch.index(nearest)] if nearest is not None else None,
        "max_presence": max(presence) if presence else None,
    }


#: How much wider than its trained timesteps a recorded range is, in trajectory fraction: the loader computes a call's
#: fraction from the timestep in its own precision (float32 on a GPU), which can differ from this one's in the 7th digit.
_GATE_SLACK = 1e-7


def key_step_range(
    table: KeyStepTable,
    iterations: int,
    timesteps: list[int],
    scheduler: str,
    num_train_timesteps: int = 1000,
) -> KeyStepRange:
    """The manifest record of the trajectory range a table trains (fractions + timesteps): from its noisiest trained
    step to the end of sampling, or to its least noisy trained step when training stopped before the trajectory's
    last step (fewer iterations than steps from the start)."""
    steps = {e.step for e in table.entries(iterations)}
    trained = sorted({round(timesteps[s]) for s in steps}, reverse=True)
    # from the timesteps as the loader sees them (a flow scheduler's are fractional), a hair wider for float error
    first, last = float(timesteps[min(steps)]), float(timesteps[max(steps)])
    return KeyStepRange(
        start=max(0.0, key_step_fraction(first, num_train_timesteps) - _GATE_SLACK),
        end=1.0 if max(steps) == len(timesteps) - 1 else key_step_fraction(last, num_train_timesteps) + _GATE_SLACK,
        timesteps=trained,
        scheduler=scheduler,
        num_inference_steps=len(timesteps),
        num_train_timesteps=num_train_timesteps,
    )


def resolve_preset(
    concepts: list[Concept],
    *,
    task: str | None = None,
    iterations: int | None = None,
    start_step: int | None = None,
    scope: Scope | None = None,
    num_inference_steps: int = REFERENCE_STEPS,
) -> tuple[str, int, int, Scope]:
    """``(task, iterations, start step, scope)`` for ``concepts``: the preset of their kind, with overrides.

    Example:
        >>> resolve_preset([Concept("Van Gogh", kind="style")])
        ('style', 500, 24, 'xattn')
        >>> resolve_preset([Concept("circle")], num_inference_steps=25)
        ('object', 750, 7, 'noxattn')
    """
    if task is None:
        kinds = {c.kind for c in concepts}
        if len(kinds) > 1:
            raise MethodError(f"concepts of several kinds {sorted(kinds)}; pass task= to pick a preset")
        task = kinds.pop()
    if task not in PRESETS:
        raise MethodError(f"unknown KSCU task {task!r}; presets: {sorted(PRESETS)}")
    preset = PRESETS[task]
    if iterations is None:
        several = len(concepts) > 1 and preset.iterations_several is not None
        iterations = preset.iterations_several if several else preset.iterations
    start = start_step if start_step is not None else scaled_start(preset.start, num_inference_steps)
    return task, int(iterations), start, scope or preset.scope  # type: ignore[return-value]


def _load_analysis(analysis: Any) -> dict[str, Any] | None:
    if analysis is None or isinstance(analysis, dict):
        return analysis
    path = Path(analysis)
    if path.is_dir():
        path = path / "keysteps.json"
    if not path.exists():
        raise MethodError(f"key-step analysis {path} not found; run `forgetpatch keysteps` first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class KSCUParams:
    """KSCU's own settings (the paper's, by task preset); the fine-tuning engine's (:class:`FinetuneConfig`) are
    passed beside them.

    Args:
        task: preset to use (``"nudity"``, ``"object"``, ``"style"``, ``"identity"``); default: the concepts' kind.
        iterations, start_step, scope: override the preset (``start_step`` is out of ``num_inference_steps``;
            preset starts are given out of 50 and scaled; ``scope``: ``"xattn"``, ``"noxattn"`` or ``"all"``, both).
        lr: Adam learning rate (paper: 1e-5).
        num_inference_steps: E, the steps of the trajectory (paper: 50).
        g, lam2: loss weights (paper: 1.0, 1e-4).
        creep_every: full passes over the table before the start step creeps up by one (paper: 8).
        preserve_weight: weight of the optional preservation term, used only when ``preserve`` is given (not in
            the paper; see :class:`KSCUObjective`).
        key_step_analysis: a key-step analysis as data (``forgetpatch.eval.keysteps.analyze(...).to_dict()``, a
            JSON file or its folder), stored in the patch's metrics next to the preset it checks
            (:func:`preset_check`).
        adversarial: adversarial fine-tuning (:class:`~forgetpatch.methods.adversarial.Adversarial`, or its
            ``every`` as an int, or a dict of its fields); off by default.
    """

    task: ConceptKind | None = None
    iterations: int | None = None
    start_step: int | None = None
    scope: Scope | None = None
    lr: float = 1e-5
    num_inference_steps: int = REFERENCE_STEPS
    g: float = 1.0
    lam2: float = 1e-4
    creep_every: int = 8
    preserve_weight: float = 1.0
    key_step_analysis: Any = None
    adversarial: Adversarial | int | dict[str, Any] | None = None


@register
class KSCU:
    """Key Step Concept Unlearning as a forgetpatch method (name ``"kscu"``)."""

    name: ClassVar[str] = "kscu"
    version: ClassVar[str] = "1"
    closed_form: ClassVar[bool] = False
    denoisers: ClassVar[frozenset[str]] = frozenset({"unet", "transformer"})
    """A UNet, or an SD3 / FLUX transformer with flow matching."""
    key_steps: ClassVar[bool] = True
    """The patch records its trained range in ``manifest.key_steps``; ``apply(..., key_steps=True)`` gates to it."""
    params: ClassVar[tuple[type, ...]] = (KSCUParams, FinetuneConfig)

    def erase(self, pipe: Any, concepts: list[Concept], *, preserve: list[Concept], name: str | None = None,
              **params: Any):
        """Erase ``concepts`` with KSCU; returns a Patch whose manifest records the key-step range.

        ``params``: :class:`KSCUParams` fields and :class:`~forgetpatch.methods.finetune.FinetuneConfig` fields
        (``mode``, ``rank``, ``seed``, ``latent_size``, ``checkpoint_dir``, ``guidance_scale``, ...).
        """
        check_concepts(concepts, preserve)
        settings, engine = split_params(KSCUParams, params, "KSCU")
        task, iterations, start, scope = resolve_preset(
            concepts,
            task=settings.task,
            iterations=settings.iterations,
            start_step=settings.start_step,
            scope=settings.scope,
            num_inference_steps=settings.num_inference_steps,
        )
        table = KeyStepTable(
            num_steps=settings.num_inference_steps,
            start=start,
            n_concepts=len(concepts),
            creep_every=settings.creep_every,
        )
        config = make_config(
            scope=scope,
            iterations=iterations,
            lr=settings.lr,
            num_inference_steps=settings.num_inference_steps,
            **engine,
        )
        objective = KSCUObjective(
            concepts,
            table,
            iterations,
            g=settings.g,
            lam2=settings.lam2,
            seed=config.seed,
            preserve=preserve,
            preserve_weight=settings.preserve_weight,
            adversary=(adversary := adversary_for(settings.adversarial, pipe, [c.target for c in concepts])),
        )
        T = int(pipe.scheduler.config.num_train_timesteps)
        trajectory = None
        if flow.family(pipe) is None:
            timesteps: list[Any] = ddim_timesteps(pipe, settings.num_inference_steps)
            ranges = [key_step_range(table, iterations, timesteps, "DDIMScheduler", T)]
        else:  # flow matching: t = 1000 sigma on the pipeline's Euler grid; the fraction is 1 - sigma
            side = config.latent_size or flow.default_latent_size(pipe)
            trajectory = flow.schedule(pipe, settings.num_inference_steps, side)
            ranges = [key_step_range(table, iterations, trajectory.timesteps, "FlowMatchEulerDiscreteScheduler", T)]
        metrics: dict[str, Any] = {
            "key_steps": {
                "task": task,
                "start_step": start,
                "final_start_step": objective.entries[-1].start,
                "num_inference_steps": settings.num_inference_steps,
            }
        }
        if trajectory is not None:
            trained = sorted({e.step for e in table.entries(iterations)})
            metrics["key_steps"].update(
                convention=flow.KEY_STEP_CONVENTION,
                sigmas=[round(s, 6) for s in trajectory.sigmas[:-1]],
                trained_sigmas=[round(trajectory.sigmas[k], 6) for k in trained],
                shift_mu=trajectory.mu,
            )
        if adversary is not None:
            metrics["adversarial"] = adversary.record
        analysis = _load_analysis(settings.key_step_analysis)
        if analysis is not None:
            metrics["key_step_analysis"] = analysis
            if {"presence", "switch_steps", "num_inference_steps"} <= set(analysis):
                metrics["key_step_check"] = preset_check(analysis, start, settings.num_inference_steps)
        return train_patch(
            pipe,
            config,
            objective,
            method=self.name,
            version=self.version,
            concepts=concepts,
            preserve=preserve,
            params={
                "task": task,
                "start_step": start,
                "g": settings.g,
                "lam2": settings.lam2,
                "creep_every": settings.creep_every,
                "preserve_weight": settings.preserve_weight if preserve else 0.0,
                **({} if adversary is None else {"adversarial": adversary.settings.to_dict()}),
            },
            key_steps=ranges,
            metrics=metrics,
            name=name,
        )
