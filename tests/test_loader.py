"""The loader: apply / remove / applied on tiny SD and SDXL pipelines, and one full-size SD 1.5 UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import forgetpatch
from forgetpatch.errors import (
    AlreadyAppliedError,
    ApplyError,
    FingerprintMismatchError,
    HubError,
    LineageError,
    MissingModuleError,
    NotAppliedError,
    PatchFormatError,
)
from forgetpatch.format import KeyStepRange, build_patch, resolve_module
from forgetpatch.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

ATTN2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
SD_PATHS = [f"{ATTN2}.to_k", f"{ATTN2}.to_v", "unet.conv_in", "unet.mid_block.resnets.0.conv1",
            "text_encoder.encoder.layers.1.self_attn.v_proj"]  # fmt: skip


def make_patch(pipe, paths=SD_PATHS, *, seed=0, name=None, size=0.3, key_steps=None, lineage=()):
    """A patch of known random rank-2 deltas."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        w = resolve_module(pipe, path).weight
        factors[path] = (
            size * torch.randn(2, w[0].numel(), generator=g),
            torch.randn(w.shape[0], 2, generator=g),
        )
    return build_patch(pipe, factors, name=name or f"p{seed}", method="manual", concepts=["cat"],
                       key_steps=key_steps, lineage=list(lineage))  # fmt: skip


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, component, None)
        if module is not None:
            out.update({f"{component}.{k}": v.clone() for k, v in module.state_dict().items()})
    return out


def assert_unchanged(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys(), "module structure changed"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    assert forgetpatch.applied(pipe) == []


def generate(pipe, steps=3, **kw) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=steps, height=32, width=32, output_type="np", generator=g,
                **kw).images[0]  # fmt: skip


@pytest.fixture
def pipe():
    p = tiny_sd_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def base_image():
    p = tiny_sd_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return generate(p)


def test_apply_changes_output_and_remove_is_exact(pipe, base_image):
    before = snapshot(pipe)
    patch = make_patch(pipe)
    forgetpatch.apply(pipe, patch)
    assert [(e.name, e.fused) for e in forgetpatch.applied(pipe)] == [("p0", False)]
    assert not np.array_equal(generate(pipe), base_image)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)
    np.testing.assert_array_equal(generate(pipe), base_image)


def test_plain_diffusers_load_equals_forgetpatch_apply(tmp_path, pipe):
    folder = make_patch(pipe).save(tmp_path / "p")
    forgetpatch.apply(pipe, folder)
    ours = generate(pipe)
    forgetpatch.remove(pipe)
    pipe.load_lora_weights(str(folder))  # plain diffusers, no forgetpatch involved
    np.testing.assert_allclose(generate(pipe), ours, atol=1e-6, rtol=0)


@pytest.fixture
def diffusers_loads(pipe, monkeypatch) -> list[int]:
    """One entry per call of diffusers' ``load_lora_weights`` on ``pipe``'s class during the test."""
    loads = []
    real = type(pipe).load_lora_weights

    def counted(self, *args, **kwargs):
        loads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "load_lora_weights", counted)
    return loads


def test_direct_injection_equals_diffusers_loader(pipe, monkeypatch, diffusers_loads):
    """apply puts peft layers on the targets itself (not walking the UNet): same adapter, same output as diffusers'
    load_lora_weights, which it falls back to on hooked pipelines."""
    from forgetpatch.loader import adapters

    patch = make_patch(pipe)
    forgetpatch.apply(pipe, patch)
    assert diffusers_loads == [], "a plain pipeline gets the adapter directly"
    direct_image = generate(pipe)
    direct = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" in k}
    configs = {c: getattr(pipe, c).peft_config["p0"] for c in ("unet", "text_encoder")}
    forgetpatch.remove(pipe)
    assert not hasattr(pipe.unet, "peft_config") and not hasattr(pipe.text_encoder, "peft_config")

    monkeypatch.setattr(adapters, "direct", lambda pipe: False)
    forgetpatch.apply(pipe, patch)
    assert diffusers_loads == [1]
    np.testing.assert_array_equal(generate(pipe), direct_image)
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert loaded.keys() == direct.keys()
    assert all(torch.equal(v, loaded[k]) for k, v in direct.items())
    for c, config in configs.items():
        theirs = getattr(pipe, c).peft_config["p0"]
        assert (config.r, config.lora_alpha, config.use_dora, config.lora_bias) == (
            theirs.r, theirs.lora_alpha, theirs.use_dora, theirs.lora_bias)  # fmt: skip
    forgetpatch.remove(pipe)


