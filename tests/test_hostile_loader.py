"""The loader under misuse: user LoRAs (unfused, fused, gated), bad scales, scheduler swaps, dtypes, paths, threads.

Every case ends in a named error (a ForgetPatchError subclass) with the pipeline as it was, or in the exact
result. Effects are checked where LoRA arithmetic is exact: the effective weight of a targeted Linear (its
output on the identity) must be base + user delta + patch delta; UNet outputs match a plain copy of the UNet
with those weights written in, to float tolerance.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from torch import nn

import forgetpatch
from forgetpatch.errors import (
    AlreadyAppliedError,
    ApplyError,
    FingerprintMismatchError,
    ForgetPatchError,
    HubError,
    NotAppliedError,
    PatchFormatError,
)
from forgetpatch.format import KeyStepRange, build_patch, resolve_module
from forgetpatch.testing import tiny_sd_pipeline

SHARED = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # user LoRA and patch
USER_ONLY = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
PATCH_ONLY = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TEXT = "text_encoder.encoder.layers.0.self_attn.v_proj"  # user LoRA and patch, never gated
USER_WEIGHT = 0.7
EARLY = [KeyStepRange(start=0.0, end=0.5)]


# --- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_base():
    from forgetpatch import toy

    try:
        return toy.pipeline()
    except ForgetPatchError as exc:
        pytest.skip(f"toy pipeline not available: {exc}")


@pytest.fixture
def toy_pipe(toy_base):
    return copy.deepcopy(toy_base)


def factors(pipe, paths, seed, rank=2, size=0.05):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        w = resolve_module(pipe, path).weight
        out[path] = (
            size * torch.randn(rank, w[0].numel(), generator=g),
            size * torch.randn(w.shape[0], rank, generator=g),
        )
    return out


def make_patch(pipe, paths=(SHARED, PATCH_ONLY, TEXT), *, seed=0, name="p0", key_steps=None):
    return build_patch(pipe, factors(pipe, paths, seed), name=name, method="manual", concepts=["cat"],
                       key_steps=key_steps)  # fmt: skip


def load_user_lora(pipe, paths=(SHARED, USER_ONLY, TEXT), *, name="mine", seed=10, weight=USER_WEIGHT):
    """A diffusers-format LoRA loaded the ordinary way; returns its weight deltas (at ``weight``)."""
    fs = factors(pipe, paths, seed, rank=4)
    state_dict = {}
    for path, (A, B) in fs.items():
        state_dict[f"{path}.lora_A.weight"], state_dict[f"{path}.lora_B.weight"] = A, B
    pipe.load_lora_weights(state_dict, adapter_name=name)
    pipe.set_adapters([name], adapter_weights=[weight])
    return {path: weight * (B @ A) for path, (A, B) in fs.items()}


def layer(pipe, path) -> nn.Module:
    component, rest = path.split(".", 1)
    return getattr(pipe, component).get_submodule(rest)


@torch.no_grad()
def effective(pipe, path) -> torch.Tensor:
    """The weight a Linear acts with now (peft adapters, merges and all): its output on the identity."""
    base = resolve_module(pipe, path)
    out = layer(pipe, path)(torch.eye(base.in_features, dtype=base.weight.dtype))
    return (out - base.bias if base.bias is not None else out).T


def expect(base_pipe, pipe, terms: dict[str, list[torch.Tensor]]) -> None:
    for path, deltas in terms.items():
        want = resolve_module(base_pipe, path).weight + sum(deltas, torch.zeros(()))
        torch.testing.assert_close(effective(pipe, path), want, atol=1e-5, rtol=0, msg=path)


def peft_state(pipe) -> dict:
    """Everything peft keeps per layer that the user may have set: active set, scales, merges, on/off."""
    out = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if hasattr(module, "active_adapters") and hasattr(module, "scaling"):
                out[f"{component}.{name}"] = (list(module.active_adapters), dict(module.scaling),
                                              list(module.merged_adapters), module.disable_adapters)  # fmt: skip
    return out


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "text_encoder", "vae"):
        out.update({f"{component}.{k}": v.clone() for k, v in getattr(pipe, component).state_dict().items()})
    return out


def assert_same(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))[:4]
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, changed[:3]


def unet_inputs(pipe, t: int):
    g = torch.Generator().manual_seed(1)
    size = pipe.unet.config.sample_size
    sample = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=g)
    context = torch.randn(1, 6, pipe.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([t]), context


@torch.no_grad()
def assert_unet_matches(base_pipe, pipe, t: int, terms: dict[str, list[torch.Tensor]]) -> None:
    """``pipe.unet`` at timestep ``t`` == a plain copy of the base UNet with the deltas written into its weights."""
    reference = copy.deepcopy(base_pipe.unet)
    for path, deltas in terms.items():
        if path.startswith("unet."):
            reference.get_submodule(path.removeprefix("unet.")).weight += sum(deltas, torch.zeros(()))
    sample, timestep, context = unet_inputs(pipe, t)
    got = pipe.unet(sample, timestep, encoder_hidden_states=context).sample
    want = reference(sample, timestep, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


# --- user LoRAs ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["unfused", "fused", "gated"])
def test_patch_adds_to_an_unfused_user_lora(toy_base, toy_pipe, mode):
    pipe = toy_pipe
    user = load_user_lora(pipe)
    user_before, params_before = peft_state(pipe), snapshot(pipe)
    patch = make_patch(toy_base, key_steps=EARLY if mode == "gated" else None)
    p = {path: patch.delta(path) for path in patch.target_modules}
    forgetpatch.apply(pipe, patch, fuse=mode == "fused", key_steps=mode == "gated")
    full = {SHARED: [user[SHARED], p[SHARED]], USER_ONLY: [user[USER_ONLY]], PATCH_ONLY: [p[PATCH_ONLY]],
            TEXT: [user[TEXT], p[TEXT]]}  # fmt: skip
    # t = 900 is at trajectory fraction 0.1 (inside EARLY); t = 100 at 0.9 (outside)
    assert_unet_matches(toy_base, pipe, 900, full)
    expect(toy_base, pipe, full)
    if mode == "gated":
        off = {
            SHARED: [user[SHARED]],
            USER_ONLY: [user[USER_ONLY]],
            PATCH_ONLY: [],
            TEXT: [user[TEXT], p[TEXT]],
        }
        assert_unet_matches(toy_base, pipe, 100, off)
        expect(toy_base, pipe, off)  # the gate switched off the patch only, never the user's LoRA
        assert_unet_matches(toy_base, pipe, 900, full)
    forgetpatch.remove(pipe)
    assert peft_state(pipe) == user_before
    assert_same(pipe, params_before)
    expect(toy_base, pipe, {SHARED: [user[SHARED]], USER_ONLY: [user[USER_ONLY]], PATCH_ONLY: []})


@pytest.mark.parametrize("mode", ["unfused", "fused", "gated"])
def test_patch_beside_a_fused_user_lora(toy_base, toy_pipe, mode):
    pipe = toy_pipe
    user = load_user_lora(pipe, (USER_ONLY, TEXT))
    pipe.fuse_lora(components=["unet", "text_encoder"])
    user_before, params_before = peft_state(pipe), snapshot(pipe)
    patch = make_patch(toy_base, (SHARED, PATCH_ONLY), key_steps=EARLY if mode == "gated" else None)
    p = {path: patch.delta(path) for path in patch.target_modules}
    forgetpatch.apply(pipe, patch, fuse=mode == "fused", key_steps=mode == "gated")
    full = {
        SHARED: [p[SHARED]],
        USER_ONLY: [user[USER_ONLY]],
        PATCH_ONLY: [p[PATCH_ONLY]],
        TEXT: [user[TEXT]],
    }
    assert_unet_matches(toy_base, pipe, 900, full)
    expect(toy_base, pipe, full)
    assert layer(pipe, USER_ONLY).merged_adapters == ["mine"]  # still fused, not unmerged by peft
    if mode == "gated":
        off = {SHARED: [], USER_ONLY: [user[USER_ONLY]], PATCH_ONLY: [], TEXT: [user[TEXT]]}
        assert_unet_matches(toy_base, pipe, 100, off)
    forgetpatch.remove(pipe)
    assert peft_state(pipe) == user_before
    assert_same(pipe, params_before)


@pytest.mark.parametrize("fuse", [False, True])
def test_patch_on_a_layer_with_a_fused_user_lora_is_refused(toy_base, toy_pipe, fuse):
    pipe = toy_pipe
    load_user_lora(pipe)
    pipe.fuse_lora(components=["unet", "text_encoder"])
    user_before, params_before = peft_state(pipe), snapshot(pipe)
    with pytest.raises(ApplyError, match="unfuse_lora") as info:
        forgetpatch.apply(pipe, make_patch(toy_base), fuse=fuse)
    assert not isinstance(info.value, FingerprintMismatchError)
    assert peft_state(pipe) == user_before and forgetpatch.applied(pipe) == []
    assert_same(pipe, params_before)


def test_lora_switched_off_elsewhere_does_not_refuse_a_patch(toy_base, toy_pipe):
    """The user's LoRA switched off on the text encoder only: a patch on UNet layers was refused as if its own layers
    were off. Only switched-off layers the patch changes refuse it; the patch then acts, the user's LoRA stays off."""
    from diffusers.utils.peft_utils import set_adapter_layers

    from forgetpatch.loader import adapters

    pipe = toy_pipe
    load_user_lora(pipe, (TEXT,))
    set_adapter_layers(pipe.text_encoder, enabled=False)
    patch = make_patch(toy_base, (SHARED, PATCH_ONLY))
    forgetpatch.apply(pipe, patch)
    assert [e.patch.name for e in forgetpatch.applied(pipe)] == ["p0"]
    assert all(layer.disable_adapters for path, layer in adapters.tuner_layers(pipe) if path.startswith("text_encoder"))
    forgetpatch.remove(pipe)
    with pytest.raises(ApplyError, match="enable_lora"):  # a switched-off layer the patch changes still refuses
        forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, TEXT)))


