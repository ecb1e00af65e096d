"""Soft prompt search, word search, and adversarial fine-tuning built on them (AdvUnlearn's inner loop, arXiv 2405.15234).

**Soft prompt search** (:func:`prefix_search`; UnlearnDiffAtk-style, arXiv 2310.11868), shared with the attack suite
(:func:`forgetpatch.attacks.suite.prompt_search` calls :func:`prefix_search`). With ``k`` placeholder tokens in
front of a prompt ``p``, learn their input embeddings ``V = (v_1 .. v_k)`` so the attacked model denoises like a
reference model does on the plain prompt:

    V* = argmin_V  E_{x_0, t, n} || eps_attacked(x_t, t, E([V; p])) - eps_ref(x_t, t, E(p)) ||^2

(``E`` the text encoder, ``x_t`` a latent of the concept noised at timestep ``t``; Adam for ``steps`` steps).

**Word search** (:func:`word_search`: textual inversion, Gal et al.; the attack that circumvents seven erasure
methods, Pham et al., ICLR 2024): the same loss with the concept word's own input embedding ``w`` learned instead of a
prefix, starting from the word's row of the embedding table: ``w* = argmin_w E || eps_attacked(x_t, t, E(p[word := w])) - eps_ref(x_t, t, E(p)) ||^2``.

**Adversarial fine-tuning** (:class:`Adversarial`, ``adversarial=`` of ESD, KSCU and Dynamic Mask). Every
``every`` calls of the objective for a concept, the engine runs one of those searches (``search="prefix"``, the
default, or ``"word"``) on its *current student* with the *teacher* as reference (``steps`` Adam steps, ``tokens``
prefix tokens or the word's one, warm-started from the last ``V*``), on ``images`` latents the teacher draws for the
concept prompt (DDIM with the engine's steps and guidance; made once per concept). The conditioning the method's
erase term applies to is then ``{E(p)} ∪ {E([V*_j; p])}`` (``{E(p[word := w*_j])}``) over the last ``memory``
searches: every member gets the method's own erase target, in one batched student pass, and the erase
term is their mean. The method's retention terms are kept (KSCU's ``preserve_weight``, Dynamic Mask's
distillation and preservation); ESD, which has none, gets AdvUnlearn's:
``retain_weight * ||eps*(x_t, q) - eps(x_t, q)||^2`` for one preserved concept ``q`` in turn, on the same ``x_t``.

Cost per search: ``steps`` x (one teacher forward, one student forward, one backward) at batch ``batch``, plus,
once per concept, ``num_inference_steps`` teacher passes (batch ``2 images``) for the data. The passes are added to
the engine's :class:`~forgetpatch.methods.finetune.Passes` and recorded apart in ``metrics["adversarial"]`` with the
settings and every found embedding's mean row norm. A resumed run starts the adversary afresh (its memory is
not checkpointed). SD-style pipelines only (one text encoder).

Example:
    >>> patch = forgetpatch.erase(pipe, "circle", method="esd", adversarial={"every": 10, "steps": 20})
    >>> patch.manifest.metrics["adversarial"]["unet_passes"]["total"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from forgetpatch.errors import MethodError
from forgetpatch.methods.finetune import Cond, FinetuneEngine, encode_prompt

#: The filler word whose copies mark where a prefix goes (never a concept's word).
PLACEHOLDER = "and"
#: Tried in order when a tokenizer splits :data:`PLACEHOLDER` (e.g. a character-level test tokenizer).
_FALLBACKS = ("a", "x", "!")
#: ``(input_ids, rows) -> rows`` for a batch of prompts.
RowMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Generator stream of the inner search (the objectives draw from stream 0).
_STREAM = 17


# --- prefix tokens ---------------------------------------------------------------------------------
def placeholder_word(pipe: Any) -> str:
    """:data:`PLACEHOLDER`, or the first fallback the tokenizer keeps as one token (and repeats as one each)."""
    for word in (PLACEHOLDER, *_FALLBACKS):
        if len(pipe.tokenizer(f"{word} {word}").input_ids[1:-1]) == 2:
            return word
    raise MethodError(f"the tokenizer splits every placeholder word {(PLACEHOLDER, *_FALLBACKS)}; prefix search "
                      "needs one that is a single token")


def placeholder_id(pipe: Any, word: str = PLACEHOLDER) -> int:
    """The token id of ``word`` (one token: :func:`placeholder_word` picks one)."""
    ids = pipe.tokenizer(word).input_ids[1:-1]
    if len(ids) != 1:
        raise MethodError(f"the tokenizer splits {word!r} into {len(ids)} tokens; prefix search needs one")
    return int(ids[0])


def prefixed(k: int, prompt: str, word: str = PLACEHOLDER) -> str:
    """``prompt`` behind ``k`` copies of the placeholder ``word`` (where :func:`at_prefix` puts the vectors)."""
    return " ".join([word] * k + [prompt])


@contextmanager
def token_vectors(pipe: Any, replace_rows: RowMap) -> Iterator[None]:
    """Within the block, the text encoder's token embeddings pass through ``replace_rows(ids, embeddings)``."""
    layer = pipe.text_encoder.get_input_embeddings()

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return replace_rows(args[0], output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def at_prefix(placeholder: int, vectors: torch.Tensor) -> RowMap:
    """Put ``vectors`` (``k x D``) at positions ``1..k`` of prompts that start with ``k`` placeholder tokens."""
    k = vectors.shape[0]

    def replace_rows(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        marked = (ids[:, 1 : k + 1] == placeholder).all(dim=1).to(rows.device)
        if not marked.any():
            return rows
        out = rows.clone()
        out[marked, 1 : k + 1] = vectors.to(rows.dtype)
        return out

    return replace_rows


def single_token(pipe: Any, word: str) -> int | None:
    """The id of ``word`` when the tokenizer spells it as one token (every toy word is one), else ``None``."""
    ids = pipe.tokenizer(word).input_ids[1:-1]
    return int(ids[0]) if len(ids) == 1 else None


def at_token(word_id: int, vector: torch.Tensor) -> RowMap:
    """Put ``vector`` (``D`` or ``1 x D``) wherever token ``word_id`` is (a learned token in the word's place)."""

    def replace_rows(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        where = (ids == word_id).to(rows.device)
        if not where.any():
            return rows
        out = rows.clone()
        out[where] = vector.reshape(-1).to(rows.dtype)
        return out

    return replace_rows


def text_states(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """The UNet's text conditioning of ``prompts`` as the pipeline computes it, gradients kept."""
    return pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1, False)[0]


# --- the search ------------------------------------------------------------------------------------
def prefix_search(
    pipe: Any,
    vectors: nn.Parameter,
    steps: int,
    lr: float,
    loss_of: Callable[[Callable[[Sequence[str]], torch.Tensor]], torch.Tensor],
    on_step: Callable[[float], None] | None = None,
    placeholder: str = PLACEHOLDER,
) -> list[float]:
    """Adam on the prefix ``vectors`` (``k x D``, updated in place) for ``steps`` steps of ``loss_of(encode)``.

    ``encode(prompts)`` gives the text states of ``prompts`` with the ``k`` learned vectors in front (gradients
    reach ``vectors`` only); ``loss_of`` draws its batch and compares the attacked model with its reference.
    Returns the losses.
    """
    k = vectors.shape[0]

    def encode(prompts: Sequence[str]) -> torch.Tensor:
        return text_states(pipe, [prefixed(k, p, placeholder) for p in prompts])

    rows = at_prefix(placeholder_id(pipe, placeholder), vectors)
    return _adam(pipe, vectors, rows, encode, steps, lr, loss_of, on_step)


def word_search(
    pipe: Any,
    vector: nn.Parameter,
    word_id: int,
    steps: int,
    lr: float,
    loss_of: Callable[[Callable[[Sequence[str]], torch.Tensor]], torch.Tensor],
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Textual inversion: Adam on ``vector`` (``1 x D``, updated in place), the input embedding of token
    ``word_id`` wherever it occurs, for ``steps`` steps of ``loss_of(encode)``; ``encode(prompts)`` encodes the
    prompts as they are, the learned vector in the word's place. Returns the losses."""

    def encode(prompts: Sequence[str]) -> torch.Tensor:
        return text_states(pipe, prompts)

    return _adam(pipe, vector, at_token(word_id, vector), encode, steps, lr, loss_of, on_step)


def _adam(
    pipe: Any,
    vectors: nn.Parameter,
    rows: RowMap,
    encode: Callable[[Sequence[str]], torch.Tensor],
    steps: int,
    lr: float,
    loss_of: Callable[[Callable[[Sequence[str]], torch.Tensor]], torch.Tensor],
    on_step: Callable[[float], None] | None,
) -> list[float]:
    """The searches' loop: input embeddings mapped by ``rows`` while ``vectors`` descend ``loss_of(encode)``."""
    optimizer = torch.optim.Adam([vectors], lr=lr)
    losses: list[float] = []
    with token_vectors(pipe, rows):
        for _ in range(steps):
            loss = loss_of(encode)
            (grad,) = torch.autograd.grad(loss, [vectors])
            vectors.grad = grad
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(losses[-1])
    return losses


# --- adversarial fine-tuning -----------------------------------------------------------------------
#: The inner attacks adversarial fine-tuning can run.
SEARCHES = ("prefix", "word")


@dataclass(frozen=True)
class AdversarialParam:
    """The ``adversarial`` parameter, declared for a method whose own params dataclass does not hold it (Dynamic Mask
    records the settings apart): what :func:`~forgetpatch.methods.base.check_params` checks it against."""

    adversarial: Adversarial | int | dict[str, Any] | None = None


@dataclass(frozen=True)
class Adversarial:
    """Settings of the inner prompt-search attack of adversarial fine-tuning (``every=0``: off).

    Example:
        >>> Adversarial.of({"every": 10}).steps
        20
        >>> Adversarial.of(None).on
        False
    """

    every: int = 0
    """Objective calls per concept between searches (0 = off); the first search comes after ``every`` calls."""
    steps: int = 20
    """Adam steps of each search."""
    tokens: int = 5
    """Prefix tokens learned."""
    lr: float = 1e-2
    batch: int = 4
    """Noised teacher latents per search step."""
    images: int = 8
    """Teacher latents drawn per concept (once) for the search."""
    memory: int = 2
    """Found embeddings kept in the erase conditioning (the latest ones)."""
    retain_weight: float = 1.0
    """Weight of the retention term ESD gets on preserved concepts (KSCU and Dynamic Mask keep their own)."""
    search: str = "prefix"
    """The inner attack: ``"prefix"`` (soft prompt search, ``tokens`` learned in front of the prompt) or ``"word"``
    (textual inversion: the concept word's own embedding learned anew; the word must be one token)."""

    def __post_init__(self) -> None:
        counts = ("steps", "tokens", "batch", "images", "memory")
        if self.every < 0 or any(getattr(self, n) < 1 for n in counts) or self.lr <= 0 or self.retain_weight < 0:
            raise MethodError(
                f"adversarial settings out of range ({self.to_dict()}): every >= 0 (0 = off), "
                f"{', '.join(counts)} >= 1, lr > 0, retain_weight >= 0"
            )
        if self.search not in SEARCHES:
            raise MethodError(f"adversarial search must be one of {SEARCHES}, not {self.search!r}")

    @property
    def on(self) -> bool:
        return self.every > 0

    @classmethod
    def of(cls, value: Adversarial | int | dict[str, Any] | None) -> Adversarial:
        """From an :class:`Adversarial`, ``every`` as an int, a dict of fields, or ``None`` (off)."""
        if value is None:
            return cls()
        if isinstance(value, Adversarial):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(every=value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise MethodError(f"unknown adversarial settings {unknown}; known: {sorted(known)}")
            return replace(cls(), **value)
        raise MethodError(
            f"adversarial must be an int (every), a dict of settings or None, not {type(value).__name__}; "
            "e.g. adversarial={'every': 10, 'steps': 20}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adversary_for(
    value: Adversarial | int | dict[str, Any] | None, pipe: Any, words: Sequence[str] = ()
) -> Adversary | None:
    """An :class:`Adversary` when the settings are on, else ``None`` (the method trains exactly as without).

    ``words``: the concepts' words, checked before training when the search is ``"word"`` (one token each)."""
    settings = Adversarial.of(value)
    if not settings.on:
        return None
    if hasattr(pipe, "text_encoder_2") or getattr(pipe, "text_encoder", None) is None:
        raise MethodError(
            "adversarial fine-tuning needs an SD-style pipeline with one text encoder (SDXL is not supported yet); "
            "leave adversarial unset"
        )
    if settings.search == "word" and (split := [w for w in words if single_token(pipe, w) is None]):
        raise MethodError(
            f"adversarial search 'word' learns a concept word's one token, and the tokenizer splits {split}; "
            "use search='prefix'"
        )
    return Adversary(settings, placeholder_word(pipe))


class Adversary:
    """The inner attack's state during one training run: teacher latents, last vectors and found conditioning
    per prompt, and the record the manifest gets (``record``, filled as training goes)."""

    def __init__(self, settings: Adversarial, placeholder: str = PLACEHOLDER) -> None:
        self.settings, self.placeholder = settings, placeholder
        self.calls: dict[str, int] = {}
        self.latents: dict[str, torch.Tensor] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.found: dict[str, list[Cond]] = {}
        self.passes = {"teacher_forward": 0, "student_forward": 0, "backward": 0, "total": 0}
        self.record: dict[str, Any] = {
            "settings": settings.to_dict(), "searches": 0, "unet_passes": self.passes, "embedding_norms": [],
            "loss_first": [], "loss_last": [],
        }

    def conds(self, engine: FinetuneEngine, iteration: int, prompt: str) -> list[Cond]:
        """The adversarial conditionings of ``prompt`` to erase now (searching first when one is due)."""
        count = self.calls.get(prompt, 0)
        self.calls[prompt] = count + 1
        if count and count % self.settings.every == 0:
            self.search(engine, iteration, prompt)
        return list(self.found.get(prompt, []))

    def search(self, engine: FinetuneEngine, iteration: int, prompt: str) -> Cond:
        """Run the inner prompt search on the current student; remember and return the conditioning found."""
        s, pipe = self.settings, engine.pipe
        before = engine.passes.as_dict()
        generator = engine.generator(iteration, stream=_STREAM)
        if prompt not in self.latents:
            self.latents[prompt] = teacher_latents(engine, prompt, s.images, generator)
        latents, reference = self.latents[prompt], engine.encode(prompt)
        word = single_token(pipe, prompt) if s.search == "word" else None
        if s.search == "word" and word is None:  # adversary_for checks the concepts' words before training
            raise MethodError(f"adversarial search 'word' needs a one-token word, and {prompt!r} is not one")
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        if prompt in self.vectors:
            start = self.vectors[prompt]
        elif word is not None:
            start = table[word : word + 1].float()  # textual inversion starts from the word itself
        else:
            start = table[torch.randint(table.shape[0], (s.tokens,), generator=generator)].float()
        vectors = nn.Parameter(start.detach().clone().float())
        steps_total = int(engine.scheduler.config.num_train_timesteps)

        def loss_of(encode: Callable[[Sequence[str]], torch.Tensor]) -> torch.Tensor:
            picks = torch.randint(len(latents), (s.batch,), generator=generator)
            t = int(torch.randint(steps_total, (1,), generator=generator))
            noise = torch.randn(latents[picks].shape, generator=generator).to(latents.device, latents.dtype)
            x_t = engine.scheduler.add_noise(latents[picks], noise, torch.full((s.batch,), t))
            wanted = engine.teacher(x_t, t, reference)
            hidden = encode([prompt] * s.batch).to(engine.device, engine.unet.dtype)
            return nn.functional.mse_loss(engine.student(x_t, t, Cond(hidden)).float(), wanted.float())

        if word is None:
            losses = prefix_search(pipe, vectors, s.steps, s.lr, loss_of, placeholder=self.placeholder)
            rows = at_prefix(placeholder_id(pipe, self.placeholder), vectors.detach())
            text = prefixed(s.tokens, prompt, self.placeholder)
        else:
            losses = word_search(pipe, vectors, word, s.steps, s.lr, loss_of)
            rows, text = at_token(word, vectors.detach()), prompt
        engine.passes.backward += s.steps  # one backward through the student per step
        self.vectors[prompt] = vectors.detach()
        with torch.no_grad(), token_vectors(pipe, rows):
            found = encode_prompt(pipe, text, engine.latent_size)
        cond = found.to(engine.device, dtype=engine.unet.dtype)
        self.found[prompt] = [*self.found.get(prompt, []), cond][-s.memory :]
        after = engine.passes.as_dict()
        for key in self.passes:
            self.passes[key] += after[key] - before[key]
        self.record["searches"] += 1
        self.record["embedding_norms"].append(round(float(vectors.detach().norm(dim=1).mean()), 4))
        self.record["loss_first"].append(round(losses[0], 6))
        self.record["loss_last"].append(round(losses[-1], 6))
        return cond


@torch.no_grad()
def teacher_latents(engine: FinetuneEngine, prompt: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` final latents the teacher draws for ``prompt`` (DDIM, the engine's steps and guidance)."""
    c, empty = engine.encode(prompt), engine.encode("")
    both = Cond.cat(*([empty] * count), *([c] * count))
    x = engine.noise(generator, batch=count)
    for t in engine.timesteps:
        e_u, e_c = engine.teacher(torch.cat([x, x]), t, both).chunk(2)
        x = engine.scheduler.step(e_u + engine.config.guidance_scale * (e_c - e_u), t, x).prev_sample
    return x


__all__ = [
    "PLACEHOLDER",
    "Adversarial",
    "AdversarialParam",
    "SEARCHES",
    "Adversary",
    "adversary_for",
    "at_prefix",
    "at_token",
    "placeholder_id",
    "placeholder_word",
    "prefix_search",
    "prefixed",
    "single_token",
    "teacher_latents",
    "text_states",
    "token_vectors",
    "word_search",
]
