"""The real-weight suites' plumbing (issue 15): prompts and the I2P CSV, NudeNet's bundled model on rendered images,
CLIP from a tiny random-weight folder, FID's Fréchet distance and its feature-network path, the report, the CLI.

Random CLIP weights and the toy base say nothing about how well a method forgets: these tests check that images are
generated, judged, counted, given intervals and recorded as stated. The figures of a real run need real weights."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import forgetpatch
import forgetpatch.toy as toy
from forgetpatch.cli import app
from forgetpatch.errors import EvalError, EvalInputError, MissingExtraError
from forgetpatch.eval import (
    FeatureNet,
    SuitePrompt,
    SuiteReport,
    check_guidance,
    evaluate_suite,
    frechet_distance,
    read_prompt_csv,
)
from forgetpatch.eval.suites import (
    NUDITY_CLASSES,
    nudity_prompts,
    nudity_verdict,
    object_prompts,
    quality_prompts,
    rate,
    style_prompts,
)
from forgetpatch.eval.suites.run import _labelled_scores
from forgetpatch.testing import tiny_sd_pipeline
from forgetpatch.tokenizer import word_level_clip_tokenizer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIPModel and its processor, saved as a local folder the way save_pretrained writes one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tok = word_level_clip_tokenizer(["a", "photo", "of", "church", "tench", "parachute"])
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


class TinyFeatures(torch.nn.Module):
    """A random conv net standing in for Inception: uint8 N x 3 x H x W -> N x 6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean((2, 3))


def test_eval_reexports_the_suites_own_names():
    import forgetpatch.eval as ev
    import forgetpatch.eval.suites as suites

    assert all(hasattr(ev, name) for name in ev.__all__) and len(set(ev.__all__)) == len(ev.__all__)
    shared = set(ev.__all__) & set(suites.__all__)
    assert {"SUITES", "SuiteReport", "evaluate_suite", "read_prompt_csv"} <= shared
    assert all(getattr(ev, name) is getattr(suites, name) for name in shared) and ev.record_suite is suites.record


def test_prompt_lists_are_fixed_by_their_settings():
    objects = object_prompts(images_per_class=2)
    assert len(objects) == 20 and objects == object_prompts(images_per_class=2)
    assert [it.seed for it in objects] == list(range(20)) and objects[1].prompt == "a picture of a tench"
    styles = style_prompts(["Claude Monet", "Rembrandt"], images_per_artist=6, seed=10)
    assert len({it.prompt for it in styles}) == 12 and styles[0].seed == 10
    assert {it.concept for it in nudity_prompts()} == {"nudity"} and len(quality_prompts(images_per_prompt=2)) == 32


def test_read_prompt_csv_takes_the_i2p_and_esd_layouts(tmp_path):
    i2p = tmp_path / "i2p.csv"
    i2p.write_text('prompt,categories,hard,sd_seed,sd_guidance\n"a bather, oil",sexual,1,123,7\nstatue,sexual,0,5,\n')
    items = read_prompt_csv(i2p, concept="nudity")
    assert items == [SuitePrompt("a bather, oil", 123, "nudity", 7.0), SuitePrompt("statue", 5, "nudity", None)]
    esd = tmp_path / "esd.csv"
    esd.write_text("case_number,prompt,evaluation_seed,evaluation_guidance,class\n0,a photo of a church,7,7.5,church\n"
                   "1,a tench,8,7.5,tench\n")
    assert read_prompt_csv(esd, limit=1) == [SuitePrompt("a photo of a church", 7, "church", 7.5)]
    # seeds are read exactly (a float rounded those above 2**53), as spreadsheets also write them
    big = tmp_path / "big.csv"
    big.write_text("prompt,seed\na,12345678901234567891\nb,18446744073709551615\nc,2734971755.0\n")
    assert [p.seed for p in read_prompt_csv(big)] == [12345678901234567891, 2**64 - 1, 2734971755]


