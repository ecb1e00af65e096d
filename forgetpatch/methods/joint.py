"""Closed-form edits (UCE, RECE rounds) on SD3 / FLUX: what is linear in the prompt, and what is edited.

An MMDiT transformer takes the text encoders' rows ``e`` (SD3: CLIP-L || CLIP-G rows, then T5 rows; FLUX: T5
rows) through ``context_embedder`` (a ``Linear``), then through the joint blocks. Block ``l``'s context key /
value projections see

    block 0:   u_0 = AdaLN(E e ; temb) = LN(E e + b) * (1 + scale(temb)) + shift(temb)        (row by row)
    block l:   u_l = AdaLN(h_l ; temb),   h_l = the context stream after blocks 0 .. l-1,

where ``temb`` carries the timestep and the pooled CLIP projection, and ``h_l`` has attended to the image tokens.
So the only layer whose input is *linear* in the text embedding is ``context_embedder`` itself; ``add_k_proj`` /
``add_v_proj`` see a layer-normalised, timestep-modulated row (block 0: a function of that row and ``temb`` only;
later blocks: of the whole prompt and the noisy image as well).

Two edits, chosen by ``context``:

* ``"embedder"`` (default, exact): UCE's closed form on ``transformer.context_embedder`` with the text rows
  ``C`` (concept), ``G`` (guide, same positions), ``P`` (preserved). ``W' = argmin lam |W' - W|^2 +
  s_e sum |W' c - W g|^2 + s_p sum |W' p - W p|^2``, exactly as on a UNet's ``attn2.to_k``. Because everything
  downstream reads the context only through ``E e``, every block at every timestep then sees (up to UCE's
  least-squares residual) the guide's context row where the concept's was: the "later blocks see transformed
  context" problem does not arise. Nothing else is edited.
* ``"joint"``: the issue's context projections, ``attn.add_k_proj`` / ``attn.add_v_proj`` of every joint
  (double-stream) block, each solved with UCE on the rows ``u_l`` it actually receives, captured with forward hooks
  for the concept, guide and preserved prompts at ``joint_sigmas`` points of the pipeline's sigma grid (one seeded
  noise latent per point, shared by all prompts so rows pair up). Block 0 is exact at those sigmas (its rows
  depend on the text row and ``temb`` only); for later blocks the fit is least squares over the sampled noise, on
  the inputs of the *unedited* earlier blocks (each layer is solved from the original weights, as UCE does for a
  UNet's layers; the earlier edits change what later blocks receive and that is not fed back). Not edited:
  ``context_embedder``, ``add_q_proj`` (the text queries), the image-side projections, FLUX's single-stream blocks
  (their ``to_k`` / ``to_v`` mix text and image rows in one linear).

Edited positions (``tokens``), per text segment (SD3: the CLIP rows, then the T5 rows; FLUX: the T5 rows): the
concept's last word token (``"last"``), or it and every later row of the segment, each paired with the guide's
row at the same offset (``"trailing"``); ``templates`` add the concept inside prompts as on a UNet.

Example:
    >>> patch = forgetpatch.erase(sd3, "circle", method="uce")                      # context_embedder, exact
    >>> patch = forgetpatch.erase(sd3, "circle", method="uce", context="joint")     # add_k/add_v of each block
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from forgetpatch.errors import MethodError
from forgetpatch.methods import flow
from forgetpatch.methods.closed_form import (
    TOKEN_MODES,
    Embeddings,
    in_templates,
    last_token_index,
    refuse_empty,
)

#: Where a closed-form edit can be made on a flow-matching transformer.
CONTEXTS = ("embedder", "joint")
#: What each ``context`` edits, as recorded in the manifest.
EDITED: dict[str, str] = {
    "embedder": "transformer.context_embedder (input: the text encoders' rows; exact, timestep-free); "
    "nothing else",
    "joint": "attn.add_k_proj / attn.add_v_proj of every joint block, each on the rows it receives (captured at "
    "joint_sigmas, unedited earlier blocks); not context_embedder, add_q_proj, image-side or single-stream layers",
}


def check_context(pipe: Any, context: str) -> None:
    """Refuse an unknown ``context`` (before anything slow)."""
    if context not in CONTEXTS:
        raise MethodError(f"unknown context {context!r}; on SD3 / FLUX choose one of {list(CONTEXTS)}")


def context_layers(pipe: Any, context: str) -> dict[str, nn.Module]:
    """The layers a closed-form edit changes, keyed by full module path (``transformer.<name>``)."""
    check_context(pipe, context)
    transformer = pipe.transformer
    if context == "embedder":
        return {"transformer.context_embedder": transformer.context_embedder}
    layers = {
        f"transformer.{name}": module
        for name, module in transformer.named_modules()
        if name.startswith("transformer_blocks.") and name.endswith(("attn.add_k_proj", "attn.add_v_proj"))
    }
    if not layers:
        raise MethodError(f"{type(transformer).__name__} has no joint blocks with add_k_proj / add_v_proj")
    return layers


# --- text rows -----------------------------------------------------------------------------------
def _segments(pipe: Any, length: int) -> list[tuple[Any, int, int]]:
    """``(tokenizer, first row, rows)`` of each text segment of the prompt embedding (``length`` rows)."""
    if flow.family(pipe) == "flux":
        return [(pipe.tokenizer_2, 0, length)]
    clip = int(getattr(pipe, "tokenizer_max_length", 77))
    found = [(pipe.tokenizer, 0, clip)]
    if getattr(pipe, "text_encoder_3", None) is not None and length > clip:  # without T5 its rows are zeros
        found.append((pipe.tokenizer_3, clip, length - clip))
    return found


def _last_word(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    mask = tokenizer(list(prompts), padding="longest", truncation=True, return_tensors="pt").attention_mask
    return (mask.sum(dim=1) - 2).clamp_min(0).tolist()


@torch.no_grad()
def encode(pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt embedding ``(n, L, D)`` and pooled projection ``(n, P)``, float32 on the CPU."""
    conds = [flow.encode_prompt(pipe, p) for p in prompts]
    hidden = torch.cat([c.hidden for c in conds]).float().cpu()
    pooled = torch.cat([c.added["pooled_projections"] for c in conds]).float().cpu()  # type: ignore[index]
    return hidden, pooled


