"""Adversarial fine-tuning (``adversarial=``, :mod:`forgetpatch.methods.adversarial`) on a random-weight tiny SD
pipeline: the inner prompt search runs on the student, what it finds is in the erase loss, its UNet passes are
counted and recorded, and off trains exactly as before (same factors, same digest)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import forgetpatch.methods as methods
from forgetpatch.errors import MethodError
from forgetpatch.methods import Adversarial, Concept
from forgetpatch.methods.adversarial import Adversary, placeholder_word, teacher_latents
from forgetpatch.methods.esd import ESDObjective
from forgetpatch.methods.finetune import Cond, FinetuneEngine, make_config, train_patch
from forgetpatch.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

FAST = dict(iterations=3, lr=1e-3, num_inference_steps=4, latent_size=8, rank=2, progress=False)
INNER = {"every": 1, "steps": 2, "tokens": 2, "images": 2, "batch": 2}
DM = {"steps": 6, "epochs": 2, "warmup": 1, "update_every": 3, "images": 2, "num_inference_steps": 3, "batch": 2,
      "lr": 3e-3, "progress": False}


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def test_settings_parse_and_refuse():
    assert not Adversarial.of(None).on and not Adversarial.of(0).on
    assert Adversarial.of(5) == Adversarial(every=5)
    assert Adversarial.of({"every": 3, "steps": 7}).steps == 7
    with pytest.raises(MethodError, match="unknown adversarial settings"):
        Adversarial.of({"evry": 3})
    with pytest.raises(MethodError, match="out of range"):
        Adversarial(every=2, tokens=0)
    with pytest.raises(MethodError, match="SD-style"):
        methods.erase(tiny_sdxl_pipeline(0), "circle", method="esd", adversarial=1, **FAST)


def test_esd_inner_loop_runs_counts_passes_and_is_recorded(pipe):
    plain = methods.erase(pipe, "circle", method="esd", **FAST)
    adv = methods.erase(pipe, "circle", method="esd", adversarial=INNER, **FAST)
    record = adv.manifest.metrics["adversarial"]
    assert adv.manifest.method.params["adversarial"] == Adversarial(**INNER).to_dict()
    assert record["searches"] == 2  # calls 1 and 2 of 3 (the first search comes after `every` calls)
    assert len(record["embedding_norms"]) == 2 and all(n > 0 for n in record["embedding_norms"])
    inner = record["unet_passes"]
    # per search: 2 x (teacher + student + backward); once: 4 DDIM teacher passes for the data
    assert inner == {"teacher_forward": 4 + 2 * 2, "student_forward": 2 * 2, "backward": 2 * 2, "total": 16}
    before, after = plain.manifest.metrics["training"]["unet_passes"], adv.manifest.metrics["training"]["unet_passes"]
    assert after["total"] - before["total"] == inner["total"]  # the engine's count includes the inner attack
    assert plain.digest != adv.digest


def test_the_found_conditioning_is_in_the_erase_loss(pipe):
    config = make_config(scope="noxattn", seed=0, **FAST)
    concept = Concept("circle")
    with FinetuneEngine(pipe, config) as engine:
        adversary = Adversary(Adversarial(**{**INNER, "every": 100}), placeholder_word(pipe))  # searches only here
        found = adversary.search(engine, 0, "circle")
        assert adversary.conds(engine, 0, "circle")[0] is found
        seen: list[Cond] = []
        student = engine.student

        def spy(x, t, cond):
            seen.append(cond)
            return student(x, t, cond)

        engine.student = spy
        objective = ESDObjective([concept], adversary=adversary, preserve=[Concept("square")])
        loss = objective(engine, 0)
        assert len(seen) == 1 and seen[0].hidden.shape[0] == 3  # c, the found conditioning, the preserved concept
        assert torch.equal(seen[0].hidden[1], found.hidden[0])
        assert not torch.equal(found.hidden, engine.encode("circle").hidden)
        # without the found conditioning and the retention term, the loss is the plain ESD loss on the same x_t
        (grad,) = torch.autograd.grad(loss, [next(iter(engine.trainable().values()))], allow_unused=True)
        assert grad is not None
        engine.student = student
        plain = ESDObjective([concept])(engine, 0)
        assert not torch.isclose(loss, plain)


def test_the_word_search_relearns_the_concept_word_in_its_place(pipe):
    """``search="word"``: the inner attack is textual inversion, the concept word's own embedding learned on the
    student from the word's row; what it finds is the plain prompt encoded with that vector in the word's place."""
    from forgetpatch.methods.adversarial import at_token, single_token, token_vectors
    from forgetpatch.methods.finetune import encode_prompt

    with pytest.raises(MethodError, match="search must be one of"):
        Adversarial(every=1, search="words")
    word = single_token(pipe, "circle")
    row = pipe.text_encoder.get_input_embeddings().weight[word].detach().clone()
    config = make_config(scope="noxattn", seed=0, **FAST)
    with FinetuneEngine(pipe, config) as engine:
        with torch.no_grad():  # a student that has moved from its teacher (the word is then no longer its optimum)
            for i, weight in enumerate(engine.trainable().values()):
                weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(i)))
        adversary = Adversary(Adversarial(**{**INNER, "every": 100, "search": "word"}), placeholder_word(pipe))
        found = adversary.search(engine, 0, "circle")
        vector = adversary.vectors["circle"]
        assert vector.shape == (1, row.shape[0]) and not torch.equal(vector[0], row)
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[word], row)  # the table is untouched
        with torch.no_grad(), token_vectors(pipe, at_token(word, vector)):
            again = encode_prompt(pipe, "circle", engine.latent_size)
        assert torch.equal(found.hidden, again.hidden.to(found.hidden.dtype))
        assert not torch.equal(found.hidden, engine.encode("circle").hidden)
        assert adversary.record["searches"] == 1 and adversary.record["embedding_norms"][0] > 0
    # a word the tokenizer splits has no one embedding to relearn: refused before any training
    with pytest.raises(MethodError, match="splits"):
        methods.erase(pipe, "and", method="esd", adversarial={**INNER, "search": "word"}, **FAST)


def test_teacher_latents_follow_the_teacher(pipe):
    config = make_config(scope="xattn", seed=0, **FAST)
    with FinetuneEngine(pipe, config) as engine:
        a = teacher_latents(engine, "circle", 2, torch.Generator().manual_seed(1))
        b = teacher_latents(engine, "circle", 2, torch.Generator().manual_seed(1))
        assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)
        assert engine.passes.teacher_forward == 2 * len(engine.timesteps)


@pytest.mark.parametrize("off", [None, 0, {"every": 0, "steps": 3}])
def test_off_trains_exactly_as_the_paper_loss(pipe, off):
    """Off is the plain objective: the ESD patch equals one trained with the paper's loss written out here."""

    def paper(engine: FinetuneEngine, iteration: int) -> torch.Tensor:
        generator = engine.generator(iteration)
        step = int(torch.randint(0, len(engine.timesteps), (1,), generator=generator))
        c, empty = engine.encode("circle"), engine.encode("")
        x, t = engine.sample_xt("circle", c, empty, step, generator=generator, reuse=False)
        e_anchor, e_concept = engine.teacher(torch.cat([x, x]), t, Cond.cat(empty, c)).chunk(2)
        return F.mse_loss(engine.student(x, t, c).float(), (e_anchor - (e_concept - e_anchor)).float())

    kwargs = {} if off is None else {"adversarial": off}
    patch = methods.erase(pipe, "circle", method="esd", variant="u", **kwargs, **FAST)
    config = make_config(scope="noxattn", **FAST)
    reference = train_patch(pipe, config, paper, method="esd", concepts=[Concept("circle")], preserve=[],
                            params={"variant": "u", "eta": 1.0})
    assert patch.digest == reference.digest
    assert "adversarial" not in patch.manifest.metrics and "adversarial" not in patch.manifest.method.params