@pytest.mark.parametrize(
    "text, message",
    [
        ("text,seed\nhello,1\n", "no 'prompt' column (columns: text, seed)"),
        ("prompt,guidance\nhello,7\n", "no seed column: name it 'evaluation_seed' or 'sd_seed' or 'seed'"),
        ("prompt,seed\nhello,seven\n", "line 2"),
        ("prompt,seed\n\n\nhello,1\n\nbye,1.9\n", "line 6: seed: '1.9' is not a seed"),  # blank lines counted
        ('prompt,seed\n"two\nlines",1\nbye,inf\n', "line 4: seed: 'inf' is not a seed"),
        ("prompt,seed\nhello,1e30\n", "from 0 to 2**64 - 1"),
        ("prompt,seed\nhello,-1\n", "from 0 to 2**64 - 1"),
        ("prompt,seed,guidance\nhello,1,nan\n", "line 2: guidance: guidance must be a finite number >= 0"),
    ],
)
def test_read_prompt_csv_names_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(EvalInputError, match=re.escape(message)):
        read_prompt_csv(path)
    with pytest.raises(EvalInputError, match="not found"):
        read_prompt_csv(tmp_path / "missing.csv")


def test_a_guidance_that_is_not_a_number_from_0_is_refused_before_the_first_image():
    """A prompt's own guidance (an I2P row's) of NaN given from Python failed at its own image, mid-run, after every
    image before it; NaN draws noise and a negative scale means nothing. Each is refused before anything runs."""

    class Counting:
        asked = 0

        def generate(self, prompts, seeds):
            Counting.asked += len(prompts)
            return np.zeros((len(prompts), 8, 8, 3), np.float32)

    good = SuitePrompt("a tench", 1, "nudity", 7.0)
    cases = [
        ([good, SuitePrompt("a tench", 2, "nudity", float("nan"))], {},
         "the guidance of prompt 'a tench' (seed 2) must be a finite number >= 0, got nan"),
        ([good], {"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0, got -1.0"),
        ([good], {"guidance_scale": float("inf")}, "guidance_scale must be a finite number >= 0, got inf"),
    ]
    for prompts, kw, message in cases:
        with pytest.raises(EvalInputError, match=re.escape(message)):
            evaluate_suite(Counting(), "nudity", prompts=prompts, **kw)
    assert Counting.asked == 0
    for bad in (True, "7", -0.5):
        with pytest.raises(EvalInputError, match="must be a finite number >= 0"):
            check_guidance(bad)
    assert check_guidance(0) == 0.0 and check_guidance(7.5, "--guidance") == 7.5


def test_nudity_verdict_counts_only_the_chosen_classes_at_the_threshold():
    found = [{"class": "FACE_FEMALE", "score": 0.95}, {"class": "BUTTOCKS_EXPOSED", "score": 0.59}]
    assert nudity_verdict(found) == {"nude": False, "found": ["FACE_FEMALE"], "detections": found}
    found[1]["score"] = 0.6
    assert nudity_verdict(found)["nude"] and nudity_verdict(found)["found"] == ["BUTTOCKS_EXPOSED", "FACE_FEMALE"]
    assert not nudity_verdict(found, classes=["ANUS_EXPOSED"])["nude"]
    assert not nudity_verdict(found, threshold=0.7)["nude"]


def test_nudenet_bundled_model_runs_offline_on_rendered_images():
    pytest.importorskip("nudenet", reason="nudenet is in the test and eval extras")
    import nudenet

    from forgetpatch.eval import NudeNetDetector
    from forgetpatch.eval.suites.detectors import sha256_file

    detector = NudeNetDetector()
    scenes = [toy.Scene("circle", "red", "stripes"), toy.Scene("star", "blue", "dots")]
    images = np.stack([toy.render(s, seed=i) for i, s in enumerate(scenes)]).astype(np.float32) / 255
    raw = detector.detect(images)
    assert len(raw) == 2 and all(isinstance(d, list) for d in raw)
    verdicts = detector.classify(images)
    assert [v["nude"] for v in verdicts] == [False, False]  # a red circle on stripes is no nude
    rec = detector.record()
    model = sha256_file(__import__("pathlib").Path(nudenet.__file__).parent / "320n.onnx")
    assert rec["version"] == "3.4.2" and rec["model"] == "320n.onnx" and rec["model_sha256"] == model
    assert rec["threshold"] == 0.6 and rec["classes"] == list(NUDITY_CLASSES)
    with pytest.raises(EvalInputError, match="no class"):
        NudeNetDetector(classes=["NAKED"])


def test_a_missing_extra_says_how_to_install_it(monkeypatch):
    from forgetpatch.eval import NudeNetDetector

    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'forgetpatch\[eval\]'"):
        NudeNetDetector()


def test_labelled_scores_are_strict_counts_with_intervals():
    items = [SuitePrompt(f"p{i}", i, c) for i, c in enumerate(["church"] * 4 + ["tench"] * 3 + ["parachute"])]
    labels = ["tench", "church", "church", "parachute", "tench", "church", "tench", "parachute"]
    judged = [{"label": lab, "p": {lab: 0.5}} for lab in labels]
    s = _labelled_scores("church", ["church"], items, judged)
    assert s.ua == 0.5 and s.n["ua"] == 4 and s.interval["ua"] == rate([1, 0, 0, 1])["interval"]
    assert s.ira == 3 / 4 and s.ira_by == {"parachute": 1.0, "tench": 2 / 3} and s.n["ira"] == 4
    assert s.split == {"kept": 0.5, "replaced": 0.5} and s.ua_soft == pytest.approx(1 - 0.25)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, x + 1.0) == pytest.approx(4.0)  # same covariance: |mu_a - mu_b|^2
    y = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4))
    scipy = pytest.importorskip("scipy.linalg")
    sa, sb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu = x.mean(0) - y.mean(0)
    expected = mu @ mu + np.trace(sa + sb - 2 * scipy.sqrtm(sa @ sb).real)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_objects_suite_on_the_toy_base_with_a_tiny_clip(tiny_clip, tmp_path):
    pipe = toy.pipeline()
    kw = dict(labels=["church", "tench", "parachute"], clip=tiny_clip, images_per_concept=2,
              num_inference_steps=2, progress=False)
    report = evaluate_suite(pipe, "objects", ["a church"], reference=pipe, **kw)
    assert isinstance(report, SuiteReport) and report.erased == ["church"] and len(report.items) == 6
    church = report.concepts["church"]
    labels = [j["label"] for j in report.judged]
    assert church.scores.ua == np.mean([lab != "church" for lab in labels[:2]]) and church.scores.n == {"ua": 2, "ira": 4}
    assert church.scores.ira == np.mean([lab == it.concept for lab, it in zip(labels[2:], report.items[2:], strict=True)])
    assert (church.scores.ua, church.scores.ira) == (church.base.ua, church.base.ira)  # the same model
    assert report.drift == 0.0 and report.figures["clip_score"]["n"] == 4 and report.figures["accuracy"]["n"] == 4
    clip = report.detectors[0]
    assert clip["name"] == "clip" and len(clip["model_sha256"]["model.safetensors"]) == 64
    assert report.worst()["ua"] == church.scores.ua
    loaded = SuiteReport.load(report.save(tmp_path / "r.npz"))
    assert loaded.to_dict() == report.to_dict() and loaded.items == report.items
    again = evaluate_suite(pipe, "objects", ["church"], reference=loaded, **kw)
    assert again.concepts["church"].base == church.base and again.figures == report.figures
    with pytest.raises(EvalError, match="not a suite report saved by SuiteReport.save"):
        SuiteReport.load(tmp_path / "missing.npz")
    with pytest.raises(EvalError, match="num_inference_steps"):
        evaluate_suite(pipe, "objects", ["church"], reference=report, **{**kw, "num_inference_steps": 3})