def positions(pipe: Any, pairs: Sequence[tuple[str, str]], length: int, tokens: str) -> list[list[int]]:
    """Row indices of each ``(prompt, prefix)`` that an edit uses: per segment the prefix's last word token,
    and with ``tokens="trailing"`` every later row of the segment."""
    out: list[list[int]] = [[] for _ in pairs]
    if not pairs:
        return out
    for tokenizer, first, rows in _segments(pipe, length):
        starts = _last_word(tokenizer, [prefix for _, prefix in pairs])
        for found, start in zip(out, starts, strict=True):
            start = min(start, rows - 1)
            found.extend(range(first + start, first + (rows if tokens == "trailing" else start + 1)))
    return out


def _pair(c: list[int], g: list[int], pipe: Any, length: int) -> tuple[list[int], list[int]]:
    """Align a concept's and its guide's rows segment by segment from their starts (UCE's alignment)."""
    ci, gi = [], []
    for _, first, rows in _segments(pipe, length):
        cs = [i for i in c if first <= i < first + rows]
        gs = [i for i in g if first <= i < first + rows]
        n = min(len(cs), len(gs))
        ci += cs[:n]
        gi += gs[:n]
    return ci, gi


@torch.no_grad()
def row_sets(
    pipe: Any,
    erase: Sequence[str],
    guides: Sequence[str],
    preserve: Sequence[str],
    *,
    tokens: str,
    templates: Sequence[str],
    held: Sequence[str] = (),
) -> tuple[list[str], list[tuple[int, list[int], int, list[int]]], list[tuple[int, list[int], bool]]]:
    """The prompts to run and which of their rows pair up.

    Returns ``(prompts, pairs, kept)``: ``pairs`` = ``(concept prompt index, its rows, guide prompt index, its
    rows)``, ``kept`` = ``(kept prompt index, its rows, held)``: the ``preserve`` words' rows, then the ``held``
    ones' (concepts that patches on the pipeline erased, kept with their own weight: :class:`Embeddings`).
    Words that tokenize to nothing are refused.
    """
    if tokens not in TOKEN_MODES:
        raise MethodError(f"unknown tokens mode {tokens!r}; choose one of {list(TOKEN_MODES)}")
    named = [*erase, *preserve, *held]
    refuse_empty(named, last_token_index(pipe, named))
    erase_pairs = [pair for word in erase for pair in in_templates(word, templates)]
    guide_pairs = [pair for word in guides for pair in in_templates(word, templates)]
    keep_pairs = [(pair, False) for word in preserve for pair in in_templates(word, templates)]
    keep_pairs += [(pair, True) for word in held for pair in in_templates(word, templates)]
    prompts = list(dict.fromkeys(p for p, _ in erase_pairs + guide_pairs + [pair for pair, _ in keep_pairs]))
    length = int(flow.encode_prompt(pipe, prompts[0]).hidden.shape[1])
    c_rows = positions(pipe, erase_pairs, length, tokens)
    g_rows = positions(pipe, guide_pairs, length, tokens)
    k_rows = positions(pipe, [pair for pair, _ in keep_pairs], length, tokens)
    pairs = []
    for (cp, _), (gp, _), c, g in zip(erase_pairs, guide_pairs, c_rows, g_rows, strict=True):
        ci, gi = _pair(c, g, pipe, length)
        pairs.append((prompts.index(cp), ci, prompts.index(gp), gi))
    kept = [(prompts.index(kp), k, is_held) for ((kp, _), is_held), k in zip(keep_pairs, k_rows, strict=True)]
    return prompts, pairs, kept


