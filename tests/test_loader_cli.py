"""``forgetpatch inspect`` and ``forgetpatch apply`` on tiny patches and a saved tiny pipeline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from forgetpatch.cli import app
from forgetpatch.format import KeyStepRange, build_patch, resolve_module
from forgetpatch.testing import tiny_sd_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(root / "base")
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w = resolve_module(pipe, path).weight
    g = torch.Generator().manual_seed(0)
    patch = build_patch(pipe, {path: (torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g))},
                        name="no-circle", method="manual", concepts=[{"target": "circle", "guide": "square"}, {"target": "star", "superclass": "cross"}],
                        key_steps=[KeyStepRange(start=0.0, end=0.3)], metrics={"forget_acc": 0.02}, lineage=[])  # fmt: skip
    return root, patch.save(root / "no-circle"), patch


def test_inspect(saved):
    _, folder, patch = saved
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    for text in (
        "circle (object) -> square",
        "star (object), superclass cross",  # Dynamic Mask's
        "manual",
        "0.00-0.30",
        "rank 2",
        "forget acc (--json for all)",
        patch.digest[:12],
    ):
        assert text in result.output
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert '"format_version": 1' in result.output


def test_inspect_bad_ref(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    result = runner.invoke(app, ["inspect", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "not a valid safetensors" in result.output


def test_apply_writes_patched_image(saved, tmp_path):
    root, folder, _ = saved
    out = tmp_path / "out.png"
    args = ["apply", "--base", str(root / "base"), str(folder), "--prompt", "a red circle", "-o", str(out),
            "--steps", "2", "--key-steps", "--compare"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "no-circle" in result.output
    image = Image.open(out)
    assert image.size == (256, 256) and out.with_suffix(".base.png").exists()  # 32 pixels, enlarged to be seen
    assert image.text["prompt"] == "a red circle" and image.text["patches"] == "no-circle"


def _help_pages(group, words: list[str]):
    """``words + ["--help"]`` for the group and each of its verbs and verb groups, recursively."""
    yield words
    for name, command in getattr(group, "commands", {}).items():
        yield from _help_pages(command, [*words, name])


def test_every_help_page_shows_flags_without_a_value():
    """A flag takes no value, so no help page puts a type beside one (typer 0.29 prints ``--fuse <bool>``); options
    that take a value keep theirs."""
    import typer

    pages = list(_help_pages(typer.main.get_command(app), []))
    assert ["apply"] in pages and ["toy", "train"] in pages
    for words in pages:
        if words[:1] == ["bench"] and len(words) > 1:
            continue
        result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert result.exit_code == 0, (words, result.output)
        assert "<bool>" not in result.output, (words, result.output)
        assert "--help" in result.output
    page = runner.invoke(app, ["apply", "--help"], env={"COLUMNS": "200"}, terminal_width=200).output
    assert "<float>" in page and "--fuse" in page
