"""The forgetting metrics on known inputs: fake generators whose every image is known, and a judge that reads them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from forgetpatch import Concept
from forgetpatch.errors import ConceptError, EvalError, EvalInputError, ForgetPatchError
from forgetpatch.eval import (
    ConceptReport,
    EvalReport,
    PipelineGenerator,
    blindfold,
    evaluate,
    guide_ceiling,
    main_prompts,
    paraphrase_prompts,
    save_grid,
    scoring_prompts,
    steered_to,
    wilson,
)
from forgetpatch.rates import paired_ratio_interval, percent, rate_text
from forgetpatch.testing import tiny_sd_pipeline
from forgetpatch.toy import vocab

N = 8
WORDS = {w: w for w in (*vocab.SHAPES, *vocab.COLOURS, *vocab.TEXTURES)}
WORDS.update({syn: canon for canon, syns in vocab.SYNONYMS.items() for syn in syns})
INDEX = {k: list(vocab.concepts_of(k)) for k in ("shape", "colour", "texture")}


NONE_CODE = 14  # the shape channel's code for "nothing drawn"
DEFORMED = 0.95  # pixel (0, 0) at this value: the shape is drawn deformed, the judge can't tell


class FakeGenerator:
    """Draws exactly the scene a prompt names, after rewriting words by ``word_map``; ``offset`` shifts pixels.

    ``spoil`` draws that concept as the next one of its kind, ``deform`` draws that shape so deformed
    that the judge abstains, ``vanish`` draws nothing where that shape should be.
    """

    def __init__(
        self,
        word_map: dict[str, str] | None = None,
        offset: float = 0.0,
        spoil: str | None = None,
        deform: str | None = None,
        vanish: str | None = None,
    ):
        self.word_map, self.offset, self.spoil = word_map or {}, offset, spoil
        self.deform, self.vanish = deform, vanish

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        out = np.zeros((len(prompts), 4, 4, 3), np.float32)
        for i, text in enumerate(prompts):
            words = [WORDS[self.word_map.get(w, w)] for w in text.split() if self.word_map.get(w, w) in WORDS]
            for c, kind in enumerate(INDEX):
                (name,) = [w for w in words if vocab.kind_of(w) == kind]
                if name == self.spoil:  # the concept is drawn as the next one of its kind
                    name = INDEX[kind][(INDEX[kind].index(name) + 1) % len(INDEX[kind])]
                code = NONE_CODE if name == self.vanish else INDEX[kind].index(name)
                out[i, ..., c] = code / 16 + 0.01
                if name == self.deform:
                    out[i, 0, 0, :] = DEFORMED
        return out + self.offset


def verdict(shape: str | None, colour: str | None, texture: str | None, p_shape: dict | None = None) -> dict:
    """A judge verdict in :meth:`Judge.classify`'s form, probability 1 on each label unless ``p_shape``."""
    one_hot = {"shape": shape or "unclear", "colour": colour or "unclear", "texture": texture or "unclear"}
    p = {k: {c: float(c == one_hot[k]) for c in (*INDEX[k], "none", "unclear")} for k in INDEX}
    if p_shape is not None:
        p["shape"] = {**dict.fromkeys(p["shape"], 0.0), **p_shape}
    return {"shape": shape, "colour": colour, "texture": texture, "p": p}


class FakeJudge:
    """Reads :class:`FakeGenerator`'s images back exactly; abstains on deformed shapes (p 0.45 for the shape)."""

    def classify(self, images: np.ndarray) -> list[dict]:
        idx = np.floor((images[:, 1, 1, :] + 1e-6) * 16).astype(int)
        out = []
        for row, corner in zip(idx, images[:, 0, 0, 0], strict=True):
            shape = "none" if row[0] == NONE_CODE else INDEX["shape"][row[0]]
            colour, texture = INDEX["colour"][row[1]], INDEX["texture"][row[2]]
            if corner >= DEFORMED - 0.01:
                out.append(verdict(None, colour, texture, {shape: 0.45, "unclear": 0.55}))
            else:
                out.append(verdict(shape, colour, texture))
        return out