def test_kscu_and_dynamic_mask_take_the_option(pipe):
    off = methods.erase(pipe, "circle", method="kscu", task="object", iterations=3, num_inference_steps=4,
                        preserve=["square"], **{k: v for k, v in FAST.items() if k not in ("iterations",
                                                                                           "num_inference_steps")})
    on = methods.erase(pipe, "circle", method="kscu", task="object", iterations=3, num_inference_steps=4,
                       preserve=["square"], adversarial=INNER,
                       **{k: v for k, v in FAST.items() if k not in ("iterations", "num_inference_steps")})
    assert on.manifest.metrics["adversarial"]["searches"] == 2 and on.digest != off.digest
    again = methods.erase(pipe, "circle", method="kscu", task="object", iterations=3, num_inference_steps=4,
                          preserve=["square"], adversarial=0,
                          **{k: v for k, v in FAST.items() if k not in ("iterations", "num_inference_steps")})
    assert again.digest == off.digest
    circle = Concept("circle", superclass="shape")
    dm_off = methods.erase(pipe, circle, method="dynamic_mask", **DM)
    dm_on = methods.erase(pipe, circle, method="dynamic_mask", adversarial={**INNER, "every": 2}, **DM)
    record = dm_on.manifest.metrics["dynamic_mask"]["adversarial"]
    assert record["searches"] == 2 and record["unet_passes"]["total"] > 0  # calls 2 and 4 of 6
    assert dm_on.manifest.method.params["adversarial"]["every"] == 2 and dm_on.digest != dm_off.digest
    assert methods.erase(pipe, circle, method="dynamic_mask", adversarial=None, **DM).digest == dm_off.digest


