"""UCE: the closed form of methods.md, exact LoRA storage, SD and SDXL shapes."""

from __future__ import annotations

import pytest
import torch
from reference import token_embedding

import forgetpatch
from forgetpatch.methods import Concept
from forgetpatch.methods.closed_form import cross_attention_layers, current_weight, embed_concepts
from forgetpatch.methods.uce import UCE
from forgetpatch.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline(seed=0)


def reference_weight(W, erase, guides, preserve, lam=0.5, s_e=1.0, s_p=1.0, held=(), s_h=1.0):
    """methods.md's formula, written term by term in float64 (``held`` rows kept like preserved ones, weight s_h)."""
    W = W.double()
    D = W.shape[1]
    left = lam * W
    right = lam * torch.eye(D, dtype=torch.float64)
    for c, g in zip(erase, guides, strict=True):
        left = left + s_e * torch.outer(W @ g, c)
        right = right + s_e * torch.outer(c, c)
    for scale, rows in ((s_p, preserve), (s_h, held)):
        for p in rows:
            left = left + scale * torch.outer(W @ p, p)
            right = right + scale * torch.outer(p, p)
    return left @ torch.linalg.inv(right)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_matches_closed_form_reference(which, request):
    pipe = request.getfixturevalue(which)
    concepts = [Concept("circle"), Concept("star", guide="shape"), Concept("vangogh", kind="style")]
    preserve = [Concept("ellipse"), Concept("monet", kind="style")]
    deltas = UCE.compute_deltas(
        pipe, concepts, preserve=preserve, lam=0.5, erase_scale=1.0, preserve_scale=1.0
    )

    erase = [token_embedding(pipe, c) for c in ("circle", "star", "vangogh")]
    guides = [token_embedding(pipe, g) for g in ("", "shape", "art")]  # "" = blank, styles -> "art"
    kept = [token_embedding(pipe, p) for p in ("ellipse", "monet")]
    layers = cross_attention_layers(pipe)
    assert set(deltas) == set(layers)
    for path, module in layers.items():
        W = module.weight.detach()
        expected = reference_weight(W, erase, guides, kept) - W.double()
        assert deltas[path].shape == W.shape
        torch.testing.assert_close(
            deltas[path].double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
        )


def test_more_edited_rows_than_the_width_still_match_the_reference(sd):
    """Trailing tokens in templates give more rows than the 32-wide embeddings: the width-sized solve."""
    params = {"tokens": "trailing", "templates": ["a red {concept} on a dots background", "a {concept}"]}
    emb, _ = embed_concepts(sd, ["circle", "star"], ["", ""], ["ellipse"], **params)
    assert emb.erase.shape[0] + emb.preserve.shape[0] > emb.erase.shape[1]
    deltas = UCE.compute_deltas(
        sd, [Concept("circle"), Concept("star")], preserve=[Concept("ellipse")], **params
    )
    for path, module in cross_attention_layers(sd).items():
        W = module.weight.detach()
        expected = reference_weight(W, emb.erase, emb.guide, emb.preserve) - W.double()
        torch.testing.assert_close(
            deltas[path].double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
        )


def test_sdxl_edits_every_cross_attention_layer_at_2048_style_width(sdxl):
    deltas = UCE.compute_deltas(sdxl, [Concept("circle")])
    width = sdxl.unet.config.cross_attention_dim  # 64 = 32 + 32 here, 2048 = 768 + 1280 on SDXL
    assert len(deltas) == 16
    assert all(d.shape[1] == width for d in deltas.values())
    assert all(path.endswith(("attn2.to_k", "attn2.to_v")) for path in deltas)


def test_change_has_rank_of_erased_embeddings_and_is_stored_exactly(sd):
    concepts = ["circle", "star", "square"]
    patch = forgetpatch.erase(sd, concepts, method="uce", preserve=["ellipse", "ring"], paper=True)
    deltas = UCE.compute_deltas(
        sd, [Concept(c) for c in concepts], preserve=[Concept("ellipse"), Concept("ring")]
    )
    lora = patch.manifest.lora
    assert lora.rank == 3 and lora.rank_pattern == {}
    assert lora.reconstruction_error is not None and lora.reconstruction_error < 1e-5
    assert set(lora.reconstruction_errors) == set(deltas)
    for path, delta in deltas.items():
        assert torch.linalg.matrix_rank(delta, rtol=1e-4) == 3
        torch.testing.assert_close(patch.delta(path), delta, rtol=1e-5, atol=1e-6)


def test_max_rank_stores_the_best_low_rank_change_and_records_its_error(sd):
    """max_rank cuts each layer's exact change to its best rank-k approximation (Eckart-Young) and records the
    error, measured against the exact change."""
    params = {"tokens": "trailing", "templates": ["a red {concept} on a dots background", "a {concept}"]}
    exact = UCE.compute_deltas(sd, [Concept("circle")], **params)
    patch = forgetpatch.erase(sd, ["circle"], method="uce", max_rank=3, **params)
    lora = patch.manifest.lora
    assert lora.rank == 3 and patch.manifest.method.params["max_rank"] == 3
    for path, delta in exact.items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close(patch.delta(path).double(), best, rtol=1e-4, atol=1e-5 * float(S[0]))
        measured = float((patch.delta(path).double() - delta.double()).norm() / delta.double().norm())
        assert measured <= lora.reconstruction_errors[path] + 1e-5
        assert lora.reconstruction_errors[path] == pytest.approx(measured, abs=1e-4)
    with pytest.raises(forgetpatch.errors.MethodError, match="max_rank"):
        forgetpatch.erase(sd, ["circle"], method="uce", max_rank=0)