def run(gen, erased=("circle",), **kw) -> EvalReport:
    return evaluate(gen, list(erased), judge=FakeJudge(), images_per_concept=N, progress=False, **kw)


def test_prompts_are_balanced_never_trained_and_independent_of_erased():
    items = main_prompts(N)
    for concept in (*vocab.SHAPES, *vocab.COLOURS, *vocab.TEXTURES):
        assert sum(it.names(concept) for it in items) >= N, concept
    assert len({it.key for it in items}) == len(items)
    for it in items:
        reworded = any(it.prompt == vocab.prompt(it.scene, t) for t in vocab.HELDOUT_TEMPLATES)
        assert reworded or vocab.is_heldout(it.scene), it.prompt
    # circle meets several colours and textures, not one held-out scene over and over
    circles = [it.scene for it in items if it.scene.shape == "circle"]
    assert len({s.colour for s in circles}) >= 6 and len({s.texture for s in circles}) == 5
    assert (
        scoring_prompts(["circle"], N)[: len(items)]
        == items
        == scoring_prompts(["red", "grid"], N)[: len(items)]
    )


def test_paraphrases_use_synonyms_or_rewording():
    disc = paraphrase_prompts("circle", N)
    assert all("disc" in it.prompt.split() and "circle" not in it.prompt.split() for it in disc)
    red = paraphrase_prompts("red", N)
    assert all(not it.synonym and "red" in it.prompt.split() for it in red)
    assert all(any(it.prompt == vocab.prompt(it.scene, t) for t in vocab.HELDOUT_TEMPLATES) for it in red)
    assert not {it.key for it in disc} & {it.key for it in main_prompts(N)}


def test_perfect_generator_forgets_nothing():
    report = run(FakeGenerator(), reference=FakeGenerator())
    s = report.concepts["circle"].scores
    assert (s.ua, s.ira, s.cra, s.near, s.leakage) == (0.0, 1.0, 1.0, 1.0, 1.0)
    assert report.drift == 0.0
    assert report.concepts["circle"].ratios == {"ira": 1.0, "cra": 1.0, "near": 1.0}
    assert report.accuracy == {"shape": 1.0, "colour": 1.0, "texture": 1.0}


def test_generator_that_never_draws_circles_has_full_ua_and_keeps_the_rest():
    erased = FakeGenerator({"circle": "square", "disc": "square"})
    report = run(erased, reference=FakeGenerator())
    s, b = report.concepts["circle"].scores, report.concepts["circle"].base
    assert (s.ua, s.ira, s.cra, s.near, s.leakage) == (1.0, 1.0, 1.0, 1.0, 0.0)
    assert (b.ua, b.leakage) == (0.0, 1.0)
    assert report.drift == 0.0  # prompts not naming circle are untouched


def test_worst_case_over_erased_concepts():
    # circle forgotten (but "disc" leaks); star not forgotten; square drawn as circle hurts star's IRA
    gen = FakeGenerator({"circle": "square", "square": "circle", "box": "circle"})
    report = run(gen, erased=("circle", "star"), reference=FakeGenerator())
    circle, star = report.concepts["circle"], report.concepts["star"]
    worst = report.worst()
    assert worst["ua"] == min(circle.scores.ua, star.scores.ua) == 0.0  # star still drawn
    assert worst["ira"] == min(circle.ratios["ira"], star.ratios["ira"]) < 1.0
    assert worst["leakage"] == max(circle.scores.leakage, star.scores.leakage) == 1.0
    assert worst["cra"] == worst["near"] == 1.0


def test_guide_ceiling_is_what_the_guide_prompts_draw():
    def ceiling(concept, guide):
        return guide_ceiling(FakeGenerator(), [concept], guide, judge=FakeJudge(), images_per_concept=N)

    assert ceiling("circle", "cross") == {"circle": 1.0}  # the guide's prompts never draw a circle
    assert ceiling("circle", "disc") == {"circle": 0.0}  # a synonym as guide: no erasure towards it helps
    assert ceiling("red", "blue") == {"red": 1.0}


