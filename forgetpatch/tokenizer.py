"""Offline CLIP tokenizers with a small, known vocabulary.

No tokenizer files can be downloaded here, so test pipelines and the toy world build a real
:class:`transformers.CLIPTokenizer` from a word list: every printable byte is a token (so any
text tokenizes), and BPE merges spell each listed word as a single token.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = 0
    chars = []
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def word_level_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer in which each of ``words`` is one token.

    Other text still tokenizes (character by character), as with a real CLIP vocabulary.

    Example:
        >>> tok = word_level_clip_tokenizer(["a", "red", "circle"])
        >>> tok.tokenize("a red circle")
        ['a</w>', 'red</w>', 'circle</w>']
    """
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.lower() for w in words):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"tokenizer words must be single non-empty words, got {word!r}")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            merged = left + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            left = merged
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
