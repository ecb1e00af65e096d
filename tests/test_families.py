"""Pipeline families: the loader on SD3 (``StableDiffusion3Pipeline``) and FLUX (``FluxPipeline``).

Tiny random-weight pipelines built offline (``forgetpatch.testing``), the published SD3-medium / FLUX.1-dev
transformer configs (on ``meta``), key-step gating on flow-matching schedulers, a user's own LoRA beside
patches, and patches of the wrong family refused.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import forgetpatch
from forgetpatch.errors import ApplyError, FamilyMismatchError, MissingModuleError
from forgetpatch.format import KeyStepRange, build_patch, detect_family, read_patch, resolve_module
from forgetpatch.loader import unpatched
from forgetpatch.testing import (
    published_transformer,
    t5_tokenizer,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
JOINT = "transformer.transformer_blocks.0.attn"
#: Transformer attention projections (image and text streams; FLUX also a single-stream block).
PATHS = {
    "sd3": [f"{JOINT}.to_q", f"{JOINT}.to_v", f"{JOINT}.add_k_proj", "transformer.transformer_blocks.1.attn.to_out.0"],
    "flux": [f"{JOINT}.to_k", f"{JOINT}.add_v_proj", "transformer.single_transformer_blocks.0.attn.to_q",
             "transformer.single_transformer_blocks.1.attn.to_v"],
}  # fmt: skip
TEXT = {"sd3": "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        "flux": "text_encoder.encoder.layers.1.self_attn.v_proj"}  # fmt: skip
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def make_patch(pipe, paths, *, seed=0, name=None, size=0.3, key_steps=None):
    """A patch of known random rank-2 deltas on ``paths``."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        w = resolve_module(pipe, path).weight
        factors[path] = (
            size * torch.randn(2, w[0].numel(), generator=g),
            torch.randn(w.shape[0], 2, generator=g),
        )
    return build_patch(pipe, factors, name=name or f"p{seed}", method="manual", concepts=["cat"],
                       key_steps=key_steps, lineage=[])  # fmt: skip


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for component in COMPONENTS:
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


def generate(pipe, steps=2) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=steps, height=32, width=32, output_type="np", generator=g,
                max_sequence_length=16).images[0]  # fmt: skip


@pytest.fixture(params=["sd3", "flux"])
def family(request) -> str:
    return request.param


@pytest.fixture
def pipe(family):
    p = BUILDERS[family](seed=0)
    p.set_progress_bar_config(disable=True)
    return p


# --- the pipelines ---------------------------------------------------------------------------
def test_tiny_pipelines_are_real_and_fast(family):
    start = time.perf_counter()
    pipe = BUILDERS[family](seed=0)
    pipe.set_progress_bar_config(disable=True)
    built = time.perf_counter() - start
    image = generate(pipe)
    took = time.perf_counter() - start
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert detect_family(pipe) == family
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert built < 3 and took < 6, f"build {built:.2f} s, build + 2-step generation {took:.2f} s"
    # same seed, same weights; another seed, other weights
    again = BUILDERS[family](seed=0)
    w = resolve_module(pipe, PATHS[family][0]).weight
    assert torch.equal(resolve_module(again, PATHS[family][0]).weight, w)
    assert not torch.equal(resolve_module(BUILDERS[family](seed=1), PATHS[family][0]).weight, w)


def test_t5_tokenizer_stand_in():
    tok = t5_tokenizer()
    assert tok.tokenize("a red circle") == ["\u2581a", "\u2581red", "\u2581circle"]
    ids = tok("a red xq", padding="max_length", max_length=10).input_ids
    assert ids[:2] == tok.convert_tokens_to_ids(["\u2581a", "\u2581red"])
    end = ids.index(tok.eos_token_id)  # "</s>" once, after the text, then padding
    assert ids[end + 1 :] == [tok.pad_token_id] * (9 - end) and ids.count(tok.eos_token_id) == 1
    assert tok.unk_token_id not in ids  # unknown words are spelled by characters
    assert tok.batch_decode([tok("a red xq").input_ids], skip_special_tokens=True) == ["a red xq"]


