"""Which rows of the embedding a tokenizer can never produce.

A WordPiece tokenizer (BERT and its sentence encoders) normalizes the text, splits it into words
(at whitespace and punctuation; a Chinese character becomes a word of its own), and then cuts each
word into vocabulary pieces, `##` marking a piece inside a word. Some vocabulary entries cannot come
out of that at all: `[unused0]` .. `[unused993]` (the brackets split them), `##!` or `##字` (such a
character never sits inside a word), or a token with capitals in a lowercasing vocabulary. Their
rows are never looked up, so a compressed embedding need not spend bits on them (codebook.py).

The test uses the tokenizer's own normalizer and pre-tokenizer: a token is unreachable when
normalizing its text and splitting that into words does not give the token back as one word (a
`##` piece is tested behind a letter, as it would sit in a word). BERT's normalizer and
pre-tokenizer act on each character and on word boundaries, so a token that fails cannot appear
in any normalized, split text. Special and added tokens are always reachable (they are matched
before normalization). Other tokenizer
models (BPE, Unigram: Gemma, Llama, GPT-2) and slow tokenizers are left alone: no row is
reported, so nothing is dropped where this cannot be decided from the rules above.
"""

from __future__ import annotations

import torch


def _wordpiece(tokenizer) -> tuple[object, str] | None:
    """(the fast tokenizer's backend, its continuing-subword prefix), or None when it is not WordPiece."""
    from tokenizers.models import WordPiece

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if not isinstance(model, WordPiece):  # asked of the model object: serializing a 262k vocabulary took 1.4 s
        return None
    return backend, model.continuing_subword_prefix or "##"


def _one_word(backend, text: str) -> bool:
    """Whether normalizing `text` and splitting it into words gives `text` back as one word."""
    normalizer, pre = backend.normalizer, backend.pre_tokenizer
    normal = normalizer.normalize_str(text) if normalizer is not None else text
    words = [word for word, _ in pre.pre_tokenize_str(normal)] if pre is not None else normal.split()
    return words == [text]


def unreachable_rows(tokenizer, vocab: int) -> torch.Tensor:
    """Sorted row numbers (int64) below `vocab` of tokens the tokenizer can never produce; empty for tokenizers
    other than fast WordPiece ones, for which this is not decided."""
    found = _wordpiece(tokenizer)
    if found is None:
        return torch.zeros(0, dtype=torch.long)
    backend, prefix = found
    always = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    rows = []
    for token, row in tokenizer.get_vocab().items():
        if row >= vocab or row in always:
            continue
        inside = token.startswith(prefix) and len(token) > len(prefix)
        body = token[len(prefix):] if inside else token
        if not body or not _one_word(backend, body) or (inside and not _one_word(backend, "a" + body)):
            rows.append(row)
    return torch.tensor(sorted(rows), dtype=torch.long)
