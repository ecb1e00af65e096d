"""``forgetpatch.attack`` and ``forgetpatch attack``: the controls the attack issue asks for, on tiny budgets.

* on the unpatched base every attack finds the concept;
* a strong closed-form patch (UCE steered to cross) is undone by the white-box inversion;
* a deliberately weak budget recovers less than the default;
* one seed, the same figures;
* bad requests are refused before anything slow, and results recorded on a patch keep its digest.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

import forgetpatch
from forgetpatch import toy
from forgetpatch.attacks import ATTACKS, Budget, attack
from forgetpatch.errors import AttackError
from forgetpatch.eval import fit_shapes
from forgetpatch.format import ROBUSTNESS_METRICS, read_patch
from forgetpatch.loader import unpatched
from forgetpatch.recipes import load_recipe
from tests.toy_bars import RECIPES

TINY = Budget.named("tiny")


@pytest.fixture(scope="module")
def judge():
    return toy.load_judge()


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    """The UCE steered-to-cross circle patch (strict UA 0.93 on 96 images), saved to a folder."""
    recipe = load_recipe(RECIPES / "toy-no-circle-uce-guided.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = forgetpatch.erase(toy.pipeline(), recipe.erase_concepts(), progress=False, **recipe.erase_kwargs())
    return patch.save(tmp_path_factory.mktemp("patches") / "no-circle")


def test_a_rate_of_no_images_is_refused():
    """It read as 0% (the concept came back) with the interval [0, 1]."""
    from forgetpatch.attacks.report import Rate

    assert Rate.of([True, False, True, True]).value == 0.75
    with pytest.raises(ValueError, match="no images"):
        Rate.of([])


def test_unpatched_copy_has_the_base_weights_and_leaves_the_pipeline_patched(guided):
    reference = toy.pipeline().unet.state_dict()
    for fuse in (False, True):
        pipe = forgetpatch.apply(toy.pipeline(), guided, fuse=fuse)
        base = unpatched(pipe)
        assert forgetpatch.applied(base) == [] and len(forgetpatch.applied(pipe)) == 1
        weights = base.unet.state_dict()
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_on_the_base_every_attack_finds_the_concept(judge):
    report = attack(toy.pipeline(), "circle", budget=TINY, judge=judge, progress=False)
    assert set(report.results) == {
        "paraphrase", "inversion", "prompt_search_soft", "prompt_search_hard", "textual_inversion", "relearning"
    }
    assert report.patches == [] and report.base.value <= 0.25
    for name, result in report.results.items():
        presence = 1 - result.after.value
        assert presence >= 0.75, f"{name}: the concept is in only {presence:.0%} of {result.after.n} base images"
        assert result.unet_passes > 0 and result.seconds > 0
        # "named": the images the judge calls a circle, the concept surely back; the rest of presence it can't tell
        circles = sum(v.get("shape") == "circle" for v in result.verdicts)
        assert result.named.n == result.after.n and result.named.value == circles / result.after.n
        assert result.named.value <= presence and result.to_dict()["named_after"] == result.named.value
        # "fitted": the images whose outline's geometric fit is a circle, the second opinion beside the judge's
        fits = [f.shape for f in fit_shapes(result.images)]
        assert result.fits == fits and result.fitted.value == fits.count("circle") / len(fits)
        assert result.fitted.n == result.after.n and result.to_dict()["fitted_after"] == result.fitted.value
    assert report.fitted_base.value >= 0.75 and report.to_dict()["fitted_base"]["n"] == report.base.n
    assert report.results["inversion"].detail["layers"] == 0  # nothing patched: nothing to invert
    # a colour has no outline: no fit, and nothing in the figures or the table for it
    red = attack(toy.pipeline(), "red", attacks=["inversion"], budget=TINY, judge=judge, progress=False)
    assert red.fitted_base is None and red.results["inversion"].fitted is None
    assert "fitted_after" not in red.to_dict()["attacks"]["inversion"] and "fitted_base" not in red.to_dict()


def test_inversion_undoes_a_closed_form_patch_and_one_seed_gives_the_same_figures(guided, judge):
    pipe = forgetpatch.apply(toy.pipeline(), guided)
    budget = Budget.of({"images": 16, "num_inference_steps": 10})
    first = attack(pipe, "circle", attacks=["inversion"], budget=budget, judge=judge, progress=False)
    result = first.results["inversion"]
    assert result.before.value >= 0.75, f"the patch forgets too little to attack: {result.before}"
    assert result.after.interval[1] < result.before.interval[0], f"{result.before} -> {result.after}"
    from forgetpatch.methods.closed_form import cross_attention_layers

    assert result.detail["layers"] == len(cross_attention_layers(pipe))  # every K and V the patch edits
    again = attack(pipe, "circle", attacks=["inversion"], budget=budget, judge=judge, progress=False)

    def figures(report):
        d = report.to_dict()
        for r in d["attacks"].values():
            r.pop("seconds")
        return d

    assert figures(again) == figures(first)
    assert forgetpatch.applied(pipe)[0].patch.name == "toy-no-circle-uce-guided"  # still on, untouched


def test_a_weak_budget_recovers_less_than_the_default(guided, judge):
    pipe = forgetpatch.apply(toy.pipeline(), guided)
    shared = {"images": 12, "num_inference_steps": 10, "batch": 4}
    weak = attack(pipe, "circle", attacks=["relearning"], budget={**shared, "relearn_steps": 1},
                  judge=judge, progress=False).results["relearning"]
    strong = attack(pipe, "circle", attacks=["relearning"], budget=shared,
                    judge=judge, progress=False).results["relearning"]
    assert strong.budget["steps"] == Budget().relearn_steps
    assert weak.after.value > strong.after.value + 0.3, f"weak {weak.after}, default {strong.after}"


def test_prompt_search_and_textual_inversion_bring_back_what_a_closed_form_patch_hides(guided, judge):
    """On the base every attack "finds" the concept without trying; here each must undo a patch that forgets it (the
    UCE patch; at the default budget both leave 0% [0-11%], README): an attack that searched nothing, or generated
    without what it found, leaves the patch's UA."""
    pipe = forgetpatch.apply(toy.pipeline(), guided)
    budget = {"images": 16, "num_inference_steps": 10, "batch": 4, "data": 16, "search_steps": 10, "ti_steps": 20}
    report = attack(pipe, "circle", attacks=["prompt_search", "textual_inversion"], budget=budget, judge=judge,
                    progress=False)
    assert report.before.value >= 0.75, f"the patch forgets too little to attack: {report.before}"
    for name in ("prompt_search_soft", "textual_inversion"):
        result = report.results[name]
        assert result.after.interval[1] < result.before.interval[0], f"{name}: {result.before} -> {result.after}"
    assert report.results["prompt_search_hard"].after.n == 16  # the words it projects to: measured, no bar


