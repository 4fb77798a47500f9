"""Codebook compression (placeholder maths, to be replaced by the tuned algorithm).

Rows are cut into m pieces of s numbers; each piece position has a codebook of K <= 256
centroids learned by weighted k-means; a row is stored as m uint8 indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .compressed import Compressed, register, storage_dtype
from .errors import FactorsError

INDICES, CODEBOOKS = "indices", "codebooks"


@dataclass
class CodebookConfig:
    bits: float = 2.0
    iterations: int = 8
    sample: int = 32768
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.bits < 16):
            raise ValueError(f"codebook bits must be in (0, 16), got {self.bits}")

    def settings(self) -> dict:
        return asdict(self)


def fit_codebook(embedding, *, weights=None, metric=None, config: CodebookConfig, device="cpu", progress=False):
    vocab, hidden = embedding.shape
    piece = next((s for s in (1, 2, 4, 8, 16, 32) if hidden % s == 0 and 8 / s <= config.bits), None)
    if piece is None:
        raise FactorsError(f"no piece size reaches {config.bits} bits per weight for hidden size {hidden}")
    m, k = hidden // piece, min(256, vocab)
    x = embedding.float().view(vocab, m, piece).transpose(0, 1)  # m x V x s
    g = torch.Generator().manual_seed(config.seed)
    w = torch.ones(vocab) if weights is None else weights.float()
    sample = torch.multinomial(w, min(config.sample, vocab), replacement=False, generator=g)
    xs, ws = x[:, sample], w[sample]
    cents = xs[:, torch.randperm(len(sample), generator=g)[:k]].clone()
    for _ in range(config.iterations):
        assign = _assign(xs, cents)
        for j in range(m):
            sums = torch.zeros(k, piece).index_add_(0, assign[j], xs[j] * ws.unsqueeze(1))
            mass = torch.zeros(k).index_add_(0, assign[j], ws)
            keep = mass > 0
            cents[j, keep] = sums[keep] / mass[keep].unsqueeze(1)
    dtype = storage_dtype(embedding.dtype)
    cents = cents.to(dtype)
    return {INDICES: _assign(x, cents.float()).T.contiguous().to(torch.uint8), CODEBOOKS: cents}


def _assign(x: torch.Tensor, cents: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[1], chunk):
        part = x[:, i:i + chunk]
        d = (cents * cents).sum(-1).unsqueeze(1) - 2 * torch.bmm(part, cents.transpose(1, 2))
        out.append(d.argmin(-1))
    return torch.cat(out, dim=1)


def decode_rows(tensors: dict[str, torch.Tensor], index) -> torch.Tensor:
    idx = tensors[INDICES][index].long()  # n x m
    cents = tensors[CODEBOOKS].float()  # m x K x s
    m = cents.shape[0]
    pieces = cents[torch.arange(m), idx]  # n x m x s
    return pieces.flatten(-2)


@register
class Codebook(Compressed):
    """Rows as uint8 indices into learned codebooks."""

    kind = "codebook"

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None):
        self._tensors, self.meta = dict(tensors), {} if meta is None else meta
        idx, cents = tensors.get(INDICES), tensors.get(CODEBOOKS)
        if idx is None or cents is None or idx.dtype != torch.uint8 or cents.ndim != 3 or idx.shape[1] != cents.shape[0]:
            raise FactorsError("codebook tensors are inconsistent")
        self._shape = (idx.shape[0], cents.shape[0] * cents.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    @classmethod
    def from_tensors(cls, tensors, meta):
        return cls(tensors, meta)

    @classmethod
    def decode(cls, tensors, index):
        return decode_rows(tensors, index)