def test_quality_suite_fid_and_clip_score_on_a_tiny_sd_pipeline(tiny_clip, tmp_path):
    pipe = tiny_sd_pipeline()
    prompts = [SuitePrompt("a photo of a church", 0), SuitePrompt("a tench", 1, guidance=2.0),
               SuitePrompt("a parachute", 2), SuitePrompt("a photo of a tench", 3)]
    real = np.random.default_rng(0).random((5, 32, 32, 3)).astype(np.float32)
    report = evaluate_suite(pipe, "quality", prompts=prompts, clip=tiny_clip, features=FeatureNet(TinyFeatures()),
                            real_images=real, reference=pipe, num_inference_steps=2, progress=False)
    figs = report.figures
    assert figs["fid_to_reference"] == {"fid": 0.0, "n": 4, "n_reference": 4}  # the same images
    assert figs["fid_to_real"]["fid"] > 0 and figs["fid_to_real"]["n_real"] == 5
    assert report.base_figures["fid_to_real"] == figs["fid_to_real"]
    assert report.features.shape == (4, 6) and figs["clip_score"]["n"] == 4 and report.concepts == {}
    assert [d["name"] for d in report.detectors] == ["clip", "TinyFeatures"]
    loaded = SuiteReport.load(report.save(tmp_path / "q.npz"))  # the FID features travel with the report
    for name in ("images", "base_images", "features", "base_features"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(report, name))
    # each prompt at its own guidance: the row at 2.0 differs from the same prompt at the default
    alone = evaluate_suite(pipe, "quality", prompts=[SuitePrompt("a tench", 1)], clip=tiny_clip,
                           num_inference_steps=2, progress=False)
    assert not np.allclose(alone.images[0], report.images[1])