def test_the_paraphrase_attack_generates_every_rewording_and_reports_the_worst(judge, monkeypatch):
    from forgetpatch.attacks import suite

    asked: list[list[str]] = []
    generate = suite.Target.generate

    def spy(self, prompts, seeds, pipe=None):
        asked.append(list(prompts))
        return generate(self, prompts, seeds, pipe=pipe)

    monkeypatch.setattr(suite.Target, "generate", spy)
    budget = {**TINY.to_dict(), "paraphrase_images": 2}
    result = attack(toy.pipeline(), "circle", attacks=["paraphrase"], budget=budget, judge=judge,
                    progress=False).results["paraphrase"]
    variants = suite.paraphrases("circle")
    reworded = asked[2 : 2 + len(variants)]  # after the base's and the patched model's images of the prompts
    assert len(reworded) == len(variants) and all(len(p) == 2 for p in reworded)
    assert len({tuple(batch) for batch in reworded}) == len(variants)  # every rewording its own prompts
    by_prompt = result.detail["by_prompt"]
    assert len(by_prompt) == len(variants) and result.after.value == min(by_prompt.values())
    assert result.detail["pooled_n"] == 2 * len(variants) and result.before.n == result.after.n == 2


def test_bad_requests_are_refused_before_anything_runs():
    pipe = toy.pipeline()
    with pytest.raises(AttackError, match="synonym of 'circle'"):
        attack(pipe, "disc")
    with pytest.raises(AttackError, match="unknown attacks"):
        attack(pipe, "circle", attacks=["jailbreak"])
    with pytest.raises(AttackError, match="relearn_steps=0"):
        attack(pipe, "circle", budget={"relearn_steps": 0})
    with pytest.raises(AttackError, match="unknown attack budget fields"):
        attack(pipe, "circle", budget={"steps": 3})
    with pytest.raises(AttackError, match="unknown attack budget"):
        Budget.named("huge")
    with pytest.raises(AttackError, match="search_tokens=80 does not fit.*give search_tokens <= "):  # was a torch error
        attack(pipe, "circle", attacks=["prompt_search"], budget={"search_tokens": 80, "images": 2}, progress=False)
    for field in ("guidance_scale", "inversion_lambda", "search_lr"):  # inf made NaN images, scored as "recalled"
        with pytest.raises(AttackError, match=f"{field}=inf out of range"):
            Budget.of({field: float("inf")})
    from forgetpatch.testing import tiny_sd_pipeline

    with pytest.raises(AttackError, match="toy-world pipelines"):
        attack(tiny_sd_pipeline(), "circle")
    assert list(ATTACKS) == ["paraphrase", "inversion", "prompt_search", "textual_inversion", "relearning"]


