"""ScaPre: each piece against a naive reference, the whole layer edit against a per-row D-space solve,
presets, seeding, storage, SDXL shapes, and the toy-world bars."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import forgetpatch
from forgetpatch.errors import MethodError
from forgetpatch.methods import Concept, joint
from forgetpatch.methods.closed_form import cross_attention_layers, current_weight
from forgetpatch.methods.scapre import (
    NUDITY_TERMS,
    ScaPre,
    ScaPreParams,
    bures_coefficients,
    edit_layer,
    entropy_factor,
    gate_weights,
    mi_soft_mask,
    pooled_entropy_factor,
    shared_noise_mi_mask,
    solve_rows,
)
from forgetpatch.testing import (
    TEST_WORDS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


# --- the pieces ----------------------------------------------------------------------------------
def naive_entropy_factor(acts: np.ndarray, bins: int = 20) -> float:
    entropies = []
    for row in acts:
        unit = (row - row.min()) / (row.max() - row.min())
        counts, _ = np.histogram(unit, bins=bins, range=(0.0, 1.0))
        prob = counts[counts > 0] / len(row)
        entropies.append(-(prob * np.log(prob)).sum())
    return float(np.mean(1 - (1 - np.array(entropies) / math.log(bins))))  # mu = mean(1 - e_i)


def test_entropy_factor_matches_histogram_reference():
    acts = torch.randn(40, 60, dtype=torch.float64) * torch.linspace(0.1, 3, 40)[:, None]
    acts[3] = acts[3] ** 3  # a skewed row
    assert entropy_factor(acts, 20) == pytest.approx(naive_entropy_factor(acts.numpy()), abs=1e-12)
    assert entropy_factor(torch.ones(2, 10, dtype=torch.float64)) == 0.0  # constant rows carry no entropy


def test_pooled_entropy_factor_equals_entropy_of_the_materialised_activations():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(64, 30, generator=generator, dtype=torch.float64) * 3
    noise = torch.randn(64, 20, generator=generator, dtype=torch.float64) * 0.05
    acts = (base[:, :, None] + noise[:, None, :]).flatten(1)
    assert pooled_entropy_factor(base, noise) == pytest.approx(entropy_factor(acts), abs=1e-6)
    assert pooled_entropy_factor(base, noise) == pytest.approx(naive_entropy_factor(acts.numpy()), abs=1e-6)


def naive_mi_mask(pos: np.ndarray, neg: np.ndarray, p: float, temperature: float) -> np.ndarray:
    n, d, _ = pos.shape
    mi = np.zeros((n, d))
    for k in range(n):
        for i in range(d):
            values = list(pos[k, i]) + list(neg[k, i])
            labels = [1] * pos.shape[2] + [0] * neg.shape[2]
            median = sorted(values)[(len(values) - 1) // 2]
            bits = [int(v > median) for v in values]
            total = len(values)
            for b in (0, 1):
                for y in (0, 1):
                    joint = sum(1 for bb, yy in zip(bits, labels, strict=True) if bb == b and yy == y) / total
                    if joint > 0:
                        pb, py = bits.count(b) / total, labels.count(y) / total
                        mi[k, i] += joint * math.log(joint / (pb * py))
    z = (mi - mi.mean(1, keepdims=True)) / (mi.std(1, keepdims=True) + 1e-8)
    return ((1 / (1 + np.exp(-z / temperature))) ** p).max(0)


def test_mi_soft_mask_matches_counting_reference():
    generator = torch.Generator().manual_seed(0)
    d = 30
    signal = torch.zeros(3, d, 1, dtype=torch.float64)
    signal[:, :10] = 2.0  # rows 0-9 separate positives from negatives, the others mostly do not
    pos = signal + torch.randn(3, d, 5, generator=generator, dtype=torch.float64)
    neg = torch.randn(3, d, 5, generator=generator, dtype=torch.float64)
    mask = mi_soft_mask(pos, neg, p=5, temperature=0.7)
    expected = naive_mi_mask(pos.numpy(), neg.numpy(), 5, 0.7)
    np.testing.assert_allclose(mask.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert mask[:10].mean() > 3 * mask[10:].mean()  # concept-carrying channels get the larger weight


def test_shared_noise_mask_equals_the_median_mask():
    """The merge-count shortcut gives the per-concept median binarisation's mask exactly."""
    generator = torch.Generator().manual_seed(3)
    d, n, s = 40, 6, 5
    clean = torch.randn(d, n, generator=generator, dtype=torch.float64)
    clean[:12] *= 0.05  # some rows barely tell concepts from blank
    noise = 0.5 * torch.randn(d, s, generator=generator, dtype=torch.float64)
    negative = torch.randn(d, s, generator=generator, dtype=torch.float64)
    positive = clean.T[:, :, None] + noise[None]
    expected = mi_soft_mask(positive, negative, p=5, temperature=0.7)
    torch.testing.assert_close(shared_noise_mi_mask(clean, noise, negative, p=5, temperature=0.7), expected)
    reference = naive_mi_mask(positive.numpy(), negative.expand(n, d, s).numpy(), 5, 0.7)
    np.testing.assert_allclose(expected.numpy(), reference, rtol=1e-9, atol=1e-12)