# --- the toy world -------------------------------------------------------------------------------
#: Issue 12's bar: strict UA after each of these attacks >= 80% (lower end of the 95% interval), and IRA and CRA
#: >= 90% of the base's (safe end), with UA >= 90% before any attack.
ROBUST_ATTACKS = ("inversion", "prompt_search", "textual_inversion")
ROBUST_BARS = {"ua": 0.90, "ira": 0.90, "cra": 0.90}
ATTACK_BAR = 0.80


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FORGETPATCH_ROBUST_BARS", "") in ("", "0"),
    reason="an adversarial erase plus three attacks takes tens of minutes on 2 cores: run with "
    "FORGETPATCH_ROBUST_BARS=1, or `python benchmarks/attack.py --only esd-adversarial kscu-all-adversarial --retention`",
)
@pytest.mark.parametrize("name", ["toy-no-circle-robust-esd", "toy-no-circle-robust-kscu-all"])
def test_toy_robust_recipe_keeps_the_circle_gone_under_attack(competent_toy, name):
    """Issue 12 bar on a robust recipe (ESD, or KSCU on every layer, with adversarial fine-tuning): measured in two
    stages like :func:`toy_bars.measure_recipe` (UA and retention, then the three attacks at the default budget
    on 32 prompts); xfails with every figure when a bar is unmet, the share the judge names as a circle after each
    attack and the share whose geometric fit is a circle beside strict UA. Erasing takes about as long as the plain recipe plus the inner searches (minutes on
    2 cores), hence ``slow``."""
    import warnings

    from toy_bars import FIRST_RETAIN_IMAGES, FIRST_UA_IMAGES, RECIPES, RETAIN_IMAGES, UA_IMAGES, base_report

    import forgetpatch
    from forgetpatch import toy
    from forgetpatch.attacks import attack
    from forgetpatch.eval import evaluate
    from forgetpatch.recipes import load_recipe

    recipe = load_recipe(RECIPES / f"{name}.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = forgetpatch.erase(toy.pipeline(), recipe.erase_concepts(), progress=False, **recipe.erase_kwargs())
    pipe = forgetpatch.apply(toy.pipeline(), patch)
    for ua_images, retain_images in ((FIRST_UA_IMAGES, FIRST_RETAIN_IMAGES), (UA_IMAGES, RETAIN_IMAGES)):
        report = evaluate(pipe, ["circle"], reference=base_report(ua_images, retain_images, ("circle",)),
                          images_per_concept=retain_images,
                          images_per_erased=ua_images, progress=False)
        if report.concepts["circle"].scores.interval["ua"][1] < ROBUST_BARS["ua"]:
            break  # stage 1 already says UA is below the bar
    safe = report.worst(safe=True)
    below = {k: v for k, bar in ROBUST_BARS.items() if (v := safe[k]) is None or v < bar}
    figures = {"safe": {k: None if v is None else round(v, 3) for k, v in safe.items()}, "ua_images": ua_images}
    if not below:
        attacked = attack(pipe, "circle", attacks=list(ROBUST_ATTACKS), progress=False)
        after = {attack_name: (round(r.after.value, 3), [round(x, 3) for x in r.after.interval], r.after.n)
                 for attack_name, r in attacked.results.items()}
        figures["after_attack"] = after
        figures["named_as_circle_after"] = {a: str(r.named) for a, r in attacked.results.items()}
        figures["fitted_as_circle_after"] = {a: str(r.fitted) for a, r in attacked.results.items()}
        below.update({a: v[1][0] for a, v in after.items() if a != "prompt_search_hard" and v[1][0] < ATTACK_BAR})
    print(figures)
    if below:
        pytest.xfail(f"below issue 12's bars (UA/IRA/CRA {ROBUST_BARS}, after attack {ATTACK_BAR}): {below}; {figures}")