def test_weights_offloaded_to_meta_are_refused_with_a_forgetpatch_error(toy_base, toy_pipe):
    """Sequential offload (accelerate's cpu_offload, which enable_sequential_cpu_offload puts on each component)
    leaves the weights on the meta device: apply raised torch's "Cannot copy out of meta tensor"."""
    from accelerate import cpu_offload

    cpu_offload(toy_pipe.unet, execution_device=torch.device("cpu"))
    with pytest.raises(ApplyError, match="on the meta device .* apply patches before enabling sequential offload"):
        forgetpatch.apply(toy_pipe, make_patch(toy_base, (SHARED, PATCH_ONLY)))
    assert forgetpatch.applied(toy_pipe) == []


def test_failed_apply_leaves_the_user_lora_as_it_was(toy_base, toy_pipe, monkeypatch):
    pipe = toy_pipe
    load_user_lora(pipe)
    user_before, params_before = peft_state(pipe), snapshot(pipe)
    good = make_patch(toy_base)
    wrong_base = make_patch(tiny_sd_pipeline(), ["unet.conv_in"], name="other")
    with pytest.raises(ForgetPatchError):
        forgetpatch.apply(pipe, [good, wrong_base])
    assert peft_state(pipe) == user_before
    assert_same(pipe, params_before)
    # LoRA switched off by the user: an unfused patch would be off too
    pipe.disable_lora()
    with pytest.raises(ApplyError, match="enable_lora"):
        forgetpatch.apply(pipe, good)
    pipe.enable_lora()
    assert peft_state(pipe) == user_before
    # a failure half-way through loading is rolled back to the user's adapters too
    from forgetpatch.loader import adapters

    real, calls = adapters.load_adapter, []

    def flaky(pipe, patch, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        real(pipe, patch, name)

    monkeypatch.setattr(adapters, "load_adapter", flaky)
    with pytest.raises(ApplyError, match="out of memory"):
        forgetpatch.apply(pipe, [good, make_patch(toy_base, (SHARED, USER_ONLY), seed=1, name="p1")])
    assert peft_state(pipe) == user_before and forgetpatch.applied(pipe) == []
    assert_same(pipe, params_before)


def test_user_fusing_after_a_fused_patch_keeps_their_fusion_on_remove(toy_base, toy_pipe):
    pipe = toy_pipe
    forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, PATCH_ONLY)), fuse=True)
    load_user_lora(pipe, (SHARED, USER_ONLY))
    pipe.fuse_lora(components=["unet"])
    forgetpatch.remove(pipe)
    fresh = copy.deepcopy(toy_base)  # the same LoRA fused into a pipeline that never had the patch
    load_user_lora(fresh, (SHARED, USER_ONLY))
    fresh.fuse_lora(components=["unet"])
    assert peft_state(pipe) == peft_state(fresh)
    assert_same(pipe, snapshot(fresh))