def test_record_refuses_an_attack_on_anything_but_the_patch_alone(guided):
    """``attacks.record`` writes robustness into a patch only when every report attacked that patch alone, as it
    ships: the same check, and the same record of the patches on the model, as ``record_toy`` (no attack is run
    here, the reports are built with the patches they would name)."""
    from forgetpatch.attacks import record
    from forgetpatch.attacks.report import AttackReport, AttackResult, Rate
    from forgetpatch.eval import patches_on

    patch = forgetpatch.load(guided)
    other = forgetpatch.erase(toy.pipeline(), ["star"], method="uce")
    rate = Rate(0.5, 2, (0.1, 0.9))

    def report(pipe) -> AttackReport:
        result = AttackResult("inversion", rate, rate, 0.0, 0, {})
        return AttackReport(concept="circle", seed=0, budget={}, patches=patches_on(pipe), base=rate, before=rate,
                            results={"inversion": result}, prompts=[])  # fmt: skip

    before = (guided / "forgetpatch.json").read_bytes()
    alone = report(forgetpatch.apply(toy.pipeline(), guided))
    star = report(forgetpatch.apply(toy.pipeline(), guided))
    star.concept = "star"  # the patch erases the circle: a star's robustness is not its own
    with pytest.raises(AttackError, match="does not erase 'star'"):
        record(guided, [star])
    assert alone.patches == [{"name": patch.name, "digest": patch.digest, "scale": 1.0, "fused": False,
                              "key_steps": False}]  # fmt: skip
    for pipe, match in [
        (toy.pipeline(), "the attack on 'circle' measured no patch"),
        (forgetpatch.apply(toy.pipeline(), other), "measured uce-no-star"),
        (forgetpatch.apply(toy.pipeline(), [guided, other]), "alone"),
        (forgetpatch.apply(toy.pipeline(), guided, scale=0.5), "at scale 0.5"),
    ]:
        with pytest.raises(AttackError, match=match):
            record(guided, [alone, report(pipe)])
        assert (guided / "forgetpatch.json").read_bytes() == before


