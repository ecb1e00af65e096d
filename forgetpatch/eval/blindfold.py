"""The blindfold: a hand-made, known change that the metrics must catch.

It replaces the text encoder's token embedding of a word (and its synonyms) with that of another
word, on a copy of the pipeline, so prompts naming the concept draw the replacement instead.
With ``swap=True`` the replacement's words get the concept's embedding as well, so the
replacement is damaged too (collateral damage that IRA must show).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from forgetpatch.errors import ConceptError
from forgetpatch.toy import vocab


def _token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConceptError(
            f"{word!r} is {len(ids)} tokens for this tokenizer; the blindfold needs single-token words"
        )
    return int(ids[0])


def blindfold(
    pipe: Any,
    concept: str,
    replacement: str,
    *,
    synonyms: Sequence[str] | None = None,
    swap: bool = False,
) -> Any:
    """A copy of ``pipe`` whose text encoder reads ``concept`` (and its synonyms) as ``replacement``.

    ``pipe`` is not changed: the text encoder is copied, every other component is shared.
    ``synonyms`` defaults to the toy vocabulary's (``"disc"`` for ``"circle"``; with ``swap``, also
    those of ``replacement``); pass a list (maybe empty) to choose them for a non-toy tokenizer.

    Example:
        >>> blind = blindfold(forgetpatch.toy.pipeline(), "circle", "square")
        >>> evaluate(blind, ["circle"]).concepts["circle"].scores.ua   # near 1.0: circles became squares
    """
    toy = synonyms is None
    words = [concept, *(vocab.SYNONYMS.get(concept, ()) if toy else synonyms)]
    replaced = [replacement, *(vocab.SYNONYMS.get(replacement, ()) if toy else ())] if swap else []
    encoder = copy.deepcopy(pipe.text_encoder)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        source = table[_token_id(pipe.tokenizer, replacement)].clone()
        target = table[_token_id(pipe.tokenizer, concept)].clone()
        for word in words:
            table[_token_id(pipe.tokenizer, word)] = source
        for word in replaced:
            table[_token_id(pipe.tokenizer, word)] = target
    return type(pipe).from_pipe(pipe, text_encoder=encoder)
