"""The toy world's Stable Diffusion: a real, small ``StableDiffusionPipeline`` built from configs.

The parts are the ones SD 1.x has, only narrower: an ``AutoencoderKL`` (32x32 RGB -> 8x8x4
latents, as SD's factor 8 is for 512 px; a shape spans 4-6 latent pixels), a 2-layer ``CLIPTextModel`` over the
toy tokenizer, a ``UNet2DConditionModel`` whose cross-attention modules are named as in SD
(``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``; cross-attention at 8x8, 4x4 and
the 2x2 middle, about 6M parameters) and a ``DDIMScheduler`` with SD's
noise schedule and epsilon prediction.

Example:
    >>> from forgetpatch.toy.model import build_pipeline
    >>> pipe = build_pipeline(seed=0)
    >>> pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from forgetpatch.archs import SCHEDULER_CONFIG
from forgetpatch.tokenizer import word_level_clip_tokenizer
from forgetpatch.toy import vocab
from forgetpatch.toy.render import IMAGE_SIZE

#: Longest prompt the toy text encoder reads, in tokens (BOS and EOS included).
MAX_TOKENS = 24


@dataclass
class ToyModelConfig:
    """Widths of the toy pipeline's parts; the defaults are the shipped model's."""

    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention: tuple[bool, ...] = (True, True, False)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tokenizer() -> CLIPTokenizer:
    """The toy tokenizer: each toy-world word (concepts, synonyms, fillers) is one token."""
    return word_level_clip_tokenizer(vocab.all_words(), model_max_length=MAX_TOKENS)


def build_vae(config: ToyModelConfig) -> AutoencoderKL:
    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(config: ToyModelConfig, vocab_size: int) -> CLIPTextModel:
    h = config.text_hidden
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=h,
            intermediate_size=4 * h,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=h,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )


def build_unet(config: ToyModelConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_attention))
    factor = 2 ** (len(config.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // factor,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        layers_per_block=config.unet_layers_per_block,
        block_out_channels=config.unet_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=32,
    )


def build_pipeline(config: ToyModelConfig | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A toy pipeline with freshly initialised (untrained) weights, seeded."""
    config = config or ToyModelConfig()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    vae = build_vae(config)
    text_encoder = build_text_encoder(config, len(tokenizer))
    unet = build_unet(config)
    return assemble(vae, text_encoder, tokenizer, unet)


def assemble(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """Put trained parts together with SD's DDIM scheduler."""
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
