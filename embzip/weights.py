"""Per-token weights from how often each token occurs in a text corpus.

Data-aware factorizations spend their rank where the model's real inputs are: a token seen
often should be rebuilt more faithfully than one never seen. Weight of token i:

    w_i = (count_i + floor) ** power

`floor` keeps tokens absent from the corpus from getting zero weight (their rows are still fitted,
only less tightly); `power` tempers the counts (1 = squared error weighted by frequency).
Weights are normalised to mean 1. Rows beyond the tokenizer's length (padded vocabularies) are
never produced by the tokenizer and keep the floor weight.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from . import options
from .errors import OptionError
from .texts import Text


@dataclass
class WeightConfig:
    """How token counts become row weights."""

    floor: float = 1.0  # added to every count
    power: float | None = None  # applied to count + floor; None: the method's default (1; a codebook on a tied head
    # 0.5 below 3 bits per weight and 0.75 from there, CodebookConfig.weight_power)

    def __post_init__(self) -> None:
        floor = options.flagged("weight floor", "weight-floor")
        options.finite(floor, self.floor)
        if not self.floor > 0:
            raise OptionError(f"{floor} must be > 0 so unseen tokens keep some weight, got {self.floor}")
        if self.power is not None:
            options.non_negative(options.flagged("weight power", "weight-power"), self.power)

    def settings(self) -> dict:
        return asdict(self)


def token_counts(tokenizer, text: Text, vocab: int, batch_lines: int = 512) -> torch.Tensor:
    """How many times each of `vocab` token ids occurs when the text is tokenized line by line, each line as the
    model reads a sequence: with the special tokens the tokenizer adds to it ([CLS] and [SEP] for BERT, <bos> for
    Gemma and Llama). Those rows are in every input; counted as absent, they got the floor's weight and were coded
    coarsely (all-MiniLM-L6-v2 at 2 bpw: fidelity 0.9858 / 0.9869 without them, 0.9894 / 0.9887 with them, two
    seeds; docs/method.md)."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for i in range(0, len(text.lines), batch_lines):
        encoded = tokenizer(text.lines[i:i + batch_lines], add_special_tokens=True, verbose=False)["input_ids"]
        ids = torch.tensor([t for line in encoded for t in line if t < vocab], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab).double()
    return counts


def row_weights(counts: torch.Tensor, config: WeightConfig | None = None) -> torch.Tensor:
    """Weights with mean 1 from token counts."""
    config = config or WeightConfig()
    power = 1.0 if config.power is None else config.power
    w = (counts.double() + config.floor).pow(power)
    return (w / w.mean()).float()


_ZIPF_OFFSET = 100.0  # prior of the token ranked r: 1 / (r + this), so the first hundred ranks are not extreme
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_RANKED_MODELS = ("BPE", "WordPiece")  # vocabularies whose order can be a frequency rank
_ORDER_AGREEMENT = -0.1  # the order is taken for a frequency rank only where log(id + 100) and the text's
# log(count + 1) correlate below this over the ranked tokens: all-MiniLM-L6-v2's WordPiece -0.43, Gemma-3's BPE -0.41
# with the shipped weights text, the same vocabularies shuffled 0.00 (docs/method.md)


def vocabulary_prior(tokenizer, vocab: int, counts: torch.Tensor | None = None,
                     exclude: torch.Tensor | None = None) -> torch.Tensor | None:
    """A prior over the rows (float64, summing to 1) from the order of the tokenizer's own vocabulary, or None.

    A BPE vocabulary lists its tokens in the order its merges were learned, most frequent pair first, on the
    tokenizer's training text, which for a multilingual model covers its languages (Gemma-3's ids 100000-100009:
    Reactive, μου, jalanan, หว่าง, matériaux, ...). BERT's WordPiece vocabulary is listed the same way after its
    single characters (all-MiniLM-L6-v2's ids 1996-2007: the, of, and, in, to, was, ...; 20000: chunk, rigorous,
    blaine). So the id is a frequency rank, and Zipf's law gives the token of rank r a share 1 / (r + 100). Added
    tokens (special and placeholder ones), byte-fallback pieces (<0x41>) and the rows in `exclude` (tokens the
    tokenizer never produces) get none. Other tokenizers (Unigram, word-level, slow ones) give None, and so does a
    vocabulary whose order does not follow `counts` (the weights text's token counts), where given: nothing
    promises that a WordPiece file is sorted by frequency.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ not in _RANKED_MODELS:
        return None
    pieces = backend.get_vocab(with_added_tokens=False)
    byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
    skip = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if exclude is not None:
        skip |= set(exclude.tolist())
    ids = torch.tensor(sorted(i for piece, i in pieces.items() if i < vocab and i not in skip
                              and not (byte_fallback and _BYTE_PIECE.fullmatch(piece))), dtype=torch.long)
    if len(ids) == 0 or (counts is not None and not _follows_counts(ids, counts)):
        return None
    prior = torch.zeros(vocab, dtype=torch.float64)
    prior[ids] = 1.0 / (ids.double() + _ZIPF_OFFSET)
    return prior / prior.sum()


def _follows_counts(ids: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether later ids are rarer in the text: log(id + 100) against log(count + 1), correlated below
    _ORDER_AGREEMENT (a text that shows none of the tokens, or all alike, cannot tell: False)."""
    x = (ids.double() + _ZIPF_OFFSET).log()
    y = counts.double()[ids].log1p()
    x, y = x - x.mean(), y - y.mean()
    scale = x.norm() * y.norm()
    return bool(scale > 0) and (x @ y / scale).item() < _ORDER_AGREEMENT


def coverage(counts: torch.Tensor) -> dict[str, float]:
    """How much of the vocabulary the corpus touches."""
    seen = (counts > 0).sum().item()
    return {"corpus_tokens": int(counts.sum().item()), "distinct_tokens": int(seen),
            "vocab_coverage": seen / len(counts)}