def test_hooked_pipeline_is_left_to_diffusers_loader(pipe, base_image):
    """A component with an accelerate / diffusers hook (offloading) takes diffusers' path, which handles hooks."""
    from forgetpatch.loader import adapters

    before = snapshot(pipe)
    pipe.vae._hf_hook = object()  # inert here; its presence is what diffusers' loader checks for
    assert not adapters.direct(pipe)
    forgetpatch.apply(pipe, make_patch(pipe))
    assert "p0" in pipe.unet.peft_config
    assert not np.array_equal(generate(pipe), base_image)
    forgetpatch.remove(pipe)
    del pipe.vae._hf_hook
    assert adapters.direct(pipe)
    assert_unchanged(pipe, before)


def test_a_peft_without_config_taking_layers_is_left_to_diffusers_loader(pipe, base_image, monkeypatch, diffusers_loads):
    """peft releases whose LoRA layers take their settings one by one: every adapter goes through diffusers."""
    from forgetpatch.loader import adapters

    assert adapters.peft_takes_config()  # the pinned peft: the direct path is the one the other tests run
    monkeypatch.setattr(adapters, "peft_takes_config", lambda: False)
    before = snapshot(pipe)
    forgetpatch.apply(pipe, make_patch(pipe))
    assert diffusers_loads == [1] and not np.array_equal(generate(pipe), base_image)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "diffusers-loader"])
