"""The toy world's verbs and Python API on careless input: refused in one line before any work, nothing deleted or
half-written, and no image read as something else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from forgetpatch import toy
from forgetpatch.cli import app
from forgetpatch.errors import ForgetPatchError


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def test_toy_export_never_deletes_a_folder_that_is_not_an_earlier_export(tmp_path):
    """`toy export RUN -o precious` deleted precious/ and everything in it; `-o afile.txt` failed after the export and
    left afile.txt.tmp/ behind."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "important.txt").write_text("keep")
    (tmp_path / "afile.txt").write_text("keep")
    for target, said in ((precious, "holds files that are not a pipeline export"), (tmp_path / "afile.txt", "is a file")):
        result = _run("toy", "export", str(tmp_path / "run"), "-o", str(target))
        assert result.exit_code == 1 and said in result.output, result.output
    assert (precious / "important.txt").read_text() == "keep" and (tmp_path / "afile.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "precious"]


def test_toy_checkpoints_that_are_missing_or_not_checkpoints_are_named(tmp_path):
    result = _run("toy", "export", str(tmp_path / "run"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "no training checkpoint at" in result.output, result.output
    for content in (b"not a pickle", None):
        run = tmp_path / f"run-{content is None}"
        run.mkdir()
        if content is None:
            torch.save({"step": 1}, run / "checkpoint.pt")  # a pickle of something else: was KeyError 'vae'
        else:
            (run / "checkpoint.pt").write_bytes(content)  # was UnpicklingError
        result = _run("toy", "export", str(run), "-o", str(tmp_path / "out"))
        assert result.exit_code == 1 and "is not a toy training checkpoint" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_toy_train_refuses_a_resume_without_a_checkpoint_and_a_device_it_cannot_train_on(tmp_path):
    """--resume with nothing to resume trained a new model from scratch; --device meta started rendering 20,000
    images; --device mps gave a traceback."""
    result = _run("toy", "train", "--resume", "--steps", "1", "-o", str(tmp_path / "fresh"))
    assert result.exit_code == 1 and "no checkpoint in" in result.output, result.output
    for device in ("meta", "mps"):
        result = _run("toy", "train", "--device", device, "--steps", "1", "-o", str(tmp_path / device))
        assert result.exit_code == 1 and "trains on cpu or cuda" in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_only_a_toy_world_export_loads_as_the_toy_world(tmp_path):
    """toy.pipeline(path=...) labelled any diffusers folder the toy world: its patches recorded base "toy" and the
    judge scored its images (shape 0.000, with no warning)."""
    from forgetpatch.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "tinysd")
    with pytest.raises(ForgetPatchError, match="is not a toy-world model"):
        toy.pipeline(path=tmp_path / "tinysd")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ForgetPatchError, match=r"is a training run, not a pipeline: export it first"):
        toy.pipeline(path=run)
    for text in ("{not json", "[1, 2]"):  # was JSONDecodeError / AttributeError (and erase --base's traceback)
        (tmp_path / "bad" / "unet").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "unet" / "config.json").write_text(text)
        assert toy.is_toy_model(tmp_path / "bad") is False


@pytest.fixture(scope="module")
def judge():
    return toy.load_judge()


def test_the_judge_reads_the_same_image_the_same_way_in_every_container(judge):
    """A uint8 tensor (NHWC or NCHW) and a float array in 0-255 were read as "none": only a uint8 NumPy array was
    divided by 255. Now 8-bit values are scaled in any container, and 0-255 floats are refused."""
    pixels = toy.render(toy.Scene("circle", "red", "plain"), 0)
    image = Image.fromarray(pixels)
    same = [pixels, pixels[None], pixels[None] / 255.0, torch.from_numpy(pixels)[None],
            torch.from_numpy(pixels).permute(2, 0, 1)[None], image, [image], [image.resize((64, 64))],
            [image.convert("P")]]  # fmt: skip
    read = [(v["shape"], v["colour"], v["texture"]) for images in same for v in judge.classify(images)]
    assert read == [("circle", "red", "plain")] * len(same), read
    for images, said in (
        (pixels[None].astype(np.float32), "float images in \\[0, 1\\]"),
        ([], "no images"),
        (image.convert("RGBA"), "convert\\('RGB'\\)"),
        ([pixels, pixels[:16, :16]], "several shapes"),
    ):
        with pytest.raises(ForgetPatchError, match=said):
            judge.classify(images)


def test_demo_checks_its_last_outputs_before_the_first_step(tmp_path):
    """A folder named grid.png was found after all four steps; a second demo into the same folder replaced the first
    one's patch silently (erase refuses that without --force)."""
    (tmp_path / "d1" / "grid.png").mkdir(parents=True)
    result = _run("demo", "--images", "1", "--steps", "2", "-o", str(tmp_path / "d1"))
    assert result.exit_code == 1 and "grid.png" in result.output and "1/4" not in result.output, result.output
    (tmp_path / "d2" / "no-circle").mkdir(parents=True)
    (tmp_path / "d2" / "no-circle" / "forgetpatch.json").write_text("{}")
    result = _run("demo", "--images", "1", "--steps", "2", "-o", str(tmp_path / "d2"))
    assert result.exit_code == 1 and "already holds a patch" in result.output and "--force" in result.output


def test_bench_runs_only_the_benchmarks_in_benchmarks(tmp_path):
    result = _run("bench", "../tests/conftest", "--root", str(tmp_path))
    assert result.exit_code == 2 and "not a benchmark's name" in result.output, result.output