def test_gate_penalises_dominant_directions_less():
    sigma = torch.tensor([10.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    weights = gate_weights(sigma, p=8, temperature=0.1)
    median = 2.0
    expected = 1 - torch.sigmoid((sigma - median) / (0.1 * median)) ** 8
    torch.testing.assert_close(weights, expected)
    assert weights[0] < 1e-6 and weights[-1] > 0.99 and bool((weights.diff() >= 0).all())


def test_fast_row_solve_equals_naive_per_row_solve():
    generator = torch.Generator().manual_seed(1)
    k, rows = 12, 50
    X = torch.randn(k, k, generator=generator, dtype=torch.float64)
    M0 = X @ X.T + 0.5 * torch.eye(k, dtype=torch.float64)
    C = torch.randn(4, k, generator=generator, dtype=torch.float64)
    Pi = C.T @ torch.linalg.solve(C @ C.T, C)  # a rank-4 projector, as Pi_C
    a = torch.rand(rows, generator=generator, dtype=torch.float64) * 3
    a[:5] = 0.0
    beta = torch.randn(rows, k, generator=generator, dtype=torch.float64)
    fast = solve_rows(M0, Pi, a, beta)
    naive = torch.stack([torch.linalg.solve(M0 + a[i] * Pi, beta[i]) for i in range(rows)])
    torch.testing.assert_close(fast, naive, rtol=1e-9, atol=1e-10)


def naive_bures(a: torch.Tensor, w0: torch.Tensor, lam_p: float, mu: float, iters: int) -> torch.Tensor:
    r0, a_norm = w0.norm(), a.norm()
    u0, ua = w0 / r0, a / a_norm
    u, row = ua, a
    for _ in range(iters):
        kappa = max(0.0, float(u @ u0))
        r = (lam_p * a_norm + mu * r0 * kappa) / (lam_p + mu)
        v = lam_p * a_norm * ua + mu * r0 * kappa * u0
        u = v / v.norm()
        row = r * u
    return row


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_bures_coefficients_equal_vector_reference(iters):
    generator = torch.Generator().manual_seed(2)
    old = torch.randn(20, 16, generator=generator, dtype=torch.float64)
    new = old + 0.8 * torch.randn(20, 16, generator=generator, dtype=torch.float64)
    new[0] = -old[0]  # opposite direction: kappa = 0, the row only shrinks
    c1, c2 = bures_coefficients((new * new).sum(1), (new * old).sum(1), (old * old).sum(1), 0.9, 0.4, iters)
    ours = c1[:, None] * new + c2[:, None] * old
    reference = torch.stack([naive_bures(new[i], old[i], 0.9, 0.4, iters) for i in range(20)])
    torch.testing.assert_close(ours, reference)


# --- one layer against methods.md, solved naively in embedding space ------------------------------
def naive_layer(W, emb, mu, mask, params: ScaPreParams):
    """Steps 2, 4, 5, 6 of methods.md with D x D matrices and one solve per row."""
    W = W.double()
    C, G, P = emb.erase, emb.guide, emb.preserve
    n, D = C.shape
    eye = torch.eye(D, dtype=torch.float64)
    S = C.T @ C
    uce_sum = params.erase_scale * C.T @ C + params.preserve_scale * P.T @ P
    H = emb.held if emb.held is not None else P[:0]  # concepts an applied patch erased, kept with weight s_h
    s_h = params.erase_scale if params.hold_scale is None else params.hold_scale
    uce_sum = uce_sum + s_h * H.T @ H
    ridge = params.pi_eps * float((C * C).sum()) / n
    Pi = C.T @ torch.linalg.inv(C @ C.T + ridge * torch.eye(n, dtype=torch.float64)) @ C
    R = torch.zeros(D, D, dtype=torch.float64)
    if params.spectral_gate:
        _, sigma, vh = torch.linalg.svd(C, full_matrices=False)
        median = sigma.median()
        gate = torch.sigmoid((sigma - median) / (params.gate_temperature * median)) ** params.p
        R = vh.T @ torch.diag((1 - gate) * mu) @ vh
    V = params.erase_scale * (W @ G.T) @ C + params.preserve_scale * (W @ P.T) @ P + s_h * (W @ H.T) @ H
    lam_p = params.lam + mu
    solved, final = [], []
    for i in range(W.shape[0]):
        M = lam_p * eye + R + uce_sum + S + params.erase_scale * float(mask[i]) * Pi
        w = torch.linalg.solve(M, lam_p * W[i] + V[i])
        solved.append(w)
        final.append(naive_bures(w, W[i], lam_p, mu, params.bures_iters))
    return torch.stack(solved), torch.stack(final) - W


def assert_layers_match_naive_solve(layers, shared, settings) -> None:
    """The first layers' edits (the solved rows and the change) equal :func:`naive_layer`'s."""
    for path in list(layers)[:3]:
        W = current_weight(layers[path])
        edit = edit_layer(W, shared, settings, keep_solved=True)
        solved, delta = naive_layer(W, shared.emb, edit.mu, edit.mask, settings)
        torch.testing.assert_close(edit.solved.double(), solved, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(edit.delta.double(), delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["object", "style"])
def test_layer_edit_equals_naive_per_row_solve(sd, preset):
    concepts = [Concept("circle"), Concept("star", guide="shape"), Concept("vangogh", kind="style")]
    params = {"preset": preset}
    settings, shared, layers = ScaPre.prepare(sd, concepts, [Concept("ellipse"), Concept("monet")], params)
    assert settings.spectral_gate is (preset == "style")
    assert_layers_match_naive_solve(layers, shared, settings)


@pytest.mark.parametrize("hold_scale", [None, 6.0])
def test_concepts_an_applied_patch_erased_are_held_in_the_row_solve(hold_scale):
    """A preserved concept that a patch on the pipeline erased enters the solve like a preserved one, with weight
    hold_scale (default: the erase scale), on the weights as patched."""
    pipe = tiny_sd_pipeline(seed=0)
    forgetpatch.apply(pipe, forgetpatch.erase(pipe, ["circle"], method="scapre", paper=True))
    params = {"hold_scale": hold_scale, "erase_scale": 2.0}
    settings, shared, layers = ScaPre.prepare(pipe, [Concept("star")], [Concept("ellipse"), Concept("circle")], params)
    assert shared.emb.held.shape[0] == 1 and shared.emb.preserve.shape[0] == 1
    assert_layers_match_naive_solve(layers, shared, settings)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_on_a_transformer_the_context_embedder_gets_the_row_solve_on_the_text_rows(family):
    """SD3 / FLUX: ScaPre edits ``context_embedder`` (the one layer linear in the prompt) on the rows it takes, with
    the same row solve; erased rows move towards their guides' outputs, preserved rows' outputs stay; a concept that
    an applied patch erased is held; the patch says what it edited, applies and comes off exactly."""
    pipe = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[family](seed=0)
    concepts, kept = [Concept("circle"), Concept("star", guide="square")], [Concept("ellipse")]
    settings, shared, layers = ScaPre.prepare(pipe, concepts, kept, {"tokens": "last"})
    assert list(layers) == ["transformer.context_embedder"]
    prompts, pairs, rows = joint.row_sets(pipe, ["circle", "star"], ["", "square"], ["ellipse"], tokens="last", templates=())
    hidden, _ = joint.encode(pipe, [*prompts, ""])
    assert torch.equal(shared.emb.erase, joint.gather(hidden[:-1], pairs, rows).erase)
    assert torch.equal(shared.blank, hidden[-1, 0].double())
    assert_layers_match_naive_solve(layers, shared, settings)
    W = current_weight(layers["transformer.context_embedder"]).double()
    delta = edit_layer(W.float(), shared, settings).delta.double()
    for c, g in zip(shared.emb.erase, shared.emb.guide, strict=True):
        assert ((W + delta) @ c - W @ g).norm() < 0.75 * (W @ c - W @ g).norm()
    for p in shared.emb.preserve:
        assert (delta @ p).norm() < 0.05 * (W @ p).norm()

    patch = forgetpatch.erase(pipe, concepts, method="scapre", preserve=kept, progress=False)
    assert patch.manifest.lora.target_modules == ["transformer.context_embedder"]
    assert "context_embedder" in patch.manifest.method.params["edited"]
    before = W.float().clone()
    forgetpatch.apply(pipe, patch)
    try:
        torch.testing.assert_close(
            current_weight(pipe.transformer.context_embedder), before + patch.delta("transformer.context_embedder")
        )
        _, held_shared, _ = ScaPre.prepare(pipe, [Concept("triangle")], [Concept("circle")], {"tokens": "last"})
        assert held_shared.emb.held is not None and held_shared.emb.preserve.shape[0] == 0
    finally:
        forgetpatch.remove(pipe)
    assert torch.equal(pipe.transformer.context_embedder.weight, before)


def test_entropy_and_mask_come_from_the_seeded_noisy_activations(sd):
    settings, shared, layers = ScaPre.prepare(sd, [Concept("circle"), Concept("star")], [], {})
    W = current_weight(next(iter(layers.values()))).double()
    n_e, n_m = settings.entropy_samples, settings.mi_samples
    C, blank = shared.emb.erase, shared.probes[-1].double()
    noise = shared.probes[-(1 + n_e + 2 * n_m) : -1].double()
    assert noise.shape[0] == n_e + 2 * n_m
    assert float(noise.std()) == pytest.approx(settings.noise_std, rel=0.1)
    acts = torch.cat([W @ (C[k] + noise[:n_e]).T for k in range(2)], dim=1)
    edit = edit_layer(W.float(), shared, settings)
    assert edit.mu == pytest.approx(naive_entropy_factor(acts.numpy()), abs=1e-4)
    pos = torch.stack([W @ (C[k] + noise[n_e : n_e + n_m]).T for k in range(2)])
    neg = (W @ (blank + noise[n_e + n_m :]).T).expand(2, -1, -1)
    expected = naive_mi_mask(pos.numpy(), neg.numpy(), settings.p, settings.mi_temperature)
    np.testing.assert_allclose(edit.mask.numpy(), expected, atol=1e-4)


# --- presets, seeding, storage ---------------------------------------------------------------------
def test_presets_follow_the_concept_kind():
    obj = ScaPreParams.for_concepts([Concept("circle")], {})
    style = ScaPreParams.for_concepts([Concept("vangogh", kind="style")], {})
    nudity = ScaPreParams.for_concepts([Concept("nudity", kind="nudity")], {})
    assert (obj.erase_scale, obj.p, obj.bures_iters, obj.spectral_gate) == (3.0, 5.0, 1, False)
    assert (style.erase_scale, style.p, style.spectral_gate, style.entropy_samples) == (2.0, 8.0, True, 30)
    assert (nudity.erase_scale, nudity.p) == (2.0, 3.0)
    assert ScaPreParams.for_concepts([Concept("circle")], {"p": 2}).p == 2
    with pytest.warns(UserWarning, match="several kinds"):
        ScaPreParams.for_concepts([Concept("circle"), Concept("monet", kind="style")], {})
    with pytest.raises(MethodError, match="unknown ScaPre parameter"):
        ScaPreParams.for_concepts([Concept("circle")], {"erase_scal": 2})


def test_nudity_concept_expands_to_the_paper_word_list():
    settings = ScaPreParams.for_concepts([Concept("nudity", kind="nudity")], {})
    targets = ScaPre.targets([Concept("nudity", kind="nudity"), Concept("circle")], settings)
    assert [t.target for t in targets] == [*NUDITY_TERMS, "circle"]


def test_same_seed_same_change_other_seed_other_noise(sd):
    concepts = [Concept("circle"), Concept("square")]
    a = ScaPre.compute_deltas(sd, concepts, seed=3)
    b = ScaPre.compute_deltas(sd, concepts, seed=3)
    c = ScaPre.compute_deltas(sd, concepts, seed=4)
    assert all(torch.equal(a[p], b[p]) for p in a)
    assert any(not torch.equal(a[p], c[p]) for p in a)


def test_patch_is_truncated_svd_with_recorded_rank_and_error(sd):
    concepts = [Concept("circle"), Concept("star")]
    deltas = ScaPre.compute_deltas(sd, concepts, preserve=[Concept("ellipse")])
    patch = forgetpatch.erase(sd, concepts, method="scapre", preserve=["ellipse"], energy=0.999, paper=True)
    lora = patch.manifest.lora
    assert set(lora.target_modules) == set(deltas)
    bound = math.sqrt(1 - 0.999) + 1e-6
    for path, delta in deltas.items():
        recorded = lora.reconstruction_errors[path]
        measured = float((patch.delta(path) - delta).norm() / delta.norm())
        assert recorded <= bound
        assert measured == pytest.approx(recorded, abs=1e-4)
        assert patch.rank_of(path) < min(delta.shape)  # compressed, not the full matrix
    assert lora.reconstruction_error == max(lora.reconstruction_errors.values())
    assert patch.manifest.method.params["erase_scale"] == 3.0


def test_sdxl_shapes_and_style_preset():
    pipe = tiny_sdxl_pipeline(seed=0)
    deltas = ScaPre.compute_deltas(pipe, [Concept("vangogh", kind="style"), Concept("monet", kind="style")])
    layers = cross_attention_layers(pipe)
    assert set(deltas) == set(layers) and len(deltas) == 16
    for path, delta in deltas.items():
        assert delta.shape == layers[path].weight.shape and delta.shape[1] == 64
        assert torch.isfinite(delta).all() and delta.norm() > 0


def test_many_concepts_in_one_call(sd):
    words = [w for w in TEST_WORDS if w not in ("a", "of", "the", "an")]  # 38 words
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = forgetpatch.erase(sd, words, method="scapre", progress=False)  # in context: 38 x 6 prompts, trailing
    assert len(patch.manifest.concepts) == len(words) == 38
    assert patch.manifest.lora.rank <= 32


# --- the toy world ---------------------------------------------------------------------------------
#: UA strict and absolute; IRA, CRA and near as ratios of the base; all on the safe end of the 95% interval.
TOY_BARS = {"ua": 0.90, "ira": 0.90, "cra": 0.95, "near": 0.80}


def _check_bars(recipe: str, ua_floor: float | None = None) -> None:
    """Below the bars the test xfails with the figures; under the floor (point figures; ``ua_floor`` for strict UA)
    it fails."""
    from toy_bars import FLOOR, check_bars, measure_recipe

    floor = FLOOR if ua_floor is None else {**FLOOR, "ua": ua_floor}
    check_bars(measure_recipe(recipe), TOY_BARS, f"ScaPre, recipes/{recipe}.yaml", floor)


@pytest.mark.slow
def test_toy_erase_one_shape_meets_the_bars():
    """The toy world's defaults (the demo's patch): the circle must be mostly replaced (strict UA >= 0.8)."""
    _check_bars("toy-no-circle-scapre", ua_floor=0.8)


@pytest.mark.slow(seconds=70)
def test_toy_erase_five_shapes_meets_the_bars():
    _check_bars("toy-no-5-shapes-scapre")
