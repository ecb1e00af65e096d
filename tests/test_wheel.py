"""The built wheel works on its own: everything the package reads at run time is inside it.

A wheel is built from the checkout, unpacked, and imported in a fresh interpreter with the unpacked folder
first on ``sys.path`` (so nothing is read from the checkout): the toy world loads from its shipped weights, the
judge classifies, and a patch's model card renders from the shipped template.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import forgetpatch
    from forgetpatch import toy
    from forgetpatch.hub import render_card
    assert forgetpatch.__file__.startswith(sys.argv[1]), forgetpatch.__file__
    pipe = toy.pipeline()
    image = pipe("a red circle", num_inference_steps=4, output_type="np").images
    verdict = toy.load_judge().classify((image * 255).round().astype("uint8"))[0]
    assert set(verdict) >= {"shape", "colour", "texture", "p"}, verdict
    patch = forgetpatch.erase(pipe, ["circle"], method="uce", progress=False)
    card = str(render_card(patch, "someone/no-circle"))
    assert "forgetpatch.apply" in card, card[:400]
    print("ok", len(card))
    """
)


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    """The wheel, built and unpacked once for the run: under ``pytest -n N`` both workers built it in the same source
    tree at once (setuptools' in-tree ``build/``), and one build failed."""
    from toy_bars import made_once

    def make() -> Path:
        out = tmp_path_factory.mktemp("wheel")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
            check=True,
            capture_output=True,
        )
        (wheel,) = out.glob("forgetpatch-*.whl")
        site = out / "site"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        return site

    return made_once("wheel", make)


def test_wheel_ships_the_card_template_and_the_toy_weights(unpacked):
    package = unpacked / "forgetpatch"
    assert (package / "hub" / "cards" / "patch.md").is_file()
    assert (package / "toy" / "weights" / "judge.safetensors").is_file()
    assert (package / "toy" / "weights" / "pipeline" / "model_index.json").is_file()
    assert (package / "py.typed").is_file()


def test_installed_package_erases_and_renders_a_card_without_the_checkout(unpacked, tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(unpacked)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")