def gather(states: torch.Tensor, pairs, kept) -> Embeddings:
    """:class:`Embeddings` from per-prompt row states ``(n_prompts, L, D)`` (:func:`row_sets`' pairs and kept)."""
    C = torch.cat([states[i, rows] for i, rows, _, _ in pairs])
    G = torch.cat([states[j, rows] for _, _, j, rows in pairs])

    def rows_of(held: bool) -> torch.Tensor:
        found = [states[i, rows] for i, rows, is_held in kept if is_held is held]
        return torch.cat(found).double() if found else C.new_zeros(0, C.shape[1]).double()

    held = rows_of(True)
    return Embeddings(erase=C.double(), guide=G.double(), preserve=rows_of(False), held=held if len(held) else None)


def embed_rows(
    pipe: Any,
    erase: Sequence[str],
    guides: Sequence[str],
    preserve: Sequence[str],
    *,
    tokens: str,
    templates: Sequence[str],
    held: Sequence[str] = (),
) -> tuple[Embeddings, torch.Tensor]:
    """The text rows ``context_embedder`` takes for a closed-form edit (:func:`row_sets`), and the blank prompt's
    first row (CLIP's BOS on SD3, T5's end token on FLUX): ``(Embeddings, blank (D,) float64)``."""
    prompts, pairs, kept = row_sets(pipe, erase, guides, preserve, tokens=tokens, templates=templates, held=held)
    hidden, _ = encode(pipe, [*prompts, ""])
    return gather(hidden[:-1], pairs, kept), hidden[-1, 0].double()


def concat(parts: Sequence[Embeddings]) -> Embeddings:
    """Several :class:`Embeddings` (e.g. one per captured sigma) as one."""
    held = [e.held for e in parts if e.held is not None]
    return Embeddings(
        erase=torch.cat([e.erase for e in parts]),
        guide=torch.cat([e.guide for e in parts]),
        preserve=torch.cat([e.preserve for e in parts]),
        held=torch.cat(held) if held else None,
    )


@torch.no_grad()
def layer_inputs(
    pipe: Any, prompts: Sequence[str], paths: Sequence[str], sigmas: Sequence[float], *, seed: int = 0,
    latent_size: int | None = None, guidance: float = 3.5,
) -> dict[str, list[torch.Tensor]]:
    """``{path: [rows per sigma]}``: the inputs each layer receives, ``(n_prompts, L, D)`` per sigma, float32 CPU.

    One noise latent per sigma (seeded), shared by every prompt, noised to ``x = sigma * noise`` (the pure-noise
    end of the flow's line with ``x_0 = 0``: the text rows do not depend on ``x_0`` in block 0 and the later blocks
    see a plausible latent scale).
    """
    transformer = pipe.transformer
    side = latent_size or flow.default_latent_size(pipe)
    hidden, pooled = encode(pipe, prompts)
    device, dtype = next(transformer.parameters()).device, next(transformer.parameters()).dtype
    from forgetpatch.methods.finetune import Cond

    cond = Cond(hidden.to(device, dtype), {"pooled_projections": pooled.to(device, dtype)})
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = []
    for path in paths:
        module = transformer.get_submodule(path.removeprefix("transformer."))

        def hook(_module, args, _out, path=path):
            seen[path].append(args[0].detach().float().cpu())

        hooks.append(module.register_forward_hook(hook))
    try:
        for index, sigma in enumerate(sigmas):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            noise = torch.randn(flow.latent_shape(transformer, side), generator=generator)
            x = (sigma * noise).expand(len(prompts), *noise.shape[1:]).to(device, dtype)
            transformer(**flow.transformer_kwargs(transformer, x, 1000.0 * sigma, cond, side, guidance))
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def joint_sigmas(pipe: Any, count: int, latent_size: int | None = None) -> list[float]:
    """``count`` sigmas spread over the pipeline's default 28-step grid (noisiest first)."""
    if count < 1:
        raise MethodError(f"joint_sigmas must be >= 1, got {count}")
    grid = flow.schedule(pipe, 28, latent_size or flow.default_latent_size(pipe)).sigmas[:-1]
    picks = torch.linspace(0, len(grid) - 1, count).round().long().unique().tolist()
    return [grid[i] for i in picks]


__all__ = [
    "CONTEXTS",
    "EDITED",
    "check_context",
    "concat",
    "context_layers",
    "embed_rows",
    "encode",
    "gather",
    "joint_sigmas",
    "layer_inputs",
    "positions",
    "row_sets",
]
