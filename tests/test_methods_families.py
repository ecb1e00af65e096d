"""Erasure on SD3 and FLUX: UCE's closed form on the text-side projections, ESD / KSCU with flow matching."""

from __future__ import annotations

import re

import pytest
import torch

import forgetpatch
from forgetpatch.errors import FamilyMismatchError, MethodError
from forgetpatch.methods import Concept, flow, joint
from forgetpatch.methods.closed_form import current_weight
from forgetpatch.methods.uce import UCE
from forgetpatch.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

FAMILIES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
FAST = dict(iterations=2, lr=1e-2, num_inference_steps=4, latent_size=4, rank=2, progress=False)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipe(request):
    return FAMILIES[request.param](seed=0)


def rows(pipe, erase, guides, preserve, tokens="last"):
    prompts, pairs, kept = joint.row_sets(pipe, erase, guides, preserve, tokens=tokens, templates=())
    return prompts, pairs, kept


def reference_weight(W, C, G, P, lam):
    """UCE's formula written term by term in float64."""
    W = W.double()
    left = lam * W + (W @ G.T) @ C + (W @ P.T) @ P
    right = lam * torch.eye(W.shape[1], dtype=torch.float64) + C.T @ C + P.T @ P
    return left @ torch.linalg.inv(right)


def test_embedder_edit_is_uce_on_the_text_rows_and_maps_concept_to_guide(pipe):
    """context="embedder": the one layer linear in the prompt; concept rows map onto the guide's, kept rows stay."""
    prompts, pairs, kept = rows(pipe, ["circle", "star"], ["", "square"], ["ellipse"])
    hidden, _ = joint.encode(pipe, prompts)
    emb = joint.gather(hidden, pairs, kept)
    deltas = UCE.compute_deltas(
        pipe, [Concept("circle"), Concept("star", guide="square")], preserve=[Concept("ellipse")],
        lam=0.01, tokens="last", progress=False,
    )
    assert list(deltas) == ["transformer.context_embedder"]
    W = current_weight(pipe.transformer.context_embedder).double()
    delta = deltas["transformer.context_embedder"].double()
    expected = reference_weight(W, emb.erase, emb.guide, emb.preserve, 0.01) - W
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    moved = [c for c, g in zip(emb.erase, emb.guide, strict=True) if not torch.allclose(c, g)]
    assert moved
    for c, g in zip(emb.erase, emb.guide, strict=True):
        before, after = (W @ c - W @ g).norm(), ((W + delta) @ c - W @ g).norm()
        assert after <= 0.05 * before + 1e-6
    for p in emb.preserve:
        assert (delta @ p).norm() < 0.05 * (W @ p).norm()


def test_joint_edit_maps_each_blocks_captured_context_and_block0_is_noise_free(pipe):
    """context="joint": add_k/add_v of every joint block, solved on the rows each receives; block 0's rows depend on
    the text and the timestep only (exact), later blocks' on the noisy image too (least squares over samples)."""
    settings = dict(lam=0.01, tokens="last", context="joint", joint_sigmas=2, latent_size=4, progress=False)
    deltas = UCE.compute_deltas(pipe, [Concept("circle")], preserve=[Concept("ellipse")], **settings)
    layers = joint.context_layers(pipe, "joint")
    assert set(deltas) == set(layers) and all(p.endswith(("add_k_proj", "add_v_proj")) for p in deltas)
    prompts, pairs, kept = rows(pipe, ["circle"], [""], ["ellipse"])
    sigmas = joint.joint_sigmas(pipe, 2, 4)
    seen = joint.layer_inputs(pipe, prompts, list(layers), sigmas, seed=0, latent_size=4)
    for path, W in ((p, current_weight(m).double()) for p, m in layers.items()):
        for states in seen[path]:
            emb = joint.gather(states, pairs, kept)
            delta = deltas[path].double()
            gap = (emb.erase @ W.T - emb.guide @ W.T).norm()
            left = (emb.erase @ (W + delta).T - emb.guide @ W.T).norm()
            assert left < 0.05 * gap, path
            assert (emb.preserve @ delta.T).norm() < 0.05 * (emb.preserve @ W.T).norm(), path
    other = joint.layer_inputs(pipe, prompts, list(layers), sigmas[:1], seed=7, latent_size=4)
    first = [p for p in layers if ".transformer_blocks.0." in p]
    later = [p for p in layers if ".transformer_blocks.1." in p]
    for path in first:
        torch.testing.assert_close(other[path][0], seen[path][0], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(other[p][0], seen[p][0], atol=1e-4) for p in later)


