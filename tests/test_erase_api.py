"""``forgetpatch.erase``: input errors, recipes, the ``erase`` command, and patches that act as in-place edits."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from typer.testing import CliRunner

import forgetpatch
from forgetpatch.cli import app
from forgetpatch.errors import ConceptError, MethodError, UnknownMethodError
from forgetpatch.format import read_patch
from forgetpatch.methods import Concept, get_method
from forgetpatch.methods.closed_form import cross_attention_layers
from forgetpatch.methods.scapre import ScaPre
from forgetpatch.methods.uce import UCE
from forgetpatch.recipes import load_recipe
from forgetpatch.testing import tiny_sd_pipeline

METHODS = ["uce", "scapre"]
RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


class DroppingTokenizer:
    """A tokenizer that silently drops one word, as real tokenizers drop characters they cannot encode."""

    def __init__(self, inner, dropped: str):
        self.inner, self.dropped = inner, dropped

    def __call__(self, texts, **kwargs):
        texts = [" ".join(w for w in t.split() if w != self.dropped) for t in texts]
        return self.inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_empty_concept_list_is_refused(sd, method):
    with pytest.raises(ConceptError, match="nothing to erase"):
        forgetpatch.erase(sd, [], method=method)
    with pytest.raises(ConceptError, match="nothing to erase"):
        get_method(method).erase(sd, [], preserve=[])


@pytest.mark.parametrize("method", ["uce", "scapre", "esd", "kscu", "dynamic_mask"])
def test_preserving_what_is_erased_is_refused(sd, method):
    """Every method, called through erase or its class, refuses a concept both erased and preserved (compared by
    Concept.key: trimmed, lower-cased) before anything slow starts."""
    with pytest.raises(ConceptError, match="both erased and preserved"):
        forgetpatch.erase(sd, ["circle", "star"], method=method, preserve=["star"])
    with pytest.raises(ConceptError, match="both erased and preserved"):
        get_method(method).erase(sd, [Concept("circle")], preserve=[Concept(" Circle")])
    with pytest.raises(ConceptError, match="nothing to erase"):
        get_method(method).erase(sd, [], preserve=[])


@pytest.mark.parametrize("method", ["uce", "scapre", "esd", "kscu", "dynamic_mask"])
def test_steering_to_a_concept_the_same_patch_erases_is_refused(sd, method, monkeypatch, tmp_path):
    """A concept steered (guide or superclass) to one the same patch erases would draw that erased concept: refused
    by every method, through erase or its class, and by the CLI before the model loads."""
    import forgetpatch.cli.erase as cli_erase
    from forgetpatch.cli import app

    for circle in (Concept("circle", guide="Star "), Concept("circle", superclass="star")):
        with pytest.raises(ConceptError, match="'circle' is steered to .*which this patch erases too"):
            forgetpatch.erase(sd, [circle, "star"], method=method)
        with pytest.raises(ConceptError, match="which this patch erases too"):
            get_method(method).erase(sd, [circle, Concept("star")], preserve=[])
    monkeypatch.setattr(cli_erase, "load_base", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    args = ["erase", "-m", method, "-c", "circle", "-c", "star", "--guide", "star", "-o", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "which this patch erases too" in result.output


def test_steering_to_a_concept_a_patch_on_the_pipeline_erases_is_refused():
    """On a patched pipeline (sequential unlearning), a new concept steered to one the patch there erased would
    draw that concept wherever the new patch is applied without its parent: refused, with hold or without."""
    pipe = tiny_sd_pipeline(seed=0)
    pipe = forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["circle"], method="uce"))
    for hold in (True, False):
        for star in (Concept("star", guide="circle"), Concept("star", superclass="Circle")):
            with pytest.raises(ConceptError, match="'star' is steered to .*which a patch on this pipeline erases"):
                forgetpatch.erase(pipe, [star], method="uce", hold=hold)
    assert forgetpatch.erase(pipe, [Concept("star", guide="square")], method="uce").manifest.concepts[0].guide


@pytest.mark.parametrize("method", METHODS)
def test_concept_that_tokenizes_to_nothing_is_refused(method):
    pipe = tiny_sd_pipeline(seed=0)
    pipe.tokenizer = DroppingTokenizer(pipe.tokenizer, dropped="zzz")
    with pytest.raises(ConceptError, match=r"\['zzz'\] tokenize to nothing"):
        forgetpatch.erase(pipe, ["circle", "zzz"], method=method)


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_without_cross_attention_is_refused(method):
    pipe = tiny_sd_pipeline(seed=0)
    pipe.unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    with pytest.raises(MethodError, match="no cross-attention layers"):
        forgetpatch.erase(pipe, ["circle"], method=method)
    with pytest.raises(MethodError, match="has no UNet"):
        forgetpatch.erase(
            SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder), ["circle"]
        )


@pytest.mark.parametrize("method", METHODS)
def test_unknown_parameter_is_refused(sd, method):
    with pytest.raises(MethodError, match="unknown .* parameter"):
        forgetpatch.erase(sd, ["circle"], method=method, erase_scal=3)


def test_unknown_method_lists_the_known_ones(sd):
    with pytest.raises(UnknownMethodError, match="scapre"):
        forgetpatch.erase(sd, ["circle"], method="nope")


def test_erase_does_not_touch_the_pipeline(sd):
    before = {p: m.weight.detach().clone() for p, m in cross_attention_layers(sd).items()}
    for method in METHODS:
        forgetpatch.erase(sd, ["circle"], method=method, progress=False)
    after = cross_attention_layers(sd)
    assert all(torch.equal(before[p], after[p].weight) for p in before)


# --- the patch is what ships -----------------------------------------------------------------------
def _images(pipe, prompts=("a red circle", "a blue star on a white background")) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        list(prompts), num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="np"
    )
    return out.images


def _edited_in_place(deltas: dict[str, torch.Tensor]):
    pipe = tiny_sd_pipeline(seed=0)
    with torch.no_grad():
        for path, module in cross_attention_layers(pipe).items():
            module.weight += deltas[path]
    return pipe


@pytest.mark.parametrize(
    ("method", "params", "fuse"),
    [("uce", {}, False), ("scapre", {"energy": 1.0}, True), ("scapre", {"energy": 0.999}, False)],
)
def test_applied_patch_gives_the_images_of_the_edited_model(method, params, fuse):
    base = tiny_sd_pipeline(seed=0)
    concepts = [Concept("circle"), Concept("star")]
    cls = {"uce": UCE, "scapre": ScaPre}[method]
    deltas = cls.compute_deltas(base, concepts, **params)
    patch = forgetpatch.erase(base, concepts, method=method, paper=True, progress=False, **params)
    in_place = _images(_edited_in_place(deltas))
    patched = _images(forgetpatch.apply(tiny_sd_pipeline(seed=0), patch, fuse=fuse))
    original = _images(base)
    effect = np.abs(in_place - original).mean()
    assert effect > 1e-3  # the edit changes the images
    if params.get("energy", 1.0) == 1.0:  # exact storage: the same images
        np.testing.assert_allclose(patched, in_place, atol=2e-4)
    else:  # truncated storage: far closer to the edited model than the edit is to the base
        assert np.abs(patched - in_place).mean() < 0.1 * effect


# --- recipes and the command ---------------------------------------------------------------------
def test_shipped_recipes_load():
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.erase_concepts() and forgetpatch.methods.get_method(recipe.method)


def test_toy_defaults_edit_in_context_towards_a_kept_shape():
    from forgetpatch import toy
    from forgetpatch.methods.defaults import with_defaults

    pipe = toy.pipeline()
    for method in ("uce", "scapre"):
        erased, kept, params = with_defaults(pipe, method, [Concept("circle"), Concept("cross")], [], {"lam": 0.3})
        assert [c.guide for c in erased] == ["square", "square"]  # cross is erased too: the next reliable shape
        assert {c.target for c in kept} == set(toy.SHAPES) - {"circle", "cross"}
        assert params["tokens"] == "trailing" and tuple(params["templates"]) == toy.ERASE_TEMPLATES
        assert params["lam"] == 0.3 and params["erase_scale"] == 20  # the caller's settings win
        assert with_defaults(pipe, method, [Concept("circle")], [], {}, paper=True)[2] == {}
    erased, _, _ = with_defaults(pipe, "dynamic_mask", [Concept("circle", superclass="shape")], [], {})
    assert erased[0].superclass == "shape"
    # Dynamic Mask: each shape's own superclass (toy.defaults.SUPERCLASSES), never one being erased
    shapes = [Concept("circle"), Concept("star"), Concept("ring"), Concept("triangle")]
    erased, kept, _ = with_defaults(pipe, "dynamic_mask", shapes, [], {})
    assert [c.superclass for c in erased] == ["square", "cross", "square", "rectangle"]
    # ... preserving the near neighbours that are neither erased nor a superclass, as KSCU does
    assert [c.target for c in kept] == ["ellipse", "diamond"]
    erased, _, _ = with_defaults(pipe, "dynamic_mask", [Concept("circle"), Concept("square")], [], {})
    assert [c.superclass for c in erased] == ["cross", "triangle"]
    # KSCU: each target's anchor (guide) from the same table unless the caller names one, the table's anchors never
    # preserved, guidance 0.25
    erased, kept, params = with_defaults(pipe, "kscu", [Concept("circle"), Concept("hexagon", guide="ring")], [], {})
    assert [c.guide for c in erased] == ["square", "ring"] and params["g"] == 0.25
    assert "square" not in {c.target for c in kept} and "ellipse" in {c.target for c in kept}
    # ESD: the same anchors, negative guidance 0.25, nothing preserved (ESD preserves only when adversarial)
    erased, kept, params = with_defaults(pipe, "esd", [Concept("circle"), Concept("star")], [], {})
    assert [c.guide for c in erased] == ["square", "cross"] and params["eta"] == 0.25 and kept == []
    # fine-tuning iterations are for the whole patch: 200 per shape erased in it (KSCU 300, at lr 3e-4), unless the
    # caller sets them
    assert params["iterations"] == 400 and params["lr"] == 5e-4
    kscu = with_defaults(pipe, "kscu", [Concept("circle")], [], {})[2]
    assert kscu["iterations"] == 300 and kscu["lr"] == 3e-4
    assert with_defaults(pipe, "kscu", [Concept("circle"), Concept("star")], [], {"iterations": 50})[2]["iterations"] == 50
    # nor one that a patch on the pipeline erased (a chain): the circle's square is gone, and so is UCE's cross
    chained = forgetpatch.apply(pipe, forgetpatch.erase(toy.pipeline(), ["square", "cross"], method="uce", progress=False))
    assert [c.superclass for c in with_defaults(chained, "dynamic_mask", [Concept("circle")], [], {})[0]] == ["triangle"]
    assert [c.guide for c in with_defaults(chained, "uce", [Concept("circle")], [], {})[0]] == ["triangle"]
    assert [c.guide for c in with_defaults(chained, "kscu", [Concept("circle")], [], {})[0]] == ["triangle"]
    # a shape's next choice when its first is held: the square's triangle gone, a rectangle (not the GUIDES' cross)
    assert toy.erase_defaults("dynamic_mask", ["square"], held=["triangle"])["superclass"] == {"square": "rectangle"}


def test_toy_kscu_start_for_a_colour_follows_the_callers_trajectory():
    """KSCU's colour and texture start step (4 of its 50-step trajectory) stayed 4 when the caller set another
    ``num_inference_steps``: of 25 steps it started twice as late on the trajectory; now scaled as the presets are."""
    from forgetpatch import toy
    from forgetpatch.methods.defaults import with_defaults
    from forgetpatch.methods.kscu import resolve_preset, scaled_start

    toy_like = SimpleNamespace(forgetpatch_defaults=toy.erase_defaults)
    for given, start in (({}, 4), ({"num_inference_steps": 25}, 2), ({"num_inference_steps": 100}, 8)):
        for concept in ("red", "stripes"):
            params = with_defaults(toy_like, "kscu", [Concept(concept)], [], given)[2]
            assert params["start_step"] == start, (concept, given, params)
    # the same share of the trajectory as the object preset keeps when scaled (14 of 50: 7 of 25)
    assert resolve_preset([Concept("circle")], num_inference_steps=25)[2] == scaled_start(14, 25) == 7
    # the caller's own start wins
    assert with_defaults(toy_like, "kscu", [Concept("red")], [], {"num_inference_steps": 25, "start_step": 5})[2][
        "start_step"
    ] == 5


def test_real_bases_edit_closed_form_concepts_in_the_prompts_of_their_kind(sd):
    from forgetpatch.methods.defaults import KIND_TEMPLATES, with_defaults

    _, _, params = with_defaults(sd, "uce", [Concept("Van Gogh", kind="style")], [], {})
    assert params == {"tokens": "trailing", "templates": KIND_TEMPLATES["style"]}
    assert with_defaults(sd, "esd", [Concept("cat")], [], {})[2] == {}  # fine-tuning: the method's own defaults


def test_register_checks_the_protocol_and_refuses_a_taken_name():
    from forgetpatch.methods import register

    class NoErase:
        name, version = "no-erase", "1"

    with pytest.raises(TypeError, match="lacks erase"):
        register(NoErase)

    class Impostor:
        name, version = "uce", "9"

        def erase(self, pipe, concepts, *, preserve, **params): ...

    with pytest.raises(ValueError, match="'uce' is registered already"):
        register(Impostor)
    assert get_method("uce").version == "1"


def test_a_concept_the_tokenizer_splits_into_many_pieces_is_warned_about(sd):
    with pytest.warns(UserWarning, match="'xqzvbnmwrt' splits into 10 tokenizer pieces"):
        forgetpatch.erase(sd, ["xqzvbnmwrt"], method="uce", paper=True, progress=False)


def test_bad_concepts_are_refused_before_anything_runs():
    from forgetpatch import toy

    pipe = toy.pipeline()
    with pytest.raises(ConceptError, match="synonym of 'circle'"):
        forgetpatch.erase(pipe, ["disc"], method="uce")
    with pytest.raises(ConceptError, match=r"pass a list: \['circle', 'star'\]"):
        forgetpatch.erase(pipe, "circle, star", method="uce")


def test_recipe_accepts_words_and_mappings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "method: uce\nconcepts: [circle, {target: vangogh, kind: style, guide: art}]\n"
        "preserve: ellipse\nparams: {lam: 0.25}\nname: my-patch\n"
    )
    recipe = load_recipe(path)
    assert recipe.erase_concepts() == [Concept("circle"), Concept("vangogh", kind="style", guide="art")]
    assert recipe.preserved() == [Concept("ellipse")]
    assert recipe.erase_kwargs() == {
        "method": "uce",
        "preserve": [Concept("ellipse")],
        "paper": False,
        "lam": 0.25,
        "name": "my-patch",
    }
    path.write_text("concepts: [circle]\nparams: {adversarial: {every: 20, lr: 1e-3}, anchors: [1e-3]}\n")
    assert load_recipe(path).params == {"adversarial": {"every": 20, "lr": 0.001}, "anchors": [0.001]}  # nested too


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concepts: []\n", "concepts"),
        ("concepts: [{target: circle, kind: colour}]\n", "kind"),
        ("method: uce\n", "concepts"),
        ("concepts: [circle\n", "not valid YAML"),
        ("- circle\n", "mapping"),
        ("concepts: [circle]\nsteps: 3\n", "steps"),
        ("concepts: 3\n", "give a concept, or a list of them"),  # was a TypeError
        # params overrode the recipe's own method (chain) or crashed erase with "multiple values for 'method'"
        ("method: uce\nconcepts: [circle]\nparams: {method: scapre}\n", "recipe's own fields"),
        ("concepts: [circle]\nparams: {preserve: [star], name: '123'}\n", "['name', 'preserve'] are the recipe's"),
        ("concepts: [circle]\nparams: {lr: 1e-3}\nparams: {lr: 2e-3}\n", "key 'params' is given twice"),  # kept the last
        ("concepts: [circle]\npaper: 'yes'\n", "paper: Input should be a valid boolean"),  # a string was True
    ],
)
def test_bad_recipes_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MethodError, match=re.escape(message) if "[" in message else message):
        load_recipe(path)
    with pytest.raises(MethodError, match="is a folder"):  # were IsADirectoryError and UnicodeDecodeError
        load_recipe(tmp_path)
    path.write_bytes(b"concepts: [caf\xe9]\n")
    with pytest.raises(MethodError, match="not UTF-8"):
        load_recipe(path)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, sd):
    folder = tmp_path_factory.mktemp("base") / "tiny-sd"
    sd.save_pretrained(folder)
    return folder


def test_cli_erase_writes_a_patch_folder(sd_folder, tmp_path):
    out = tmp_path / "no-circle-star"
    args = ["erase", "--base", str(sd_folder), "--method", "scapre", "-c", "circle", "-c", "star"]
    result = CliRunner().invoke(
        app, [*args, "--preserve", "ellipse", "--param", "energy=0.99", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    patch = read_patch(out)
    assert [c.target for c in patch.manifest.concepts] == ["circle", "star"]
    # the next step it shows measures this model with a real-weight suite, not the toy judge (which cannot read it)
    assert "--suite objects --clip" in " ".join(result.output.split())

    refused = CliRunner().invoke(app, ["eval", "--base", str(sd_folder), str(out), "--images", "1", "--steps", "1"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "not a toy-world model" in refused.output and "--suite" in " ".join(refused.output.split())
    assert [c.target for c in patch.manifest.preserved] == ["ellipse"]
    assert patch.manifest.method.name == "scapre" and patch.manifest.method.params["energy"] == 0.99


def test_cli_erase_names_the_superclass_dynamic_mask_aligns_with(sd_folder, tmp_path):
    base = ["erase", "--base", str(sd_folder), "--method", "dynamic_mask", "-c", "circle"]
    short = ["steps=2", "epochs=1", "warmup=1", "update_every=1", "images=2", "num_inference_steps=2", "batch=1"]
    params = [arg for p in short for arg in ("--param", p)]
    missing = CliRunner().invoke(app, [*base, *params, "-o", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "--superclass" in missing.output and not (tmp_path / "x").exists()
    result = CliRunner().invoke(app, [*base, "--superclass", "shape", *params, "-o", str(tmp_path / "y")])
    assert result.exit_code == 0, result.output
    assert read_patch(tmp_path / "y").manifest.concepts[0].superclass == "shape"


def test_cli_erase_from_recipe(sd_folder, tmp_path):
    out = tmp_path / "uce"
    toy_recipe = RECIPES / "toy-no-5-shapes-uce.yaml"
    refused = CliRunner().invoke(app, ["erase", "--base", str(sd_folder), "--recipe", str(toy_recipe), "-o", str(out)])
    assert refused.exit_code == 1 and "written for base 'toy'" in refused.output and not out.exists()

    recipe = tmp_path / "any-base.yaml"  # a recipe without `base:` runs on any base
    recipe.write_text("\n".join(line for line in toy_recipe.read_text().splitlines() if not line.startswith("base:")))
    result = CliRunner().invoke(app, ["erase", "--base", str(sd_folder), "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    patch = read_patch(out)
    assert patch.name == "toy-no-5-shapes-uce" and patch.manifest.method.name == "uce"
    assert len(patch.manifest.concepts) == 5 and patch.manifest.lora.rank == 5  # paper: true, one row per word


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to erase"),
        (["-c", "circle", "--method", "nope"], "unknown method"),
        (["-c", "circle", "--param", "energy"], "key=value"),
        (["-c", "circle", "--kind", "colour"], "kind"),
    ],
)
def test_cli_erase_errors(sd_folder, tmp_path, args, message):
    result = CliRunner().invoke(app, ["erase", "--base", str(sd_folder), *args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["uce", "esd"])
def test_every_method_names_its_patch_the_same_way(method):
    """One default name for closed-form and fine-tuning methods alike: ``<method>-no-<concepts>``."""
    extra = {"iterations": 1, "num_inference_steps": 2} if method == "esd" else {}
    patch = forgetpatch.erase(tiny_sd_pipeline(), ["circle", "Van Gogh"], method=method, progress=False, **extra)
    assert patch.name == f"{method}-no-circle-van_gogh"


def test_numbers_in_exponent_form_are_numbers_on_the_command_line_and_in_recipes(tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string; ``--param lr=1e-3`` and ``lr: 1e-3`` in a recipe are the number."""
    from forgetpatch.cli.erase import parse_params
    from forgetpatch.recipes import load_recipe

    assert parse_params(["lr=1e-3", "iterations=20", "tokens=last"]) == {"lr": 1e-3, "iterations": 20, "tokens": "last"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: esd\nconcepts: [circle]\nparams:\n  lr: 5e-4\n")
    assert load_recipe(recipe).params == {"lr": 5e-4}


@pytest.mark.parametrize("method", METHODS)
def test_erasing_on_a_patched_pipeline_edits_the_patched_weights(method):
    """A second patch is computed on top of the first (as applied), and records it as lineage."""
    first = forgetpatch.erase(tiny_sd_pipeline(seed=0), ["circle"], method="uce", progress=False)
    patched = forgetpatch.apply(tiny_sd_pipeline(seed=0), first)
    in_place = tiny_sd_pipeline(seed=0)
    with torch.no_grad():
        for path, module in cross_attention_layers(in_place).items():
            module.weight += first.delta(path)
    cls = {"uce": UCE, "scapre": ScaPre}[method]
    on_patched = cls.compute_deltas(patched, [Concept("star")])
    on_edited = cls.compute_deltas(in_place, [Concept("star")])
    for path in on_edited:
        torch.testing.assert_close(on_patched[path], on_edited[path], rtol=1e-4, atol=1e-5)
    second = forgetpatch.erase(patched, ["star"], method=method, progress=False)
    assert second.manifest.lineage == [first.digest]


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [
        ("uce", {"erase_scale": 0}, "erase_scale > 0"),  # wrote a patch with NaN errors no one could load
        ("uce", {"erase_scale": -5}, "erase_scale > 0"),  # a complex square root in the solve
        ("scapre", {"erase_scale": 0}, "erase_scale > 0"),
        ("uce", {"erase_scale": float("nan")}, "erase_scale must be a finite number"),
        ("scapre", {"preserve_scale": float("inf")}, "preserve_scale must be a finite number"),
        ("esd", {"lr": float("nan"), "iterations": 2}, "lr must be a finite number"),  # torch's ValueError before
        ("esd", {"eta": float("nan"), "iterations": 2}, "eta must be a finite number"),  # "lower the learning rate"
        ("kscu", {"lr": float("inf"), "iterations": 2}, "lr must be a finite number"),
        ("dynamic_mask", {"lr": float("nan"), "steps": 2}, "lr must be a finite number"),
        ("esd", {"checkpoint_every": 0, "checkpoint_dir": "ck", "iterations": 2}, "checkpoint_every must be >= 1"),
        (None, {}, "unknown method None"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_anything_runs(sd, tmp_path, monkeypatch, method, params, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MethodError, match=match):
        forgetpatch.erase(sd, ["circle"], method=method, **params)
    assert list(tmp_path.iterdir()) == []