def test_guide_ceiling_takes_a_guide_per_concept_as_a_patch_records_them():
    concepts = [Concept("circle", guide="cross"), Concept("star", superclass="star"), Concept("ring")]
    to = steered_to(concepts)
    assert to == {"circle": "cross", "star": "star", "ring": ""}
    found = guide_ceiling(FakeGenerator(), ["circle", "star"], to, judge=FakeJudge(), images_per_concept=N)
    assert found == {"circle": 1.0, "star": 0.0}  # each concept's own guide: "cross" erases, "star" itself does not
    with pytest.raises(ConceptError, match="no guide for"):
        guide_ceiling(FakeGenerator(), ["square"], {"circle": "cross"}, judge=FakeJudge(), images_per_concept=N)


def test_synonym_left_out_shows_as_paraphrase_leakage():
    s = run(FakeGenerator({"circle": "square"})).concepts["circle"].scores
    assert s.ua == 1.0 and s.leakage == 1.0


def test_strict_ua_counts_an_abstention_as_not_forgotten():
    deformed = run(FakeGenerator(deform="circle"), reference=FakeGenerator()).concepts["circle"]
    s = deformed.scores
    assert s.ua == 0.0 and s.split == {"kept": 0.0, "replaced": 0.0, "empty": 0.0, "unclear": 1.0}
    assert s.ua_soft == pytest.approx(0.55) and s.ua_top1 == 0.0  # top-1 still reads a circle
    assert s.leakage == 1.0  # the synonym's images are deformed circles too
    vanished = run(FakeGenerator(vanish="circle")).concepts["circle"].scores
    assert vanished.ua == 1.0 and vanished.split["empty"] == 1.0 and vanished.ua_soft == 1.0


def test_every_rate_has_its_sample_size_and_wilson_interval():
    s = run(FakeGenerator({"circle": "square", "disc": "square"})).concepts["circle"].scores
    # CRA: one outcome per retained image (both other kinds named right); it counted each image once per kind
    assert s.n == {"ua": N, "ira": 9 * N, "cra": 9 * N, "near": 2 * N, "leakage": N}
    assert s.interval["ua"] == list(wilson(N, N)) and s.interval["ua"][1] == 1.0
    assert 0.6 < s.interval["ua"][0] < 0.7  # 8 of 8: the rate is only known to be above ~0.68
    assert wilson(0, 10)[0] == 0.0 and wilson(5, 10) == (0.2365, 0.7635)  # 0.23659, 0.76341: rounded outward


def test_safe_worst_case_uses_the_interval_bounds():
    report = run(FakeGenerator({"circle": "square", "disc": "square"}), reference=FakeGenerator())
    point, safe = report.worst(), report.worst(safe=True)
    assert point["ua"] == 1.0 and safe["ua"] == report.concepts["circle"].scores.interval["ua"][0] < 1.0
    assert safe["ira"] < point["ira"] == 1.0 and safe["leakage"] > point["leakage"] == 0.0
    circle = report.concepts["circle"]
    assert safe["ira"] == circle.ratio_interval["ira"][0]  # the ratio's own interval, the base's noise counted
    # both models right on all 72 retained images, paired: the ratio is known to within about 5% either way
    assert circle.ratio_interval["ira"] == list(paired_ratio_interval([True] * 72, [True] * 72))
    assert 0.94 < circle.ratio_interval["ira"][0] < 1.0 < circle.ratio_interval["ira"][1] < 1.06