def test_uce_patch_records_the_edit_loads_changes_output_and_removes_exactly(pipe):
    patch = forgetpatch.erase(pipe, ["circle"], method="uce", preserve=["ellipse"], progress=False)
    m = patch.manifest
    assert m.base_model.family == flow.family(pipe)
    assert m.lora.target_modules == ["transformer.context_embedder"]
    assert m.method.params["context"] == "embedder" and "context_embedder" in m.method.params["edited"]
    assert m.lora.reconstruction_error < 1e-5
    W = pipe.transformer.context_embedder.weight.detach().clone()

    def image():
        out = pipe("a circle", num_inference_steps=2, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return torch.as_tensor(out.images)

    before = image()
    forgetpatch.apply(pipe, patch)
    try:
        layer = pipe.transformer.context_embedder  # a peft wrapper now (unfused)
        torch.testing.assert_close(current_weight(layer), W + patch.delta("transformer.context_embedder"))
        assert not torch.allclose(image(), before)
    finally:
        forgetpatch.remove(pipe)
    assert torch.equal(pipe.transformer.context_embedder.weight, W)
    assert torch.equal(image(), before)


def test_esd_on_flow_matching_makes_a_transformer_patch_that_applies_and_removes(pipe):
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    patch = forgetpatch.erase(pipe, "circle", method="esd", variant="x", **FAST)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    m = patch.manifest
    assert m.base_model.family == flow.family(pipe)
    assert m.lora.target_modules and all(t.startswith("transformer.") and ".attn." in t for t in m.lora.target_modules)
    assert m.metrics["training"]["unet_passes"]["backward"] == 2
    x = torch.randn(flow.latent_shape(pipe.transformer, 4, 1), generator=torch.Generator().manual_seed(1))
    cond = flow.encode_prompt(pipe, "circle")

    def velocity():
        kwargs = flow.transformer_kwargs(pipe.transformer, x, 600.0, cond, 4, 3.0)
        with torch.no_grad():
            return pipe.transformer(**kwargs)[0]

    base = velocity()
    forgetpatch.apply(pipe, patch)
    try:
        assert not torch.allclose(velocity(), base)
    finally:
        forgetpatch.remove(pipe)
    assert torch.equal(velocity(), base)


def test_the_engine_asks_the_family_one_way(pipe):
    """The engine's scope and its family come from the same table: a transformer's scope is flow's, a UNet's is not."""
    from forgetpatch.methods.finetune import scope_modules

    assert flow.denoiser_family(pipe.transformer) == flow.family(pipe) in ("sd3", "flux")
    assert scope_modules(pipe.transformer, "xattn") == flow.scope_modules(pipe.transformer, "xattn")
    both = scope_modules(pipe.transformer, "all")  # the joint attention and every other layer
    assert both == flow.scope_modules(pipe.transformer, "xattn") + flow.scope_modules(pipe.transformer, "noxattn")
    assert len(set(both)) == len(both)
    unet = tiny_sd_pipeline().unet
    assert flow.denoiser_family(unet) is None and all(".attn2." in n for n in scope_modules(unet, "xattn"))


def test_kscu_on_flux_records_its_range_in_sigmas():
    pipe = tiny_flux_pipeline(seed=0)
    patch = forgetpatch.erase(pipe, "circle", method="kscu", start_step=2, **FAST)
    (keys,) = patch.manifest.key_steps
    info = patch.manifest.metrics["key_steps"]
    trajectory = flow.schedule(pipe, 4, 4)
    assert keys.scheduler == "FlowMatchEulerDiscreteScheduler" and info["convention"] == flow.KEY_STEP_CONVENTION
    assert keys.timesteps == [round(t) for t in trajectory.timesteps[2:]]
    assert info["trained_sigmas"] == [round(s, 6) for s in trajectory.sigmas[2:4]]
    assert keys.start == pytest.approx(1 - trajectory.sigmas[2], abs=1e-3) and keys.end == 1.0


def test_wrong_settings_and_wrong_family_are_refused():
    sd3, flux, sd = tiny_sd3_pipeline(0), tiny_flux_pipeline(0), tiny_sd_pipeline(0)
    with pytest.raises(MethodError, match="context"):
        UCE.compute_deltas(sd3, [Concept("circle")], context="everywhere")
    with pytest.raises(MethodError, match="SD3 and FLUX"):
        UCE.compute_deltas(sd, [Concept("circle")], context="joint")
    with pytest.raises(MethodError, match="robust"):
        UCE.compute_deltas(flux, [Concept("circle")], context="joint", robust=1)
    patch = forgetpatch.erase(sd3, ["circle"], method="uce", progress=False)
    for other in (flux, sd):
        with pytest.raises(FamilyMismatchError):
            forgetpatch.apply(other, patch)
    with pytest.raises(FamilyMismatchError):
        forgetpatch.apply(sd3, forgetpatch.erase(sd, ["circle"], method="uce", progress=False))


DM_SHORT = {"steps": 12, "epochs": 3, "warmup": 3, "update_every": 4, "images": 4, "num_inference_steps": 4,
            "batch": 2, "lr": 3e-3, "latent_size": 4, "progress": False}


def test_dynamic_mask_trains_masked_joint_attention_with_the_flow_objective(pipe):
    """Dynamic Mask on SD3 / FLUX: the joint attention's projections under the element-wise mask, trained on latents
    the pipeline generates, noised along the flow line with the velocity as the denoising target; its patch applies
    and comes off exactly."""
    from types import SimpleNamespace

    from forgetpatch.methods.dynamic_mask import DynamicMask, _noised

    circle = Concept("circle", superclass="shape")
    deltas = DynamicMask.compute_deltas(pipe, [circle], **{**DM_SHORT, "turnover": 0.0, "keep": 0.25})
    assert deltas and all(re.fullmatch(flow.JOINT_ATTENTION_REGEX, p.removeprefix("transformer.")) for p in deltas)
    for path, delta in deltas.items():
        assert 0 < float((delta != 0).float().mean()) <= 0.25 + 1e-6, path
    # the convention: one Euler step x_t + (0 - sigma) v of the target velocity lands on the clean latents
    engine = SimpleNamespace(flow=flow.family(pipe), device="cpu", unet=SimpleNamespace(dtype=torch.float32))
    clean = torch.randn(flow.latent_shape(pipe.transformer, 4, 2), generator=torch.Generator().manual_seed(3))
    x_t, velocity = _noised(engine, clean, 700.0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(x_t - 0.7 * velocity, clean, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_t, clean)

    patch = forgetpatch.erase(pipe, [circle], method="dynamic_mask", **DM_SHORT)
    assert patch.manifest.base_model.family == flow.family(pipe)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    forgetpatch.apply(pipe, patch)
    forgetpatch.remove(pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())


def test_uce_holds_what_an_applied_patch_erased_with_its_own_weight(pipe):
    """On a pipeline carrying a circle patch, UCE on ``context_embedder`` keeps the circle's rows with weight
    ``s_h`` (its term in the closed form, written out), as on a UNet."""
    forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["circle"], method="uce", paper=True, progress=False))
    try:
        W = current_weight(pipe.transformer.context_embedder).double()
        deltas = UCE.compute_deltas(
            pipe, [Concept("star")], preserve=[Concept("ellipse"), Concept("circle")],
            lam=0.1, tokens="last", hold_scale=7.0, progress=False,
        )
        emb, _ = joint.embed_rows(
            pipe, erase=["star"], guides=[""], preserve=["ellipse"], held=["circle"], tokens="last", templates=()
        )
        assert emb.held is not None and emb.held.shape == emb.preserve.shape  # a row per text segment
        P = torch.cat([emb.preserve, 7.0**0.5 * emb.held])
        expected = reference_weight(W, emb.erase, emb.guide, P, 0.1) - W
        delta = deltas["transformer.context_embedder"].double()
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    finally:
        forgetpatch.remove(pipe)
