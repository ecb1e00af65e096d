"""Export to kohya format: key names, alpha, and the numerical round trip through diffusers' own loader."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_hub import MODULES, make_patch
from typer.testing import CliRunner

from forgetpatch.errors import PatchFormatError
from forgetpatch.format import WEIGHTS_NAME, Patch
from forgetpatch.hub import export_kohya, kohya_name
from forgetpatch.testing import tiny_sd_pipeline

SCALES = {"to_k": 2.0, "to_v": 0.5, "conv1": 3.0}  # alpha / rank per module, deliberately not 1


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=1)


@pytest.fixture(scope="module")
def patch(pipe) -> Patch:
    """A patch whose modules have alpha != rank (a global alpha and a per-module alpha_pattern)."""
    base = make_patch(pipe, rank=3)
    scale = {m: next(v for k, v in SCALES.items() if m.endswith(k)) for m in MODULES}
    alpha_pattern = {m: s * 3 for m, s in scale.items() if s != SCALES["to_k"]}
    lora = base.manifest.lora.model_copy(update={"alpha": SCALES["to_k"] * 3, "alpha_pattern": alpha_pattern})
    scaled = Patch(base.manifest.model_copy(update={"lora": lora}), base.state_dict)
    assert {m: scaled.scale_of(m) for m in MODULES} == scale
    return scaled


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {m: pipe.unet.get_submodule(m.removeprefix("unet.")).weight.detach().clone() for m in MODULES}


def _fused_change(pipe, file) -> dict[str, torch.Tensor]:
    """Load ``file`` with diffusers' ``load_lora_weights``, fuse it, and return each module's weight change."""
    before = _weights(pipe)
    pipe.load_lora_weights(str(file), adapter_name="x")
    try:
        pipe.fuse_lora(adapter_names=["x"])
        after = _weights(pipe)
        pipe.unfuse_lora()
    finally:
        pipe.unload_lora_weights()
    assert all(torch.allclose(w, before[m], atol=1e-6) for m, w in _weights(pipe).items())
    return {m: after[m] - before[m] for m in MODULES}


def test_kohya_keys_and_alpha(patch, tmp_path):
    out = export_kohya(patch, tmp_path / "k.safetensors")
    tensors = load_file(out)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == name
    assert set(tensors) == {
        f"{kohya_name(m)}.{suffix}"
        for m in MODULES
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    for module in MODULES:
        a, b = patch.factors()[module]
        k = kohya_name(module)
        assert tensors[f"{k}.alpha"].item() == a.shape[0]  # alpha = rank: tools that ignore alpha agree
        assert torch.equal(tensors[f"{k}.lora_down.weight"], a)
        torch.testing.assert_close(tensors[f"{k}.lora_up.weight"], b * patch.scale_of(module))
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "3"
    assert '"name":"no-vangogh"' in meta["forgetpatch_source_manifest"].replace(" ", "")


def test_kohya_round_trip_through_diffusers_matches_patch(pipe, patch, tmp_path):
    kohya = export_kohya(patch, tmp_path / "no-vangogh.safetensors")
    changes = _fused_change(pipe, kohya)  # diffusers detects kohya keys and converts them itself
    for module in MODULES:
        torch.testing.assert_close(changes[module], patch.delta(module), rtol=1e-4, atol=1e-6)

    # the patch's own file, loaded by plain diffusers as in the model card, has the same effect
    folder = patch.save(tmp_path / "folder")
    plain = _fused_change(pipe, folder / WEIGHTS_NAME)
    for module in MODULES:
        torch.testing.assert_close(plain[module], changes[module], rtol=1e-4, atol=1e-6)


def test_kohya_names_for_text_encoders():
    assert kohya_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert kohya_name("text_encoder.text_model.encoder.layers.0.mlp.fc1", two_text_encoders=True) == (
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    )
    assert kohya_name("text_encoder_2.text_model.encoder.layers.3.mlp.fc2").startswith("lora_te2_text_model")
    with pytest.raises(PatchFormatError, match="vae"):
        kohya_name("vae.decoder.conv_in")


def test_cli_export(patch, tmp_path):
    from forgetpatch.cli import app

    folder = patch.save(tmp_path / "p")
    out = tmp_path / "out" / "k.safetensors"
    result = CliRunner().invoke(app, ["export", str(folder), "--format", "kohya", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_file(out).keys() == load_file(export_kohya(folder, tmp_path / "again.safetensors")).keys()

    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "-o", str(out)])
    assert result.exit_code == 1 and "no patch at" in result.output


def test_a_patch_of_mixed_ranks_exports_at_one_rank_with_the_same_effect(pipe, tmp_path):
    """Modules of ranks 2, 3 and 5 (as ScaPre and the fine-tuning methods make): diffusers' kohya reader keeps one
    alpha per file and scaled the modules of other ranks wrongly (15% off on a ScaPre patch). The export pads every
    module to the largest rank with zeros, and diffusers' load of it equals the patch."""
    from forgetpatch.format import build_patch

    g = torch.Generator().manual_seed(3)
    factors = {path: (torch.randn(r, n_in, generator=g) * 0.1, torch.randn(n_out, r, generator=g) * 0.1)
               for (path, (n_out, n_in)), r in zip(MODULES.items(), (2, 3, 5), strict=True)}  # fmt: skip
    patch = build_patch(pipe, factors, name="mixed", method="scapre", concepts=["cat"], lineage=[])
    assert sorted({a.shape[0] for a, _ in patch.factors().values()}) == [2, 3, 5]
    tensors = load_file(export_kohya(patch, tmp_path / "mixed.safetensors"))
    assert {tensors[f"{kohya_name(m)}.lora_down.weight"].shape[0] for m in MODULES} == {5}
    assert {tensors[f"{kohya_name(m)}.alpha"].item() for m in MODULES} == {5.0}
    changes = _fused_change(pipe, tmp_path / "mixed.safetensors")
    for module in MODULES:
        torch.testing.assert_close(changes[module], patch.delta(module), rtol=1e-4, atol=1e-6)


