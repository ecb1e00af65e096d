"""Toy training runs, checkpoints atomically, resumes, and exports a loadable pipeline."""

from __future__ import annotations

import json

import pytest
import torch

import forgetpatch.toy as toy
from forgetpatch.errors import ForgetPatchError
from forgetpatch.toy.model import ToyModelConfig
from forgetpatch.toy.train import CHECKPOINT, LATENTS, TrainConfig, Trainer, train


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, warmup=2, vae_steps=2, vae_batch_size=4, dataset_size=16)


def test_train_resume_and_export(tmp_path):
    out = tmp_path / "run"
    first = train(out, _cfg(steps=2))
    assert first.step == 2 and first.vae_step == 2 and first.scaling_factor > 0
    assert (out / CHECKPOINT).exists() and (out / LATENTS).exists()
    assert not list(out.glob("*.tmp"))

    with pytest.raises(ForgetPatchError, match="--resume"):
        train(out, _cfg(steps=3))

    resumed = train(out, _cfg(steps=3), resume=True)
    assert resumed.step == 3 and resumed.scaling_factor == first.scaling_factor
    torch.testing.assert_close(resumed.vae.state_dict(), first.vae.state_dict())  # VAE frozen after phase 1

    resumed.export(tmp_path / "pipe")
    exporter = Trainer(out, TrainConfig(p_reorder=0.9), ToyModelConfig(), "cpu")  # as `--export` builds it
    exporter.load(out / CHECKPOINT)
    assert exporter.export(tmp_path / "pipe-again") is not None
    phases = json.loads((tmp_path / "pipe-again" / "training.json").read_text())["phases"]
    assert phases == [{"steps": [0, 3], "p_reorder": TrainConfig.p_reorder}]  # the run's mix, not 0.9
    pipe = toy.pipeline(path=tmp_path / "pipe")
    assert pipe.vae.config.scaling_factor == pytest.approx(first.scaling_factor)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, toy.IMAGE_SIZE, toy.IMAGE_SIZE, 3)


def test_training_continues_from_an_export(tmp_path):
    """``init_from``: a lost checkpoint is no dead end; training goes on from the shipped-style export."""
    first = train(tmp_path / "run", _cfg(steps=2))
    first.export(tmp_path / "pipe")
    exported = toy.pipeline(path=tmp_path / "pipe")

    cont = train(tmp_path / "again", _cfg(steps=4), init_from=tmp_path / "pipe")
    assert cont.step == 4 and cont.restart_step == 2 and cont.vae_step == 2
    assert cont.scaling_factor == pytest.approx(exported.vae.config.scaling_factor)
    torch.testing.assert_close(cont.vae.state_dict(), exported.vae.state_dict())  # VAE kept as exported
    assert cont.lr_at(2) < cont.lr_at(3)  # the fresh optimiser warms up again
    cont.export(tmp_path / "pipe2")
    info = json.loads((tmp_path / "pipe2" / "training.json").read_text())
    assert info["phases"] == [  # both runs, with the prompt mix each used
        {"steps": [0, 2], "p_reorder": TrainConfig.p_reorder},
        {"steps": [2, 4], "p_reorder": TrainConfig.p_reorder},
    ]
    with pytest.raises(ForgetPatchError, match="--resume"):  # an existing run is never overwritten
        train(tmp_path / "again", _cfg(steps=5), init_from=tmp_path / "pipe")
