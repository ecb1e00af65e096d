"""Hostile or careless input to recipes, method parameters and the patch format: refused in one line, before any
work, never accepted and then ignored, dropped or turned into something else."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_format import PATHS, random_factors
from typer.testing import CliRunner

from forgetpatch.cli import app
from forgetpatch.errors import ConceptError, ManifestError, MethodError
from forgetpatch.format import (
    HEADER_MANIFEST_KEY,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Patch,
    as_concepts,
    build_patch,
    read_patch,
    record_metrics,
)
from forgetpatch.format.migrate import upgrade
from forgetpatch.methods.uce import UCEParams
from forgetpatch.recipes import load_recipe
from forgetpatch.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def _patch(pipe, seed: int = 0, **kwargs) -> Patch:
    return build_patch(pipe, random_factors(pipe, seed=seed), name="p", method="manual", concepts=["cat"], **kwargs)


# --- method parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"lamm": 0.5}, r"unknown uce parameter\(s\) \['lamm'\]"),
        ({"lam": True}, "lam must be a number, got True"),  # was read as lam=1.0
        ({"robust": 2.7}, "robust must be an integer, got 2.7"),  # was cut to 2 rounds
        ({"max_rank": 2.9}, "max_rank must be an integer or None"),
        ({"templates": "a photo of {concept}"}, "templates must be a list"),  # was a tuple of characters
        ({"lam": float("inf")}, "lam must be a finite number"),
        ({"hold": "false"}, "hold must be true or false"),
        ({"pipe": 1}, r"unknown uce parameter\(s\) \['pipe'\]"),
    ],
)
def test_uce_parameters_of_the_wrong_type_are_refused_not_converted(params, said):
    from forgetpatch.methods import check_params

    with pytest.raises(MethodError, match=said):
        check_params("uce", params)
    if set(params) <= {"lam", "robust", "max_rank", "templates"}:
        with pytest.raises(MethodError, match=said.replace("or None", "")):
            UCEParams.from_dict(params)


def test_parameters_are_converted_only_where_nothing_is_lost():
    """A whole number for a number and a list (YAML has no tuples) for a tuple are what the user meant."""
    from forgetpatch.methods import check_params

    settings = UCEParams.from_dict({"lam": 1, "templates": ["a {concept}"], "robust": 2})
    assert settings.lam == 1.0 and isinstance(settings.lam, float)
    assert settings.templates == ("a {concept}",) and settings.robust == 2
    check_params("esd", {"eta": 1, "rank": 4, "iterations": 10, "seed": 0, "name": "x", "progress": False})
    check_params("dynamic_mask", {"steps": 2, "templates": ["a {concept}"]})
    check_params("kscu", {"iterations": None, "scope": None})  # KSCU's own None (its preset), not the engine's int
    with pytest.raises(MethodError, match="iterations must be an integer"):
        check_params("kscu", {"iterations": "ten"})


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ("{lamm: 0.5}", r"unknown uce parameter\(s\) \['lamm'\]"),
        ("{lam: .nan}", "lam must be a finite number"),
        ("{lam: yes}", "lam must be a number, got True"),
        ("{pipe: 1}", "pipe is erase's own argument"),  # was a TypeError traceback after the model loaded
    ],
)
def test_erase_refuses_a_recipes_bad_parameters_before_the_model_loads(tmp_path, params, said):
    """A missing base folder is found only when the model loads: the parameter's error comes first."""
    recipe = _recipe(tmp_path, f"method: uce\nconcepts: [cat]\nparams: {params}\n")
    result = CliRunner().invoke(app, ["erase", "--recipe", str(recipe), "--base", str(tmp_path / "no-base"),
                                      "-o", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert "not found" not in result.output, result.output
    assert result.output.count("\n") == 1 and __import__("re").search(said, result.output), result.output


def test_chain_force_keeps_the_old_chain_when_the_input_is_bad(tmp_path):
    """--force removed the old steps first; a typo in the recipe then left the folder empty."""
    out = tmp_path / "chain"
    (out / "step-1").mkdir(parents=True)
    (out / "step-1" / MANIFEST_NAME).write_text("{}")
    recipe = _recipe(tmp_path, "base: toy\nmethod: uce\nconcepts: [circle, star]\nparams: {lamm: 0.5}\n")
    result = CliRunner().invoke(app, ["chain", str(recipe), "-o", str(out), "--force"])
    assert result.exit_code == 1 and "lamm" in result.output, result.output
    assert (out / "step-1" / MANIFEST_NAME).is_file() and "removed" not in result.output


# --- recipe files -----------------------------------------------------------------------------------
def test_a_recipe_with_aliases_is_refused_before_it_expands(tmp_path):
    """Six levels of aliases in 433 bytes took 9.7 s and 820 MB; seven, 100 s and 7.4 GB."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    recipe = _recipe(tmp_path, "\n".join(levels) + "\nmethod: uce\nconcepts: [cat]\n")
    with pytest.raises(MethodError, match="aliases .* are not read in a recipe"):
        load_recipe(recipe)


def test_a_recipe_is_read_with_a_size_bound(tmp_path):
    big = _recipe(tmp_path, "concepts: [cat]\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(MethodError, match="more than the 1,048,576 allowed"):
        load_recipe(big)
    with pytest.raises(MethodError, match="not a regular file"):
        load_recipe("/dev/zero")  # read until memory ran out


def test_a_recipes_comma_separated_concepts_are_refused_as_in_python(tmp_path):
    with pytest.raises(MethodError, match=r"one concept; to name several write a list: \[circle, star\]"):
        load_recipe(_recipe(tmp_path, "concepts: circle, star\n"))
    assert [c.target for c in load_recipe(_recipe(tmp_path, "concepts: circle\n")).concepts] == ["circle"]


def test_concepts_come_as_a_list_in_order():
    with pytest.raises(ConceptError, match="a set, whose order changes"):
        as_concepts({"cat", "dog"})
    with pytest.raises(ConceptError, match="give a concept .* not 5"):
        as_concepts(5)
    assert [c.target for c in as_concepts(("cat", "dog"))] == ["cat", "dog"]


# --- the patch format ---------------------------------------------------------------------------------
def test_numbers_the_manifest_cannot_store_are_refused_where_they_are_given(pipe, tmp_path):
    """A NaN or infinite timestep, reconstruction error or parameter was saved as null, then read back as None or
    refused on reading; a NumPy or torch number in the metrics raised pydantic's serialisation error."""
    with pytest.raises(ManifestError, match="timesteps"):
        _patch(pipe, key_steps=[{"start": 0.0, "end": 1.0, "timesteps": [float("inf")]}])
    with pytest.raises(ManifestError, match="reconstruction_errors"):
        _patch(pipe, reconstruction_errors={PATHS[0]: float("nan")})
    with pytest.raises(ManifestError, match=r"method.params\['lam'\] is inf"):
        _patch(pipe, params={"lam": float("inf")}).save(tmp_path / "inf")
    for value in (np.float32(0.5), np.int64(3), torch.tensor(0.5)):
        patch = _patch(pipe)
        patch.manifest.metrics["figure"] = value
        with pytest.raises(ManifestError, match=r"metrics\['figure'\] is a .*record plain Python values"):
            patch.save(tmp_path / "np")
    assert not (tmp_path / "inf").exists() and not (tmp_path / "np").exists()


def test_an_invalid_manifest_is_one_line(pipe, tmp_path):
    folder = _patch(pipe).save(tmp_path / "p")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["lora"]["rank"] = -1
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 1 and "lora.rank:" in result.output, result.output
    assert result.output.count("\n") == 1 and "errors.pydantic.dev" not in result.output, result.output


def _v0(**changes):
    return {"format_version": 0, "name": "old", "method": "esd-x", "concepts": ["cat"], "rank": 2, "alpha": 2,
            "target_modules": PATHS, **changes}  # fmt: skip


def test_a_v0_manifest_migrates_as_written_or_is_refused(pipe, tmp_path):
    """"concepts": "cat" became the concepts c, a, t; a third key-step number was dropped; an alpha_pattern was
    dropped (the patch would then act at other scales); [0.3] said only IndexError."""
    assert [c["target"] for c in upgrade(_v0(concepts="cat"))["concepts"]] == ["cat"]
    assert [c["target"] for c in upgrade(_v0(concepts={"target": "cat"}))["concepts"]] == ["cat"]
    for bad, said in (({"key_steps": [0.0, 0.3, 0.9]}, r"key_steps is \[0.0, 0.3, 0.9\], not \[start, end\]"),
                      ({"key_steps": [0.3]}, r"not \[start, end\]"),
                      ({"alpha_pattern": {PATHS[0]: 4}}, "keys v0 never had \\(alpha_pattern\\)"),
                      ({"concepts": 5}, "concepts is 5, not a list")):  # fmt: skip
        with pytest.raises(ManifestError, match=said):
            upgrade(_v0(**bad))
    uniform = build_patch(pipe, {p: (A[:2], B[:, :2]) for p, (A, B) in random_factors(pipe).items()},
                          name="u", method="m", concepts=["cat"], lineage=[])  # fmt: skip
    folder = tmp_path / "old"
    folder.mkdir()
    v0 = _v0(concepts="cat", metrics={"ua": 0.9})
    save_file(uniform.state_dict, str(folder / WEIGHTS_NAME), metadata={HEADER_MANIFEST_KEY: json.dumps(v0)})
    (folder / MANIFEST_NAME).write_text(json.dumps(v0))
    old = read_patch(folder, allow_unverified=True).manifest
    assert [c.target for c in old.concepts] == ["cat"] and old.metrics == {"ua": 0.9}


def test_a_grid_of_the_patch_a_save_replaces_is_not_listed_with_the_new_one(pipe, tmp_path):
    """Save A, put its grid beside it, save B over it: B listed A's grid, and push would publish it with B."""
    from PIL import Image

    folder = _patch(pipe, seed=0).save(tmp_path / "p")
    Image.new("RGB", (8, 8), "red").save(folder / "grid.png")
    _patch(pipe, seed=0).save(folder)  # the same patch again: its grid stays listed
    assert "grid.png" in read_patch(folder).manifest.files
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # figures recorded into it change the weights file's header, not the patch
        record_metrics(folder, lambda patch: {"figure": 0.5})
    assert "grid.png" in read_patch(folder).manifest.files
    with pytest.warns(UserWarning, match="grid.png shows the patch this one replaced"):
        _patch(pipe, seed=1).save(folder)
    assert "grid.png" not in read_patch(folder).manifest.files and (folder / "grid.png").is_file()
    Image.new("RGB", (8, 8), "blue").save(folder / "grid.png")  # a new grid, then the save: it is the new one's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _patch(pipe, seed=2).save(folder)
    assert "grid.png" in read_patch(folder).manifest.files


def test_every_shipped_recipe_passes_the_parameter_check():
    """The early check must not refuse what the methods take (Dynamic Mask's ``adversarial`` sits outside its
    params dataclass)."""
    from pathlib import Path

    from forgetpatch.methods import check_params

    recipes = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) > 10
    for path in recipes:
        kwargs = load_recipe(path).erase_kwargs()
        method = kwargs.pop("method")
        check_params(method, {k: v for k, v in kwargs.items() if k not in ("preserve", "paper")})


def test_a_manifest_path_and_empty_recipe_fields_are_named(pipe, tmp_path):
    """read_patch("p/forgetpatch.json") said the file was corrupt ("re-download"); a recipe's `name: ""` and `base: ""`
    were accepted and then ignored."""
    from forgetpatch.errors import PatchFormatError

    folder = _patch(pipe).save(tmp_path / "p")
    with pytest.raises(PatchFormatError, match="is a patch's manifest: give its folder"):
        read_patch(folder / MANIFEST_NAME)
    for field in ("name", "base"):
        with pytest.raises(MethodError, match=f"{field}: Value error, is empty"):
            load_recipe(_recipe(tmp_path, f'{field}: ""\nconcepts: [cat]\n'))
