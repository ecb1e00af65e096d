"""Helpers of the closed-form methods (UCE, ScaPre; Dynamic Mask and the attacks use some too): cross-attention
layers, concept embeddings.

* :func:`cross_attention_layers`: the ``attn2.to_k`` / ``attn2.to_v`` layers of a pipeline's UNet, keyed by
  their full module path (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``).
* :func:`current_weight`: a layer's weight as the pipeline computes with it now (patches included).
* :func:`encode_tokens`: the text-encoder output at the last word token of each prompt, exactly as the
  UNet receives it (``encoder_hidden_states``): one encoder for SD 1.x / 2.x, two encoders concatenated
  for SDXL (penultimate hidden states, 768 + 1280 = 2048 wide).

Example:
    >>> from forgetpatch.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> layers = cross_attention_layers(pipe)
    >>> next(iter(layers))
    'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'
    >>> encode_tokens(pipe, ["circle", "star"]).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from forgetpatch.errors import ConceptError, MethodError
from forgetpatch.methods.base import Concept, erased_on, registered

#: The projections closed-form methods edit in every cross-attention block.
KEY_VALUE = ("to_k", "to_v")


# --- layers --------------------------------------------------------------------------------------
def require_unet(pipe: Any, method: str) -> nn.Module:
    """The pipeline's UNet, or a :class:`MethodError` naming the methods that run on a transformer instead."""
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise MethodError(
            f"{type(pipe).__name__} has no UNet, and {method} edits a UNet's cross-attention (SD 1.x/2.x/SDXL); "
            f"on SD3 and FLUX use method={_one_of(m.name for m in registered() if 'transformer' in m.denoisers)}"
        )
    return unet


def _one_of(names: Iterable[str]) -> str:
    """``'uce', 'esd' or 'kscu'``."""
    quoted = [repr(n) for n in names]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def cross_attention_layers(pipe, projections: Sequence[str] = KEY_VALUE) -> dict[str, nn.Module]:
    """The UNet's cross-attention projections, keyed by full module path, in UNet order.

    The value is the module as it sits in the UNet (a peft wrapper while a patch is applied unfused).
    Self-attention ``attn2`` blocks (``only_cross_attention=False`` models without text) are skipped.

    Raises:
        MethodError: the pipeline has no UNet or its UNet has no cross-attention.

    Example:
        >>> paths = list(cross_attention_layers(pipe))
        >>> paths[0].endswith("attn2.to_k"), paths[1].endswith("attn2.to_v")
        (True, True)
    """
    unet = require_unet(pipe, "this method")
    wanted = tuple(f"attn2.{p}" for p in projections)
    layers: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if not name.endswith(wanted):
            continue
        attention = unet.get_submodule(name.rsplit(".", 1)[0])
        if getattr(attention, "is_cross_attention", True) is False:
            continue
        layers[f"unet.{name}"] = module
    if not layers:
        raise MethodError(
            f"the UNet ({type(unet).__name__}) has no cross-attention layers (attn2.to_k / attn2.to_v); "
            "closed-form methods need a text-conditioned UNet such as Stable Diffusion's"
        )
    return layers


