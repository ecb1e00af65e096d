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

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from forgetpatch.errors import MethodError
from forgetpatch.methods.base import Concept, register
from forgetpatch.methods.engine import Cond, FinetuneEngine, Scope, make_config, train_patch

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
    """

    def __init__(self, concepts: list[Concept], eta: float = 1.0) -> None:
        self.concepts, self.eta = concepts, eta

    def __call__(self, engine: FinetuneEngine, iteration: int) -> torch.Tensor:
        concept = self.concepts[iteration % len(self.concepts)]
        generator = engine.generator(iteration)
        steps = len(engine.timesteps)
        step = int(torch.randint(0, steps, (1,), generator=generator))
        c, empty = engine.encode(concept.target), engine.encode("")
        anchor = engine.encode(concept.guide or "")
        # Fresh noise every iteration, as the paper samples (no trajectory reuse).
        x, t = engine.sample_xt(concept.target, c, empty, step, generator=generator, reuse=False)
        e_anchor, e_concept = engine.teacher(torch.cat([x, x]), t, Cond.cat(anchor, c)).chunk(2)
        target = e_anchor - self.eta * (e_concept - e_anchor)
        return F.mse_loss(engine.student(x, t, c).float(), target.float())


@register
class ESD:
    """ESD-x / ESD-u as a forgetpatch method (name ``"esd"``)."""

    name: ClassVar[str] = "esd"
    version: ClassVar[str] = "1"

    def erase(
        self,
        pipe: Any,
        concepts: list[Concept],
        *,
        preserve: list[Concept],
        variant: str | None = None,
        eta: float = 1.0,
        iterations: int = 1000,
        lr: float = 1e-5,
        name: str | None = None,
        **params: Any,
    ):
        """Erase ``concepts`` by ESD fine-tuning; returns a Patch (the pipeline is left unchanged).

        Args:
            variant: ``"x"`` (cross-attention) or ``"u"`` (everything else); default by concept
                kind: styles and identities ``"x"``, the rest ``"u"``.
            eta: negative-guidance strength.
            iterations, lr: training length and Adam learning rate (paper: 1000, 1e-5).
            **params: :class:`~forgetpatch.methods.engine.FinetuneConfig` fields (``mode``, ``rank``,
                ``seed``, ``num_inference_steps``, ``latent_size``, ``checkpoint_dir``, ...).

        ``preserve`` is recorded in the manifest; ESD itself has no preservation term.
        """
        if variant is None:
            kinds = {DEFAULT_SCOPE[c.kind] for c in concepts}
            if len(kinds) > 1:
                raise MethodError(
                    "these concepts want different ESD variants (styles/identities 'x', objects 'u'); "
                    "pass variant='x' or variant='u'"
                )
            scope = kinds.pop()
        elif variant in _VARIANTS:
            scope = _VARIANTS[variant]
        else:
            raise MethodError(f"unknown ESD variant {variant!r}; use 'x' (ESD-x) or 'u' (ESD-u)")
        config = make_config(scope=scope, iterations=iterations, lr=lr, **params)
        return train_patch(
            pipe,
            config,
            ESDObjective(concepts, eta=eta),
            method=self.name,
            version=self.version,
            concepts=concepts,
            preserve=preserve,
            params={"variant": "x" if scope == "xattn" else "u", "eta": eta},
            name=name,
        )
