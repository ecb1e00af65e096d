"""KSCU: key-step table (creeping start, cap, timesteps), presets, augmentation window, patches."""

from __future__ import annotations

import random

import pytest
import torch
from toy_bars import all_bars_only

import forgetpatch.methods as methods
from forgetpatch.errors import MethodError
from forgetpatch.eval.keysteps import KeyStepCurve
from forgetpatch.methods import Concept
from forgetpatch.methods.finetune import Cond, ddim_timesteps
from forgetpatch.methods.kscu import (
    KeyStepTable,
    KSCUObjective,
    key_step_range,
    leakage_weight,
    paraphrase,
    resolve_preset,
)
from forgetpatch.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

FAST = dict(lr=1e-3, latent_size=8, rank=2, progress=False)


def test_table_walks_steps_in_order_and_cycles_concepts():
    entries = KeyStepTable(num_steps=10, start=6, n_concepts=2).entries(10)
    assert [(e.concept, e.step) for e in entries] == [
        (0, 6),
        (0, 7),
        (0, 8),
        (0, 9),
        (1, 6),
        (1, 7),
        (1, 8),
        (1, 9),
        (0, 6),
        (0, 7),
    ]


def test_table_start_creeps_every_8_passes_and_is_capped():
    table = KeyStepTable(num_steps=50, start=14)
    per_pass = 50 - 14
    entries = table.entries(8 * per_pass + 1)
    assert {e.start for e in entries[: 8 * per_pass]} == {14}
    assert entries[8 * per_pass] == (0, 15, 15)
    assert table.max_start == 44  # S < 0.9 * 50
    late = KeyStepTable(num_steps=50, start=43, creep_every=1).entries(200)
    assert max(e.start for e in late) == 44 and all(e.step >= e.start for e in late)
    assert all(e.start < 0.9 * 50 for e in late)
    with pytest.raises(MethodError, match="start"):
        KeyStepTable(num_steps=50, start=45)


def test_timesteps_and_manifest_range():
    pipe = tiny_sd_pipeline(0)
    timesteps = ddim_timesteps(pipe, 50)
    assert timesteps[0] == 981 and timesteps[14] == 981 - 20 * 14 == 701
    table = KeyStepTable(num_steps=50, start=14)
    r = key_step_range(table, 36, timesteps, "DDIMScheduler")
    assert r.timesteps == [981 - 20 * k for k in range(14, 50)] and r.timesteps[-1] == 1
    assert r.start == pytest.approx(1 - 701 / 1000) and r.end == 1.0 and r.num_inference_steps == 50
    assert leakage_weight(701) == pytest.approx(299 * 2e-5) and leakage_weight(1000) == 0
    # 10 iterations train steps 14-23 only (t 701..521): the loader must not gate the patch on past them (it recorded
    # end 1.0, and the patch acted on the 26 steps it never trained)
    short = key_step_range(table, 10, timesteps, "DDIMScheduler")
    # a flow scheduler's timesteps are fractional: the range came from the rounded ones, and the gate, reading the
    # call's own timestep, switched the first and last trained steps off
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(28)
    fractional = [float(t) for t in flow.timesteps]
    r = key_step_range(KeyStepTable(num_steps=28, start=8), 3, fractional, "FlowMatchEulerDiscreteScheduler", 1000)
    gated = [i for i, t in enumerate(fractional) if r.start <= 1 - t / 1000 <= r.end]
    assert gated == [8, 9, 10], (r, fractional[7:12])
    assert short.timesteps == [981 - 20 * k for k in range(14, 24)]
    assert short.start == pytest.approx(1 - 701 / 1000) and short.end == pytest.approx(1 - 521 / 1000)


