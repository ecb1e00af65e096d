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


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way CLIP's tokenizer does: lowest-ranked pair first."""
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:], strict=False) if (a, b) in ranks}
        if not pairs:
            break
        first, second = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def word_level_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer in which each of ``words`` is one token.

    Other text still tokenizes (character by character), as with a real CLIP vocabulary. Merges are
    appended word by word, only those BPE still needs to spell the word whole; appended merges rank
    last, so they never change how an earlier word is spelled.

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
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"tokenizer words must be single non-empty words, got {word!r}")
        while len(symbols := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length)