def test_retention_ratios_have_an_interval_that_survives_the_record(tmp_path):
    swap = FakeGenerator({"circle": "square", "disc": "square", "square": "circle", "box": "circle"})
    report = run(swap, reference=FakeGenerator())
    circle = report.concepts["circle"]
    lo, hi = circle.ratio_interval["ira"]
    assert circle.ratios["ira"] == pytest.approx(8 / 9) and lo < 8 / 9 < hi
    assert circle.to_dict()["ratio_interval"] == circle.ratio_interval and "flags" not in circle.to_dict()
    again = EvalReport.load(report.save(tmp_path / "r.npz")).concepts["circle"]
    assert again.ratio_interval == circle.ratio_interval  # as measured (paired), not rebuilt from the two rates
    rebuilt = ConceptReport("circle", "shape", again.scores, again.base)  # read back: no per-image outcomes
    wide = rebuilt.ratio_interval["ira"]  # only the two rates known: the interval from their intervals
    assert wide[0] <= 8 / 9 <= wide[1] and wide != circle.ratio_interval["ira"]


def test_a_concept_whose_ratio_has_no_interval_is_the_worst_case_not_left_out():
    """No image right on both models (nothing kept): no interval, and the safe worst case dropped that concept and
    read another's bound."""
    from forgetpatch.eval.report import Scores

    def scores(flags: list[bool]) -> Scores:
        return Scores(ua=1.0, ira=sum(flags) / len(flags), cra=None, near=None, leakage=None,
                      n={"ua": 16, "ira": len(flags)},
                      interval={"ua": list(wilson(16, 16)), "ira": list(wilson(sum(flags), len(flags)))},
                      flags={"ira": flags})

    lost = ConceptReport("circle", "shape", scores([False] * 16), scores([True] * 16))
    kept = ConceptReport("star", "shape", scores([True] * 16), scores([True] * 16))
    assert "ira" not in lost.ratio_interval and lost.ratios["ira"] == 0.0
    report = EvalReport(["circle", "star"], {"circle": lost, "star": kept}, {}, None, {}, 0.0, [], np.zeros((0,)), [])
    assert report.worst(safe=True)["ira"] == 0.0 == report.worst()["ira"]


def test_rates_are_written_without_claiming_more_than_measured():
    assert rate_text(199 / 200, wilson(199, 200), 200) == ">99% [97-100%], n=200"  # it said 100% [97-100%]
    assert rate_text(1 / 300, wilson(1, 300)) == "<1% [0-2%]"
    assert rate_text(1.0, wilson(34, 34), 34) == "100% [89-100%], n=34"  # lower bound 0.8985: not "[90-100%]"
    assert wilson(34, 34)[0] <= 0.8985 and wilson(67, 67)[0] < 0.946
    assert rate_text(None) == "-" and percent(0.845, down=True) == "84%"  # a lower bound never rounds up to a bar


def test_swap_damages_in_domain_retention_of_the_replacement():
    swap = FakeGenerator({"circle": "square", "disc": "square", "square": "circle", "box": "circle"})
    report = run(swap, reference=FakeGenerator())
    c = report.concepts["circle"]
    assert c.scores.ua == 1.0
    assert c.scores.ira_by["square"] == 0.0 and c.scores.ira_by["triangle"] == 1.0
    assert c.scores.ira == pytest.approx(8 / 9)  # 9 retained shapes, 8 images each, square's all wrong
    assert c.ratios["ira"] == pytest.approx(8 / 9)
    assert c.scores.cra == 1.0 and c.scores.near == 1.0
    assert report.drift > 0  # square prompts now draw circles


def test_near_neighbour_and_cross_domain_damage_are_measured():
    s = run(FakeGenerator(spoil="ellipse")).concepts["circle"].scores
    assert s.near_by == {"ellipse": 0.0, "ring": 1.0} and s.near == 0.5
    assert s.cra == 1.0
    s = run(FakeGenerator(spoil="red")).concepts["circle"].scores
    retained = [it for it in main_prompts(N) if not it.names("circle")]
    reds = sum(it.scene.colour == "red" for it in retained)
    assert s.cra_by["colour"] == pytest.approx(1 - reds / len(retained)) and s.cra_by["texture"] == 1.0
    assert s.ira == 1.0


def test_drift_is_mean_absolute_pixel_difference_on_retained_prompts():
    report = run(FakeGenerator(offset=0.002), reference=FakeGenerator())
    assert report.drift == pytest.approx(0.002)