def test_replaced_component_is_not_reported_as_patched(toy_base, toy_pipe):
    pipe = toy_pipe
    forgetpatch.apply(pipe, make_patch(toy_base))
    pipe.text_encoder = copy.deepcopy(toy_base.text_encoder)
    with pytest.raises(ApplyError, match="text_encoder was replaced"):
        forgetpatch.applied(pipe)
    with pytest.raises(ApplyError, match="text_encoder was replaced"):
        assert_unet_matches(toy_base, pipe, 500, {})
    forgetpatch.remove(pipe)
    assert forgetpatch.applied(pipe) == []


def test_user_lora_calls_after_apply_never_leave_the_patch_silently_off(toy_base, toy_pipe):
    pipe = toy_pipe
    patch = make_patch(toy_base)
    p = {path: patch.delta(path) for path in patch.target_modules}
    forgetpatch.apply(pipe, patch)
    # the user's load_lora_weights makes their adapter the only active one: the patch is switched back on
    user = load_user_lora(pipe)
    with pytest.warns(UserWarning, match="switched back on"):
        assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]
    full = {SHARED: [user[SHARED], p[SHARED]], USER_ONLY: [user[USER_ONLY]], PATCH_ONLY: [p[PATCH_ONLY]],
            TEXT: [user[TEXT], p[TEXT]]}  # fmt: skip
    expect(toy_base, pipe, full)
    # ... also when the next thing the user does is run the UNet (or the text encoder)
    pipe.set_adapters(["mine"], adapter_weights=[USER_WEIGHT])
    with pytest.warns(UserWarning, match="switched back on"):
        assert_unet_matches(toy_base, pipe, 500, full)
    pipe.set_adapters(["mine"], adapter_weights=[USER_WEIGHT])
    with pytest.warns(UserWarning, match="switched back on"):
        pipe.text_encoder(torch.tensor([[1, 2, 3]]))
    expect(toy_base, pipe, {TEXT: [user[TEXT], p[TEXT]]})
    # disable_lora() switches every adapter off, the patch included: refused, not silently run
    pipe.disable_lora()
    with pytest.raises(ApplyError, match="disable_lora"):
        forgetpatch.applied(pipe)
    with pytest.raises(ApplyError, match="disable_lora"):
        assert_unet_matches(toy_base, pipe, 500, full)
    pipe.enable_lora()
    # fuse_lora() bakes the patch into the weights, where it cannot be gated nor removed exactly
    pipe.fuse_lora(components=["unet", "text_encoder"])
    with pytest.raises(ApplyError, match="unfuse_lora"):
        forgetpatch.remove(pipe)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    # unload_lora_weights() deletes every adapter, the patch's too
    pipe.unload_lora_weights()
    with pytest.raises(ApplyError, match="no longer on the pipeline"):
        forgetpatch.applied(pipe)
    forgetpatch.remove(pipe)
    assert forgetpatch.applied(pipe) == []


