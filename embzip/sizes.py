"""Parameter counts and compression ratios of a factored embedding.

A V x d embedding becomes codes (V x k) and a decoder (k x d), plus an optional bias (d) and
optional per-row norms (V). The ratio is always computed from what is really stored.
"""

from __future__ import annotations

from numbers import Integral

from .errors import RankError


def _shape(vocab: int, hidden: int) -> None:
    if not all(isinstance(n, Integral) and not isinstance(n, bool) and n > 0 for n in (vocab, hidden)):
        raise RankError(f"a matrix's vocab and hidden sizes must be positive integers, got {vocab!r} and {hidden!r}")


def _rank(rank: int) -> None:
    if not (isinstance(rank, Integral) and not isinstance(rank, bool) and rank >= 1):
        raise RankError(f"rank must be a positive integer, got {rank!r}")


def factored_params(vocab: int, hidden: int, rank: int, *, bias: bool = False, norms: bool = False) -> int:
    """Number of stored numbers for rank-`rank` factors of a `vocab` x `hidden` matrix."""
    return vocab * rank + rank * hidden + (hidden if bias else 0) + (vocab if norms else 0)


def compression_ratio(vocab: int, hidden: int, rank: int, *, bias: bool = False, norms: bool = False) -> float:
    """V*d divided by the parameters of the factors."""
    _shape(vocab, hidden)
    _rank(rank)
    return vocab * hidden / factored_params(vocab, hidden, rank, bias=bias, norms=norms)


def max_useful_rank(vocab: int, hidden: int, *, bias: bool = False, norms: bool = False) -> int:
    """The largest rank whose factors are strictly smaller than the dense matrix (0 if none)."""
    _shape(vocab, hidden)
    extra = (hidden if bias else 0) + (vocab if norms else 0)
    # V*k + k*d + extra < V*d  <=>  k < (V*d - extra) / (V + d)
    bound = (vocab * hidden - extra) / (vocab + hidden)
    k = int(bound)
    if k >= bound:
        k -= 1
    return max(k, 0)


def check_rank(rank: int, vocab: int, hidden: int, *, bias: bool = False, norms: bool = False) -> int:
    """Return `rank` if it compresses a `vocab` x `hidden` matrix, else raise RankError."""
    _rank(rank)
    largest = max_useful_rank(vocab, hidden, bias=bias, norms=norms)
    if rank > largest:
        raise RankError(
            f"rank {rank} saves nothing for a {vocab} x {hidden} embedding "
            f"(factors would hold {factored_params(vocab, hidden, rank, bias=bias, norms=norms):,} numbers, "
            f"the matrix {vocab * hidden:,}); the largest useful rank is {largest}"
        )
    return rank


def rank_for_ratio(ratio: float, vocab: int, hidden: int, *, bias: bool = False, norms: bool = False) -> int:
    """The largest rank whose compression ratio is at least `ratio`."""
    if not ratio > 1.0:
        raise RankError(f"--ratio must be greater than 1, got {ratio}")
    extra = (hidden if bias else 0) + (vocab if norms else 0)
    k = int((vocab * hidden / ratio - extra) // (vocab + hidden))
    while k >= 1 and compression_ratio(vocab, hidden, k, bias=bias, norms=norms) < ratio:
        k -= 1
    if k < 1:
        raise RankError(
            f"no rank reaches a compression ratio of {ratio} for a {vocab} x {hidden} embedding; "
            f"rank 1 gives {compression_ratio(vocab, hidden, 1, bias=bias, norms=norms):.1f}"
        )
    return k


def resolve_rank(rank: int | None, ratio: float | None, vocab: int, hidden: int, *, bias: bool = False,
                 norms: bool = False) -> int:
    """Exactly one of `rank` and `ratio` gives the rank to use."""
    if (rank is None) == (ratio is None):
        raise RankError("give exactly one of rank (--rank) and ratio (--ratio)")
    if rank is not None:
        return check_rank(rank, vocab, hidden, bias=bias, norms=norms)
    return rank_for_ratio(ratio, vocab, hidden, bias=bias, norms=norms)
