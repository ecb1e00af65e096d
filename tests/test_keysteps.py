"""Key-step analysis: switching the prompt at step k, the curve, its files and the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from forgetpatch.errors import MethodError
from forgetpatch.eval.keysteps import KeyStepCurve, analyze, compare_with_preset, toy_detector, toy_prompts
from forgetpatch.testing import tiny_sd_pipeline


def test_switch_at_end_is_the_concept_image_and_at_zero_the_guide_image():
    pipe = tiny_sd_pipeline(0)
    seen: list[np.ndarray] = []

    def record(images: np.ndarray) -> list[bool]:
        seen.append(images)
        return [True, False][: len(images)]

    curve = analyze(
        pipe, "circle", detector=record, guide="square", num_images=2, num_inference_steps=3, progress=False
    )
    assert curve.switch_steps == [0, 1, 2, 3] and curve.presence == [0.5] * 4 and len(seen) == 4
    noise = torch.cat(
        [torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    )
    for k, prompt in ((3, "circle"), (0, "square")):
        ref = pipe(
            [prompt] * 2, num_inference_steps=3, guidance_scale=3.0, latents=noise.clone(), output_type="np"
        ).images
        assert np.abs(seen[k].astype(np.float32) / 255 - ref).max() <= 1.5 / 255


def test_curve_rise_table_files_and_preset(tmp_path):
    curve = KeyStepCurve(
        concept="circle",
        guide="",
        num_inference_steps=10,
        guidance_scale=3.0,
        timesteps=[901 - 100 * i for i in range(10)],
        switch_steps=list(range(0, 11, 2)),
        presence=[0.0, 0.05, 0.4, 0.8, 0.95, 1.0],
        num_images=20,
        seed=0,
    )
    assert curve.rise() == (4, 8)
    assert "| 4 | 501 | 0.40 | 40% |" in curve.table()
    curve.save(tmp_path)
    data = json.loads((tmp_path / "keysteps.json").read_text())
    assert data["presence"] == curve.presence and data["rise_90"] == 8
    assert (tmp_path / "keysteps.csv").read_text().splitlines()[1] == "0,901,0.0000"
    assert Image.open(tmp_path / "keysteps.png").size[0] > 100
    cmp = compare_with_preset(curve, start_step=14)  # 14/50 -> k = 3 of 10; nearest tested step: 2
    assert cmp["preset_start_fraction"] == 0.28 and cmp["presence_switching_at_preset_start"] == 0.05
    assert cmp["rise_90_fraction"] == 0.8


def test_toy_prompts_and_detector_use_the_judge():
    prompts = toy_prompts("circle", n=5)
    assert len(prompts) == 5 and all("circle" in p for p in prompts)

    class FakeJudge:  # bright: a circle; mid grey: can't tell; dark: a star
        def classify(self, images):
            shapes = ["circle" if im.mean() > 150 else None if im.mean() > 50 else "star" for im in images]
            return [{"shape": s, "colour": "red", "texture": "plain", "p": {}} for s in shapes]

    detect = toy_detector("circle", judge=FakeJudge())
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (200, 100, 0)])
    assert detect(images) == [True, True, False]  # an abstention is not forgetting: the circle may still be there


def test_bad_input():
    """Settings and detectors the analysis cannot use are named as such: an empty step list and batch size 0 raised
    Python's own errors, and a detector with one verdict too many (or a score) gave a presence of 200% (or 50%)."""
    pipe = tiny_sd_pipeline(0)
    small = {"num_inference_steps": 3, "num_images": 2, "progress": False}
    with pytest.raises(MethodError, match="switch steps"):
        analyze(pipe, "circle", detector=lambda x: [True] * len(x), num_inference_steps=3, switch_steps=[5])
    with pytest.raises(MethodError, match="switch_steps is empty"):
        analyze(pipe, "circle", detector=lambda x: [True] * len(x), switch_steps=[], **small)
    with pytest.raises(MethodError, match="batch_size >= 1"):
        analyze(pipe, "circle", detector=lambda x: [True] * len(x), batch_size=0, **small)
    with pytest.raises(MethodError, match="4 verdicts for 2 images"):
        analyze(pipe, "circle", detector=lambda x: [True] * 2 * len(x), switch_steps=[3], **small)
    with pytest.raises(MethodError, match="returned 0.2: return True or False"):
        analyze(pipe, "circle", detector=lambda x: [0.2] * len(x), switch_steps=[3], **small)


def test_cli_names_an_unknown_concept_whole(tmp_path):
    from forgetpatch.cli import app

    result = CliRunner().invoke(app, ["keysteps", "--base", "toy", "--concept", "nosuch", "-o", str(tmp_path / "k")])
    assert result.exit_code == 1
    assert "'nosuch' is not a toy-world concept; known: circle, ellipse" in " ".join(result.output.split())


def test_cli_refuses_a_base_without_a_judge(tmp_path):
    from forgetpatch.cli import app

    result = CliRunner().invoke(
        app, ["keysteps", "--base", "./sd15", "--concept", "circle", "-o", str(tmp_path)]
    )
    assert result.exit_code == 1 and "judge" in result.output