# --- scale, scheduler, dtype, refs ---------------------------------------------------------
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_bad_scale_is_refused_before_anything_changes(scale):
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    patch = make_patch(pipe, ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"])
    for fuse in (False, True):
        with pytest.raises(ApplyError, match="scale"):
            forgetpatch.apply(pipe, patch, scale=scale, fuse=fuse)
        assert_same(pipe, before)
        assert forgetpatch.applied(pipe) == []


def test_scheduler_swapped_after_apply_is_read_at_call_time(toy_base, toy_pipe):
    pipe = toy_pipe
    patch = make_patch(toy_base, (SHARED, PATCH_ONLY), key_steps=EARLY)
    p = {path: patch.delta(path) for path in patch.target_modules}
    forgetpatch.apply(pipe, patch, key_steps=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, num_train_timesteps=2000)
    # with T = 2000: t = 1500 is at fraction 0.25 (on), t = 500 at 0.75 (off); with a stale T = 1000 it is reversed
    assert_unet_matches(toy_base, pipe, 1500, {SHARED: [p[SHARED]], PATCH_ONLY: [p[PATCH_ONLY]]})
    assert_unet_matches(toy_base, pipe, 500, {SHARED: [], PATCH_ONLY: []})
    # two pipelines on one UNet whose schedulers disagree: the gate cannot know which one runs
    other = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, num_train_timesteps=1000)})  # fmt: skip
    forgetpatch.applied(other)
    with pytest.raises(ApplyError, match="num_train_timesteps"):
        assert_unet_matches(toy_base, pipe, 500, {})
    other.scheduler = pipe.scheduler
    assert_unet_matches(toy_base, pipe, 500, {SHARED: [], PATCH_ONLY: []})


def test_an_edm_scheduler_never_runs_a_gated_patch_at_the_wrong_noise_levels(toy_base, toy_pipe):
    """EDM schedulers hand the UNet log(sigma) / 4, which the gate would read as a fraction near 1 at every step (a
    0-0.5 patch never on): gating is refused at apply, and at the next call when the scheduler is set after it."""
    from diffusers import EDMEulerScheduler

    pipe, patch = toy_pipe, make_patch(toy_base, (SHARED, PATCH_ONLY), key_steps=EARLY)
    ddim = pipe.scheduler
    pipe.scheduler = EDMEulerScheduler()
    before = snapshot(pipe)
    with pytest.raises(ApplyError, match="EDMEulerScheduler hands the denoiser log.sigma"):
        forgetpatch.apply(pipe, patch, key_steps=True)
    assert_same(pipe, before)
    assert forgetpatch.applied(pipe) == []
    forgetpatch.apply(pipe, patch)  # not gated: always on, on any scheduler
    forgetpatch.remove(pipe)
    pipe.scheduler = ddim
    forgetpatch.apply(pipe, patch, key_steps=True)
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ApplyError, match="gated to its key steps, but this pipeline's EDMEulerScheduler"):
        assert_unet_matches(toy_base, pipe, 500, {})
    pipe.scheduler = ddim
    p = {path: patch.delta(path) for path in patch.target_modules}
    assert_unet_matches(toy_base, pipe, 900, {SHARED: [p[SHARED]], PATCH_ONLY: [p[PATCH_ONLY]]})


@pytest.mark.parametrize("flag", ["key_steps", "fuse", "strict", "with_lineage", "allow_unverified"])
@pytest.mark.parametrize("value", [(0.6, 1.0), "no", 1, None])
def test_apply_flags_take_true_or_false_only(toy_base, toy_pipe, flag, value):
    """``key_steps=(0.6, 1.0)`` gated the patch to its own 0-0.5 range and ``fuse="no"`` fused it: any truthy value
    counted as True."""
    before = snapshot(toy_pipe)
    with pytest.raises(ApplyError, match=f"{flag} takes True or False"):
        forgetpatch.apply(toy_pipe, make_patch(toy_base, key_steps=EARLY), **{flag: value})
    assert_same(toy_pipe, before)
    assert forgetpatch.applied(toy_pipe) == []


def test_weights_read_outside_a_call_count_a_gated_patch_as_on(toy_base, toy_pipe):
    """Closed-form erasure and the inversion attack read the weights outside any UNet call, where a gated patch was
    on or off as the last step left it (off after a late step): they see every patch on, and the gate is kept."""
    from forgetpatch.methods import current_weights

    pipe, patch = toy_pipe, make_patch(toy_base, (SHARED, PATCH_ONLY), key_steps=EARLY)
    forgetpatch.apply(pipe, patch, key_steps=True)
    assert_unet_matches(toy_base, pipe, 100, {})  # a late step: the gate left it off
    read = current_weights(pipe, {PATCH_ONLY: layer(pipe, PATCH_ONLY)})[PATCH_ONLY]
    expected = resolve_module(toy_base, PATCH_ONLY).weight.float() + patch.delta(PATCH_ONLY).float()
    torch.testing.assert_close(read, expected, atol=1e-5, rtol=1e-5)
    assert forgetpatch.applied(pipe)[0].name == "p0"
    assert_unet_matches(toy_base, pipe, 100, {})  # still gated
    p = patch.delta(PATCH_ONLY)
    assert_unet_matches(toy_base, pipe, 900, {PATCH_ONLY: [p], SHARED: [patch.delta(SHARED)]})


