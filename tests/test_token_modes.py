"""Which text-embedding rows closed-form methods edit: the last word token, or (as UCE's release does) it and
every later position, and the concept inside prompt templates."""

from __future__ import annotations

import pytest
import torch
from reference import hidden_states

import forgetpatch
from forgetpatch.errors import MethodError
from forgetpatch.methods import Concept
from forgetpatch.methods.closed_form import cross_attention_layers, embed_concepts, in_templates
from forgetpatch.methods.uce import UCE
from forgetpatch.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

TEMPLATES = ("a red {concept} on the background", "a photo of a {concept}")


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


def test_templates_fill_the_concept_and_mark_where_it_sits():
    assert in_templates("circle", ["a red {concept} on the background"]) == [
        ("circle", "circle"),
        ("a red circle on the background", "a red circle"),
    ]
    assert in_templates("", ["a {concept} photo"]) == [("", ""), ("a photo", "a")]
    with pytest.raises(MethodError, match="placeholder"):
        in_templates("circle", ["a photo"])


def test_trailing_rows_are_the_unets_rows_from_the_concept_on(sd):
    emb, _ = embed_concepts(sd, ["circle"], [""], tokens="trailing", templates=TEMPLATES[:1])
    length = sd.tokenizer.model_max_length
    alone, in_context = hidden_states(sd, "circle"), hidden_states(sd, "a red circle on the background")
    blank, guide_context = hidden_states(sd, ""), hidden_states(sd, "a red on the background")
    # "circle" sits at 1 (after BOS) alone and at 3 in the template; the blank guide starts at BOS, and
    # in the template at "red" (2): rows are paired from there, as long as the shorter run.
    expected_c = torch.cat([alone[1:length], in_context[3:length]])
    expected_g = torch.cat([blank[0 : length - 1], guide_context[2 : length - 1]])
    torch.testing.assert_close(emb.erase, expected_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.guide, expected_g, rtol=1e-5, atol=1e-5)


def test_last_mode_with_templates_edits_the_concept_token_in_each_template(sd):
    emb, _ = embed_concepts(sd, ["circle"], ["shape"], ["ring"], templates=TEMPLATES)
    assert emb.erase.shape[0] == emb.guide.shape[0] == emb.preserve.shape[0] == 1 + len(TEMPLATES)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.erase[1], hidden_states(sd, "a red circle on the background")[3], **close)
    torch.testing.assert_close(emb.guide[2], hidden_states(sd, "a photo of a shape")[5], **close)
    torch.testing.assert_close(emb.preserve[2], hidden_states(sd, "a photo of a ring")[5], **close)


def test_uce_trailing_is_the_closed_form_over_every_edited_row(sd):
    """UCE's formula with C, G, P the trailing rows: the change maps each erased row as the formula says."""
    params = dict(tokens="trailing", templates=TEMPLATES, lam=0.5)
    deltas = UCE.compute_deltas(sd, [Concept("circle")], preserve=[Concept("ring")], **params)
    emb, _ = embed_concepts(sd, ["circle"], [""], ["ring"], tokens="trailing", templates=TEMPLATES)
    C, G, P = emb.erase, emb.guide, emb.preserve
    D = C.shape[1]
    for path, module in cross_attention_layers(sd).items():
        W = module.weight.detach().double()
        left = 0.5 * W + (W @ G.T) @ C + (W @ P.T) @ P
        right = 0.5 * torch.eye(D, dtype=torch.float64) + C.T @ C + P.T @ P
        expected = left @ torch.linalg.inv(right) - W
        scale = float(expected.abs().max())
        torch.testing.assert_close(deltas[path].double(), expected, rtol=1e-4, atol=1e-4 * scale)


def test_trailing_steers_the_rows_after_the_concept_to_the_guides(sd):
    """In a prompt, the rows after the concept carry it too: only "trailing" maps them to the guide's rows."""
    rows_c = hidden_states(sd, "a red circle on the background")[3:6].float()  # circle, on, the
    rows_g = hidden_states(sd, "a red on the background")[2:5].float()  # red, on, the (UCE's pairing)
    gap = {}
    for mode in ("last", "trailing"):
        deltas = UCE.compute_deltas(sd, [Concept("circle")], tokens=mode, templates=TEMPLATES[:1], lam=0.01)
        gap[mode] = []
        for path, module in cross_attention_layers(sd).items():
            W = module.weight.detach()
            before = (W @ rows_c.T - W @ rows_g.T).norm()
            gap[mode].append(float(((W + deltas[path]) @ rows_c.T - W @ rows_g.T).norm() / before))
    assert max(gap["trailing"]) < 0.2
    assert min(gap["last"]) > 2 * max(gap["trailing"])


@pytest.mark.parametrize("method", ["uce", "scapre"])
def test_modes_run_on_sdxl_and_record_their_settings(method):
    pipe = tiny_sdxl_pipeline(seed=0)
    patch = forgetpatch.erase(
        pipe, ["circle", "star"], method=method, tokens="trailing", templates=["a {concept}"], progress=False
    )
    params = patch.manifest.method.params
    assert params["tokens"] == "trailing" and list(params["templates"]) == ["a {concept}"]
    assert len(patch.manifest.lora.target_modules) > 0


@pytest.mark.parametrize("method", ["uce", "scapre"])
def test_unknown_token_mode_is_refused(sd, method):
    with pytest.raises(MethodError, match="tokens mode"):
        forgetpatch.erase(sd, ["circle"], method=method, tokens="all", progress=False)