def test_several_erased_concepts_of_different_kinds():
    report = run(
        FakeGenerator({"red": "blue", "stripes": "plain", "striped": "plain"}), erased=["red", "stripes"]
    )
    assert report.concepts["red"].scores.ua == 1.0 and report.concepts["red"].scores.leakage == 0.0
    assert report.concepts["stripes"].scores.ua == 1.0 and report.concepts["stripes"].scores.leakage == 0.0
    assert report.concepts["red"].scores.near is None
    assert report.concepts["red"].scores.ira == 1.0 and report.concepts["stripes"].scores.cra == 1.0


def test_reference_report_is_reused_like_a_reference_generator():
    patched = FakeGenerator({"circle": "square", "disc": "square"}, offset=0.001)
    base_report = run(FakeGenerator(), erased=[])
    via_report = run(patched, reference=base_report)
    via_gen = run(patched, reference=FakeGenerator())
    assert via_report.drift == pytest.approx(via_gen.drift)
    r, g = via_report.concepts["circle"], via_gen.concepts["circle"]
    assert (r.base.ua, r.base.ira, r.base.cra, r.base.near) == (
        g.base.ua,
        g.base.ira,
        g.base.cra,
        g.base.near,
    )
    assert r.base.leakage is None and g.base.leakage == 1.0  # the base report had no paraphrase prompts
    fewer = evaluate(
        patched, ["circle"], judge=FakeJudge(), images_per_concept=4, reference=base_report, progress=False
    )
    assert fewer.concepts["circle"].base.ira == 1.0  # a smaller main set is a prefix of the larger one
    with pytest.raises(ForgetPatchError, match="images_per_concept, seed"):
        run(patched, reference=base_report, seed=1)
    with pytest.raises(ForgetPatchError, match="guidance_scale"):
        run(patched, reference=base_report, guidance_scale=1.0)


def test_report_serialises_and_renders(tmp_path):
    report = run(FakeGenerator(), reference=FakeGenerator())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["concepts"]["circle"]["ua"] == 0.0 and data["concepts"]["circle"]["base"]["ira"] == 1.0
    assert data["n_images"] == 10 * N + N and data["drift"] == 0.0
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report.table())
    assert "circle (shape)" in console.export_text()


def test_unknown_concept_is_a_clear_error():
    with pytest.raises(ConceptError, match="disc"):
        run(FakeGenerator(), erased=["disc"])


def test_save_grid_writes_a_labelled_png(tmp_path):
    before = np.random.default_rng(0).random((5, 32, 32, 3))
    path = save_grid(before, before[::-1], tmp_path / "g.png", [f"prompt {i}" for i in range(5)])
    img = Image.open(path)
    assert img.width >= 5 * 96 and img.height >= 2 * 96
    with pytest.raises(ValueError, match="labels"):
        save_grid(before, before, tmp_path / "x.png", ["one"])
    with pytest.raises(ValueError, match="got 5 and 2 notes for 5 images"):  # was a bare IndexError
        save_grid(before, before, tmp_path / "x.png", notes=(["n"] * 5, ["n"] * 2))
    with pytest.raises(ValueError, match="flagged"):
        save_grid(before, before, tmp_path / "x.png", flagged=([True], [False] * 5))


def test_pipeline_generator_images_do_not_depend_on_the_batch():
    pipe = tiny_sd_pipeline(seed=0)
    gen = PipelineGenerator(pipe, num_inference_steps=2, batch_size=3, progress=False)
    prompts = ["a red circle", "a blue square", "a green star"]
    together = gen.generate(prompts, [1, 2, 3])
    alone = PipelineGenerator(pipe, num_inference_steps=2, batch_size=1, progress=False).generate(
        prompts[1:2], [2]
    )
    assert together.shape[0] == 3 and together.min() >= 0 and together.max() <= 1
    np.testing.assert_allclose(together[1], alone[0], atol=1e-4)