def test_bf16_pipeline_is_told_the_dtype_is_the_problem():
    made_on = tiny_sd_pipeline()
    patch = make_patch(made_on, ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"])
    pipe = tiny_sd_pipeline().to(torch.bfloat16)
    before = snapshot(pipe)
    with pytest.raises(FingerprintMismatchError, match="bfloat16"):
        forgetpatch.apply(pipe, patch)
    assert_same(pipe, before)
    # a genuinely different model in float32 still gets the other-model message
    with pytest.raises(FingerprintMismatchError, match="made for") as info:
        forgetpatch.apply(tiny_sd_pipeline(seed=1), patch)
    assert "bfloat16" not in str(info.value)


@pytest.mark.parametrize("fuse", [False, True])
def test_fp16_pipeline_applies_and_removes_exactly(fuse):
    made_on = tiny_sd_pipeline()
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    patch = make_patch(made_on, [path])
    pipe = tiny_sd_pipeline().to(torch.float16)
    before = snapshot(pipe)
    forgetpatch.apply(pipe, patch, fuse=fuse)
    want = made_on.unet.get_submodule(path.removeprefix("unet.")).weight + patch.delta(path)
    torch.testing.assert_close(effective(pipe, path).float(), want, atol=2e-3, rtol=1e-2)
    forgetpatch.remove(pipe)
    assert_same(pipe, before)


def test_missing_local_path_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    import forgetpatch.hub

    calls = []

    def fake_download(repo_id, revision=None, token=None, allow_unverified=False):
        calls.append(repo_id)
        raise HubError(f"404: repository {repo_id} not found")

    monkeypatch.setattr(forgetpatch.hub, "download", fake_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "patches").mkdir()
    for ref in [
        "patches/no-cat",
        "./no-cat",
        "../no-cat",
        str(tmp_path / "no-cat"),
        "a/b/no-cat",
        "no-cat.safetensors",
    ]:
        with pytest.raises(PatchFormatError, match="no-cat"):
            forgetpatch.load(ref)
    from pathlib import Path

    with pytest.raises(PatchFormatError, match="org"):
        forgetpatch.load(Path("org/no-cat"))  # a Path is never a Hub id
    assert calls == []
    with pytest.raises(PatchFormatError, match="'patches' is a local folder"):
        forgetpatch.load("patches/no-cat")
    with pytest.raises(HubError) as info:
        forgetpatch.load("org/no-cat@v1")
    message = str(info.value)
    assert "no local folder or file 'org/no-cat@v1'" in message
    assert "Hub repo 'org/no-cat' (revision 'v1')" in message and "404" in message
    assert calls == ["org/no-cat"]


def test_allow_unverified_is_passed_to_read_patch(tmp_path, monkeypatch):
    import forgetpatch.loader.core as core

    pipe = tiny_sd_pipeline()
    folder = make_patch(pipe, ["unet.conv_in"]).save(tmp_path / "p")
    real, seen = core.read_patch, []

    def read(path, **kwargs):
        seen.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(core, "read_patch", read)
    forgetpatch.load(folder, allow_unverified=True)
    forgetpatch.apply(pipe, folder, allow_unverified=True)
    forgetpatch.load(folder)
    assert seen == [{"allow_unverified": True}] * 2 + [{"allow_unverified": False}]


# --- stacking misuse -----------------------------------------------------------------------
def test_applying_twice_is_refused(toy_base, toy_pipe):
    pipe = toy_pipe
    patch = make_patch(toy_base)
    before = snapshot(pipe)
    forgetpatch.apply(pipe, patch)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)  # same UNet: same bookkeeping
    for fuse in (False, True):
        with pytest.raises(AlreadyAppliedError):
            forgetpatch.apply(img2img, patch, fuse=fuse, scale=0.5)
    forgetpatch.remove(pipe)
    with pytest.raises(NotAppliedError):
        forgetpatch.remove(img2img, patch)
    assert_same(pipe, before)


def test_mid_stack_removal_with_a_user_lora(toy_base, toy_pipe):
    pipe = toy_pipe
    user = load_user_lora(pipe)
    user_before, params_before = peft_state(pipe), snapshot(pipe)
    patches = [make_patch(toy_base, (SHARED, PATCH_ONLY), seed=s, name=f"p{s}") for s in range(3)]
    forgetpatch.apply(pipe, patches[0], fuse=True)
    forgetpatch.apply(pipe, patches[1])
    forgetpatch.apply(pipe, patches[2], fuse=True, scale=0.5)
    forgetpatch.remove(pipe, "p1")
    forgetpatch.remove(pipe, "p0")
    left = {
        SHARED: [user[SHARED], 0.5 * patches[2].delta(SHARED)],
        PATCH_ONLY: [0.5 * patches[2].delta(PATCH_ONLY)],
    }
    expect(toy_base, pipe, left)
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p2"]
    forgetpatch.remove(pipe)
    assert peft_state(pipe) == user_before
    assert_same(pipe, params_before)


