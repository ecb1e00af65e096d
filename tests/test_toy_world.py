"""The toy world's renderer, tokenizer and model architecture."""

from __future__ import annotations

import numpy as np
import pytest

from forgetpatch.toy import vocab
from forgetpatch.toy.model import MAX_TOKENS, ToyModelConfig, build_pipeline, build_tokenizer
from forgetpatch.toy.render import IMAGE_SIZE, render
from forgetpatch.toy.train import TrainConfig, dataset_scene, training_prompt


def test_render_is_deterministic_uint8_rgb():
    scene = vocab.Scene("star", "blue", "checker")
    a, b = render(scene, seed=7), render(scene, seed=7)
    assert a.dtype == np.uint8 and a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render(scene, seed=8))


@pytest.mark.parametrize("kind", ["shape", "colour", "texture"])
def test_render_concepts_of_a_kind_are_distinct(kind):
    base = vocab.Scene("circle", "red", "plain")
    images = [render(vocab.Scene(**{**base.__dict__, kind: c}), seed=3) for c in vocab.concepts_of(kind)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).sum() > 0, (i, j)


def test_shape_covers_a_legible_part_of_the_image():
    for seed in range(20):
        img = render(vocab.Scene("square", "red", "plain"), seed=seed).astype(int)
        red = (img[..., 0] > 150) & (img[..., 1] < 100)
        assert 0.1 < red.mean() < 0.6


def test_background_is_grey_so_colour_reads():
    img = render(vocab.Scene("ring", "green", "stripes"), seed=0).astype(int)
    greyish = np.abs(img - img.mean(axis=2, keepdims=True)).max(axis=2) < 4
    assert greyish.mean() > 0.4


def test_tokenizer_spells_every_toy_word_as_one_token():
    tok = build_tokenizer()
    for word in vocab.all_words():
        assert tok.tokenize(word) == [word + "</w>"], word
    assert tok.tokenize("xyz") == ["x", "y", "z</w>"]  # unknown words still tokenize
    assert tok.model_max_length == MAX_TOKENS
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2


def test_pipeline_has_sd_cross_attention_names_and_eps_ddim():
    pipe = build_pipeline(ToyModelConfig(), seed=0)
    names = [n for n, _ in pipe.unet.named_modules()]
    assert any(n.endswith("attn2.to_k") for n in names)
    assert any(n.endswith("attn2.to_v") for n in names)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_training_never_sees_heldout_scenes_and_mixes_prompts():
    import random

    scenes = [dataset_scene(i)[0] for i in range(2000)]
    assert not any(vocab.is_heldout(s) for s in scenes)
    rng, cfg = random.Random(0), TrainConfig()
    prompts = [training_prompt(scenes[i], rng, cfg) for i in range(2000)]
    assert 0.05 < prompts.count("") / len(prompts) < 0.15
    assert any(vocab.SHAPE_SUPERCLASS in p.split() for p in prompts)
    assert any("disc" in p.split() for p in prompts)
    heldout_prompts = {vocab.prompt(s, t) for s in vocab.all_scenes() for t in vocab.HELDOUT_TEMPLATES}
    assert not heldout_prompts & set(prompts)
    assert not set(vocab.HELDOUT_TEMPLATES) & set(vocab.ORDER_TEMPLATES + vocab.TRAIN_TEMPLATES)
    reordered = {vocab.prompt(s, t) for s in vocab.all_scenes() for t in vocab.ORDER_TEMPLATES}
    assert 0.05 < sum(p in reordered for p in prompts) / len(prompts) < 0.3  # other word orders are trained on