def test_blindfold_copies_the_text_encoder_and_replaces_embeddings():
    pipe = tiny_sd_pipeline(seed=0)
    tok = pipe.tokenizer
    ids = {w: tok(w, add_special_tokens=False).input_ids[0] for w in ("circle", "star", "ring")}
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    blind = blindfold(pipe, "circle", "star", synonyms=[])
    table = blind.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids["circle"]], before[ids["star"]])
    assert torch.equal(table[ids["ring"]], before[ids["ring"]])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)  # original untouched
    assert blind.unet is pipe.unet
    swapped = (
        blindfold(pipe, "circle", "star", synonyms=[], swap=True).text_encoder.get_input_embeddings().weight
    )
    assert torch.equal(swapped[ids["star"]], before[ids["circle"]])
    with pytest.raises(ConceptError, match="tokens"):
        blindfold(pipe, "circle", "star", synonyms=["notaword"])


def test_report_saves_and_loads_as_a_reusable_reference(tmp_path):
    report = run(FakeGenerator({"circle": "square"}), reference=FakeGenerator())
    loaded = EvalReport.load(report.save(tmp_path / "r.npz"))
    assert loaded.to_dict() == report.to_dict()
    assert loaded.items == report.items and loaded.judged == report.judged
    np.testing.assert_array_equal(loaded.base_images, report.base_images)
    again = run(FakeGenerator(offset=0.002), reference=loaded)
    assert again.drift == pytest.approx(0.002)
    with pytest.raises(ForgetPatchError, match="not an evaluation report"):
        EvalReport.load(tmp_path / "missing.npz")


def test_blindfolded_pipeline_draws_the_replacement_for_the_concept():
    """The blindfold's effect end to end on a real pipeline: "circle" prompts give exactly the "star" images."""
    pipe = tiny_sd_pipeline(seed=0)
    blind = blindfold(pipe, "circle", "star", synonyms=[])
    gen = dict(num_inference_steps=2, progress=False)
    seeds = [3, 4]
    original = PipelineGenerator(pipe, **gen).generate(["a red star", "a red ring"], seeds)
    blinded = PipelineGenerator(blind, **gen).generate(["a red circle", "a red ring"], seeds)
    np.testing.assert_allclose(blinded, original, atol=1e-5)
    plain = PipelineGenerator(pipe, **gen).generate(["a red circle"], seeds[:1])
    assert np.abs(plain - original[:1]).mean() > 1e-3  # without the blindfold, circle and star differ