def test_presets():
    assert resolve_preset([Concept("nude", kind="nudity")]) == ("nudity", 750, 14, "noxattn")
    assert resolve_preset([Concept("circle")]) == ("object", 750, 14, "noxattn")
    assert resolve_preset([Concept("vangogh", kind="style")]) == ("style", 500, 24, "xattn")
    assert resolve_preset([Concept("x", kind="identity")]) == ("identity", 200, 40, "xattn")
    two = [Concept("x", kind="identity"), Concept("y", kind="identity")]
    assert resolve_preset(two)[1] == 750
    assert resolve_preset([Concept("circle")], num_inference_steps=20)[2] == round(14 * 20 / 50)
    assert resolve_preset([Concept("circle")], iterations=9, start_step=3, scope="xattn") == (
        "object",
        9,
        3,
        "xattn",
    )
    with pytest.raises(MethodError, match="several kinds"):
        resolve_preset([Concept("circle"), Concept("vangogh", kind="style")])
    with pytest.raises(MethodError, match="unknown KSCU task"):
        resolve_preset([Concept("circle")], task="weather")


def test_unknown_parameters_are_named_with_both_lists():
    """One params dataclass (KSCUParams) beside the engine's FinetuneConfig; a key that is neither is named."""
    from forgetpatch.methods.finetune import split_params
    from forgetpatch.methods.kscu import KSCUParams

    settings, engine = split_params(KSCUParams, {"g": 2.0, "rank": 4, "iterations": 7}, "KSCU")
    assert (settings.g, settings.iterations, engine) == (2.0, 7, {"rank": 4})
    with pytest.raises(MethodError, match=r"unknown KSCU parameter\(s\) \['gg'\].*KSCU's own.*'lam2'.*engine's.*'rank'"):
        split_params(KSCUParams, {"gg": 1}, "KSCU")


def test_augmentation_only_in_the_last_5_percent(monkeypatch):
    objective = KSCUObjective([Concept("circle")], KeyStepTable(num_steps=10, start=3), iterations=100)
    assert [i for i in range(100) if objective.augmented(i)] == list(range(95, 100))
    assert all(objective.prompt_for(i) == "circle" for i in range(95))
    late = [objective.prompt_for(i) for i in range(95, 100)]
    assert all("circle" in p.split() for p in late) and any(p != "circle" for p in late)
    rng = random.Random(0)
    assert all("circle" in paraphrase("circle", rng).split() for _ in range(50))
    # In training, the noisy paraphrase is used exactly in the window.
    calls: list[float] = []
    original = Cond.with_noise

    def spy(self, scale, generator):
        calls.append(scale)
        return original(self, scale, generator)

    monkeypatch.setattr(Cond, "with_noise", spy)
    pipe = tiny_sd_pipeline(0)
    patch = methods.erase(pipe, "circle", method="kscu", iterations=20, num_inference_steps=6, **FAST)
    assert calls == [1e-5]  # ceil(5% of 20) = 1 iteration
    assert patch.manifest.metrics["training"]["unet_passes"]["backward"] == 20


