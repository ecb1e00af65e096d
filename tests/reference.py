"""Reference text embeddings for the closed-form method tests, taken through the pipeline's own path."""

from __future__ import annotations

import torch


def hidden_states(pipe, prompt: str) -> torch.Tensor:
    """The rows the UNet receives for ``prompt`` (the pipeline's own encode_prompt, full padding), float64."""
    with torch.no_grad():
        out = pipe.encode_prompt(
            prompt=[prompt], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return out[0][0].double()


def token_embedding(pipe, prompt: str) -> torch.Tensor:
    """The row of ``prompt``'s last word token (the BOS row for a blank prompt)."""
    index = sum(pipe.tokenizer(prompt).attention_mask) - 2
    return hidden_states(pipe, prompt)[index]
