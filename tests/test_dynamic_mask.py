"""Dynamic Mask + Concept-Aware Loss on a random-weight tiny SD pipeline: the mask holds, the best epoch is kept,
the distillation term acts (the authors' release computes it and then overwrites it), chains carry lineage."""

from __future__ import annotations

import pytest
import torch
from toy_bars import check_bars, measure_recipe

import forgetpatch
from forgetpatch.errors import MethodError
from forgetpatch.methods import Concept
from forgetpatch.methods.dynamic_mask import DynamicMask, DynamicMaskParams, GradientMask
from forgetpatch.methods.finetune import encode_prompt
from forgetpatch.testing import tiny_sd_pipeline

SHORT = {"steps": 12, "epochs": 3, "warmup": 3, "update_every": 4, "images": 4, "num_inference_steps": 4,
         "batch": 2, "lr": 3e-3, "progress": False}
CIRCLE = Concept("circle", superclass="shape")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def test_only_masked_elements_change_and_the_mask_keeps_its_share(pipe):
    deltas = DynamicMask.compute_deltas(pipe, [CIRCLE], **{**SHORT, "turnover": 0.0, "keep": 0.25})
    assert deltas and all(".attn2." in path for path in deltas)
    for path, delta in deltas.items():
        changed = float((delta != 0).float().mean())
        assert 0 < changed <= 0.25 + 1e-6, f"{path}: {changed:.0%} of elements changed, mask keeps 25%"


def test_gradient_mask_turnover_swaps_weakest_active_for_strongest_inactive():
    weight = torch.nn.Parameter(torch.zeros(2, 4))
    mask = GradientMask({"w": weight})
    mask.score["w"] = torch.tensor([[8.0, 7.0, 6.0, 5.0], [4.0, 3.0, 2.0, 1.0]])
    mask.init_top(0.5)
    assert mask.masks["w"].flatten().tolist() == [True] * 4 + [False] * 4
    mask.score["w"] = torch.tensor([[8.0, 0.1, 6.0, 5.0], [4.0, 3.0, 9.0, 1.0]])
    assert mask.turn_over(0.25) == 1
    assert mask.masks["w"].flatten().tolist() == [True, False, True, True, False, False, True, False]
    weight.grad = torch.tensor([[-1.0, 2.0, -3.0, 4.0], [5.0, -6.0, 7.0, -8.0]])
    mask.absorb()  # the whole gradient is scored, then only the mask's elements keep theirs
    assert mask.score["w"].flatten().tolist() == pytest.approx([9.0, 2.1, 9.0, 9.0, 9.0, 9.0, 16.0, 9.0])
    assert weight.grad.flatten().tolist() == [-1.0, 0.0, -3.0, 4.0, 0.0, 0.0, 7.0, 0.0]


def test_the_best_epoch_is_kept_and_recorded(pipe):
    patch = forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", **SHORT)
    record = patch.manifest.metrics["dynamic_mask"]["circle"]
    losses = record["forget_loss_by_epoch"]
    assert len(losses) == 3 and record["best_epoch"] == losses.index(min(losses))
    assert record["distilled_on"] == ["shape"]
    assert patch.manifest.lora.reconstruction_error is not None and patch.manifest.lora.rank >= 1
    assert patch.manifest.method.params["steps"] == 12 and patch.name == "dynamic_mask-no-circle"
    # the training images count: one sampling call per step for the concept's images and one for the superclass's
    assert patch.manifest.metrics["dynamic_mask"]["unet_passes"]["sample_forward"] == 2 * SHORT["num_inference_steps"]


def _prediction(pipe, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 4, 16, 16, generator=generator)
    cond = encode_prompt(pipe, prompt, 16)
    with torch.no_grad():
        return torch.cat([pipe.unet(x, t, encoder_hidden_states=cond.hidden.expand(4, -1, -1)).sample
                          for t in (200, 500, 800)])


