"""How hard each attack tries: one frozen :class:`Budget`, with the default and a tiny preset."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from forgetpatch.errors import AttackError

#: Classifier-free guidance of the generated images (evaluation's default).
GUIDANCE_SCALE = 4.0


@dataclass(frozen=True)
class Budget:
    """What every attack may spend. The default keeps each attack under 5 minutes for one concept on a
    2-core CPU (``benchmarks/attack.py`` measures it); :meth:`named` ``("tiny")`` is for tests.

    Example:
        >>> Budget(relearn_steps=10).relearn_steps
        10
        >>> Budget.named("tiny").images
        8
    """

    images: int = 32
    """Scoring prompts each attack is measured on (UA's sample size)."""
    paraphrase_images: int = 16
    """Images per rewording in the paraphrase attack."""
    inversion_lambda: float = 0.1
    """Ridge weight of the closed-form inversion (larger: the embedding stays smaller)."""
    search_tokens: int = 5
    """Prefix tokens prompt search learns."""
    search_steps: int = 100
    search_lr: float = 5e-3
    ti_steps: int = 200
    """Optimizer steps of textual inversion."""
    ti_lr: float = 5e-3
    relearn_steps: int = 50
    """LoRA fine-tuning steps of relearning."""
    relearn_rank: int = 4
    relearn_lr: float = 1e-3
    batch: int = 8
    """Noised renders per optimizer step."""
    data: int = 64
    """Renders of the concept the training attacks learn from."""
    num_inference_steps: int = 25
    guidance_scale: float = GUIDANCE_SCALE

    def __post_init__(self) -> None:
        bad = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                    value >= 0 if f.name == "inversion_lambda" else value > 0
                )
            if not ok:
                bad.append(f.name)
        if bad:
            raise AttackError(
                f"attack budget {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of range: counts must "
                "be whole numbers >= 1, rates and guidance finite and > 0, inversion_lambda finite and >= 0"
            )

    @classmethod
    def named(cls, name: str) -> Budget:
        """``"default"`` or ``"tiny"`` (a few steps and images: checks that everything runs)."""
        if name not in PRESETS:
            raise AttackError(f"unknown attack budget {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def of(cls, value: Budget | str | dict[str, Any] | None) -> Budget:
        """A budget from a :class:`Budget`, a preset name, or a dict of fields overriding the default."""
        if value is None:
            return cls()
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            return cls.named(value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise AttackError(f"unknown attack budget fields {unknown}; known: {[f.name for f in fields(cls)]}")
            return replace(cls(), **value)
        raise AttackError(f"budget must be a Budget, a preset name or a dict, not {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Budget] = {
    "default": Budget(),
    "tiny": Budget(
        images=8, paraphrase_images=2, search_steps=4, search_tokens=2, ti_steps=4, relearn_steps=3, batch=2,
        data=8, num_inference_steps=10,
    ),
}