def _base_linear(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def current_weight(module: nn.Module) -> torch.Tensor:
    """The ``out x in`` weight ``module`` computes with now, as float32 (applied patches included).

    A plain ``Linear`` returns its weight; a peft-wrapped one is probed with the identity matrix so that
    any adapters active on it count, as they do at sampling time.
    """
    base = _base_linear(module)
    if base is module:
        return module.weight.detach().float()
    weight = base.weight
    eye = torch.eye(weight.shape[1], device=weight.device, dtype=weight.dtype)
    out = module(eye)
    if getattr(base, "bias", None) is not None:
        out = out - base.bias
    return out.T.float().contiguous()


def current_weights(pipe, layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """:func:`current_weight` of each of ``pipe``'s ``layers`` (by module path), with every patch on the pipeline
    acting, those gated to key steps too (:func:`forgetpatch.loader.ungated`): outside a denoiser call a gated patch
    is on or off as the last step run left it."""
    from forgetpatch.loader import ungated

    with ungated(pipe):
        return {path: current_weight(module) for path, module in layers.items()}


# --- concept embeddings --------------------------------------------------------------------------
def _text_encoders(pipe) -> list[tuple[object, nn.Module, bool]]:
    """``(tokenizer, encoder, use_penultimate_hidden_state)`` for each text encoder, in UNet order."""
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: both encoders' penultimate states
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        found = [(getattr(pipe, t, None), getattr(pipe, e, None), True) for t, e in pairs]
        return [f for f in found if f[0] is not None and f[1] is not None]
    tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or encoder is None:
        raise MethodError(f"{type(pipe).__name__} has no tokenizer/text encoder to embed concepts with")
    return [(tokenizer, encoder, False)]


def last_token_index(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Index of each prompt's last word token (``attention_mask.sum() - 2``; 0 = BOS for ``""``)."""
    tokenizer = _text_encoders(pipe)[0][0]
    mask = tokenizer(list(prompts), padding="longest", truncation=True, return_tensors="pt").attention_mask
    return mask.sum(dim=1) - 2


def _refuse_empty(prompts: Sequence[str], index: torch.Tensor) -> None:
    empty = [p for p, i in zip(prompts, index.tolist(), strict=True) if i < 1]
    if empty:
        raise ConceptError(
            f"concept(s) {empty} tokenize to nothing with this pipeline's tokenizer; "
            "name each concept with at least one word the tokenizer knows"
        )


#: Public name of the check (SD3 / FLUX closed forms use it with their own rows).
refuse_empty = _refuse_empty


@torch.no_grad()
def _hidden_states(pipe, prompts: Sequence[str], length: int | None = None) -> torch.Tensor:
    """``encoder_hidden_states`` rows of each prompt, ``(len(prompts), L, width)``, float32 on the CPU.

    Padded to the tokenizer's ``model_max_length`` as the pipeline pads (``L``), or cut to the first
    ``length`` positions. SDXL's two encoders are concatenated (penultimate hidden states).
    """
    parts = []
    for tokenizer, encoder, penultimate in _text_encoders(pipe):
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids[:, :length], tokens.attention_mask[:, :length]
        device = next(encoder.parameters()).device
        kwargs = {}
        if getattr(encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = mask.to(device)
        out = encoder(ids.to(device), output_hidden_states=penultimate, **kwargs)
        parts.append((out.hidden_states[-2] if penultimate else out[0]).float().cpu())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def encode_tokens(pipe, prompts: Sequence[str], *, allow_empty: bool = False) -> torch.Tensor:
    """Text-encoder output at the last word token of each prompt, ``(len(prompts), width)``, float32.

    This is the token embedding UCE and ScaPre edit: the row of the UNet's ``encoder_hidden_states`` at
    index ``attention_mask.sum() - 2``. The encoders are causal, so prompts are padded only to the longest
    one; the rows equal those of the pipeline's own ``encode_prompt`` (77-token padding).

    Args:
        prompts: one prompt per embedding, e.g. ``["circle", "van gogh"]``.
        allow_empty: accept prompts without word tokens (``""`` gives the BOS position, UCE's blank guide).

    Raises:
        ConceptError: a prompt tokenizes to nothing (unless ``allow_empty``).

    Example:
        >>> encode_tokens(pipe, ["circle", ""], allow_empty=True).shape
        torch.Size([2, 32])
    """
    prompts = list(prompts)
    if not prompts:
        raise ConceptError("no prompts to encode")
    unique = list(dict.fromkeys(prompts))  # e.g. one blank guide shared by 100 concepts
    where = torch.tensor([unique.index(p) for p in prompts]) if len(unique) < len(prompts) else None
    index = last_token_index(pipe, unique)
    if not allow_empty:
        _refuse_empty(unique, index)
    # causal attention: positions after the last word token (EOS, padding) change nothing before it
    states = _hidden_states(pipe, unique, length=int(index.max()) + 1)
    rows = states[torch.arange(len(unique)), index]
    return rows if where is None else rows[where]


def split_held(pipe, preserve: Sequence[Concept]) -> tuple[list[Concept], list[Concept]]:
    """``preserve`` split into plain concepts and held ones: those that patches already on ``pipe`` erased
    (:func:`~forgetpatch.methods.base.erased_on`), which a closed-form edit keeps with their own weight."""
    on = {c.key for c in erased_on(pipe)}
    held = [c for c in preserve if c.key in on]
    return [c for c in preserve if c not in held], held


@dataclass(frozen=True)
class Embeddings:
    """The token embeddings a closed-form edit works with: one row each, float64, all ``D`` wide."""

    erase: torch.Tensor
    """``(n, D)``: the erased concepts' last-word-token embeddings."""
    guide: torch.Tensor
    """``(n, D)``: what each erased embedding is steered to."""
    preserve: torch.Tensor
    """``(m, D)``: embeddings whose outputs are kept (``m`` may be 0)."""
    held: torch.Tensor | None = None
    """``(h, D)``: embeddings of concepts that patches already on the pipeline erased, kept as they are now (that
    is, still erased) with their own weight (:meth:`kept`); ``None``: none."""

    def kept(self, preserve_scale: float, hold_scale: float) -> torch.Tensor:
        """The kept rows, each scaled by the square root of its weight: ``[sqrt(s_p) P; sqrt(s_h) H]``, so that
        ``kept^T kept = s_p P^T P + s_h H^T H`` (the preservation sums of UCE's and ScaPre's solves)."""
        rows = [preserve_scale**0.5 * self.preserve]
        if self.held is not None:
            rows.append(hold_scale**0.5 * self.held)
        return torch.cat(rows)


def kept_rows(emb: Embeddings, params: Any) -> torch.Tensor:
    """:meth:`Embeddings.kept` with a closed-form method's weights: ``s_p = params.preserve_scale`` and
    ``s_h = params.hold_scale``, or ``params.erase_scale`` when that is ``None`` (UCE's and ScaPre's rule)."""
    hold = params.erase_scale if params.hold_scale is None else params.hold_scale
    return emb.kept(params.preserve_scale, hold)


def guide_prompt(concept: Concept, defaults: dict[str, str] | None = None) -> str:
    """The guide prompt of ``concept``: its own, else ``defaults[kind]``, else ``""`` (the blank prompt)."""
    if concept.guide is not None:
        return concept.guide
    return (defaults or {}).get(concept.kind, "")


#: Which positions of a concept's prompt are edited: its last word token only, or that token and every
#: position after it (EOS and padding, up to the tokenizer's length) as UCE's code release does.
TOKEN_MODES = ("last", "trailing")


def encode_trailing(pipe, prompts: Sequence[str], starts: Sequence[int]) -> list[torch.Tensor]:
    """For each prompt, the rows of ``encoder_hidden_states`` from position ``start`` to the end, float32.

    The prompt is padded to the tokenizer's ``model_max_length`` as the pipeline pads it, so the rows are
    exactly those the UNet receives: the concept's token and every later one, EOS and padding included,
    which carry the concept on through causal attention.
    """
    unique = list(dict.fromkeys(prompts))
    states = _hidden_states(pipe, unique)
    return [states[unique.index(p), int(start) :] for p, start in zip(prompts, starts, strict=True)]


def in_templates(word: str, templates: Sequence[str]) -> list[tuple[str, str]]:
    """``(prompt, prefix)`` pairs: ``word`` alone, then each template's ``{concept}`` filled with it.

    ``prefix`` is the prompt up to and including ``word``: its last word token is where the concept sits
    (or, for a blank guide, the word before it). UCE's release edits concepts inside such prompts
    ("image of {concept}", ...), each paired with the same template filled with the guide.

    Example:
        >>> in_templates("circle", ["a red {concept} on a plain background"])
        [('circle', 'circle'), ('a red circle on a plain background', 'a red circle')]
        >>> in_templates("", ["a {concept} in blue"])
        [('', ''), ('a in blue', 'a')]
    """
    out = [(word, word)]
    for template in templates:
        if template.count("{concept}") != 1:
            raise MethodError(f"template {template!r} needs exactly one {{concept}} placeholder")
        head, tail = template.split("{concept}")
        out.append((" ".join(f"{head}{word}{tail}".split()), " ".join(f"{head}{word}".split())))
    return out


def _rows(pipe, pairs: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
    """Trailing rows of each ``(prompt, prefix)``, starting at the prefix's last word token."""
    if not pairs:
        return []
    starts = last_token_index(pipe, [prefix for _, prefix in pairs]).clamp_min(0).tolist()
    return encode_trailing(pipe, [prompt for prompt, _ in pairs], starts)


def _aligned(erase: list[torch.Tensor], guides: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each concept's trailing rows with its guide's, from their starts on (UCE's alignment)."""
    pairs = [(c[: min(len(c), len(g))], g[: min(len(c), len(g))]) for c, g in zip(erase, guides, strict=True)]
    return torch.cat([c for c, _ in pairs]), torch.cat([g for _, g in pairs])


def embed_concepts(
    pipe,
    erase: Sequence[str],
    guides: Sequence[str],
    preserve: Sequence[str] = (),
    extra: Sequence[str] = (),
    *,
    tokens: str = "last",
    templates: Sequence[str] = (),
    held: Sequence[str] = (),
) -> tuple[Embeddings, torch.Tensor]:
    """Encode erase targets, their guides, preserved prompts and ``extra`` prompts.

    With ``tokens="last"`` each prompt gives one row (its last word token). With ``tokens="trailing"``
    each erased and preserved prompt gives its last word token and every position after it, each paired
    with the guide's row at the same offset from the guide's last word token, as UCE's release edits
    them; ``extra`` prompts still give one row each. ``templates`` (with a ``{concept}`` placeholder)
    add, per erased and preserved concept, the concept inside each template, paired with the template
    filled with its guide (:func:`in_templates`): its own token (``"last"``), or its token and every
    later position of the filled template (``"trailing"``). Returns the :class:`Embeddings` and the ``extra``
    rows. Guides and extras may be blank (``""`` = BOS). ``held`` concepts are encoded as preserved ones, into
    :attr:`Embeddings.held` (concepts erased by patches already on the pipeline).

    Raises:
        ConceptError: an erased or preserved prompt tokenizes to nothing.
        MethodError: an unknown ``tokens`` mode, or not one guide per concept.

    Example:
        >>> emb, (blank,) = embed_concepts(pipe, ["circle"], [""], ["ellipse"], extra=[""])
        >>> emb.erase.shape, emb.preserve.shape
        (torch.Size([1, 32]), torch.Size([1, 32]))
    """
    erase, guides, preserve, extra, held = list(erase), list(guides), list(preserve), list(extra), list(held)
    if len(guides) != len(erase):
        raise MethodError(f"{len(erase)} concepts but {len(guides)} guides; give one guide per concept")
    if tokens not in TOKEN_MODES:
        raise MethodError(f"unknown tokens mode {tokens!r}; choose one of {list(TOKEN_MODES)}")
    named = erase + preserve + held
    _refuse_empty(named, last_token_index(pipe, named))
    if tokens == "trailing":
        erase_rows, guide_rows, keep_rows, held_rows = (
            _rows(pipe, [pair for word in words for pair in in_templates(word, templates)])
            for words in (erase, guides, preserve, held)
        )
        C, G = _aligned(erase_rows, guide_rows)
        P = torch.cat(keep_rows) if keep_rows else C.new_zeros(0, C.shape[1])
        H = torch.cat(held_rows).double() if held_rows else None
        found = Embeddings(erase=C.double(), guide=G.double(), preserve=P.double(), held=H)
        more = encode_tokens(pipe, extra, allow_empty=True) if extra else C.new_zeros(0, C.shape[1])
        return found, more.double()
    if templates:  # the concept's own token inside each template (the last word token of its prefix)
        erase, guides, preserve, held = (
            [prefix for word in words for _, prefix in in_templates(word, templates)]
            for words in (erase, guides, preserve, held)
        )
    rows = encode_tokens(pipe, erase + guides + preserve + held + extra, allow_empty=True).double()
    n, m, h = len(erase), len(preserve), len(held)
    found = Embeddings(
        erase=rows[:n], guide=rows[n : 2 * n], preserve=rows[2 * n : 2 * n + m],
        held=rows[2 * n + m : 2 * n + m + h] if held else None,
    )
    return found, rows[2 * n + m + h :]


# --- robustness: the closed-form inversion --------------------------------------------------------
@torch.no_grad()
def inversion_map(
    edited: dict[str, torch.Tensor], original: dict[str, torch.Tensor], lam: float
) -> tuple[torch.Tensor, int]:
    """The text-embedding map an attacker with the patch and the base weights solves for (RECE, arXiv 2407.12383).

    For a concept embedding ``c``, ``e* = M c`` minimises ``sum_l |W'_l e - W_l c|^2 + lam |e|^2`` over the layers
    whose edited weight ``W'_l`` differs from the original ``W_l``: the embedding that makes the edited keys and
    values what the concept's were. ``M = (sum W'^T W' + lam I)^-1 sum W'^T W`` (float64, ``D x D``). Returns ``M``
    and the number of layers that differ (0: nothing was edited, ``M`` is the identity).

    Example:
        >>> M, layers = inversion_map({"k": W + B @ A}, {"k": W}, lam=0.1)
        >>> adversarial = C @ M.T          # one inverted row per erased row
    """
    gram = lhs = None
    layers, width = 0, 0
    for path, new in edited.items():
        w_new = new.double()
        w_old = original[path].double().to(w_new.device)
        width = w_new.shape[1]
        if torch.equal(w_new, w_old):
            continue
        layers += 1
        gram = w_new.T @ w_new if gram is None else gram + w_new.T @ w_new
        lhs = w_new.T @ w_old if lhs is None else lhs + w_new.T @ w_old
    if gram is None or lhs is None:
        return torch.eye(width, dtype=torch.float64), 0
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, lhs).cpu(), layers


def with_adversarial(emb: Embeddings, concept_rows: torch.Tensor, guide_rows: torch.Tensor, M: torch.Tensor):
    """``emb`` with the inverted concept rows ``concept_rows @ M^T`` added to the erased set, each steered to the
    guide row of the row it came from (RECE's round); the preserved set is unchanged."""
    adversarial = concept_rows @ M.T.to(concept_rows)
    found = replace(emb, erase=torch.cat([emb.erase, adversarial]), guide=torch.cat([emb.guide, guide_rows]))
    return found, adversarial


@dataclass(frozen=True)
class RobustRound:
    """What one RECE round found: the inverted rows' size next to the rows they came from."""

    round: int
    adversarial_norm: float
    """Mean norm of the inverted rows ``M c``."""
    concept_norm: float
    """Mean norm of the concept rows ``c`` they were inverted from."""
    map_distance: float
    """``|M - I|_F / |I|_F``: how far the attacker's map is from doing nothing."""
    erased_rows: int
    """Rows in the erased set after the round (the concept rows and every round's inverted rows)."""


def robust_rounds(
    emb: Embeddings,
    rounds: int,
    lam: float,
    original: dict[str, torch.Tensor],
    solve,
    edited,
) -> tuple[Any, list[RobustRound]]:
    """RECE's loop around a closed-form edit (arXiv 2407.12383): ``rounds`` times, invert the current edit
    (:func:`inversion_map`), add the inverted concept rows to the erased set with their guides, solve again from
    the original weights. ``solve(emb) -> result``; ``edited(result) -> {path: edited weight}``, formed only when a
    round needs it. Returns the last result and a record per round. Each round adds one inverted row per edited
    concept row, so the change's rank grows by at most that many per round (and never past the layer's width)."""
    result = solve(emb)
    concept_rows, guide_rows = emb.erase, emb.guide
    found: list[RobustRound] = []
    for index in range(rounds):
        M, _ = inversion_map(edited(result), original, lam)
        emb, adversarial = with_adversarial(emb, concept_rows, guide_rows, M)
        eye = torch.eye(M.shape[0], dtype=M.dtype)
        found.append(
            RobustRound(
                round=index + 1,
                adversarial_norm=round(float(adversarial.norm(dim=1).mean()), 4),
                concept_norm=round(float(concept_rows.norm(dim=1).mean()), 4),
                map_distance=round(float((M - eye).norm() / eye.norm()), 4),
                erased_rows=int(emb.erase.shape[0]),
            )
        )
        result = solve(emb)
    return result, found


def robust_record(rounds: list[RobustRound]) -> dict[str, Any]:
    """The manifest's ``metrics["robust"]`` entry of a closed-form patch made with RECE rounds."""
    from dataclasses import asdict

    return {
        "rounds": [asdict(r) for r in rounds],
        "rank_growth": "each round adds one inverted row per edited concept row (rank <= rows, <= layer width)",
    }


__all__ = [
    "KEY_VALUE",
    "TOKEN_MODES",
    "Embeddings",
    "RobustRound",
    "cross_attention_layers",
    "current_weight",
    "current_weights",
    "embed_concepts",
    "encode_tokens",
    "encode_trailing",
    "guide_prompt",
    "in_templates",
    "inversion_map",
    "kept_rows",
    "last_token_index",
    "require_unet",
    "robust_record",
    "robust_rounds",
    "split_held",
    "with_adversarial",
]