# --- threads -------------------------------------------------------------------------------
def test_two_threads_apply_and_remove_while_a_third_builds_models():
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    paths = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet.conv_in"]
    patches = [make_patch(pipe, paths, seed=s, name=f"p{s}") for s in range(2)]
    errors: list[BaseException] = []
    on_meta: list[str] = []
    done = threading.Event()

    def apply_remove(patch, fuse):
        try:
            for _ in range(5):
                forgetpatch.apply(pipe, patch, fuse=fuse)
                forgetpatch.remove(pipe, patch)
        except BaseException as exc:
            errors.append(exc)

    def build():
        while not done.is_set():
            linear = nn.Linear(16, 16)
            if linear.weight.is_meta:
                on_meta.append("meta")

    workers = [
        threading.Thread(target=apply_remove, args=(p, fuse))
        for p, fuse in zip(patches, (False, False), strict=True)
    ]
    builder = threading.Thread(target=build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builder.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done.set()
        builder.join()
    assert not errors, errors[:2]
    assert not on_meta, f"{len(on_meta)} nn.Linear built during apply had weights on meta"
    assert forgetpatch.applied(pipe) == []
    assert_same(pipe, before)


# --- diffusers and torch calls that bypass, rescale, reactivate or unfreeze a patch (stop 36) ----------------
def assert_kept(pipe, before: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``before`` unchanged (modules added meanwhile, like fused projections, are not compared)."""
    after = snapshot(pipe)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, changed[:3]


@pytest.mark.parametrize("fuse", [False, True])
def test_fused_qkv_projections_never_leave_a_patch_listed_but_off(toy_base, toy_pipe, fuse):
    """After ``pipe.fuse_qkv_projections()`` attention runs on fused copies of to_q/to_k/to_v that a patch does not
    reach: applying is refused, a patch applied before is not reported as on, and none is taken off while the copies
    would keep its change."""
    pipe, patch = toy_pipe, make_patch(toy_base, (SHARED, PATCH_ONLY))
    before = snapshot(pipe)
    pipe.fuse_qkv_projections()
    with pytest.raises(ApplyError, match="unfuse_qkv_projections"):
        forgetpatch.apply(pipe, patch, fuse=fuse)
    assert forgetpatch.applied(pipe) == []
    pipe.unfuse_qkv_projections()
    assert_kept(pipe, before)
    forgetpatch.apply(pipe, patch, fuse=fuse)
    pipe.fuse_qkv_projections()  # copies what the weights are now: a fused patch is in them, an unfused one not
    if fuse:
        assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]
    else:
        with pytest.raises(ApplyError, match="fuse_qkv_projections"):
            forgetpatch.applied(pipe)
    with pytest.raises(ApplyError, match="unfuse_qkv_projections"):
        forgetpatch.remove(pipe)
    pipe.unfuse_qkv_projections()
    forgetpatch.remove(pipe)
    assert forgetpatch.applied(pipe) == []
    assert_kept(pipe, before)


def test_a_patch_on_a_compiled_unet_is_listed_and_comes_off(toy_base, toy_pipe):
    """``pipe.unet = torch.compile(pipe.unet)`` after apply: the patch is still on (the wrapper runs the same UNet),
    so it is listed, acts, and ``remove`` takes it off."""
    pipe, patch = toy_pipe, make_patch(toy_base, (SHARED, PATCH_ONLY))
    forgetpatch.apply(pipe, patch)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]
    assert_unet_matches(toy_base, pipe, 500, {p: [patch.delta(p)] for p in patch.target_modules})
    forgetpatch.remove(pipe)
    assert forgetpatch.applied(pipe) == []
    assert_unet_matches(toy_base, pipe, 500, {})


@pytest.mark.parametrize("call", ["delete_adapters", "set_adapters"])
def test_a_gated_patch_stays_off_outside_its_key_steps_whatever_the_user_activates(toy_base, toy_pipe, call):
    """peft activates the remaining adapter when the user deletes theirs, and ``set_adapters`` may name the patch:
    outside its key steps the patch stays off all the same."""
    pipe = toy_pipe
    user = load_user_lora(pipe)
    forgetpatch.apply(pipe, make_patch(toy_base, key_steps=EARLY), key_steps=True)
    unet_user = {p: [d] for p, d in user.items() if p != TEXT}
    assert_unet_matches(toy_base, pipe, 100, unet_user)  # fraction 0.9: the patch is off
    if call == "delete_adapters":
        pipe.delete_adapters(["mine"])
        unet_user = {}
    else:
        pipe.set_adapters(["mine", "p0"], adapter_weights=[USER_WEIGHT, 1.0])
    assert_unet_matches(toy_base, pipe, 100, unet_user)


def test_a_patch_keeps_its_scale_through_the_users_calls(toy_base, toy_pipe):
    """``fuse_lora(lora_scale=...)`` scales every active adapter and ``unfuse_lora`` does not scale them back;
    ``set_adapters`` weights the adapters it names. A patch's scale is the one it was applied with: put back, with
    a warning, before the next forward or listing."""
    pipe = toy_pipe
    patch = make_patch(toy_base, (PATCH_ONLY,))
    forgetpatch.apply(pipe, patch)
    load_user_lora(pipe, (USER_ONLY,))
    with pytest.warns(UserWarning, match="switched back on"):  # set_adapters(["mine"]) left the patch out
        forgetpatch.applied(pipe)
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["mine"], components=["unet"])
    pipe.unfuse_lora(components=["unet"])
    pipe.delete_adapters(["mine"])
    with pytest.warns(UserWarning, match="scale"):
        assert [(e.name, e.scale) for e in forgetpatch.applied(pipe)] == [("p0", 1.0)]
    expect(toy_base, pipe, {PATCH_ONLY: [patch.delta(PATCH_ONLY)]})
    pipe.set_adapters(["p0"], adapter_weights=[0.25])
    with pytest.warns(UserWarning, match="scale"):
        assert_unet_matches(toy_base, pipe, 500, {PATCH_ONLY: [patch.delta(PATCH_ONLY)]})


@pytest.mark.parametrize("trainable", [False, True])
def test_apply_and_remove_keep_every_requires_grad_and_freeze_the_patch(toy_base, toy_pipe, trainable):
    """peft makes every adapter it activates trainable; the user's LoRA keeps its requires_grad through apply, the
    key-step gate and remove, and a patch's own parameters are never trainable."""
    pipe = toy_pipe
    load_user_lora(pipe)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    for component in (pipe.unet, pipe.text_encoder):
        for name, p in component.named_parameters():
            p.requires_grad_(trainable and "mine" in name)
    def params():
        return [(n, p) for c in (pipe.unet, pipe.text_encoder) for n, p in c.named_parameters()]

    def changed():  # the user's parameters whose requires_grad moved, and any of the patch's that is trainable
        return [n for n, p in params() if p.requires_grad != flags.get(p, False)]

    flags = {p: p.requires_grad for _, p in params()}
    forgetpatch.apply(pipe, make_patch(toy_base, key_steps=EARLY), key_steps=True)
    assert any(".p0." in n for n, _ in params())
    assert changed() == []
    sample, timestep, context = unet_inputs(pipe, 100)
    with torch.no_grad():
        pipe.unet(sample, timestep, encoder_hidden_states=context)  # the gate switches the patch off
        pipe.unet(sample, torch.tensor([900]), encoder_hidden_states=context)  # and on again
    assert changed() == []
    forgetpatch.remove(pipe)
    assert changed() == []


def test_a_fused_patch_comes_off_exactly_after_the_pipeline_changed_dtype():
    """p1 fused in float32, the pipeline converted, p2 fused: taking p2 off gives the converted weights with p1 in,
    bit for bit (p1 is added again in float32, as it was, and rounded once). Random float32 weights: the toy
    model's are float16 values, which round the same either way."""
    made_on = tiny_sd_pipeline()
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"

    def big(paths, seed, name):  # changes as large as the weights
        return build_patch(made_on, factors(made_on, paths, seed, size=0.5), name=name, method="manual",
                           concepts=["cat"])  # fmt: skip

    pipe = tiny_sd_pipeline()
    forgetpatch.apply(pipe, big([f"{attn}.to_k", f"{attn}.to_v"], 1, "p1"), fuse=True)
    pipe.to(torch.float16)
    before = snapshot(pipe)
    forgetpatch.apply(pipe, big([f"{attn}.to_k", f"{attn}.to_q"], 2, "p2"), fuse=True)
    forgetpatch.remove(pipe, "p2")
    assert_same(pipe, before)


def test_a_lora_baked_in_after_a_fused_patch_stays_when_the_patch_comes_off(toy_base, toy_pipe):
    """A fused patch, then the user's LoRA baked in the usual way (``fuse_lora()`` then ``unload_lora_weights()``):
    taking the patch off put back the weights kept from before it, wiping the user's LoRA from every layer the patch
    changes. Now those layers keep it (to float rounding), and layers the patch does not change are untouched."""
    pipe = toy_pipe
    forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, PATCH_ONLY)), fuse=True)
    deltas = load_user_lora(pipe, (SHARED, USER_ONLY))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    forgetpatch.remove(pipe)
    for path in (SHARED, USER_ONLY):
        want = resolve_module(toy_base, path).weight + deltas[path]
        torch.testing.assert_close(resolve_module(pipe, path).weight, want, rtol=0, atol=1e-6)
    assert torch.equal(resolve_module(pipe, PATCH_ONLY).weight, resolve_module(toy_base, PATCH_ONLY).weight)


