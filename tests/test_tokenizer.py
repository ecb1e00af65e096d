"""The offline word-level CLIP tokenizer spells every listed word as one token."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from forgetpatch.testing import TEST_WORDS
from forgetpatch.tokenizer import word_level_clip_tokenizer
from forgetpatch.toy.vocab import all_words


@pytest.mark.parametrize("words", [TEST_WORDS, all_words()], ids=["test-words", "toy-words"])
def test_every_listed_word_is_one_token(words):
    tok = word_level_clip_tokenizer(words)
    split = {w: tok.tokenize(w) for w in words if len(tok.tokenize(w)) != 1}
    assert split == {}


def test_words_sharing_pieces_do_not_break_each_other():
    # "art" learns the pair (a, r) before "square" needs it; "square" must still be whole.
    tok = word_level_clip_tokenizer(["art", "square", "squares", "are"])
    assert tok.tokenize("art square squares are") == ["art</w>", "square</w>", "squares</w>", "are</w>"]


def test_unknown_text_still_tokenizes_and_round_trips(tmp_path):
    tok = word_level_clip_tokenizer(["a", "red", "circle"])
    assert tok.tokenize("a red zebra")[:2] == ["a</w>", "red</w>"]
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a red circle").input_ids == tok("a red circle").input_ids


def test_rejects_multi_word_entries():
    with pytest.raises(ValueError, match="single non-empty words"):
        word_level_clip_tokenizer(["red circle"])