def test_preserve_terms_keep_preserved_outputs(sd):
    """With the preserve term, the preserved embedding's outputs move less than without it."""
    p = token_embedding(sd, "ellipse").float()
    free = UCE.compute_deltas(sd, [Concept("circle")])
    kept = UCE.compute_deltas(sd, [Concept("circle")], preserve=[Concept("ellipse")])
    for path in free:
        assert (kept[path] @ p).norm() < 0.5 * (free[path] @ p).norm()


def test_concepts_an_applied_patch_erased_are_held_with_their_own_weight():
    """On a pipeline carrying a patch, a preserved concept that patch erased is kept as the patched layers map it,
    weighted by hold_scale instead of preserve_scale: the formula with those rows at s_h, on the current weights."""
    pipe = tiny_sd_pipeline(seed=0)
    forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["circle"], method="uce", paper=True))
    deltas = UCE.compute_deltas(
        pipe, [Concept("star")], preserve=[Concept("ellipse"), Concept("circle")], erase_scale=2.0, hold_scale=7.0
    )
    star, ellipse, circle, blank = (token_embedding(pipe, w) for w in ("star", "ellipse", "circle", ""))
    for path, module in cross_attention_layers(pipe).items():
        W = current_weight(module)  # with the circle patch on
        expected = reference_weight(W, [star], [blank], [ellipse], s_e=2.0, held=[circle], s_h=7.0) - W.double()
        torch.testing.assert_close(
            deltas[path].double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
        )


def test_erased_embedding_moves_towards_its_guide(sd):
    c, g = token_embedding(sd, "circle").float(), token_embedding(sd, "").float()
    deltas = UCE.compute_deltas(sd, [Concept("circle")], lam=0.01)
    for path, module in cross_attention_layers(sd).items():
        W = module.weight.detach()
        before, after = (W @ c - W @ g).norm(), ((W + deltas[path]) @ c - W @ g).norm()
        assert after < 0.05 * before


def test_patch_manifest_records_method_and_params(sd):
    patch = forgetpatch.erase(sd, [Concept("vangogh", kind="style")], method="uce", lam=0.25)
    manifest = patch.manifest
    assert manifest.method.name == "uce"
    assert manifest.method.params["lam"] == 0.25
    assert manifest.concepts[0].target == "vangogh" and manifest.concepts[0].kind == "style"
    assert manifest.name == "uce-no-vangogh"


def test_one_hundred_concepts_in_one_call(sd):
    from forgetpatch.testing import TEST_WORDS

    words = [f"{a} {b}" for a in TEST_WORDS for b in TEST_WORDS if a != b][:100]  # 100 distinct concepts
    patch = forgetpatch.erase(sd, words, method="uce", progress=False)
    # 100 edited embeddings exceed the 32-wide layers: stored at the layer's numerical rank, still exact
    assert patch.manifest.lora.rank <= 32
    assert patch.manifest.lora.reconstruction_error < 1e-4


# --- the toy world ---------------------------------------------------------------------------------
#: UA strict and absolute; IRA, CRA and near as ratios of the base; all on the safe end of the 95% interval.
UCE_TOY_BARS = {"ua": 0.90, "ira": 0.90, "cra": 0.95, "near": 0.80}


@pytest.mark.slow
def test_toy_uce_steered_to_cross_forgets_the_circle():
    """recipes/toy-no-circle-uce-guided.yaml: circles become crosses; below the bars it xfails with the figures,
    and fails outright if the circle is not mostly replaced (strict UA point estimate under 0.8)."""
    from toy_bars import FLOOR, check_bars, measure_recipe

    check_bars(measure_recipe("toy-no-circle-uce-guided"), UCE_TOY_BARS, "UCE, recipes/toy-no-circle-uce-guided.yaml",
               {**FLOOR, "ua": 0.8})


@pytest.mark.parametrize("method", ["uce", "scapre"])
def test_rece_rounds_steer_the_inverted_embedding_to_the_guide_and_are_recorded(sd, method):
    """RECE: a round erases the embedding an attacker inverts from the plain edit, so the robust edit maps
    that embedding nearer the guide's keys and values than the plain edit does (UCE's exact steer: at least
    twice as near; ScaPre's steer is partial by design, its mask and Bures step hold rows back)."""
    from forgetpatch.methods import get_method
    from forgetpatch.methods.closed_form import current_weight, inversion_map

    c, g = token_embedding(sd, "circle").double(), token_embedding(sd, "").double()
    layers = {path: current_weight(m).double() for path, m in cross_attention_layers(sd).items()}
    concept = [Concept("circle")]
    plain = get_method(method).compute_deltas(sd, concept, lam=0.5)
    M, edited = inversion_map({p: W + plain[p].double() for p, W in layers.items()}, layers, 0.1)
    assert edited == len(layers)
    adversarial = M @ c

    def gap(deltas):  # how far the edit leaves the inverted embedding's outputs from the guide's
        return sum(float(((W + deltas[p].double()) @ adversarial - W @ g).norm()) for p, W in layers.items())

    robust = get_method(method).compute_deltas(sd, concept, lam=0.5, robust=1)
    assert gap(robust) < {"uce": 0.5, "scapre": 0.9}[method] * gap(plain)
    patch = forgetpatch.erase(sd, concept, method=method, robust=2, progress=False)
    rounds = patch.manifest.metrics["robust"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["erased_rows"] == 3 * rounds[0]["erased_rows"] // 2
    assert patch.manifest.method.params["robust"] == 2
    with pytest.raises(forgetpatch.errors.MethodError, match="robust"):
        forgetpatch.erase(sd, concept, method=method, robust=-1)