def test_an_unfused_patch_baked_in_with_the_users_lora_can_be_cleared(toy_base, toy_pipe):
    """``fuse_lora()`` then ``unload_lora_weights()`` bakes every active LoRA in, the patch included: ``applied()``
    said the patch was off, ``remove()`` asked for ``unfuse_lora()`` (which no longer reaches anything), and every
    call, the pipeline's own included, raised from then on. Now the message says it may be baked in, and ``remove()``
    clears it with a warning that its change stays in the weights; the pipeline runs."""
    pipe = toy_pipe
    load_user_lora(pipe, (SHARED, USER_ONLY))
    forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, PATCH_ONLY)))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    with pytest.raises(ApplyError, match="baked into the weights"):
        forgetpatch.applied(pipe)
    with pytest.warns(UserWarning, match="p0 had been merged into the weights .* their change stays in the weights"):
        forgetpatch.remove(pipe)
    assert forgetpatch.applied(pipe) == []
    with torch.no_grad():
        pipe.unet(*unet_inputs(pipe, 500)[:2], encoder_hidden_states=unet_inputs(pipe, 500)[2])


def test_a_fused_apply_that_fails_half_way_leaves_earlier_fused_patches_exact(toy_base, toy_pipe, monkeypatch):
    """A failure while adding a patch to layers that already hold a fused one (out of memory, Ctrl-C) is undone
    there too, not only in the layers it had just set aside."""
    from forgetpatch.loader import core

    pipe = toy_pipe
    forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, PATCH_ONLY)), fuse=True)
    before = snapshot(pipe)
    real, calls = core._add, []

    def failing(patch, path, w, scale):
        if patch.name == "p1":  # p1's additions only (p0's fused weights are also recomputed, to be compared)
            calls.append(path)
            if len(calls) == 2:  # after the shared layer (which holds p0) has been added to
                raise RuntimeError("out of memory")
        return real(patch, path, w, scale)

    monkeypatch.setattr(core, "_add", failing)
    with pytest.raises(ApplyError, match="out of memory"):
        forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, USER_ONLY), seed=1, name="p1"), fuse=True)
    assert calls[0] == SHARED
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p0"]
    assert_same(pipe, before)


