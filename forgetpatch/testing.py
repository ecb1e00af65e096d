"""Random-weight diffusion pipelines for tests and benchmarks (no download needed).

* :func:`tiny_sd_pipeline` / :func:`tiny_sdxl_pipeline`: seconds to build, SD 1.x-like and
  SDXL-like (two text encoders, ``text_time`` conditioning), module names as in the real models.
* :func:`tiny_sd3_pipeline` / :func:`tiny_flux_pipeline`: a ``StableDiffusion3Pipeline`` (MMDiT, two CLIP
  encoders + T5) and a ``FluxPipeline`` (double- and single-stream blocks, CLIP + T5), flow-matching
  scheduler with the published settings; tokenizers built offline (:func:`t5_tokenizer` stands in for T5's).
* :func:`published_unet` / :func:`published_pipeline`: full-size SD 1.5, SD 2.1 and SDXL
  architectures from their published configs (:mod:`forgetpatch.archs`), with random weights;
  :func:`published_transformer`: the SD3-medium and FLUX.1-dev transformers (on ``meta`` for shapes).

Example:
    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from forgetpatch.archs import (
    FLOW_SCHEDULER_CONFIGS,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIGS,
    TRANSFORMER_CONFIGS,
    UNET_CONFIGS,
    VAE_CONFIGS,
    Family,
    TransformerFamily,
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


def _tiny_vae(seed: int, **extra) -> AutoencoderKL:
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
        **extra,
    ).eval()


def t5_tokenizer(words: list[str] = TEST_WORDS, model_max_length: int = 512) -> T5TokenizerFast:
    """An offline stand-in for T5's tokenizer: a SentencePiece-style unigram model in which each of ``words``
    is one piece (``"▁red"``) and any other text is spelled character by character; ``</s>`` ends every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    pieces = [(s, 0.0) for s in specials] + [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [("\u2581", -2.0)] + [(chr(c), -5.0) for c in range(ord("!"), ord("~") + 1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def _t5_encoder(d_model: int, vocab_size: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3 and FLUX use
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


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


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline (MMDiT, CLIP-L/G-like + T5 encoders, flow matching, 32px) with random weights."""
    tokenizer = _tokenizer()
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5 width; the two CLIP outputs (2 x 32) are padded to it
        caption_projection_dim=32,  # = heads * head_dim, as in SD3
        pooled_projection_dim=64,  # the two pooled CLIP outputs, concatenated
        pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIGS["sd3"]),
        vae=_tiny_vae(seed + 1, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_text_encoder(32, len(tokenizer), projection=True, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(32, len(tokenizer), projection=True, seed=seed + 3),
        tokenizer_2=_tokenizer(),
        text_encoder_3=_t5_encoder(64, len(t5_tok), seed=seed + 4),
        tokenizer_3=t5_tok,
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A FLUX.1-dev-shaped pipeline (double + single-stream blocks, guidance embedding, CLIP + T5) with random weights."""
    tokenizer = _tokenizer()
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2 x 2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width
        pooled_projection_dim=32,  # CLIP pooled width
        guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],  # sums to attention_head_dim
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIGS["flux"]),
        vae=_tiny_vae(seed + 1, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_text_encoder(32, len(tokenizer), projection=False, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(32, len(t5_tok), seed=seed + 3),
        tokenizer_2=t5_tok,
    )


def published_transformer(
    family: TransformerFamily = "sd3", seed: int = 0, device: str | torch.device | None = None
) -> SD3Transformer2DModel | FluxTransformer2DModel:
    """The full-size transformer of ``family`` (``"sd3"``: SD3-medium, ``"flux"``: FLUX.1-dev), random weights.

    ``device="meta"`` builds it without allocating (shapes and module names only; instant). On CPU in fp32
    SD3-medium takes ~8 GB and FLUX.1-dev ~48 GB.
    """
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    torch.manual_seed(seed)
    if device is None:
        return cls(**TRANSFORMER_CONFIGS[family]).eval()
    with torch.device(device):
        return cls(**TRANSFORMER_CONFIGS[family]).eval()


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