def test_modules_diffusers_kohya_reader_drops_are_refused():
    """SDXL's add_embedding has no kohya name diffusers maps back: its reader logged 'unexpected keys' and loaded
    the rest, a partial patch. The export refuses it and says to load the patch folder."""
    from forgetpatch.format import build_patch
    from forgetpatch.testing import tiny_sdxl_pipeline

    sdxl = tiny_sdxl_pipeline()
    path = next(f"unet.{n}" for n, m in sdxl.unet.named_modules() if n.startswith("add_embedding.")
                and isinstance(m, torch.nn.Linear))  # fmt: skip
    w = sdxl.unet.get_submodule(path.removeprefix("unet.")).weight
    patch = build_patch(sdxl, {path: (torch.ones(1, w.shape[1]), torch.ones(w.shape[0], 1))}, name="x", method="esd",
                        concepts=["cat"], lineage=[])  # fmt: skip
    with pytest.raises(PatchFormatError, match="add_embedding.*load the patch folder"):
        export_kohya(patch, "/tmp/never-written.safetensors")


def test_a_patch_with_key_steps_exports_with_a_warning_that_the_file_acts_at_every_step(pipe, tmp_path):
    """A1111, ComfyUI and load_lora_weights cannot gate a LoRA to steps: the export used to drop a KSCU patch's key
    steps silently; it says so, and how to keep them."""
    from forgetpatch.format import build_patch

    base = make_patch(pipe, rank=3)
    patch = build_patch(pipe, base.factors(), name="gated", method="kscu", concepts=["cat"], lineage=[],
                        key_steps=[{"start": 0.0, "end": 0.5, "convention": "timestep"}])  # fmt: skip
    with pytest.warns(UserWarning, match=r"key steps \(0-0.5 .*acts at every step.*key_steps=True"):
        export_kohya(patch, tmp_path / "gated.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a patch without key steps exports without a word
        export_kohya(base, tmp_path / "plain.safetensors")
