"""Sequential unlearning as a chain of patches: lineage, strict refusal, applying with the lineage, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import forgetpatch
from forgetpatch.errors import LineageError, MethodError
from forgetpatch.methods import erase_chain
from forgetpatch.testing import tiny_sd_pipeline


def test_each_step_is_computed_on_the_ones_before_and_the_pipeline_comes_back(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    seen = []
    patches = erase_chain(pipe, ["circle", "star", "square"], method="uce", name="c",
                          on_step=lambda k, patch, chained: seen.append((k, len(forgetpatch.applied(chained)))))
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert [p.name for p in patches] == ["c-step-1", "c-step-2", "c-step-3"]
    for k, patch in enumerate(patches):
        assert patch.manifest.lineage == [p.digest for p in patches[:k]]
    assert forgetpatch.applied(pipe) == []
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)

    for k, patch in enumerate(patches, start=1):
        patch.save(tmp_path / f"step-{k}")
    with pytest.raises(LineageError, match="not applied"):
        forgetpatch.apply(pipe, tmp_path / "step-3")
    # what a save killed half-way leaves beside the steps (Patch.save's hidden work folder) is not a parent to read
    (tmp_path / ".step-1.0badc0de.tmp").mkdir()
    (tmp_path / ".step-1.0badc0de.tmp" / "forgetpatch.json").write_text("{not json")
    forgetpatch.apply(pipe, tmp_path / "step-3", with_lineage=True)
    assert [e.patch.name for e in forgetpatch.applied(pipe)] == ["c-step-1", "c-step-2", "c-step-3"]
    forgetpatch.remove(pipe)
    # a parent also named in the list goes on once, in its place (it raised AlreadyAppliedError, nothing applied);
    # an unrelated broken folder beside the chain blocks nothing (every apply failed on it)
    (tmp_path / "zz-junk").mkdir()
    (tmp_path / "zz-junk" / "forgetpatch.json").write_text("{not json")
    (tmp_path / "zz-junk" / "pytorch_lora_weights.safetensors").write_bytes(b"junk")
    forgetpatch.apply(pipe, [tmp_path / "step-2", tmp_path / "step-1"], with_lineage=True)
    assert [e.patch.name for e in forgetpatch.applied(pipe)] == ["c-step-1", "c-step-2"]
    forgetpatch.remove(pipe)
    (tmp_path / "step-1").rename(tmp_path / "moved")
    (tmp_path / "elsewhere-1").mkdir()
    (tmp_path / "moved").rename(tmp_path / "elsewhere-1" / "step-1")
    with pytest.raises(LineageError, match="zz-junk there could not be read"):  # says what it could not read
        forgetpatch.apply(pipe, tmp_path / "step-3", with_lineage=True)
    assert forgetpatch.applied(pipe) == []
    (tmp_path / "elsewhere").mkdir()
    patches[2].save(tmp_path / "elsewhere" / "step-3")
    with pytest.raises(LineageError, match="neither applied nor in a folder beside it"):
        forgetpatch.apply(pipe, tmp_path / "elsewhere" / "step-3", with_lineage=True)
    assert forgetpatch.applied(pipe) == []


def test_erase_chain_refuses_what_the_cli_refuses_before_any_step(monkeypatch):
    """Through the API a repeated concept gave two identical patches, none gave [] silently, and a bad name failed
    only after step 1 was computed."""
    import forgetpatch.methods as methods
    from forgetpatch.errors import ConceptError, ManifestError

    monkeypatch.setattr(methods, "erase", lambda *a, **k: pytest.fail("a step ran before the checks"))
    pipe = tiny_sd_pipeline(seed=0)
    for concepts, error, match in [
        (["circle", "circle"], ConceptError, "more than once"),
        ([], ConceptError, "nothing to erase"),
        (["circle", "star"], ConceptError, "both erased and preserved"),
    ]:
        with pytest.raises(error, match=match):
            erase_chain(pipe, concepts, method="uce", preserve=["star"] if "star" in concepts else None)
    with pytest.raises(ManifestError, match="may not contain a slash"):
        erase_chain(pipe, ["circle"], method="uce", name="a/b")


def test_a_later_patch_holds_what_the_patches_before_it_erased():
    """erase on a patched pipeline preserves the concepts its patches erased (hold), so the new patch leaves
    their edited outputs almost as they are; hold=False leaves them out, and a concept erased again is not held."""
    from forgetpatch.methods import erased_on
    from forgetpatch.methods.closed_form import encode_trailing, last_token_index

    pipe = tiny_sd_pipeline(seed=0)
    forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["circle"], method="uce", erase_scale=20.0))
    assert [c.target for c in erased_on(pipe)] == ["circle"]
    held = forgetpatch.erase(pipe, ["star"], method="uce", erase_scale=20.0)
    free = forgetpatch.erase(pipe, ["star"], method="uce", erase_scale=20.0, hold=False)
    again = forgetpatch.erase(pipe, ["circle", "star"], method="uce")
    assert [c.target for c in held.manifest.preserved] == ["circle"]
    assert free.manifest.preserved == [] and again.manifest.preserved == []
    with pytest.raises(MethodError, match="hold takes True or False"):
        forgetpatch.erase(pipe, ["star"], method="uce", hold="false")  # a recipe's string read as True

    # the toy world's defaults preserve every other shape: hold=False left the earlier-erased one in, held as before
    toy = forgetpatch.toy.pipeline()
    forgetpatch.apply(toy, forgetpatch.erase(toy, ["circle"], method="uce"))
    for method in ("uce", "scapre"):
        toy_held = forgetpatch.erase(toy, ["star"], method=method)
        toy_free = forgetpatch.erase(toy, ["star"], method=method, hold=False)
        assert toy_held.digest != toy_free.digest
        assert "circle" in [c.target for c in toy_held.manifest.preserved]
        assert "circle" not in [c.target for c in toy_free.manifest.preserved]

    # the circle's rows the first patch edited: its token and every later one (the default in-context edit)
    (circle,) = encode_trailing(pipe, ["circle"], last_token_index(pipe, ["circle"]).tolist())
    for path in held.target_modules:
        moved = {which: (circle @ patch.delta(path).T).norm() for which, patch in (("held", held), ("free", free))}
        assert moved["held"] < 0.5 * moved["free"], (path, moved)


def test_cli_chain_writes_steps_and_a_report_after_each(tmp_path):
    from forgetpatch.cli import app

    recipe = tmp_path / "chain.yaml"
    recipe.write_text("name: toy-chain\nmethod: uce\nconcepts: [circle, star]\nparams: {erase_scale: 20}\n")
    out = tmp_path / "chain"
    result = CliRunner().invoke(app, ["chain", str(recipe), "-o", str(out), "--images", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "step-1" / "forgetpatch.json").is_file() and (out / "step-2" / "forgetpatch.json").is_file()
    second = json.loads((out / "reports" / "step-2.json").read_text())
    assert set(second["concepts"]) == {"circle", "star"}  # the earlier concept is measured again
    assert "with_lineage=True" in result.output
    again = CliRunner().invoke(app, ["chain", str(recipe), "-o", str(out)])
    assert again.exit_code == 1 and "already holds 2 chain steps" in again.output  # one line, no traceback


def test_cli_chain_checks_everything_before_the_model_loads_and_leaves_no_stale_steps(tmp_path, monkeypatch):
    """What ``erase`` refuses up front, ``chain`` does too (before: after the reference evaluation, or after step 1
    was written); the recipe's base is the chain's base; ``--force`` over a longer chain removes its later steps."""
    from forgetpatch.cli import app, chain

    monkeypatch.setattr(chain, "load_base", lambda base: pytest.fail(f"the model ({base}) loaded before the checks"))
    runner, out = CliRunner(), tmp_path / "chain"
    (tmp_path / "afile").write_text("x")
    for text, args, message in [
        ("method: nosuch\nconcepts: [circle]\n", [], "unknown method"),
        ("method: uce\nconcepts: [circle, circle]\n", [], "more than once"),
        ("method: uce\nconcepts: [circle, star]\npreserve: [star]\n", [], "both erased and preserved"),
        ("method: uce\nconcepts: [dragon]\n", [], "dragon"),
        ("method: uce\nconcepts: [circle]\n", ["-o", str(tmp_path / "afile")], "is a file"),
    ]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        result = runner.invoke(app, ["chain", str(recipe), *(args or ["-o", str(out)])])
        assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output, (
            text, result.output)  # fmt: skip
        assert not out.exists()
    monkeypatch.undo()
    recipe.write_text("base: models/nowhere\nmethod: uce\nconcepts: [circle]\n")  # the recipe's base, not the toy's
    result = runner.invoke(app, ["chain", str(recipe), "-o", str(out)])
    assert result.exit_code == 1 and "models/nowhere" in result.output and not out.exists(), result.output
    recipe.write_text("method: uce\nconcepts: [circle, star, square]\n")
    assert runner.invoke(app, ["chain", str(recipe), "-o", str(out), "--images", "0"]).exit_code == 0
    recipe.write_text("method: uce\nconcepts: [circle, star]\n")
    result = runner.invoke(app, ["chain", str(recipe), "-o", str(out), "--images", "0", "--force"])
    assert result.exit_code == 0 and sorted(p.name for p in out.iterdir()) == ["step-1", "step-2"], result.output
    # a --force run interrupted after its first step leaves that step alone, not beside the old chain's step-2
    import forgetpatch.methods

    real = forgetpatch.methods.erase_chain

    def interrupted(*args, on_step, **kwargs):
        def one_step(k, *rest):
            if k == 2:
                raise KeyboardInterrupt
            on_step(k, *rest)

        return real(*args, on_step=one_step, **kwargs)

    monkeypatch.setattr(forgetpatch.methods, "erase_chain", interrupted)
    recipe.write_text("method: uce\nconcepts: [square, triangle]\n")
    runner.invoke(app, ["chain", str(recipe), "-o", str(out), "--images", "0", "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["step-1"]
    assert forgetpatch.load(out / "step-1").manifest.concepts[0].target == "square"


def test_taking_a_parent_off_warns_and_the_cli_checks_lineage_before_the_model_loads(tmp_path, monkeypatch):
    """Removing step 2 of a chain left step 3 on a model it was not made for, silently (a later erase then recorded
    that state); ``forgetpatch apply chain/step-2 --compare`` loaded the model and wrote the base image before the
    lineage error, and left it there."""
    import warnings

    from forgetpatch.cli import app
    from forgetpatch.cli import apply as apply_cli

    pipe = forgetpatch.toy.pipeline()
    steps = [p.save(tmp_path / f"step-{k}") for k, p in enumerate(erase_chain(
        pipe, ["circle", "star", "square"], method="uce", progress=False, name="c"), start=1)]  # fmt: skip
    from forgetpatch.hub.card import parent_names

    assert parent_names(forgetpatch.load(steps[2] / "pytorch_lora_weights.safetensors"))[1][0] == "c-step-2"
    forgetpatch.apply(pipe, steps)
    with pytest.warns(UserWarning, match="'c-step-3' was computed on top of c-step-2, which just came off"):
        forgetpatch.remove(pipe, "c-step-2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forgetpatch.remove(pipe)  # the whole chain: no child is left behind
    real = apply_cli.load_base
    monkeypatch.setattr(apply_cli, "load_base", lambda *a, **k: pytest.fail("the model loaded before refusing"))
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["apply", str(steps[1]), "-p", "a red star", "-o", str(out), "--compare"])
    assert result.exit_code != 0 and "computed on top of patches that are not applied" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("out*"))
    monkeypatch.setattr(apply_cli, "load_base", real)
    result = CliRunner().invoke(app, ["apply", str(steps[1]), "-p", "a red star", "-o", str(out), "--compare",
                                      "--with-lineage", "--steps", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "c-step-1, c-step-2" in result.output and out.exists() and out.with_suffix(".base.png").exists()


def test_a_chain_checks_every_step_before_the_first(monkeypatch):
    """A step steered to a concept a patch on the pipeline erases, or a word the toy world does not know, was
    refused only after the steps before it had been computed (minutes of training with a fine-tuning method)."""
    import forgetpatch.methods as methods
    from forgetpatch.errors import ConceptError
    from forgetpatch.methods import Concept

    pipe = forgetpatch.toy.pipeline()
    forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["cross"], method="uce"))
    monkeypatch.setattr(methods, "erase", lambda *a, **k: pytest.fail("a step ran before the refusal"))
    with pytest.raises(ConceptError, match="steered to 'cross'"):
        erase_chain(pipe, ["circle", "square", Concept("star", guide="cross")], method="uce")
    with pytest.raises(ConceptError, match="dragon"):
        erase_chain(pipe, ["circle", "dragon"], method="kscu")
    assert [e.patch.name for e in forgetpatch.applied(pipe)] == ["uce-no-cross"]


def test_erasing_on_a_parent_at_another_scale_is_refused():
    """The lineage records parents by digest only: a patch computed on a parent at scale 0.5 was put on top of it at
    scale 1 by ``apply(..., with_lineage=True)``, a model it was not made for."""
    pipe = forgetpatch.toy.pipeline()
    forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["circle"], method="uce"), scale=0.5)
    with pytest.raises(MethodError, match="at scale 0.5.*apply the parents at scale 1"):
        forgetpatch.erase(pipe, ["star"], method="uce")
