"""What the attacks change on a pipeline while they run, always undone on exit.

* :func:`token_vectors` (from :mod:`forgetpatch.methods.adversarial`, where fine-tuning's inner attack uses it
  too): replaces rows of the text encoder's *input* token embeddings (a learned token in place of the concept's
  word, :func:`~forgetpatch.methods.adversarial.at_token`, or learned prefix tokens, :func:`at_prefix`), so the
  pipeline's own ``encode_prompt`` and sampling see them.
* :func:`hidden_states_map`: maps rows of the text encoder's *output* (what the UNet's cross-attention
  reads), from a concept's token to the end of the prompt.
* :func:`lora_hooks`: a low-rank update added to linear layers' outputs by forward hooks, so that it
  stacks on whatever the layer already computes (fused or unfused patches, the user's adapters).
* :func:`concept_data`: renders of a concept, as VAE latents with the prompts that name them.
* :func:`denoising_batch`: a noised batch of those latents at random timesteps.
* :class:`PassCounter`: counts UNet calls.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from forgetpatch.errors import AttackError
from forgetpatch.methods import denoising_target, single_token
from forgetpatch.toy import render_batch, vocab

#: ``(input_ids, rows) -> rows`` for a batch of prompts.
RowMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_id(pipe, word: str) -> int:
    """The id of ``word`` when the tokenizer spells it as one token (every toy word is one)."""
    found = single_token(pipe, word)
    if found is None:
        raise AttackError(f"{word!r} is not one token for this tokenizer; attacks need a one-token concept")
    return found


@contextmanager
def hidden_states_map(pipe, replace: RowMap) -> Iterator[None]:
    """Within the block, the text encoder's output states pass through ``replace(ids, states)``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        ids = args[0] if args else kwargs["input_ids"]
        if isinstance(output, tuple):
            return (replace(ids, output[0]), *output[1:])
        output["last_hidden_state"] = replace(ids, output[0])
        return output

    handle = pipe.text_encoder.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def from_token(word_id: int, matrix: torch.Tensor) -> RowMap:
    """Map every row from token ``word_id``'s position to the end of the prompt by ``e -> matrix @ e``."""

    def replace(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hits = (ids == word_id).to(torch.int8)
        if not hits.any():
            return rows
        after = hits.cumsum(dim=1).clamp_max(1).bool().to(rows.device)  # the token and every later position
        out = rows.clone()
        out[after] = (out[after].double() @ matrix.T.to(out.device)).to(rows.dtype)
        return out

    return replace


class _LowRank(nn.Module):
    def __init__(self, layer: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        weight = layer.weight
        a = torch.randn(rank, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
        self.A = nn.Parameter(a.to(weight.device, torch.float32))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device))

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + ((x.float() @ self.A.T) @ self.B.T).to(output.dtype)


@contextmanager
def lora_hooks(
    layers: dict[str, nn.Module], rank: int, seed: int
) -> Iterator[list[nn.Parameter]]:
    """A trainable low-rank update ``x -> x A^T B^T`` (B starts at zero) added to each layer's output.

    Yields the parameters to train. The layers keep computing whatever they computed before
    (patches and the user's adapters included); the update goes when the block ends.
    """
    generator = torch.Generator().manual_seed(seed)
    updates = [_LowRank(_base_linear(m), rank, generator) for m in layers.values()]
    handles = [m.register_forward_hook(u.hook) for m, u in zip(layers.values(), updates, strict=True)]
    try:
        yield [p for u in updates for p in u.parameters()]
    finally:
        for handle in handles:
            handle.remove()


def _base_linear(module: nn.Module) -> nn.Linear:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@dataclass(frozen=True)
class ConceptData:
    """Renders of a concept as VAE latents, with a prompt naming each."""

    latents: torch.Tensor
    prompts: list[str]


@torch.no_grad()
def concept_data(pipe, concept: str, count: int, seed: int) -> ConceptData:
    """``count`` renders of ``concept`` in varied scenes and training word orders, encoded by the VAE.

    Example:
        >>> data = concept_data(pipe, "circle", 32, seed=0)
        >>> data.latents.shape, data.prompts[0]
        (torch.Size([32, 4, 8, 8]), 'a yellow circle on a grid background')
    """
    rng = random.Random(f"{seed}|{concept}|data")
    kind = vocab.kind_of(concept)
    scenes, prompts = [], []
    for _ in range(count):
        parts = {k: rng.choice(vocab.concepts_of(k)) for k in ("shape", "colour", "texture")}
        parts[kind] = concept
        scene = vocab.Scene(parts["shape"], parts["colour"], parts["texture"])
        scenes.append(scene)
        prompts.append(vocab.prompt(scene, rng.choice(vocab.TRAIN_TEMPLATES)))
    images = render_batch(scenes, [rng.randrange(1 << 30) for _ in scenes])
    vae = pipe.vae
    pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    pixels = pixels.to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    return ConceptData(latents.float(), prompts)


def denoising_batch(
    pipe, data: ConceptData, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """``(x_t, t, target, prompts)``: ``size`` of the latents, noised at uniformly drawn timesteps, and what the UNet
    should predict there (the noise, or for a v-prediction model the velocity: :func:`denoising_target`)."""
    index = torch.randint(len(data.prompts), (size,), generator=generator)
    latents = data.latents[index]
    noise = torch.randn(latents.shape, generator=generator)
    steps = int(pipe.scheduler.config.num_train_timesteps)
    t = torch.randint(steps, (size,), generator=generator)
    x_t = pipe.scheduler.add_noise(latents, noise, t)
    target = denoising_target(pipe.scheduler, latents, noise, t)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    return x_t.to(device, dtype), t.to(device), target.to(device, dtype), [data.prompts[i] for i in index.tolist()]


def encode(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The UNet's text conditioning of ``prompts`` as the pipeline computes it (gradients kept)."""
    return pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1, False)[0]


def unet_eps(pipe, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return pipe.unet(x_t, t, encoder_hidden_states=states.to(x_t.dtype), return_dict=False)[0]


class PassCounter:
    """Counts the calls of one or more UNets while active (a batched call counts once).

    Example:
        >>> with PassCounter(pipe.unet) as passes:
        ...     pipe("a red circle", num_inference_steps=25)
        >>> passes.count
        25
    """

    def __init__(self, *unets: nn.Module) -> None:
        self.unets, self.count, self._handles = unets, 0, []

    def _hook(self, *_: object) -> None:
        self.count += 1

    def __enter__(self) -> PassCounter:
        self._handles = [u.register_forward_pre_hook(self._hook) for u in self.unets]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