def test_cli_attack_records_on_the_patch_card_inspect_and_push(guided, tmp_path, capsys):
    from forgetpatch.cli import app
    from forgetpatch.hub import render_card

    runner = CliRunner()
    digest = read_patch(guided).digest
    args = ["attack", str(guided), "--attack", "inversion", "--attack", "paraphrase", "--budget", "tiny"]
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "a.json"), "--grid", str(tmp_path / "a.png"),
                                 "--record"])
    assert result.exit_code == 0, result.output
    assert "weakest against" in result.output and (tmp_path / "a.png").stat().st_size > 0
    figures = json.loads((tmp_path / "a.json").read_text())["circle"]
    assert set(figures["attacks"]) == {"inversion", "paraphrase"}
    assert {"ua_before", "ua_after", "interval", "seconds", "unet_passes"} <= set(figures["attacks"]["inversion"])
    paraphrase = figures["attacks"]["paraphrase"]  # each rate with its own sample size (before was given none)
    assert paraphrase["n_before"] >= 1 and paraphrase["n"] >= 1

    patch = read_patch(guided)
    assert patch.digest == digest  # recording figures keeps the patch's identity
    recorded = patch.manifest.metrics[ROBUSTNESS_METRICS]["circle"]
    assert recorded["attacks"]["inversion"] == figures["attacks"]["inversion"]
    assert recorded["seed"] == 0 and recorded["forgetpatch"] == forgetpatch.__version__
    assert recorded["budget"] == TINY.to_dict()

    card = render_card(guided, "org/no-circle").text
    assert "<summary>Robustness to attacks</summary>" in card and "| circle | inversion |" in card
    row = next(line for line in card.splitlines() if line.startswith("| circle | paraphrase (the worst of "))
    assert f"n={paraphrase['n_before']} |" in row and f"n={paraphrase['n']} |" in row, row
    # the worst rewording is chosen after the fact: all rewordings pooled beside it, before on the same scenes
    assert "all pooled: " in row and f"n={paraphrase['detail']['pooled_n']})" in row, row
    assert paraphrase["n_before"] == paraphrase["n"] == TINY.paraphrase_images
    assert "strongest recorded attack" in card  # the summary table names the weakest point
    assert "robustness." not in card  # no flattened keys
    shown = runner.invoke(app, ["inspect", str(guided)])
    assert shown.exit_code == 0 and "circle under the strongest recorded attack" in shown.output

    from forgetpatch.cli.hub import _print_robustness

    capsys.readouterr()
    _print_robustness(guided)  # what `forgetpatch push` tells the publisher
    told = capsys.readouterr().err
    assert "circle / inversion:" in told and "named as the concept:" in told and "fitted as it:" in told
    assert "| named after | fitted after |" in card and figures["attacks"]["inversion"]["named_interval"]
    row = next(line for line in card.splitlines() if line.startswith("| circle | inversion |"))
    fitted = figures["attacks"]["inversion"]["fitted_after"]
    assert row.split(" | ")[5].startswith(f"{fitted:.0%}"), row
    header = next(line for line in card.splitlines() if line.startswith("| concept | attack |"))
    assert card.split(header + "\n")[1].splitlines()[0].count("---") == header.count("|") - 1  # a markdown table
    # a record from before the named share (stop 45) and the fit (stop 46) still reads: "-" in the card, nothing
    # added to push's line
    older = read_patch(guided)
    for r in older.manifest.metrics[ROBUSTNESS_METRICS]["circle"]["attacks"].values():
        r.pop("named_after"), r.pop("named_interval"), r.pop("fitted_after"), r.pop("fitted_interval")
    older_folder = older.save(tmp_path / "older")
    row = next(line for line in render_card(older_folder, "org/no-circle").text.splitlines()
               if line.startswith("| circle | inversion |"))
    assert row.split(" | ")[4] == row.split(" | ")[5] == "-", row
    _print_robustness(older_folder)
    told = capsys.readouterr().err
    assert "circle / inversion:" in told and "named as the concept" not in told and "fitted" not in told
    bare = read_patch(guided)
    bare.manifest.metrics.pop(ROBUSTNESS_METRICS)
    _print_robustness(bare.save(tmp_path / "bare"))
    assert "no attack results recorded" in capsys.readouterr().err


