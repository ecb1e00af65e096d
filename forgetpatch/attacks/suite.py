"""The five attacks. Each takes a :class:`Target` and returns its :class:`~forgetpatch.attacks.report.AttackResult`
(prompt search returns two: the soft prefix and its projection to words).

Every attack is measured on the same prompts and seeds as the patched model before it (main scoring prompts
naming the concept, :func:`forgetpatch.eval.main_prompts`), with strict UA; the paraphrase attack on the same scenes
and seeds, reworded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from forgetpatch.attacks.budget import Budget
from forgetpatch.attacks.report import AttackResult, Rate
from forgetpatch.attacks.text import (
    ConceptData,
    PassCounter,
    concept_data,
    denoising_batch,
    encode,
    from_token,
    hidden_states_map,
    lora_hooks,
    token_id,
    unet_eps,
)
from forgetpatch.eval import PipelineGenerator, ScoringPrompt, fit_shapes, forgotten, outcome
from forgetpatch.methods import (
    PLACEHOLDER,
    at_prefix,
    at_token,
    cross_attention_layers,
    current_weights,
    inversion_map,
    prefix_search,
    token_vectors,
)
from forgetpatch.toy import vocab


@dataclass
class Target:
    """What every attack needs: the patched pipeline, its unpatched copy, the concept and its prompts."""

    pipe: Any
    base: Any
    concept: str
    items: list[ScoringPrompt]
    budget: Budget
    seed: int
    judge: Any
    progress: bool = True
    before_flags: list[bool] = field(default_factory=list)
    """Per scoring prompt, whether the patched model forgets the concept in its image, before any attack."""
    _data: ConceptData | None = field(default=None, repr=False)

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    @property
    def seeds(self) -> list[int]:
        return [it.seed for it in self.items]

    def data(self) -> ConceptData:
        """Renders of the concept the training attacks learn from (made once per run)."""
        if self._data is None:
            self._data = concept_data(self.pipe, self.concept, self.budget.data, self.seed)
        return self._data

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], pipe: Any = None) -> np.ndarray:
        gen = PipelineGenerator(
            pipe if pipe is not None else self.pipe,
            num_inference_steps=self.budget.num_inference_steps,
            guidance_scale=self.budget.guidance_scale,
            progress=False,
        )
        return gen.generate(list(prompts), list(seeds))

    @property
    def before(self) -> Rate:
        """Strict UA of the patched model before any attack."""
        return Rate.of(self.before_flags)

    def forgotten_in(self, images: np.ndarray) -> tuple[list[bool], list[dict]]:
        """Per image, whether the concept is forgotten in it, and the judge's verdicts."""
        verdicts = self.judge.classify(images)
        return [forgotten(v, self.concept) for v in verdicts], verdicts

    def judge_ua(self, images: np.ndarray) -> tuple[Rate, list[dict]]:
        flags, verdicts = self.forgotten_in(images)
        return Rate.of(flags), verdicts

    def fitted(self, images: np.ndarray) -> tuple[Rate | None, list[str] | None]:
        """The share of ``images`` whose best geometric fit is the concept, and each image's fit (``None, None`` for
        a colour or a texture, which the fit does not see)."""
        if vocab.kind_of(self.concept) != "shape":
            return None, None
        fits = [f.shape for f in fit_shapes(images)]
        return Rate.of([f == self.concept for f in fits]), fits

    def bar(self, total: int, name: str) -> tqdm:
        return tqdm(total=total, desc=f"attack {name}", unit="step", disable=not self.progress, leave=False)

    def generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stream)


def _result(
    target: Target, name: str, seconds: float, passes: int, images: np.ndarray, budget: dict,
    before: Rate | None = None, **detail: Any,
) -> AttackResult:
    after, verdicts = target.judge_ua(images)
    fitted, fits = target.fitted(images)
    return AttackResult(
        name=name,
        before=before or target.before,
        after=after,
        named=Rate.of([outcome(v, target.concept) == "kept" for v in verdicts]),
        fitted=fitted,
        seconds=seconds,
        unet_passes=passes,
        budget={**budget, "images": len(images), "num_inference_steps": target.budget.num_inference_steps},
        detail=detail,
        images=images,
        verdicts=verdicts,
        fits=fits,
    )