@pytest.mark.parametrize(
    ("name", "params", "to_q"),
    [("sd3", 2.028e9, (1536, 1536)), ("flux", 11.901e9, (3072, 3072))],
)
def test_published_transformers_on_meta(name, params, to_q):
    model = published_transformer(name, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    assert tuple(model.transformer_blocks[0].attn.to_q.weight.shape) == to_q
    # every module the tiny pipeline's tests patch exists, by name, in the published architecture
    names = {n for n, _ in model.named_modules()}
    assert {p.removeprefix("transformer.") for p in PATHS[name]} <= names
    assert len(model.transformer_blocks) == {"sd3": 24, "flux": 19}[name]


@pytest.mark.bigmodel
@pytest.mark.skipif(
    not os.environ.get("FORGETPATCH_BIGMODEL"), reason="allocates ~8 GB: set FORGETPATCH_BIGMODEL=1"
)
def test_full_size_sd3_transformer_apply_remove():
    tiny = tiny_sd3_pipeline()
    transformer = published_transformer("sd3")
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**{**tiny.components, "transformer": transformer})
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    paths = [
        f"transformer.{n}"
        for n, _ in transformer.named_modules()
        if n.endswith(("attn.add_k_proj", "attn.to_k"))
    ]
    forgetpatch.apply(pipe, make_patch(pipe, paths, size=0.01))
    assert len(paths) == 48 and len(forgetpatch.applied(pipe)) == 1
    forgetpatch.remove(pipe)
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


# --- apply / stack / remove ------------------------------------------------------------------
def test_apply_changes_output_and_remove_is_exact(family, pipe):
    before, base = snapshot(pipe), generate(pipe)
    patch = make_patch(pipe, PATHS[family] + [TEXT[family]])
    forgetpatch.apply(pipe, patch)
    assert [(e.name, e.fused, e.scale) for e in forgetpatch.applied(pipe)] == [("p0", False, 1.0)]
    assert patch.manifest.base_model.family == family
    assert not np.array_equal(generate(pipe), base)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)
    np.testing.assert_array_equal(generate(pipe), base)


def test_plain_diffusers_load_equals_forgetpatch_apply(family, pipe, tmp_path):
    folder = make_patch(pipe, PATHS[family] + [TEXT[family]]).save(tmp_path / "p")
    forgetpatch.apply(pipe, read_patch(folder))
    ours = generate(pipe)
    forgetpatch.remove(pipe)
    pipe.load_lora_weights(str(folder))  # plain diffusers (SD3LoraLoaderMixin / FluxLoraLoaderMixin)
    np.testing.assert_allclose(generate(pipe), ours, atol=1e-6, rtol=0)


def test_stack_scale_fuse_and_remove_exactly(family, pipe):
    before = snapshot(pipe)
    p0, p1, p2 = (make_patch(pipe, PATHS[family], seed=s) for s in range(3))
    forgetpatch.apply(pipe, [p0, p1])
    forgetpatch.apply(pipe, p2, scale=0.5)
    assert [(e.name, e.scale) for e in forgetpatch.applied(pipe)] == [("p0", 1.0), ("p1", 1.0), ("p2", 0.5)]
    unfused = generate(pipe)
    forgetpatch.remove(pipe, ["p1", p0])
    assert [e.name for e in forgetpatch.applied(pipe)] == ["p2"]
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)
    # fused: the weight is base + the deltas (p2 at half); unfused patches stacked on top still work
    forgetpatch.apply(pipe, [p0, p1], fuse=True)
    forgetpatch.apply(pipe, p2, scale=0.5)
    path = PATHS[family][0]
    expected = before[f"{path}.weight"] + p0.delta(path) + p1.delta(path)
    torch.testing.assert_close(resolve_module(pipe, path).weight, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(generate(pipe), unfused, atol=1e-4, rtol=0)
    forgetpatch.remove(pipe, "p0")
    torch.testing.assert_close(resolve_module(pipe, path).weight, before[f"{path}.weight"] + p1.delta(path),
                               atol=1e-5, rtol=0)  # fmt: skip
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


def test_unpatched_copy(family, pipe):
    base = generate(pipe)
    forgetpatch.apply(pipe, make_patch(pipe, PATHS[family]))
    copy = unpatched(pipe)
    assert forgetpatch.applied(copy) == [] and len(forgetpatch.applied(pipe)) == 1
    np.testing.assert_array_equal(generate(copy), base)


# --- key steps on flow-matching schedulers ---------------------------------------------------
def _record(pipe, layer_path):
    """Record, per transformer call, the scheduler's sigma and the adapters active on ``layer_path``."""
    component, _, rest = layer_path.partition(".")
    layer = getattr(pipe, component).get_submodule(rest)
    calls = []

    def hook(module, args, kwargs):  # registered after forgetpatch's gate, so it sees the gate's choice
        sched = pipe.scheduler
        index = sched.step_index if sched.step_index is not None else 0
        calls.append((float(sched.sigmas[index]), tuple(layer.active_adapters)))

    return pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True), calls