def test_distillation_acts_and_keeps_the_earlier_concept_where_it_was(pipe):
    """A chain: patch 1 forgets the circle; patch 2 (the star) is trained on top of it with and without the
    distillation term. With it, the model's predictions for the circle prompt move less from where patch 1 left
    them; with distill_weight 0 they move more. The circle is also in the preservation term, unless hold=False."""
    first = forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", **SHORT)
    chained = forgetpatch.apply(tiny_sd_pipeline(seed=0), first, fuse=True)
    after_first = _prediction(chained, "a photo of circle")
    moved = {}
    for weight in (0.0, 10.0):
        second = forgetpatch.erase(chained, [Concept("star", superclass="shape")], method="dynamic_mask",
                                   **{**SHORT, "distill_weight": weight, "lr": 1e-2})
        assert second.manifest.lineage == [first.digest]
        record = second.manifest.metrics["dynamic_mask"]["star"]
        assert record["distilled_on"] == ["circle", "shape"]  # the patch already on the pipeline, the superclass
        assert record["preserved_on"] == ["circle"]  # erase holds it (hold=True): preserved on the star's images too
        both = forgetpatch.apply(chained, second)
        moved[weight] = float((_prediction(both, "a photo of circle") - after_first).norm())
        forgetpatch.remove(chained, second.name)
    assert moved[10.0] < 0.7 * moved[0.0], moved
    unheld = forgetpatch.erase(chained, [Concept("star", superclass="shape")], method="dynamic_mask", hold=False, **SHORT)
    assert unheld.manifest.metrics["dynamic_mask"]["star"]["preserved_on"] == []


def test_preservation_holds_a_preserved_concept_and_is_off_without_preserve(pipe):
    """The optional preservation term (not in the paper): with ``preserve`` the preserved prompt's predictions move
    less from the base's than with ``preserve_weight`` 0; the superclass, which has its own terms, is not preserved."""
    before = _prediction(pipe, "a photo of ellipse")
    moved = {}
    for weight in (0.0, 50.0):
        patch = forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", preserve=["ellipse", "shape"],
                                  **{**SHORT, "preserve_weight": weight, "lr": 1e-2})
        record = patch.manifest.metrics["dynamic_mask"]["circle"]
        assert record["preserved_on"] == ([] if weight == 0 else ["ellipse"])  # "shape" is the superclass
        patched = forgetpatch.apply(pipe, patch)
        moved[weight] = float((_prediction(patched, "a photo of ellipse") - before).norm())
        forgetpatch.remove(pipe, patch.name)
    assert moved[50.0] < 0.7 * moved[0.0], moved
    plain = forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", **SHORT).manifest.metrics["dynamic_mask"]
    assert plain["circle"]["preserved_on"] == [] and plain["circle"]["preserve_loss_last"] is None


def test_bad_settings_are_refused_before_training(pipe, monkeypatch):
    def no_denoising(*args, **kwargs):
        raise AssertionError("the UNet ran before the settings were checked")

    monkeypatch.setattr(pipe.unet, "forward", no_denoising)
    with pytest.raises(MethodError, match="superclass"):
        forgetpatch.erase(pipe, ["circle"], method="dynamic_mask", **SHORT)
    with pytest.raises(MethodError, match=r"unknown dynamic_mask parameter\(s\) \[.iterations.\]"):
        forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", iterations=5)
    with pytest.raises(MethodError, match=r"needs 0 < keep <= 1"):
        forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", **{**SHORT, "keep": 0.0})
    with pytest.raises(MethodError, match=r"exactly one \{concept\} slot"):
        forgetpatch.erase(pipe, [CIRCLE], method="dynamic_mask", **{**SHORT, "templates": ["a photo of circle"]})
    assert DynamicMaskParams.from_dict({}).templates == ("a photo of {concept}",)  # the paper's prompt


#: Issue 17 (every method's defaults meet the toy bars) with issue 13's bars for one step: UA, IRA and CRA of base.
DM_TOY_BARS = {"ua": 0.90, "ira": 0.85, "cra": 0.90}


