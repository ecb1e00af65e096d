"""The shipped judge reads fresh renders correctly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import forgetpatch.toy as toy
from forgetpatch.errors import ForgetPatchError
from forgetpatch.toy.judge import KINDS, accuracy, labelled_renders


@pytest.fixture(scope="module")
def judge():
    return toy.load_judge()


def test_judge_is_at_least_99_percent_accurate_on_fresh_renders(judge):
    x, labels = labelled_renders(600, seed_offset=555_000_000)  # seeds never used in training
    acc = accuracy(judge, x, labels)
    assert min(acc.values()) >= 0.99, acc


def test_predict_accepts_float_arrays_uint8_and_pil(judge):
    scenes = [toy.Scene("ring", "blue", "dots"), toy.Scene("star", "yellow", "grid")]
    u8 = np.stack([toy.render(s, seed=1234) for s in scenes])
    expected = [{k: s.of(k) for k in KINDS} for s in scenes]
    assert judge.predict(u8.astype(np.float32) / 255.0) == expected
    assert judge.predict(u8) == expected
    assert judge.predict([Image.fromarray(im) for im in u8]) == expected
    proba = judge.predict_proba(u8)
    assert proba["shape"].shape == (2, len(toy.SHAPES))
    np.testing.assert_allclose(proba["colour"].sum(axis=1), 1.0, rtol=1e-5)


def test_predict_rejects_bad_shapes(judge):
    with pytest.raises(ForgetPatchError, match="N x H x W x 3"):
        judge.predict(np.zeros((2, 32, 32), dtype=np.float32))