def test_the_grid_shows_the_first_eight_or_every_image(tmp_path, monkeypatch):
    """``save_grid(every=True)`` (``--grid-all``) lays every image of the base, the patched model and each attack
    out eight to a row, the judge's shape under each; by default one row of the first eight each."""
    import numpy as np
    from PIL import Image

    from forgetpatch.attacks.report import AttackReport, AttackResult, Rate

    images = np.random.default_rng(0).random((12, 16, 16, 3)).astype(np.float32)
    verdicts = [{"shape": "circle" if i % 3 else None} for i in range(12)]
    rate = Rate.of([True] * 12)
    result = AttackResult("inversion", rate, rate, 0.0, 0, {}, named=rate, images=images, verdicts=verdicts)
    report = AttackReport(concept="circle", seed=0, budget={}, patches=[], base=rate, before=rate,
                          results={"inversion": result}, prompts=[f"p{i}" for i in range(12)], images_base=images,
                          images_before=images, verdicts_base=verdicts, verdicts_before=verdicts)  # fmt: skip
    first = Image.open(report.save_grid(tmp_path / "first.png"))
    every = Image.open(report.save_grid(tmp_path / "every.png", every=True))
    assert every.width == first.width  # eight columns
    tile = 16 * 3 + 14 + 2  # an image at scale 3, its note, the gutter
    assert every.height - first.height == 3 * tile  # a second row for each of the three (12 images: 8 + 4)
    # each row is titled with its images' range; the paraphrase's first row names its worst rewording instead
    import forgetpatch.attacks.report as report_module

    worst = AttackResult("paraphrase", rate, rate, 0.0, 0, {}, named=rate, images=images, verdicts=verdicts,
                         detail={"worst_prompt": "superclass 'shape': a blue shape"})  # fmt: skip
    report.results = {"paraphrase": worst, "inversion": result}
    result.fits = ["circle" if i < 6 else "ring" for i in range(12)]
    drawn = []
    monkeypatch.setattr(report_module, "save_rows", lambda rows, path, labels: drawn.extend(rows))
    report.save_grid(tmp_path / "titled.png", every=True)
    assert [title for title, *_ in drawn] == [
        "base\n1-8", "base\n9-12", "patched\n1-8", "patched\n9-12", "paraphrase\n(superclass 'shape')",
        "paraphrase\n9-12", "inversion\n1-8", "inversion\n9-12",
    ]
    # under each tile the judge's shape, and the geometric fit's after a slash where the two differ
    assert drawn[0][2][:3] == ["?", "circle", "circle"]  # no fit recorded
    assert drawn[6][2] == ["?/circle", "circle", "circle", "?/circle", "circle", "circle", "?/ring", "circle/ring"]


def test_cli_attack_errors_are_one_line(guided, tmp_path):
    import subprocess
    import sys

    from forgetpatch.cli import app

    runner = CliRunner()
    for args, message in (
        ((str(guided), "--attack", "jailbreak"), "unknown attacks"),
        ((str(guided), "--concept", "disc"), "synonym of 'circle'"),
        ((str(guided), str(guided), "--record"), "--record writes into one local patch folder"),
        ((str(guided), "--record", "--scale", "0.5"), "--scale 1, no --key-steps"),  # refused after every attack before
        ((str(guided), "--budget", "huge"), "unknown attack budget 'huge'; choose one of ['default', 'tiny']"),
        ((str(guided), "--grid", str(tmp_path / "g.jpg")), "ending in .png"),
        ((str(guided), "--grid-all"), "give --grid PATH.png too"),
    ):
        result = runner.invoke(app, ["attack", *args])
        assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output, result.output
    # `forgetpatch` itself prints a forgetpatch error as one line, without a traceback
    done = subprocess.run([sys.executable, "-m", "forgetpatch.cli", "attack", str(guided), "--attack", "jailbreak"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "unknown attacks" in done.stderr and "Traceback" not in done.stderr