@pytest.mark.slow(seconds=330)
def test_toy_dynamic_mask_defaults_erase_one_shape_within_the_bars():
    """``recipes/toy-no-circle-dynamic-mask.yaml`` is Dynamic Mask with its defaults on the toy world (superclass
    "square"): it meets the bars (stop 42: UA 186 of 192, lower bound 0.93; IRA of the base's, lower bound 0.867
    against 0.85; CRA 0.975 against 0.90), so below them it fails."""
    check_bars(measure_recipe("toy-no-circle-dynamic-mask"), DM_TOY_BARS,
               "Dynamic Mask, recipes/toy-no-circle-dynamic-mask.yaml", strict=True)


def test_each_concept_starts_adam_afresh_and_an_uneven_last_epoch_is_not_an_epoch_of_its_own(pipe, monkeypatch):
    """A second reading against the spec found: Adam's step count and moments carried from one concept into the next
    in one call (a chain starts each step afresh; the authors' release clears them), and 13 steps in 3 epochs made a
    fourth "epoch" of one step that could be kept as the best."""
    steps_seen: list[int] = []
    adam_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        out = adam_step(self, *args, **kwargs)
        steps_seen.append(max(int(s["step"]) for s in self.state.values()))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    settings = {**SHORT, "steps": 13, "epochs": 3}
    patch = forgetpatch.erase(pipe, [CIRCLE, Concept("star", superclass="shape")], method="dynamic_mask", **settings)
    assert steps_seen == [*range(1, 14)] * 2
    for concept in ("circle", "star"):
        record = patch.manifest.metrics["dynamic_mask"][concept]
        assert len(record["forget_loss_by_epoch"]) == 3 and record["best_epoch"] < 3


def test_the_superclass_term_and_the_attacks_target_what_the_unet_predicts(pipe):
    """The denoising target of Dynamic Mask's warm-up and superclass terms, and of the textual-inversion and
    relearning attacks, was the noise whatever the scheduler's prediction_type (SD 2.1 768 predicts v)."""
    from forgetpatch.attacks.text import ConceptData, denoising_batch
    from forgetpatch.methods.dynamic_mask import _noised
    from forgetpatch.methods.finetune import FinetuneEngine, make_config

    latents = torch.randn(2, 4, 8, 8)
    for predicts in ("epsilon", "v_prediction", "sample"):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=predicts)
        engine = FinetuneEngine(pipe, make_config(scope="xattn", iterations=1, mode="full", progress=False))
        x_t, target = _noised(engine, latents, 500, torch.Generator().manual_seed(0))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        steps = torch.full((2,), 500)
        wanted = {"epsilon": noise, "sample": latents,
                  "v_prediction": engine.scheduler.get_velocity(latents, noise, steps)}[predicts]  # fmt: skip
        torch.testing.assert_close(target, wanted.to(target.dtype))
        _, t, target, _ = denoising_batch(pipe, ConceptData(latents, ["a", "b"]), 2, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        index = torch.randint(2, (2,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        wanted = {"epsilon": noise, "sample": latents[index],
                  "v_prediction": pipe.scheduler.get_velocity(latents[index], noise, t)}[predicts]  # fmt: skip
        torch.testing.assert_close(target, wanted.to(target.dtype))
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="epsilon")


def test_a_velocity_target_needs_no_scheduler_that_computes_one():
    """PNDM, DPM-Solver and UniPC have no get_velocity: the attacks' target on a v-prediction pipeline using one
    raised AttributeError mid-attack."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    from forgetpatch.methods import denoising_target

    x, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 500])
    wanted = DDPMScheduler(prediction_type="v_prediction").get_velocity(x, noise, t)
    for scheduler in (PNDMScheduler, DPMSolverMultistepScheduler):
        torch.testing.assert_close(denoising_target(scheduler(prediction_type="v_prediction"), x, noise, t), wanted)