def test_cli_eval_writes_figures_and_reuses_the_cached_base(tmp_path, monkeypatch):
    import forgetpatch.cli.evaluate as cli_eval
    import forgetpatch.toy
    from forgetpatch.cli import app

    monkeypatch.setenv("FORGETPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_eval, "_load_base", lambda base: _toy_stand_in())
    monkeypatch.setattr(forgetpatch.toy, "load_judge", lambda: FixedJudge())
    args = [
        "eval",
        "--concept",
        "circle",
        "--images",
        "1",
        "--steps",
        "1",
        "--json",
        str(tmp_path / "r.json"),
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert (
        data["concepts"]["circle"]["ua"] == 1.0 and data["n_images"] == 11
    )  # the fixed judge always says square
    assert len(list((tmp_path / "cache" / "eval").glob("base-*.npz"))) == 1
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "reused" in second.output


def test_cli_eval_of_a_patch_against_the_base(tmp_path, monkeypatch):
    import forgetpatch.cli.evaluate as cli_eval
    import forgetpatch.toy
    from forgetpatch.cli import app
    from forgetpatch.format import build_patch

    pipe = tiny_sd_pipeline(seed=0)
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    weight = pipe.unet.get_submodule(name).weight
    g = torch.Generator().manual_seed(0)
    factors = {
        f"unet.{name}": (
            torch.randn(2, weight.shape[1], generator=g),
            torch.randn(weight.shape[0], 2, generator=g),
        )
    }
    build_patch(pipe, factors, name="no-circle", method="test", concepts=["circle"]).save(
        tmp_path / "no-circle"
    )
    monkeypatch.setenv("FORGETPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_eval, "_load_base", lambda base: _toy_stand_in())
    monkeypatch.setattr(forgetpatch.toy, "load_judge", lambda: FixedJudge())
    args = ["eval", str(tmp_path / "no-circle"), "--images", "1", "--steps", "1"]
    args += ["--json", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["erased"] == ["circle"]  # taken from the patch manifest
    assert data["drift"] > 0 and data["concepts"]["circle"]["base"] is not None
    assert Image.open(tmp_path / "g.png").height >= 2 * 32


def _toy_stand_in():
    """A tiny pipeline standing in for the toy model (the CLI's toy path refuses any other model), judged by a
    :class:`FixedJudge`."""
    pipe = tiny_sd_pipeline(seed=0)
    pipe.forgetpatch_family = "toy"
    return pipe


class FixedJudge:
    def classify(self, images: np.ndarray) -> list[dict]:
        return [verdict("square", "red", "plain") for _ in images]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images_per_erased": -3}, "images_per_erased must be a whole number >= 1, got -3"),  # recorded as -3
        ({"images_per_concept": -1}, "images_per_concept must be a whole number >= 1, got -1"),  # said "got 0"
        ({"images_per_concept": 1.5}, "images_per_concept"),
        ({"num_inference_steps": 0}, "num_inference_steps"),  # ZeroDivisionError
        ({"batch_size": 0}, "batch_size"),  # range() arg 3 must not be zero
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),  # diffusers: no guidance
    ],
)
def test_evaluate_refuses_settings_it_cannot_measure_with_before_generating(kwargs, match):
    from forgetpatch.errors import EvalInputError

    class Never:
        def generate(self, prompts, seeds):
            raise AssertionError("nothing is generated before the settings are checked")

    with pytest.raises(EvalInputError, match=match):
        evaluate(Never(), ["circle"], **kwargs)


def test_a_reference_made_with_other_settings_is_refused_before_generating():
    class Never:
        def generate(self, prompts, seeds):
            raise AssertionError("nothing is generated before the reference is checked")

    reference = run(FakeGenerator(), num_inference_steps=2)
    with pytest.raises(ForgetPatchError, match="num_inference_steps=2"):
        run(Never(), reference=reference, num_inference_steps=4)


def test_images_with_nan_pixels_are_refused_not_judged():
    """A pipeline drawing NaN (a patch at a huge scale, float16 overflow) gave figures all the same: the judge
    abstains on such an image, so erased concepts read 0% forgotten and retention 0%, measured on nothing."""
    pipe = tiny_sd_pipeline(seed=0)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    generator = PipelineGenerator(pipe, num_inference_steps=2, batch_size=2, progress=False)
    with pytest.raises(EvalError, match=r"drew 2 of 2 images with NaN or infinite pixels \(the first: 'a', seed 7\)"):
        generator.generate(["a", "b", "c"], [7, 8, 9])


def test_evaluate_records_what_it_measured_and_refuses_what_it_cannot_use():
    """Found by a hunt: ``images_per_erased`` under ``images_per_concept`` was recorded as given while UA used the
    larger; a seed of "0" or 1.5 was a TypeError or silently 1.5; erased concepts given as a generator were used up
    by the check and nothing was evaluated; a report of a patched model was taken as the base and every ratio was
    1.0; a re-judged report lost the record of its patches, so it could not be recorded."""
    from forgetpatch.eval import rejudge

    report = run(FakeGenerator(), images_per_erased=2)
    assert report.settings["images_per_erased"] == N == report.concepts["circle"].scores.n["ua"]
    for seed in ("0", None, 1.5, True, -1, 2**32):
        with pytest.raises(EvalInputError, match="seed must be a whole number from 0"):
            run(FakeGenerator(), seed=seed)
    assert run(FakeGenerator(), erased=(c for c in ["circle", "red"])).erased == ["circle", "red"]
    patched = run(FakeGenerator())
    patched.settings["patches"] = [{"name": "no-circle", "digest": "ab" * 32, "scale": 1.0, "fused": False,
                                    "key_steps": False}]  # fmt: skip
    with pytest.raises(EvalError, match="the reference has no-circle on: it stands for the base model"):
        run(FakeGenerator(), reference=patched)
    assert rejudge(patched, FakeJudge()).settings["patches"] == patched.settings["patches"]


def test_guide_ceiling_checks_its_settings_as_evaluate_does():
    """``guide_ceiling`` took NaN or negative guidance and returned a figure; steps 0 were a ZeroDivisionError."""
    for kw, message in [
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": -3.0}, "guidance_scale must be a finite number >= 0"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1"),
        ({"images_per_concept": 2.5}, "images_per_concept must be a whole number >= 1"),
        ({"seed": "1"}, "seed must be a whole number from 0"),
    ]:
        with pytest.raises(EvalInputError, match=re.escape(message)):
            guide_ceiling(FakeGenerator(), ["circle"], "cross", judge=FakeJudge(), **kw)