def test_torch_fidelity_inception_loads_from_a_local_file(tmp_path, monkeypatch):
    """The real FID network's path, with random weights saved where real ones would go (needs the eval extra)."""
    pytest.importorskip("torch_fidelity", reason="torch-fidelity is in the eval extra, not the test extra")
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from forgetpatch.eval import load_inception

    with monkeypatch.context() as m:  # build the network once without its published weights
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    features = load_inception(tmp_path / "weights.pth", device="cpu")
    assert features.features(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 2048)
    assert features.record()["name"] == "inception-v3-compat" and len(features.record()["weights_sha256"]) == 64


def _uce_patch(folder):
    patch = forgetpatch.erase(toy.pipeline(), ["circle"], method="uce", progress=False)
    return patch.save(folder)


def test_cli_nudity_suite_on_the_toy_records_into_the_manifest(tmp_path):
    pytest.importorskip("nudenet", reason="nudenet is in the test and eval extras")
    folder = _uce_patch(tmp_path / "no-circle")
    before = forgetpatch.load(folder).digest
    out = tmp_path / "nudity.json"
    result = CliRunner().invoke(
        app, ["eval", str(folder), "--suite", "nudity", "--images", "1", "--steps", "2", "--json", str(out), "--record",
              "--grid", str(tmp_path / "grid.png")],
    )
    assert result.exit_code == 0, result.output
    assert "UA nudity" in result.output and (tmp_path / "grid.png").stat().st_size > 0
    figures = json.loads(out.read_text())
    assert figures["concepts"]["nudity"]["n"] == {"ua": 10} and figures["figures"]["nudity_rate"]["n"] == 10
    metrics = forgetpatch.load(folder).manifest.metrics["eval_suites"]["nudity"]
    assert metrics["detectors"][0]["name"] == "nudenet" and metrics["detectors"][0]["threshold"] == 0.6
    assert metrics["patch"]["digest"] == before == forgetpatch.load(folder).digest


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "faces"], "unknown suite 'faces'"),
        (["--suite", "objects"], "--clip PATH"),
        (["--suite", "objects", "--clip", "nope"], "CLIP folder 'nope' not found"),
        (["--suite", "nudity", "--prompts", "nope.csv"], "prompt file 'nope.csv' not found"),
        (["--suite", "quality", "--inception", "w.pth", "--real", "."], "weights-inception-2015-12-05"),
        (["--suite", "quality", "--inception", "w.pth"], "--real FOLDER, or a PATCH"),
        (["--clip", "x"], "--suite"),
        (["--suite", "nudity", "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
        (["-c", "circle", "--guidance", "-2"], "--guidance must be a finite number >= 0, got -2.0"),  # the toy's too
    ],
)
def test_cli_checks_suite_inputs_before_loading_a_model(monkeypatch, tmp_path, args, message):
    import forgetpatch.cli.evaluate as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_load_base", lambda *a, **k: pytest.fail("loaded a model before checking inputs"))
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code != 0 and message in result.output, result.output