def test_manifest_records_the_sigma_convention(family, pipe, tmp_path):
    patch = make_patch(pipe, PATHS[family], key_steps=[{"start": 0.0, "end": 0.3}])
    (r,) = read_patch(patch.save(tmp_path / "p")).manifest.key_steps
    assert (r.convention, r.scheduler) == ("sigma", "FlowMatchEulerDiscreteScheduler")
    assert r.identity()["convention"] == "sigma"
    # on a DDPM-style pipeline ranges stay "timestep", and the digest hashes them as before conventions existed
    sd = make_patch(tiny_sd_pipeline(), ["unet.conv_in"], key_steps=[KeyStepRange(start=0.0, end=0.3)])
    assert (
        sd.manifest.key_steps[0].convention == "timestep"
        and "convention" not in sd.manifest.key_steps[0].identity()
    )
    timestep = make_patch(
        pipe, PATHS[family], key_steps=[{"start": 0.0, "end": 0.3, "convention": "timestep"}]
    )
    assert timestep.digest != patch.digest  # same factors, another convention: another patch


def test_key_step_gating_reads_sigmas(family, pipe):
    base = generate(pipe, steps=4)
    early = make_patch(pipe, PATHS[family], key_steps=[{"start": 0.0, "end": 0.3}], name="early")
    forgetpatch.apply(pipe, early, key_steps=True)
    handle, calls = _record(pipe, PATHS[family][0])
    gated = generate(pipe, steps=4)
    handle.remove()
    # on exactly the calls at noise level 1 - sigma in [0, 0.3], i.e. sigma >= 0.7 (after the scheduler's shift)
    assert len(calls) == 4  # one call per step (SD3 batches CFG; FLUX-dev has none)
    expected = [("early",) if 1 - sigma <= 0.3 + 1e-6 else () for sigma, _ in calls]
    assert [names for _, names in calls] == expected
    sigmas = sorted({sigma for sigma, _ in calls}, reverse=True)
    on = [s for s in sigmas if 1 - s <= 0.3]
    # a noise-level range, not a step-index one: step-index fraction i / (N - 1) <= 0.3 would be step 0 only
    assert len(on) == 2, sigmas
    assert not np.array_equal(gated, base)
    forgetpatch.remove(pipe)
    # a range containing every step == always on; one containing none == the base model
    everywhere = make_patch(pipe, PATHS[family], key_steps=[{"start": 0.0, "end": 1.0}], name="all")
    forgetpatch.apply(pipe, everywhere)
    always = generate(pipe, steps=4)
    forgetpatch.remove(pipe)
    forgetpatch.apply(pipe, everywhere, key_steps=True)
    np.testing.assert_array_equal(generate(pipe, steps=4), always)
    forgetpatch.remove(pipe)
    # (the first step is at sigma = 1, fraction 0.0: "nowhere" lies between steps)
    nowhere = make_patch(pipe, PATHS[family], key_steps=[{"start": 0.05, "end": 0.1}], name="none")
    forgetpatch.apply(pipe, nowhere, key_steps=True)
    np.testing.assert_array_equal(generate(pipe, steps=4), base)
    forgetpatch.remove(pipe)