def test_kscu_patch_on_tiny_sd_records_key_steps(tmp_path):
    pipe = tiny_sd_pipeline(0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    analysis = KeyStepCurve(
        concept="circle",
        guide="",
        num_inference_steps=10,
        guidance_scale=3.0,
        timesteps=ddim_timesteps(pipe, 10),
        switch_steps=[0, 3, 6, 10],
        presence=[0.0, 0.5, 1.0, 1.0],
        num_images=4,
        seed=0,
    ).to_dict()
    patch = methods.erase(
        pipe,
        [Concept("circle", guide="square"), "star"],
        method="kscu",
        iterations=4,
        num_inference_steps=10,
        key_step_analysis=analysis,
        **FAST,
    )
    m = patch.manifest
    assert m.method.name == "kscu" and m.method.params["task"] == "object"
    assert not any(".attn2." in t for t in m.lora.target_modules)  # object preset: noxattn
    (r,) = m.key_steps
    start = round(14 * 10 / 50)
    trained = ddim_timesteps(pipe, 10)[start : start + 4]  # 4 iterations: concept 0, steps 3..6
    assert r.timesteps == trained and r.start == pytest.approx(1 - trained[0] / 1000)
    assert r.end == pytest.approx(1 - trained[-1] / 1000)  # trained to step 6 of 10 only: gated there (was 1.0)
    assert m.metrics["key_steps"]["start_step"] == start and m.metrics["key_step_analysis"] == analysis
    assert m.metrics["key_step_check"]["presence_switching_at_preset_start"] == 0.5  # k = 3
    passes = m.metrics["training"]["unet_passes"]
    # the trajectory is sampled to step 3 once, then continued one step per iteration
    assert passes["sample_forward"] == start + 3
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_preserve_term_keeps_the_preserved_concept_closer_to_the_base():
    """Optional (not in the paper): with ``preserve``, the student is also held to the teacher on it."""
    import forgetpatch
    from forgetpatch.methods.finetune import encode_prompt

    pipe = tiny_sd_pipeline(0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kept = encode_prompt(pipe, "square", latent_size=8)

    def eps() -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(x, 700, encoder_hidden_states=kept.hidden).sample

    base = eps()
    moved = {}
    for preserve in ([], ["square"]):
        patch = methods.erase(
            pipe,
            ["circle"],
            method="kscu",
            preserve=preserve,
            iterations=12,
            num_inference_steps=10,
            scope="xattn",
            **{**FAST, "lr": 3e-3},
        )
        assert patch.manifest.method.params["preserve_weight"] == (1.0 if preserve else 0.0)
        forgetpatch.apply(pipe, patch)
        moved[bool(preserve)] = float((eps() - base).norm())
        forgetpatch.remove(pipe)
    assert moved[True] < 0.75 * moved[False], moved


def test_kscu_style_on_tiny_sdxl_and_gated_apply():
    from forgetpatch.loader import apply, remove

    pipe = tiny_sdxl_pipeline(0)
    patch = methods.erase(
        pipe, Concept("vangogh", kind="style"), method="kscu", iterations=2, num_inference_steps=10, **FAST
    )
    assert all(".attn2." in t for t in patch.manifest.lora.target_modules)
    assert patch.manifest.key_steps[0].timesteps[0] == ddim_timesteps(pipe, 10)[round(24 * 10 / 50)]
    apply(pipe, patch, key_steps=True)
    remove(pipe)


def test_full_weight_mode_records_reconstruction_error():
    pipe = tiny_sd_pipeline(0)
    patch = methods.erase(
        pipe, "circle", method="kscu", iterations=2, num_inference_steps=6, mode="full", scope="xattn", **FAST
    )
    assert patch.manifest.lora.reconstruction_error is not None
    assert patch.manifest.lora.reconstruction_error > 0


# --- the toy world -------------------------------------------------------------------------------
#: UA strict and absolute; IRA, CRA as ratios of the base; all on the safe end of the 95% interval.
KSCU_TOY_BARS = {"ua": 0.90, "ira": 0.85, "cra": 0.90}


@pytest.mark.slow(seconds=120)
def test_toy_kscu_defaults_forget_one_shape_and_keep_the_rest():
    """KSCU's toy defaults (its recipe) on the bar test's first stage: 32 images of the circle and 4 per kept concept,
    point figures at least UA 0.8, IRA 0.8 and CRA 0.9 of the base's (it measures about 0.94 / 0.95 / 1.0). Whether
    they meet the bars takes the second stage's 440 more images of the patch, minutes on 2 cores: the test below,
    with FORGETPATCH_ALL_BARS=1 (as ESD's)."""
    from toy_bars import check_bars, measure_recipe

    check_bars(measure_recipe("toy-no-circle-kscu", stages=1), {}, "KSCU, recipes/toy-no-circle-kscu.yaml, stage 1",
               floor={"ua": 0.8, "ira": 0.8, "cra": 0.9})  # fmt: skip


@all_bars_only
@pytest.mark.slow(seconds=170)
def test_toy_kscu_erases_one_shape_within_the_bars():
    """Issue bar: KSCU erasing one shape, UA >= 90%, IRA >= 85% and CRA >= 90% of base. Met at stop 42 on the edge:
    181 of 192 forgotten, lower bound 0.9003, so one image less misses it; below the bars it xfails with the
    figures (under the floor it fails). Minutes of images: FORGETPATCH_ALL_BARS=1 (the test above checks the
    defaults forget on a sixth of them).

    (The 15-minute budget is a speed target: ``benchmarks/finetune.py toy`` measures and prints it.)"""
    from toy_bars import check_bars, measure_recipe

    check_bars(measure_recipe("toy-no-circle-kscu"), KSCU_TOY_BARS, "KSCU, recipes/toy-no-circle-kscu.yaml")