# --- threads and components shared between pipelines ---------------------------------------------------------------
def test_a_pipeline_given_another_unet_leaves_the_one_still_sharing_the_patched_unet_working(toy_base, toy_pipe):
    """Two pipelines share a patched UNet; one is given another UNet. The other one, still running the patched
    UNet with the patch live, raised "pipe.unet was replaced" on every call (and the advised remove(pipe) on the
    first did nothing)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = toy_pipe
    forgetpatch.apply(pipe, make_patch(toy_base, (SHARED, PATCH_ONLY)))
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    pipe.unet = copy.deepcopy(toy_base.unet)
    sample, t, context = unet_inputs(i2i, 500)
    with torch.no_grad():
        i2i.unet(sample, t, encoder_hidden_states=context)
    assert [e.name for e in forgetpatch.applied(i2i)] == ["p0"] and forgetpatch.applied(pipe) == []
    forgetpatch.remove(i2i)


def test_the_gate_holds_for_each_step_when_two_threads_run_one_unet():
    """Two pipelines sharing the UNet (different schedulers and step counts) run at once in two threads: at every
    forward of a patched layer the gated patch is on exactly when that call's step is inside its key steps (before,
    the other thread's gate could switch the shared adapters between the switch and the forward)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe1 = tiny_sd_pipeline(0)
    # its own tokenizer: transformers' tokenizers are not thread-safe themselves
    pipe2 = StableDiffusionPipeline(**{**pipe1.components, "tokenizer": copy.deepcopy(pipe1.tokenizer)})
    pipe2.scheduler = EulerDiscreteScheduler.from_config(pipe1.scheduler.config)
    for pipe in (pipe1, pipe2):
        pipe.set_progress_bar_config(disable=True)
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    patch = build_patch(pipe1, factors(pipe1, [path], 3), name="early", method="manual", concepts=["cat"],
                        key_steps=EARLY)  # fmt: skip
    forgetpatch.apply(pipe1, patch, key_steps=True)
    forgetpatch.applied(pipe2)
    local, wrong, checked = threading.local(), [], []

    def step(module, args, kwargs):  # registered after the gate: the fraction of the call that runs now
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        local.fraction = 1 - float(t.flatten()[0] if torch.is_tensor(t) else t) / 1000

    def layer_runs(module, args):
        on = "early" in module.active_adapters
        checked.append(1)
        if on != (local.fraction <= 0.5):
            wrong.append((threading.current_thread().name, round(local.fraction, 3), on))

    pipe1.unet.register_forward_pre_hook(step, with_kwargs=True)
    pipe1.unet.get_submodule(path.removeprefix("unet.")).register_forward_pre_hook(layer_runs)

    def run(pipe, steps):
        pipe("a red circle", num_inference_steps=steps, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0))  # fmt: skip

    for _ in range(6):
        threads = [threading.Thread(target=run, args=(pipe1, 10), name="ddim-10"),
                   threading.Thread(target=run, args=(pipe2, 7), name="euler-7")]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(checked) == 6 * (10 + 7) and wrong == [], wrong[:5]


@pytest.mark.parametrize("fuse", [False, True])
def test_a_text_encoder_shared_with_another_unets_pipeline_is_refused_while_patched_there(fuse):
    """Pipelines sharing the text encoder but not the UNet: a patch on the text encoder through one refuses a patch
    there through the other (before, taking one off took the other's change out too while ``applied()`` listed it,
    or left the shared weight changed); a patch of the other UNet alone is fine, and all comes off exactly."""
    from diffusers import StableDiffusionPipeline

    pipe_a = tiny_sd_pipeline(0)
    pipe_b = StableDiffusionPipeline(**{**pipe_a.components, "unet": copy.deepcopy(pipe_a.unet)})
    before = {k: v.clone() for k, v in pipe_a.text_encoder.state_dict().items()}
    forgetpatch.apply(pipe_a, make_patch(pipe_a, (SHARED, TEXT), name="a"), fuse=fuse)
    with pytest.raises(ApplyError, match="text_encoder is shared"):
        forgetpatch.apply(pipe_b, make_patch(pipe_b, (SHARED, TEXT), seed=1, name="b"), fuse=fuse)
    assert forgetpatch.applied(pipe_b) == []
    forgetpatch.apply(pipe_b, make_patch(pipe_b, (SHARED,), seed=1, name="b"), fuse=fuse)
    forgetpatch.remove(pipe_a)
    forgetpatch.remove(pipe_b)
    after = pipe_a.text_encoder.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_unet_call_interrupted_by_the_user_does_not_keep_other_threads_waiting():
    """Ctrl-C in a gated UNet call (torch runs no hook after a KeyboardInterrupt): the next call of that thread drops
    the stale hold, and another thread's call then runs instead of waiting for ever."""
    pipe = tiny_sd_pipeline(0)
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    patch = build_patch(pipe, factors(pipe, [path], 3), name="early", method="manual", concepts=["cat"],
                        key_steps=EARLY)  # fmt: skip
    forgetpatch.apply(pipe, patch, key_steps=True)
    sample, timestep, context = unet_inputs(pipe, 100)
    interrupt = [True]

    def ctrl_c(module, args, kwargs):
        if interrupt:
            interrupt.clear()
            raise KeyboardInterrupt

    pipe.unet.register_forward_pre_hook(ctrl_c, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        pipe.unet(sample, timestep, encoder_hidden_states=context)
    with torch.no_grad():
        pipe.unet(sample, timestep, encoder_hidden_states=context)  # this thread again: its stale hold is dropped
    done = []
    other = threading.Thread(target=lambda: done.append(pipe.unet(sample, timestep, encoder_hidden_states=context)),
                             daemon=True)  # fmt: skip
    other.start()
    other.join(timeout=20)
    assert done, "another thread's call waited for a hold no call would release"