def test_apply_leaves_the_users_trainability_alone(pipe, monkeypatch, diffusers_loads, direct):
    """The user's parameters keep their requires_grad, with adapters put on directly (where only the patched layers
    are looked at) and with diffusers' loader (whose whole-model injection freezes every base weight); the patch's
    own are frozen."""
    from forgetpatch.loader import adapters

    if not direct:
        monkeypatch.setattr(adapters, "direct", lambda pipe: False)
    pipe.unet.requires_grad_(True)
    pipe.text_encoder.requires_grad_(False)
    forgetpatch.apply(pipe, make_patch(pipe))
    assert diffusers_loads == ([] if direct else [1])
    assert all(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for n, p in pipe.text_encoder.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" in n)
    forgetpatch.remove(pipe)
    assert all(p.requires_grad for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_fused_matches_unfused_and_removes_exactly(pipe):
    before = snapshot(pipe)
    p0, p1 = make_patch(pipe, seed=0), make_patch(pipe, seed=1)
    forgetpatch.apply(pipe, [p0, p1])
    unfused = generate(pipe)
    forgetpatch.remove(pipe)
    forgetpatch.apply(pipe, [p0, p1], fuse=True)
    assert all(e.fused for e in forgetpatch.applied(pipe))
    # additive: the fused weight is base + both deltas
    w = resolve_module(pipe, f"{ATTN2}.to_k").weight
    expected = before[f"{ATTN2}.to_k.weight"] + p0.delta(f"{ATTN2}.to_k") + p1.delta(f"{ATTN2}.to_k")
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(generate(pipe), unfused, atol=1e-4, rtol=0)
    forgetpatch.remove(pipe, "p0")  # the other stays fused, p0 comes off exactly
    torch.testing.assert_close(
        w, before[f"{ATTN2}.to_k.weight"] + p1.delta(f"{ATTN2}.to_k"), atol=1e-5, rtol=0
    )
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


def test_stacking_order_mixed_fused_and_scale(pipe):
    before = snapshot(pipe)
    p0, p1, p2 = (make_patch(pipe, seed=s) for s in range(3))
    forgetpatch.apply(pipe, [p0, p1])
    forgetpatch.apply(pipe, p2, scale=0.5)
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p0", "p1", "p2"]
    assert [e.scale for e in forgetpatch.applied(pipe)] == [1.0, 1.0, 0.5]
    all_unfused = generate(pipe)
    forgetpatch.remove(pipe, ["p1", p0])
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p2"]
    forgetpatch.remove(pipe)
    # a fused patch under unfused ones: peft's adapters keep working on top of the fused weight
    forgetpatch.apply(pipe, p0, fuse=True)
    forgetpatch.apply(pipe, p1)
    forgetpatch.apply(pipe, p2, scale=0.5)
    np.testing.assert_allclose(generate(pipe), all_unfused, atol=1e-4, rtol=0)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)
    with pytest.raises(NotAppliedError, match="p9"):
        forgetpatch.remove(pipe, "p9")


def test_refusals_leave_the_pipeline_untouched(pipe):
    before = snapshot(pipe)
    good = make_patch(pipe)
    other_base = make_patch(tiny_sd_pipeline(seed=1), seed=1, name="other")
    with pytest.raises(FingerprintMismatchError, match="other"):
        forgetpatch.apply(pipe, [good, other_base])
    assert_unchanged(pipe, before)
    sdxl_patch = make_patch(tiny_sdxl_pipeline(), ["unet.down_blocks.1.attentions.0.proj_in"], name="xl")
    with pytest.raises(MissingModuleError, match="down_blocks.1.attentions.0.proj_in"):
        forgetpatch.apply(pipe, [good, sdxl_patch])
    assert_unchanged(pipe, before)
    with pytest.raises(AlreadyAppliedError):
        forgetpatch.apply(pipe, [good, good])
    assert_unchanged(pipe, before)
    forgetpatch.apply(pipe, good)
    with pytest.raises(AlreadyAppliedError, match="p0"):
        forgetpatch.apply(pipe, good, fuse=True)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


def test_failure_while_applying_is_rolled_back(pipe, monkeypatch):
    from forgetpatch.loader import adapters

    before = snapshot(pipe)
    patches = [make_patch(pipe, seed=s) for s in range(3)]
    real = adapters.load_adapter
    calls = []

    def flaky(pipe, patch, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        real(pipe, patch, name)

    monkeypatch.setattr(adapters, "load_adapter", flaky)
    forgetpatch.apply(pipe, patches[0], fuse=True)
    with pytest.raises(ApplyError, match="out of memory"):
        forgetpatch.apply(pipe, patches[1:])
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


def test_failure_half_way_through_putting_layers_on_is_rolled_back(pipe, monkeypatch):
    """A layer failing after others got the adapter: the ones done are unwrapped again, nothing is left."""
    from forgetpatch.loader import adapters

    before = snapshot(pipe)
    real, calls = adapters.lora_layer, []

    def failing_third_wrap(module):
        calls.append(module)
        if len(calls) == len(SD_PATHS) + 3:  # after apply's check of every target: the third layer wrapped
            raise RuntimeError("out of memory")
        return real(module)

    monkeypatch.setattr(adapters, "lora_layer", failing_third_wrap)
    with pytest.raises(ApplyError, match="out of memory"):
        forgetpatch.apply(pipe, make_patch(pipe))
    assert len(calls) == len(SD_PATHS) + 3
    assert not any(hasattr(getattr(pipe, c), "peft_config") for c in ("unet", "text_encoder"))
    assert_unchanged(pipe, before)


def test_lineage(pipe):
    parent = make_patch(pipe, seed=0, name="parent")
    child = make_patch(pipe, seed=1, name="child", lineage=[parent.digest])
    with pytest.raises(LineageError, match=parent.digest[:12]):
        forgetpatch.apply(pipe, child)
    assert forgetpatch.applied(pipe) == []
    forgetpatch.apply(pipe, [parent, child])
    forgetpatch.remove(pipe)
    forgetpatch.apply(pipe, child, strict=False)
    # a patch built on a patched pipeline records what was applied as its lineage
    forgetpatch.apply(pipe, parent)
    g = torch.Generator().manual_seed(5)
    w = resolve_module(pipe, "unet.conv_in").weight
    grandchild = build_patch(pipe, {"unet.conv_in": (torch.randn(1, w[0].numel(), generator=g),
                             torch.randn(w.shape[0], 1, generator=g))}, name="gc", method="m", concepts=["x"])  # fmt: skip
    assert grandchild.manifest.lineage == [child.digest, parent.digest]


def test_fingerprint_sees_base_weights_under_applied_patches(pipe):
    patch = make_patch(pipe)
    expected = patch.manifest.base_model.fingerprint
    for fuse in (False, True):
        forgetpatch.apply(pipe, patch, fuse=fuse)
        assert forgetpatch.format.fingerprint(pipe, expected) == expected
        forgetpatch.remove(pipe)


def _trajectory_patch(pipe, start, end):
    # UNet-only: text-encoder parts of a patch are not gated (the text encoder runs once per image)
    unet_paths = [p for p in SD_PATHS if p.startswith("unet.")]
    return make_patch(
        pipe, unet_paths, key_steps=[KeyStepRange(start=start, end=end)], name=f"ks{start}-{end}"
    )


def test_key_step_gating(pipe, base_image):
    before = snapshot(pipe)
    everywhere = _trajectory_patch(pipe, 0.0, 1.0)
    forgetpatch.apply(pipe, everywhere)
    always_on = generate(pipe)
    forgetpatch.remove(pipe)
    # a range containing every step == always on (with CFG: guidance_scale defaults to 7.5)
    forgetpatch.apply(pipe, everywhere, key_steps=True)
    np.testing.assert_array_equal(generate(pipe), always_on)
    forgetpatch.remove(pipe)
    # a range containing no step == the base model, for any scheduler and step count
    nowhere = _trajectory_patch(pipe, 0.0, 0.0)
    forgetpatch.apply(pipe, nowhere, key_steps=True)
    np.testing.assert_array_equal(generate(pipe), base_image)
    forgetpatch.remove(pipe)
    # the same patch without key_steps=True is always on
    forgetpatch.apply(pipe, nowhere)
    assert not np.array_equal(generate(pipe), base_image)
    forgetpatch.remove(pipe)
    # part of the trajectory: neither base nor always-on
    early = _trajectory_patch(pipe, 0.0, 0.5)
    forgetpatch.apply(pipe, early, key_steps=True)
    partial = generate(pipe)
    assert not np.array_equal(partial, base_image) and not np.array_equal(partial, always_on)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)
    with pytest.raises(ApplyError, match="fuse"):
        forgetpatch.apply(pipe, early, key_steps=True, fuse=True)


def test_key_step_gating_other_scheduler(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    base = generate(pipe, steps=4)
    forgetpatch.apply(pipe, _trajectory_patch(pipe, 0.0, 0.0), key_steps=True)
    np.testing.assert_array_equal(generate(pipe, steps=4), base)


def test_img2img_variant_shares_components(pipe):
    before = snapshot(pipe)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    forgetpatch.apply(img2img, make_patch(pipe))
    image = torch.rand(1, 3, 32, 32)
    out = img2img("a cat", image=image, num_inference_steps=3, strength=0.7, output_type="np").images[0]
    assert out.shape == (32, 32, 3)
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]  # same UNet, same bookkeeping
    forgetpatch.remove(img2img)
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_deep_copy_of_a_patched_pipeline_is_refused_where_it_was_misreported(pipe, fuse):
    """``copy.deepcopy`` of a patched pipeline copied the patches, acting, but not the loader's bookkeeping (kept by
    module): ``applied(copy)`` said none was on, ``remove`` could not take them off and ``evaluate`` recorded a
    patched copy as the base. Every call on such a copy now says what it is and how to copy; the original is as it
    was, ``forgetpatch.loader.unpatched`` copies without the patches, and a copy made with none on is a plain pipeline."""
    import copy

    forgetpatch.apply(pipe, make_patch(pipe), fuse=fuse)
    clone = copy.deepcopy(pipe)
    drawn = generate(clone)  # the copy draws as the patched pipeline, not as the base
    assert np.array_equal(drawn, generate(pipe)) and not np.allclose(drawn, generate(tiny_sd_pipeline(seed=0)))
    for call in (forgetpatch.applied, forgetpatch.remove, lambda p: forgetpatch.apply(p, make_patch(p, seed=1))):
        with pytest.raises(ApplyError, match=r"carries the patches p0 but is a copy .*forgetpatch\.loader\.unpatched"):
            call(clone)
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]
    base = forgetpatch.loader.unpatched(pipe)
    assert forgetpatch.applied(base) == []
    assert [e.name for e in forgetpatch.applied(forgetpatch.apply(base, make_patch(base)))] == ["p0"]
    forgetpatch.remove(pipe)
    assert forgetpatch.applied(copy.deepcopy(pipe)) == []