def _fit(
    target: Target,
    name: str,
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    stream: int,
    loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[str]], torch.Tensor],
) -> dict[str, float | None]:
    """Adam on ``params`` for ``steps`` steps of ``loss_of(x_t, t, noise, prompts)`` over noised renders of the
    concept (only ``params`` get gradients; the pipeline's own weights are left alone). Returns the first and
    last loss."""
    optimizer = torch.optim.Adam(params, lr=lr)
    data, generator = target.data(), target.generator(stream)
    losses: list[float] = []
    bar = target.bar(steps, name)
    for _ in range(steps):
        loss = loss_of(*denoising_batch(target.pipe, data, target.budget.batch, generator))
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = g
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    bar.close()
    return {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


# --- 1. paraphrase -------------------------------------------------------------------------------
def paraphrases(concept: str) -> list[tuple[str, str, dict[str, str]]]:
    """``(label, template, word substitutions)`` of every rewording of a prompt naming ``concept``."""
    kind = vocab.kind_of(concept)
    slot = "{" + kind + "}"
    first = vocab.TRAIN_TEMPLATES[0]
    out = [(f"synonym '{s}'", first, {f"{kind}_word": s}) for s in vocab.SYNONYMS.get(concept, ())]
    if kind == "shape":
        out.append((f"superclass '{vocab.SHAPE_SUPERCLASS}'", first, {"shape_word": vocab.SHAPE_SUPERCLASS}))
    templates = (
        *vocab.TRAIN_TEMPLATES[1:], *vocab.ORDER_TEMPLATES, *vocab.HELDOUT_TEMPLATES, *vocab.PARTIAL_TEMPLATES
    )
    out += [(f"template '{t}'", t, {}) for t in templates if slot in t]
    return out


def paraphrase(target: Target) -> list[AttackResult]:
    """Every synonym, the superclass, every other training, held-out and partial word order; the worst one.

    Each rewording is generated for the first ``paraphrase_images`` scenes and seeds of the scoring
    prompts. UA after is the lowest over the rewordings (the worst prompt for the patch), UA before the
    concept's own prompts on the same scenes and seeds; the minimum of several small samples leans low (its
    interval is that one rewording's, chosen after the fact), so the pooled UA over all rewordings is reported
    beside it.
    """
    started, b = time.perf_counter(), target.budget
    items = target.items[: b.paraphrase_images]
    variants = paraphrases(target.concept)
    found: list[tuple[str, str, np.ndarray, Rate]] = []
    flags: list[bool] = []
    with PassCounter(target.pipe.unet) as passes:
        bar = target.bar(len(variants), "paraphrase")
        for label, template, words in variants:
            prompts = [vocab.prompt(it.scene, template, **words) for it in items]
            images = target.generate(prompts, [it.seed for it in items])
            these, _ = target.forgotten_in(images)
            flags += these
            found.append((label, prompts[0], images, Rate.of(these)))
            bar.update(1)
        bar.close()
    label, example, images, _ = min(found, key=lambda f: f[3].value)
    template, words = next((t, w) for lab, t, w in variants if lab == label)
    worst_on_base, _ = target.judge_ua(
        target.generate([vocab.prompt(it.scene, template, **words) for it in items], [it.seed for it in items],
                        pipe=target.base)
    )
    pooled = Rate.of(flags)
    return [
        _result(
            target, "paraphrase", time.perf_counter() - started, passes.count, images,
            {"images_per_prompt": len(items), "prompts": len(variants)},
            before=Rate.of(target.before_flags[: len(items)]),
            worst_prompt=f"{label}: {example!r}",
            worst_prompt_base_ua=worst_on_base.value,
            pooled_ua=pooled.value,
            pooled_n=pooled.n,
            pooled_interval=list(pooled.interval),
            by_prompt={lab: rate.value for lab, _, _, rate in found},
        )
    ]


# --- 2. inversion --------------------------------------------------------------------------------
def _inversion_map(pipe: Any, base: Any, lam: float) -> tuple[torch.Tensor, int]:
    """:func:`~forgetpatch.methods.closed_form.inversion_map` between ``pipe``'s K/V weights (patches on) and ``base``'s."""
    patched, original = cross_attention_layers(pipe), cross_attention_layers(base)
    return inversion_map(
        current_weights(pipe, patched),
        current_weights(base, {path: original[path] for path in patched}),
        lam,
    )


def inversion(target: Target) -> list[AttackResult]:
    """RECE's closed-form inversion: one solve, then the concept's token and every later position of each
    prompt's text embedding is replaced by ``e* = M c`` (white-box: it needs the patch and the base weights)."""
    started, lam = time.perf_counter(), target.budget.inversion_lambda
    matrix, layers = _inversion_map(target.pipe, target.base, lam)
    word = token_id(target.pipe, target.concept)
    with PassCounter(target.pipe.unet) as passes, hidden_states_map(target.pipe, from_token(word, matrix)):
        images = target.generate(target.prompts, target.seeds)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    detail: dict[str, Any] = {"layers": layers, "map_distance": float((matrix - eye).norm() / eye.norm())}
    if not layers:
        detail["note"] = "no cross-attention K/V weight differs from the base: nothing to invert"
    seconds = time.perf_counter() - started
    return [_result(target, "inversion", seconds, passes.count, images, {"lambda": lam}, **detail)]


# --- 3. prompt search ----------------------------------------------------------------------------
def word_tokens(pipe: Any, exclude: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids and spellings of the tokens that are whole words and tokenize back to themselves alone."""
    tokenizer = pipe.tokenizer
    special = set(tokenizer.all_special_ids)
    banned = {w.lower() for w in exclude}
    ids, words = [], []
    for text, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if i in special or not text.endswith("</w>"):
            continue
        word = text[: -len("</w>")]
        if not word.strip() or word.lower() in banned:
            continue
        if tokenizer(word).input_ids[1:-1] == [i]:
            ids.append(i)
            words.append(word)
    return ids, words


def _kind_words(concept: str) -> list[str]:
    """Every word naming a concept of ``concept``'s kind (synonyms and, for shapes, the superclass too)."""
    kind = vocab.kind_of(concept)
    words = [*vocab.concepts_of(kind), *(s for c in vocab.concepts_of(kind) for s in vocab.SYNONYMS.get(c, ()))]
    return words + ([vocab.SHAPE_SUPERCLASS] if kind == "shape" else [])


def prompt_search(target: Target) -> list[AttackResult]:
    """UnlearnDiffAtk-style: learn ``k`` prefix token embeddings so the patched model denoises noised
    renders of the concept as the base does (:func:`forgetpatch.methods.adversarial.prefix_search`, the search
    adversarial fine-tuning runs inside training too), then project each to the nearest whole word; both the soft
    prefix and the word prefix are measured. The projection leaves out every word naming a concept of the
    same kind: naming the concept (or a synonym) would be a paraphrase, and naming another shape steers the
    image away from the concept rather than towards it."""
    started, b = time.perf_counter(), target.budget
    pipe, k = target.pipe, b.search_tokens
    placeholder = token_id(pipe, PLACEHOLDER)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids, words = word_tokens(pipe, [*_kind_words(target.concept), PLACEHOLDER])
    start = torch.randint(len(ids), (k,), generator=target.generator(3))
    vectors = torch.nn.Parameter(table[[ids[i] for i in start.tolist()]].clone().float())
    head = " ".join([PLACEHOLDER] * k)
    data, generator = target.data(), target.generator(4)

    def loss_of(encode_prefixed: Callable[[Sequence[str]], torch.Tensor]) -> torch.Tensor:
        x_t, t, _, prompts = denoising_batch(pipe, data, b.batch, generator)
        with torch.no_grad():
            wanted = unet_eps(target.base, x_t, t, encode(target.base, prompts))
        got = unet_eps(pipe, x_t, t, encode_prefixed(prompts))
        return torch.nn.functional.mse_loss(got.float(), wanted.float())

    bar = target.bar(b.search_steps, "prompt_search")

    def on_step(loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    with PassCounter(pipe.unet, target.base.unet) as passes:
        found = prefix_search(pipe, vectors, b.search_steps, b.search_lr, loss_of, on_step)  # shared with fine-tuning
        bar.close()
        losses = {"loss_first": found[0] if found else None, "loss_last": found[-1] if found else None}
        search = (time.perf_counter() - started, passes.count + b.search_steps)  # + one backward pass a step
        with token_vectors(pipe, at_prefix(placeholder, vectors)):
            soft_images = target.generate([f"{head} {p}" for p in target.prompts], target.seeds)
    soft_cost = (time.perf_counter() - started, passes.count + b.search_steps)
    nearest = torch.cdist(vectors.detach().float(), table[ids].float()).argmin(dim=1).tolist()
    prefix = " ".join(words[i] for i in nearest)
    spent = {"tokens": k, "steps": b.search_steps, "lr": b.search_lr, "batch": b.batch}
    soft = _result(target, "prompt_search_soft", *soft_cost, soft_images, spent, **losses,
                   prefix_norm=float(vectors.detach().norm(dim=1).mean()))
    started = time.perf_counter()
    with PassCounter(pipe.unet) as passes:
        hard_images = target.generate([f"{prefix} {p}" for p in target.prompts], target.seeds)
    hard_cost = (search[0] + time.perf_counter() - started, search[1] + passes.count)  # the search, then words
    return [soft, _result(target, "prompt_search_hard", *hard_cost, hard_images, spent, prefix=prefix)]


# --- 4. textual inversion ------------------------------------------------------------------------
def textual_inversion(target: Target) -> list[AttackResult]:
    """Concept inversion: learn the concept word's input embedding anew on the patched model, from renders
    of the concept (the denoising loss), starting from the word's own embedding; then generate the scoring
    prompts with the learned token in the word's place."""
    started, b = time.perf_counter(), target.budget
    pipe = target.pipe
    word = token_id(pipe, target.concept)
    initial = pipe.text_encoder.get_input_embeddings().weight.detach()[word].clone().float()
    vector = torch.nn.Parameter(initial.clone())

    def loss_of(x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(unet_eps(pipe, x_t, t, encode(pipe, prompts)).float(), target.float())

    with PassCounter(pipe.unet) as passes, token_vectors(pipe, at_token(word, vector)):
        losses = _fit(target, "textual_inversion", [vector], b.ti_steps, b.ti_lr, 5, loss_of)
        images = target.generate(target.prompts, target.seeds)
    cost = (time.perf_counter() - started, passes.count + b.ti_steps)
    spent = {"steps": b.ti_steps, "lr": b.ti_lr, "batch": b.batch}
    moved = float((vector.detach() - initial).norm() / initial.norm())
    return [_result(target, "textual_inversion", *cost, images, spent, **losses, moved=moved)]


# --- 5. relearning -------------------------------------------------------------------------------
#: The layers relearning adapts: every cross-attention projection.
RELEARN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def relearning(target: Target) -> list[AttackResult]:
    """A few steps of LoRA fine-tuning of the patched model on renders of the concept (the denoising loss),
    on every cross-attention projection; then the scoring prompts as they are."""
    started, b = time.perf_counter(), target.budget
    pipe = target.pipe
    layers = cross_attention_layers(pipe, RELEARN_PROJECTIONS)

    def loss_of(x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            states = encode(pipe, prompts)
        return torch.nn.functional.mse_loss(unet_eps(pipe, x_t, t, states).float(), target.float())

    with PassCounter(pipe.unet) as passes, lora_hooks(layers, b.relearn_rank, target.seed) as params:
        losses = _fit(target, "relearning", params, b.relearn_steps, b.relearn_lr, 6, loss_of)
        images = target.generate(target.prompts, target.seeds)
    cost = (time.perf_counter() - started, passes.count + b.relearn_steps)
    spent = {"steps": b.relearn_steps, "rank": b.relearn_rank, "lr": b.relearn_lr, "batch": b.batch}
    return [_result(target, "relearning", *cost, images, spent, **losses, layers=len(layers))]


#: Attack name -> function; ``prompt_search`` reports ``prompt_search_soft`` and ``prompt_search_hard``.
ATTACKS: dict[str, Callable[[Target], list[AttackResult]]] = {
    "paraphrase": paraphrase,
    "inversion": inversion,
    "prompt_search": prompt_search,
    "textual_inversion": textual_inversion,
    "relearning": relearning,
}
