"""ESD, Erased Stable Diffusion (Gandikota et al. 2023): the fine-tuning baseline.

The edited model is trained so that, for the concept prompt ``c``, it predicts the base model's
noise *guided away* from the concept:

    target = eps(x_t, "") - eta * (eps(x_t, c) - eps(x_t, ""))
    loss   = || eps*(x_t, c) - target ||^2

``x_t`` comes from sampling with the model being edited under the concept prompt (DDIM, 50 steps,
guidance 3) from fresh noise down to a random step. **ESD-x** trains the cross-attention linears
(styles, identities), **ESD-u** every Linear/Conv2d outside cross-attention (objects, nudity).

Example:
    >>> patch = forgetpatch.erase(pipe, "circle", method="esd", iterations=200, lr=1e-4)
    >>> patch = forgetpatch.erase(pipe, Concept("Van Gogh", kind="style"), method="esd")  # ESD-x
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from forgetpatch.errors import MethodError
from forgetpatch.methods.adversarial import Adversarial, Adversary, adversary_for
from forgetpatch.methods.base import Concept, check_concepts, register
from forgetpatch.methods.finetune import (
    Cond,
    FinetuneConfig,
    FinetuneEngine,
    Scope,
    make_config,
    split_params,
    train_patch,
)

#: ESD-x for what lives in cross-attention (styles, identities), ESD-u otherwise.
DEFAULT_SCOPE: dict[str, Scope] = {
    "style": "xattn",
    "identity": "xattn",
    "object": "noxattn",
    "nudity": "noxattn",
    "other": "noxattn",
}
_VARIANTS: dict[str, Scope] = {"x": "xattn", "u": "noxattn", "xattn": "xattn", "noxattn": "noxattn"}


class ESDObjective:
    """The ESD loss at a uniformly random sampling step, cycling through the concepts.

    Args:
        concepts: the concepts to erase; a concept's ``guide`` replaces the empty anchor prompt.
        eta: negative-guidance strength (1.0 in the paper).
        adversary: adversarial fine-tuning (:mod:`forgetpatch.methods.adversarial`): the erase target also
            applies to the conditionings its inner prompt search finds (the loss is the mean over ``c`` and
            them), and with ``preserve`` a retention term pulls the student towards the teacher on one preserved
            concept in turn. ``None``: exactly the paper's loss.
    """

    def __init__(
        self,
        concepts: list[Concept],
        eta: float = 1.0,
        adversary: Adversary | None = None,
        preserve: list[Concept] | None = None,
    ) -> None:
        self.concepts, self.eta, self.adversary = concepts, eta, adversary
        self.preserve = list(preserve or [])

    def __call__(self, engine: FinetuneEngine, iteration: int) -> torch.Tensor:
        concept = self.concepts[iteration % len(self.concepts)]
        generator = engine.generator(iteration)
        steps = len(engine.timesteps)
        step = int(torch.randint(0, steps, (1,), generator=generator))
        c, empty = engine.encode(concept.target), engine.encode("")
        anchor = engine.encode(concept.guide or "")
        # Fresh noise every iteration, as the paper samples (no trajectory reuse).
        x, t = engine.sample_xt(concept.target, c, empty, step, generator=generator, reuse=False)
        if self.adversary is not None:
            return self._adversarial(engine, iteration, concept, x, t, anchor, c)
        e_anchor, e_concept = engine.teacher(torch.cat([x, x]), t, Cond.cat(anchor, c)).chunk(2)
        target = e_anchor - self.eta * (e_concept - e_anchor)
        return F.mse_loss(engine.student(x, t, c).float(), target.float())

    def _adversarial(
        self, engine: FinetuneEngine, iteration: int, concept: Concept, x: torch.Tensor, t: int, anchor: Cond, c: Cond
    ) -> torch.Tensor:
        assert self.adversary is not None
        found = self.adversary.conds(engine, iteration, concept.target)
        weight = self.adversary.settings.retain_weight
        kept = [engine.encode(self.preserve[iteration % len(self.preserve)].target)] if self.preserve and weight else []
        teacher_conds = [anchor, c, *kept]
        outs = engine.teacher(torch.cat([x] * len(teacher_conds)), t, Cond.cat(*teacher_conds)).float()
        e_anchor, e_concept, *e_kept = outs.chunk(len(teacher_conds))
        target = e_anchor - self.eta * (e_concept - e_anchor)
        student_conds = [c, *found, *kept]
        n = len(student_conds)
        s_out = engine.student(torch.cat([x] * n), t, Cond.cat(*student_conds)).float().chunk(n)
        erased = s_out[: 1 + len(found)]
        loss = sum(F.mse_loss(s, target) for s in erased) / len(erased)
        if kept:
            loss = loss + weight * F.mse_loss(s_out[-1], e_kept[0])
        return loss


@dataclass(frozen=True)
class ESDParams:
    """ESD's own settings (the paper's defaults); the fine-tuning engine's (:class:`FinetuneConfig`: ``mode``,
    ``rank``, ``seed``, ``num_inference_steps``, ``latent_size``, ``checkpoint_dir``, ...) are passed beside them.

    Args:
        variant: ``"x"`` (cross-attention) or ``"u"`` (everything else); ``None``: by concept kind, styles and
            identities ``"x"``, the rest ``"u"``.
        eta: negative-guidance strength.
        iterations, lr: training length and Adam learning rate (paper: 1000, 1e-5).
        adversarial: adversarial fine-tuning (:class:`~forgetpatch.methods.adversarial.Adversarial`, or its
            ``every`` as an int, or a dict of its fields); off by default.
    """

    variant: str | None = None
    eta: float = 1.0
    iterations: int = 1000
    lr: float = 1e-5
    adversarial: Adversarial | int | dict[str, Any] | None = None

    def scope(self, concepts: list[Concept]) -> Scope:
        """The trained layers: the variant's, else the one the concepts' kinds want."""
        if self.variant is None:
            kinds = {DEFAULT_SCOPE[c.kind] for c in concepts}
            if len(kinds) > 1:
                raise MethodError(
                    "these concepts want different ESD variants (styles/identities 'x', objects 'u'); "
                    "pass variant='x' or variant='u'"
                )
            return kinds.pop()
        if self.variant in _VARIANTS:
            return _VARIANTS[self.variant]
        raise MethodError(f"unknown ESD variant {self.variant!r}; use 'x' (ESD-x) or 'u' (ESD-u)")


@register
class ESD:
    """ESD-x / ESD-u as a forgetpatch method (name ``"esd"``)."""

    name: ClassVar[str] = "esd"
    version: ClassVar[str] = "1"
    closed_form: ClassVar[bool] = False
    denoisers: ClassVar[frozenset[str]] = frozenset({"unet", "transformer"})
    """A UNet, or an SD3 / FLUX transformer with flow matching."""
    key_steps: ClassVar[bool] = False
    params: ClassVar[tuple[type, ...]] = (ESDParams, FinetuneConfig)

    def erase(self, pipe: Any, concepts: list[Concept], *, preserve: list[Concept], name: str | None = None,
              **params: Any):
        """Erase ``concepts`` by ESD fine-tuning; returns a Patch (the pipeline is left unchanged).

        ``params``: :class:`ESDParams` fields and :class:`~forgetpatch.methods.finetune.FinetuneConfig` fields.
        ``preserve`` is recorded in the manifest; ESD itself has no preservation term (adversarial fine-tuning
        adds one on ``preserve``, weighted ``retain_weight``).
        """
        check_concepts(concepts, preserve)
        settings, engine = split_params(ESDParams, params, "ESD")
        if "scope" in engine:
            raise MethodError("ESD picks its layers by variant: pass variant='x' (cross-attention) or 'u', not scope")
        scope = settings.scope(concepts)
        config = make_config(scope=scope, iterations=settings.iterations, lr=settings.lr, **engine)
        adversary = adversary_for(settings.adversarial, pipe, [c.target for c in concepts])
        extra = {} if adversary is None else {"adversarial": adversary.settings.to_dict()}
        return train_patch(
            pipe,
            config,
            ESDObjective(concepts, eta=settings.eta, adversary=adversary, preserve=preserve),
            method=self.name,
            version=self.version,
            concepts=concepts,
            preserve=preserve,
            params={"variant": "x" if scope == "xattn" else "u", "eta": settings.eta, **extra},
            metrics=None if adversary is None else {"adversarial": adversary.record},
            name=name,
        )