def test_sdxl_with_second_text_encoder():
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    before = snapshot(pipe)
    paths = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
             "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"]  # fmt: skip
    base = generate(pipe)
    forgetpatch.apply(pipe, make_patch(pipe, paths))
    assert not np.array_equal(generate(pipe), base)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


def test_gated_and_always_on_patches_stack(pipe):
    unet_paths = [p for p in SD_PATHS if p.startswith("unet.")]
    other = make_patch(pipe, unet_paths, seed=3, name="other")
    forgetpatch.apply(pipe, other)
    alone = generate(pipe)
    forgetpatch.remove(pipe)
    forgetpatch.apply(pipe, _trajectory_patch(pipe, 0.0, 0.0), key_steps=True)
    generate(pipe)  # the gate switches the UNet's adapters off at every step
    forgetpatch.apply(pipe, other)
    np.testing.assert_array_equal(generate(pipe), alone)
    forgetpatch.remove(pipe, "ks0.0-0.0")
    np.testing.assert_array_equal(generate(pipe), alone)


def test_refs(tmp_path, pipe, monkeypatch):

    import forgetpatch.hub

    folder = make_patch(pipe).save(tmp_path / "p")
    assert (
        forgetpatch.load(folder / "pytorch_lora_weights.safetensors").digest
        == forgetpatch.load(folder).digest
    )
    with pytest.raises(PatchFormatError, match="no patch"):
        forgetpatch.load(tmp_path / "nope")
    calls = []

    def fake_download(repo_id, revision=None, token=None, allow_unverified=False):
        calls.append((repo_id, revision))
        return folder

    monkeypatch.setattr(forgetpatch.hub, "download", fake_download)
    assert forgetpatch.load("org/no-cat@v1").digest == forgetpatch.load(folder).digest
    assert forgetpatch.load("org/no-cat").name == "p0"
    assert calls == [("org/no-cat", "v1"), ("org/no-cat", None)]
    with pytest.raises(HubError, match="not a valid revision"):  # checked before any request
        forgetpatch.load("org/no-cat@..")


