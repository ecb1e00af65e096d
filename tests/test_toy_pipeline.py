"""The shipped toy pipeline loads offline, in fp32 on CPU, and generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import forgetpatch.toy as toy
from forgetpatch.errors import ForgetPatchError


@pytest.fixture(scope="module")
def pipe():
    return toy.pipeline()


def test_shipped_pipeline_is_fp32_sd_with_toy_tokenizer(pipe):
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert any(n.endswith("attn2.to_k") for n, _ in pipe.unet.named_modules())
    assert pipe.scheduler.config.prediction_type == "epsilon"
    for word in toy.all_words():
        assert pipe.tokenizer.tokenize(word) == [word + "</w>"], word


def test_shipped_pipeline_generates_32px_images(pipe):
    out = pipe(
        ["a red circle on a dots background", ""],
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    images = out.images
    assert images.shape == (2, toy.IMAGE_SIZE, toy.IMAGE_SIZE, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_shipped_weights_are_small():
    size = sum(f.stat().st_size for f in toy.PIPELINE_DIR.rglob("*") if f.is_file())
    assert size < 26 * 2**20


def test_missing_weights_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(toy, "PIPELINE_DIR", tmp_path)
    with pytest.raises(ForgetPatchError, match="forgetpatch.toy.train"):
        toy.pipeline()
