"""Published Stable Diffusion, SD3 and FLUX architecture configs, for random-weight models.

No real weights can be downloaded here, so real architectures are built from the configs their
model repos publish (``unet/config.json``, ``transformer/config.json``, ``text_encoder/config.json``,
``vae/config.json``, ``scheduler/scheduler_config.json``): code paths, shapes and timings are real even
though the pictures are not.
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["sd15", "sd21", "sdxl"]
#: Families whose denoiser is a transformer (MMDiT) sampled with flow matching.
TransformerFamily = Literal["sd3", "flux"]

_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd15": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    # stabilityai/stable-diffusion-2-1 unet/config.json
    "sd21": {
        "sample_size": 96,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}

# CLIP ViT-L/14 (SD 1.x), OpenCLIP ViT-H/14 (SD 2.x), and SDXL's ViT-L + OpenCLIP bigG.
TEXT_ENCODER_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "sd15": [
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
    ],
    "sd21": [
        {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
    ],
    "sdxl": [
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
    ],
}

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {**_SD_VAE, "sample_size": 512},
    "sd21": {**_SD_VAE, "sample_size": 768},
    "sdxl": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (SD3Transformer2DModel, ~2.0B)
    "sd3": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    },
    # black-forest-labs/FLUX.1-dev transformer/config.json (FluxTransformer2DModel, ~11.9B)
    "flux": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    },
}

#: ``scheduler/scheduler_config.json`` of the same repos (``FlowMatchEulerDiscreteScheduler``).
FLOW_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
    "flux": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}