@pytest.mark.bigmodel
@pytest.mark.slow
def test_full_size_sd15_unet_apply_remove():
    from forgetpatch.testing import published_unet

    tiny = tiny_sd_pipeline()
    pipe = StableDiffusionPipeline(**{**tiny.components, "unet": published_unet("sd15")})
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    paths = [f"unet.{n}" for n, m in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    patch = make_patch(pipe, paths, size=0.01)
    forgetpatch.apply(pipe, patch)
    assert len(paths) == 32 and forgetpatch.applied(pipe)[0].name == "p0"
    forgetpatch.remove(pipe)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_a_patch_for_another_model_names_the_model_it_was_made_for():
    """A shape mismatch says which base the patch was made for (the id its manifest records) and how to load it."""
    from forgetpatch import toy

    made_on = tiny_sd_pipeline(seed=0)
    made_on.register_to_config(_name_or_path="org/tiny-sd")  # what from_pretrained("org/tiny-sd") records
    patch = make_patch(made_on, name="for-tiny")
    assert patch.manifest.base_model.id == "org/tiny-sd"
    hint = r"made for org/tiny-sd; load that model \(CLI: --base org/tiny-sd\)"
    with pytest.raises(MissingModuleError, match=hint):
        forgetpatch.apply(toy.pipeline(), patch)