def test_the_table_gives_each_concepts_own_sample_sizes():
    """The caption gave the first erased concept's sample sizes for every row: red's UA rate (15 images) was shown
    with circle's n (12)."""
    report = run(FakeGenerator(), erased=("circle", "red"), images_per_erased=12)
    caption = report._caption()
    for concept, r in report.concepts.items():
        assert f"{concept}: " + ", ".join(f"{k} {v}" for k, v in r.scores.n.items()) in caption, caption
    assert report.concepts["circle"].scores.n["ua"] != report.concepts["red"].scores.n["ua"]
    assert "n: ua 8," in run(FakeGenerator())._caption()  # one concept: its sizes, once


def test_a_report_file_of_another_kind_or_an_odd_path_gives_an_eval_error(tmp_path):
    """EvalReport.load of a suite report's file was a bare KeyError; save to a folder an IsADirectoryError, under a
    file a FileExistsError."""
    from forgetpatch.eval import SuitePrompt, SuiteReport

    report = run(FakeGenerator())
    suite = SuiteReport(erased=[], concepts={}, accuracy={}, drift=None, settings={"suite": "quality"}, seconds=0.0,
                        items=[SuitePrompt("a tench", 1)], images=np.zeros((1, 4, 4, 3), np.float32), judged=[{}])
    with pytest.raises(EvalError, match="is not an evaluation report saved by EvalReport.save"):
        EvalReport.load(suite.save(tmp_path / "suite.npz"))
    (tmp_path / "afile").write_text("x")
    for path, message in ((tmp_path, "it is a folder"), (tmp_path / "afile" / "r.npz", "a folder above it is a file")):
        with pytest.raises(EvalError, match=message):
            report.save(path)
    assert EvalReport.load(report.save(tmp_path / "r.npz")).to_dict() == report.to_dict()


def test_a_reference_judged_by_another_judge_is_refused():
    """A base report re-judged by the first judge was compared with figures of the current one (the base's shape
    accuracy read 1.0 against 0.22 on the same images, so IRA read 0.22): reports record their judge's digest."""
    from forgetpatch import toy
    from forgetpatch.eval import rejudge

    first, shipped = toy.load_judge("v1").digest, toy.load_judge().digest
    assert first and shipped and first != shipped

    class Named(FakeJudge):
        def __init__(self, digest):
            self.digest = digest

    kw = {"images_per_concept": N, "progress": False}
    base = evaluate(FakeGenerator(), ["circle"], judge=Named("aaaa"), **kw)
    assert base.settings["judge"] == "aaaa" and rejudge(base, Named("bbbb")).settings["judge"] == "bbbb"
    with pytest.raises(EvalError, match=r"judged by another judge \(aaaa, this evaluation's is bbbb\)"):
        evaluate(FakeGenerator(), ["circle"], judge=Named("bbbb"), reference=base, **kw)
    evaluate(FakeGenerator(), ["circle"], judge=Named("aaaa"), reference=base, **kw)
    evaluate(FakeGenerator(), ["circle"], judge=FakeJudge(), reference=base, **kw)  # a judge that does not say
