"""Random-weight Stable Diffusion pipelines for tests and benchmarks (no download needed).

* :func:`tiny_sd_pipeline` / :func:`tiny_sdxl_pipeline`: seconds to build, SD 1.x-like and
  SDXL-like (two text encoders, ``text_time`` conditioning), module names as in the real models.
* :func:`published_unet` / :func:`published_pipeline`: full-size SD 1.5, SD 2.1 and SDXL
  architectures from their published configs (:mod:`forgetpatch.archs`), with random weights.

Example:
    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from forgetpatch.archs import (
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIGS,
    UNET_CONFIGS,
    VAE_CONFIGS,
    Family,
)
from forgetpatch.tokenizer import word_level_clip_tokenizer

#: Words the tiny test tokenizers spell as single tokens.
TEST_WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "the",
    "on",
    "background",
    "painting",
    "in",
    "style",
    "by",
    "shape",
    "object",
    "art",
    "nude",
    "naked",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "circle",
    "square",
    "triangle",
    "star",
    "ellipse",
    "ring",
    "rectangle",
    "diamond",
    "cat",
    "dog",
    "car",
    "church",
    "tench",
    "fish",
    "building",
    "vangogh",
    "monet",
    "picasso",
]


def _tokenizer():
    return word_level_clip_tokenizer(TEST_WORDS)


def _text_encoder(hidden: int, vocab_size: int, projection: bool, seed: int):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """An SD 1.x-shaped pipeline (32px, 2 cross-attention levels, 32-wide text) with random weights."""
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionPipeline(
        vae=_tiny_vae(seed + 1),
        text_encoder=_text_encoder(32, len(tokenizer), projection=False, seed=seed + 2),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline (two text encoders, ``text_time`` embeddings) with random weights."""
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # 32 (encoder 1) + 32 (encoder 2)
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32 (pooled text)
        norm_num_groups=8,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(seed + 1),
        text_encoder=_text_encoder(32, len(tokenizer), projection=False, seed=seed + 2),
        text_encoder_2=_text_encoder(32, len(tokenizer), projection=True, seed=seed + 3),
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )


def published_unet(family: Family = "sd15", seed: int = 0) -> UNet2DConditionModel:
    """The full-size UNet of ``family`` (``"sd15"``, ``"sd21"``, ``"sdxl"``) with random weights.

    SD 1.5 is ~860M parameters (3.4 GB in fp32), SDXL ~2.6B (10 GB).
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[family]).eval()


def published_pipeline(family: Family = "sd15", seed: int = 0):
    """A full-size pipeline of ``family`` with random weights and a small word-level tokenizer."""
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    encoders = []
    for i, cfg in enumerate(TEXT_ENCODER_CONFIGS[family]):
        torch.manual_seed(seed + 10 + i)
        config = CLIPTextConfig(
            vocab_size=vocab,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            **cfg,
        )
        cls = CLIPTextModelWithProjection if family == "sdxl" and i == 1 else CLIPTextModel
        encoders.append(cls(config).eval())
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIGS[family]).eval()
    unet = published_unet(family, seed)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizer,
            tokenizer_2=_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