def test_key_step_convention_mismatch_refused(family, pipe):
    before = snapshot(pipe)
    ddpm = make_patch(pipe, PATHS[family], key_steps=[{"start": 0.0, "end": 0.3, "convention": "timestep"}])
    with pytest.raises(ApplyError, match="'timestep' convention.*key_steps=True"):
        forgetpatch.apply(pipe, ddpm, key_steps=True)
    assert_unchanged(pipe, before)
    forgetpatch.apply(pipe, ddpm)  # not gated: always on
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)


# --- beside the user's own LoRA ----------------------------------------------------------------
def _user_lora(pipe, family) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    out = {}
    for path in (f"{JOINT}.to_q", f"{JOINT}.to_k"):  # overlaps the patch's layers
        w = resolve_module(pipe, path).weight
        out[f"{path}.lora_A.weight"] = 0.3 * torch.randn(4, w.shape[1], generator=g)
        out[f"{path}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g)
    return out


def test_user_lora_stays_as_it_is(family, pipe):
    pipe.load_lora_weights(_user_lora(pipe, family), adapter_name="mine")
    mine = generate(pipe, steps=4)
    layer = pipe.transformer.get_submodule(f"{JOINT.removeprefix('transformer.')}.to_q")
    user_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if ".mine" in k}
    patch = make_patch(pipe, PATHS[family], key_steps=[{"start": 0.0, "end": 0.3}], name="early")
    forgetpatch.apply(pipe, patch, key_steps=True)
    handle, calls = _record(pipe, PATHS[family][0])  # a layer carrying both
    assert not np.array_equal(generate(pipe, steps=4), mine)
    handle.remove()
    # the gate switches only forgetpatch's adapter: the user's stays on at every step
    assert all("mine" in names for _, names in calls)
    assert {("early" in names) for _, names in calls} == {True, False}
    forgetpatch.remove(pipe)
    assert layer.active_adapters == ["mine"] and pipe.get_list_adapters() == {"transformer": ["mine"]}
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in user_weights.items())
    np.testing.assert_array_equal(generate(pipe, steps=4), mine)


# --- the wrong family ------------------------------------------------------------------------------
def test_wrong_family_refused_before_anything_changes(family, pipe):
    sd = tiny_sd_pipeline()
    sd_patch = make_patch(
        sd, ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"], name="sd15"
    )
    before = snapshot(pipe)
    with pytest.raises(FamilyMismatchError, match="UNet model.*family it was made for") as info:
        forgetpatch.apply(pipe, [make_patch(pipe, PATHS[family]), sd_patch])
    assert isinstance(info.value, MissingModuleError)  # an ApplyError callers already catch
    assert_unchanged(pipe, before)
    # the reverse: a transformer patch on an SD 1.x pipeline
    sd_before = snapshot(sd)
    with pytest.raises(FamilyMismatchError, match=f"made for {'SD3' if family == 'sd3' else 'FLUX'}"):
        forgetpatch.apply(sd, make_patch(pipe, PATHS[family]))
    assert_unchanged(sd, sd_before)
    # SD3 <-> FLUX: the same module name and shape exists in both tiny transformers, the family tells them apart
    other = "flux" if family == "sd3" else "sd3"
    other_pipe = BUILDERS[other](seed=0)
    shared = f"{JOINT}.to_q"
    assert resolve_module(other_pipe, shared).weight.shape == resolve_module(pipe, shared).weight.shape
    with pytest.raises(FamilyMismatchError, match=f"family '{other}'"):
        forgetpatch.apply(pipe, make_patch(other_pipe, [shared]))
    assert_unchanged(pipe, before)


def test_component_the_lora_loader_cannot_load(pipe, family):
    # FLUX's load_lora_weights does not load into its T5 (text_encoder_2), SD3's not into text_encoder_3
    t5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}[
        family
    ] + ".encoder.block.0.layer.0.SelfAttention.q"
    before, base = snapshot(pipe), generate(pipe)
    patch = make_patch(pipe, [t5])
    with pytest.raises(ApplyError, match="fuse=True"):
        forgetpatch.apply(pipe, patch)
    assert_unchanged(pipe, before)
    forgetpatch.apply(pipe, patch, fuse=True)
    assert not np.array_equal(generate(pipe), base)
    forgetpatch.remove(pipe)
    assert_unchanged(pipe, before)
