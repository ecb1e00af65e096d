"""The fine-tuning engine: scopes, teacher == base, loss decreases, resume, pass counts, cleanup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forgetpatch.errors import MethodError
from forgetpatch.methods import Concept
from forgetpatch.methods.finetune import FinetuneConfig, FinetuneEngine, scope_modules
from forgetpatch.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def _cfg(**kw) -> FinetuneConfig:
    base = dict(iterations=6, lr=1e-2, num_inference_steps=4, latent_size=8, progress=False, rank=2)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(0)


def _fixed_objective(engine: FinetuneEngine, it: int) -> torch.Tensor:
    """Pull eps*(x, c) towards a fixed offset of the base prediction on one fixed x_t."""
    c = engine.encode("circle")
    x = engine.noise(torch.Generator().manual_seed(0))
    t = engine.timesteps[1]
    target = engine.teacher(x, t, c) + 0.05
    return F.mse_loss(engine.student(x, t, c), target)


def test_scopes_pick_the_right_modules(pipe):
    xattn = scope_modules(pipe.unet, "xattn")
    n_attn2 = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    assert len(xattn) == 4 * n_attn2
    assert all(
        n.split(".")[-2:] in (["attn2", "to_q"], ["attn2", "to_k"], ["attn2", "to_v"])
        or n.endswith("attn2.to_out.0")
        for n in xattn
    )
    noxattn = scope_modules(pipe.unet, "noxattn")
    assert not any("attn2" in n for n in noxattn)
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(noxattn)
    assert any(n.endswith("attn1.to_q") for n in noxattn) and any(
        n.endswith("resnets.0.conv1") for n in noxattn
    )
    every = {n for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(noxattn) | set(xattn) <= every and set(noxattn) == every - {n for n in every if "attn2" in n}
    both = scope_modules(pipe.unet, "all")  # the text's keys and values and the drawing at once
    assert both == xattn + noxattn and len(set(both)) == len(both)
    with pytest.raises(MethodError, match="scope"):
        scope_modules(pipe.unet, "everything")  # type: ignore[arg-type]


@pytest.mark.parametrize("scope", ["xattn", "noxattn", "all"])
def test_lora_adapter_sits_exactly_on_the_scope(pipe, scope):
    from peft.tuners.tuners_utils import BaseTunerLayer

    expected = set(scope_modules(pipe.unet, scope))
    with FinetuneEngine(pipe, _cfg(scope=scope)) as engine:
        wrapped = {n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}
        assert wrapped == expected == set(engine.module_names)
        trainable = engine.trainable()
        assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_decreases_teacher_is_base_and_pipe_is_restored(mode):
    pipe = tiny_sd_pipeline(0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    types = {n: type(m) for n, m in pipe.unet.named_modules()}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden = pipe.encode_prompt("circle", "cpu", 1, False)[0]
    with torch.no_grad():
        base_out = pipe.unet(x, 301, encoder_hidden_states=hidden).sample
    lr = 1e-2 if mode == "lora" else 1e-3
    with FinetuneEngine(pipe, _cfg(mode=mode, iterations=12, lr=lr)) as engine:
        losses = engine.train(_fixed_objective)
        c = engine.encode("circle")
        assert torch.allclose(engine.teacher(x, 301, c), base_out, atol=1e-6)
        assert not torch.allclose(engine.current(x, 301, c), base_out, atol=1e-4)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == types
    assert not hasattr(pipe.unet, "peft_config")


def test_full_mode_factors_compress_with_recorded_error():
    pipe = tiny_sd_pipeline(0)
    with FinetuneEngine(pipe, _cfg(mode="full", scope="noxattn", rank=2, iterations=3)) as engine:
        engine.train(_fixed_objective)
        factors, errors = engine.factors()
    a, b = factors["unet.conv_in"]
    assert a.shape == (2, 4, 3, 3) and b.shape == (32, 2, 1, 1)
    assert set(errors) == set(factors) and all(0.0 <= e <= 1.0 for e in errors.values())
    assert max(errors.values()) > 0  # a rank-2 truncation of a full-rank change is not exact


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    class Stop(Exception):
        pass

    def trajectory_objective(engine: FinetuneEngine, it: int) -> torch.Tensor:
        c, u = engine.encode("circle"), engine.encode("")
        x, t = engine.sample_xt("circle", c, u, 1 + it % 3, generator=engine.generator(it))
        return F.mse_loss(engine.student(x, t, c), engine.teacher(x, t, u))

    def interrupted(engine: FinetuneEngine, it: int) -> torch.Tensor:
        if it == 5:
            raise Stop
        return trajectory_objective(engine, it)

    pipe = tiny_sd_pipeline(0)
    with FinetuneEngine(pipe, _cfg(iterations=8, lr=1e-3)) as engine:
        engine.train(trajectory_objective)
        straight, _ = engine.factors()
        straight_passes = engine.passes.as_dict()
    cfg = _cfg(iterations=8, lr=1e-3, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(Stop), FinetuneEngine(pipe, cfg) as engine:
        engine.train(interrupted)
    assert (tmp_path / "engine_state.pt").exists()
    with FinetuneEngine(pipe, cfg) as engine:
        engine.train(trajectory_objective)
        resumed, _ = engine.factors()
        assert engine.passes.as_dict() == straight_passes
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.allclose(resumed[k][0], straight[k][0], atol=1e-7)
        assert torch.allclose(resumed[k][1], straight[k][1], atol=1e-7)
    with (
        pytest.raises(MethodError, match="other settings"),
        FinetuneEngine(pipe, cfg.__class__(**{**cfg.__dict__, "lr": 5e-3})) as engine,
    ):
        engine.train(trajectory_objective)


def test_trajectory_reuse_and_pass_counts(pipe):
    with FinetuneEngine(pipe, _cfg()) as engine:
        c, u = engine.encode("circle"), engine.encode("")
        x2, _ = engine.sample_xt("k", c, u, 2, generator=torch.Generator().manual_seed(3))
        x3, t3 = engine.sample_xt("k", c, u, 3, generator=torch.Generator().manual_seed(99))
        assert engine.passes.sample_forward == 3  # 2 steps, then 1 more on the same trajectory
        fresh, t = engine.sample_xt("k", c, u, 3, generator=torch.Generator().manual_seed(3), reuse=False)
        assert engine.passes.sample_forward == 6 and t == t3 == engine.timesteps[3]
        assert torch.allclose(fresh, x3, atol=1e-6)  # unchanged model: continuing == resampling
        engine.sample_xt("other", c, u, 3, generator=torch.Generator().manual_seed(3))
        assert engine.passes.sample_forward == 9  # another key never reuses
        engine.train(_fixed_objective, iterations=2)
        p = engine.passes
        assert (p.teacher_forward, p.student_forward, p.backward) == (2, 2, 2)
        with pytest.raises(MethodError, match="outside"):
            engine.sample_xt("k", c, u, 4, generator=torch.Generator())


def test_sdxl_conditioning_and_adapters():
    pipe = tiny_sdxl_pipeline(0)
    with FinetuneEngine(pipe, _cfg(scope="xattn", iterations=2)) as engine:
        c = engine.encode("circle")
        assert set(c.added) == {"text_embeds", "time_ids"}
        engine.train(_fixed_objective)
        factors, _ = engine.factors()
    assert all(".attn2." in k for k in factors) and len(factors) == len(scope_modules(pipe.unet, "xattn"))


def test_bad_settings_are_refused(pipe):
    with pytest.raises(MethodError, match="mode"):
        FinetuneConfig(mode="half")  # type: ignore[arg-type]
    with pytest.raises(MethodError, match="iterations"):
        FinetuneConfig(iterations=0)
    with pytest.raises(MethodError, match="learning rate"):
        FinetuneConfig(lr=0)


def test_failed_setup_leaves_the_pipeline_untouched(monkeypatch):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = tiny_sd_pipeline(0)

    def broken(*args, **kwargs):
        raise RuntimeError("no optimizer today")

    monkeypatch.setattr(torch.optim, "Adam", broken)
    with pytest.raises(RuntimeError, match="no optimizer"):
        FinetuneEngine(pipe, _cfg(scope="noxattn"))
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert not hasattr(pipe.unet, "peft_config")


QUICK = {
    "esd": {"iterations": 1, "num_inference_steps": 3, "latent_size": 8, "progress": False},
    "kscu": {"iterations": 1, "num_inference_steps": 3, "latent_size": 8, "progress": False},
    "dynamic_mask": {"steps": 1, "epochs": 1, "warmup": 1, "update_every": 1, "batch": 1, "images": 1,
                     "num_inference_steps": 3, "latent_size": 8, "progress": False},
}  # fmt: skip


CIRCLE = Concept("circle", superclass="shape")


@pytest.mark.parametrize("method", ["esd", "kscu", "dynamic_mask"])
def test_a_pipeline_the_engine_cannot_train_into_a_patch_is_refused_before_training(method):
    """Three pipelines the fine-tuning methods used to train into a broken patch or a misleading error, each refused
    before any training with what to do, and left as they were; and a UNet in train mode stays in train mode.

    * ``fuse_qkv_projections()``: the attention ran on the fused copies, so to_k / to_v changes never reached the
      patch and the fused layers went into it (a patch no unfused base could take);
    * float16: "loss became nan ... lower the learning rate" at any rate;
    * the user's own LoRA: the refusal told them to ``forgetpatch.remove(pipe)``, which removes nothing of theirs.
    """
    import forgetpatch

    fused = tiny_sd_pipeline(0)
    fused.fuse_qkv_projections()
    half = tiny_sd_pipeline(0).to(torch.float16)
    lora = tiny_sd_pipeline(0)
    from peft import LoraConfig

    lora.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]), adapter_name="mine")
    for pipe, match in [
        (fused, r"pipe.unfuse_qkv_projections\(\) before erasing"),
        (half, "in float16: fine-tuning methods train in float32"),
        (lora, r"carries peft adapters.*pipe.fuse_lora\(\); pipe.unload_lora_weights\(\)"),
    ]:
        before = {n: p.clone() for n, p in pipe.unet.state_dict().items()}
        calls = []  # Dynamic Mask generated its training images first, minutes at its defaults
        hook = pipe.unet.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        with pytest.raises(MethodError, match=match):
            forgetpatch.erase(pipe, [CIRCLE], method=method, **QUICK[method])
        hook.remove()
        assert calls == []
        after = pipe.unet.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[n], v) for n, v in before.items())
    training = tiny_sd_pipeline(0)
    training.unet.train()
    forgetpatch.erase(training, [CIRCLE], method=method, **QUICK[method])
    assert training.unet.training


@pytest.mark.parametrize("method", ["esd", "kscu"])
def test_a_checkpoint_of_another_erasure_is_refused_not_resumed(tmp_path, method):
    """A checkpoint written while erasing the circle was resumed when the star was erased into the same folder (or
    the circle on a pipeline carrying a patch): a "no-star" patch with the circle patch's tensors, which looked right.
    The folder's path is no patch setting either: it stays out of the manifest (a published patch showed it)."""
    import forgetpatch

    quick = {**QUICK[method], "iterations": 2, "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 1}
    first = forgetpatch.erase(tiny_sd_pipeline(0), [CIRCLE], method=method, **quick)
    assert "checkpoint_dir" not in first.manifest.method.params
    with pytest.raises(MethodError, match="written by another erasure"):
        forgetpatch.erase(tiny_sd_pipeline(0), [Concept("star", superclass="shape")], method=method, **quick)
    patched = forgetpatch.apply(tiny_sd_pipeline(0), first, fuse=True)
    with pytest.raises(MethodError, match="written by another erasure"):
        forgetpatch.erase(patched, [CIRCLE], method=method, **quick)
    again = forgetpatch.erase(tiny_sd_pipeline(0), [CIRCLE], method=method, **quick)  # the same run: resumed
    assert again.digest == first.digest
    # another base of the same Hub-less kind (a local folder, a pipeline built in code: no id names it) was resumed
    # into the first base's patch, with the second base's fingerprints
    with pytest.raises(MethodError, match="written by another erasure"):
        forgetpatch.erase(tiny_sd_pipeline(1), [CIRCLE], method=method, **quick)


def test_two_runs_saving_checkpoints_in_one_folder_never_rename_each_others_file(tmp_path, monkeypatch):
    """Every save wrote engine_state.pt.tmp: two writers renamed each other's half-written file into place, and one
    crashed with FileNotFoundError. Each writer now has its own temporary file."""
    from forgetpatch.methods import checkpoint

    written: list[Path] = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (written.append(Path(f)), save(obj, f, *a, **k)))
    checkpoint.save(tmp_path, {"step": 1})
    checkpoint.save(tmp_path, {"step": 2})
    assert len({w.name for w in written}) == 2 and all(w.name.startswith(".") for w in written)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.NAME]
    assert torch.load(tmp_path / checkpoint.NAME)["step"] == 2
