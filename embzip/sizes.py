"""Parameter counts and compression ratios of a factored embedding.

A V x d embedding becomes codes (V x k) and a decoder (k x d), plus an optional bias (d) and
optional per-row norms (V). Sizes count bytes: the matrix's numbers at the source's bits, the factors' at the
bits they are stored in (16 for a float32 model's factors: compressed.storage_dtype), so a float32 model's factors
save bytes up to the matrix's own rank. With both bits equal (the defaults) a ratio is a ratio of numbers.
"""

from __future__ import annotations

from numbers import Integral, Real

from .errors import RankError


def _shape(vocab: int, hidden: int) -> None:
    if not all(isinstance(n, Integral) and not isinstance(n, bool) and n > 0 for n in (vocab, hidden)):
        raise RankError(f"a matrix's vocab and hidden sizes must be positive integers, got {vocab!r} and {hidden!r}")


def _bits(source_bits: int, stored_bits: int) -> None:
    if not all(isinstance(n, Integral) and not isinstance(n, bool) and n > 0 for n in (source_bits, stored_bits)):
        raise RankError(f"source_bits and stored_bits must be positive integers, got {source_bits!r} and "
                        f"{stored_bits!r}")


def _rank(rank: int) -> None:
    if not (isinstance(rank, Integral) and not isinstance(rank, bool) and rank >= 1):
        raise RankError(f"rank must be a positive integer, got {rank!r}")


def factored_params(vocab: int, hidden: int, rank: int, *, bias: bool = False, norms: bool = False) -> int:
    """Number of stored numbers for rank-`rank` factors of a `vocab` x `hidden` matrix."""
    return vocab * rank + rank * hidden + (hidden if bias else 0) + (vocab if norms else 0)


def compression_ratio(vocab: int, hidden: int, rank: int, *, bias: bool = False, norms: bool = False,
                      source_bits: int = 32, stored_bits: int = 32) -> float:
    """Bytes of the V x d matrix at `source_bits` a number over bytes of the factors at `stored_bits`
    (the defaults, equal, give the ratio of numbers)."""
    _shape(vocab, hidden)
    _bits(source_bits, stored_bits)
    _rank(rank)
    return vocab * hidden * source_bits / (factored_params(vocab, hidden, rank, bias=bias, norms=norms) * stored_bits)


def max_useful_rank(vocab: int, hidden: int, *, bias: bool = False, norms: bool = False, source_bits: int = 32,
                    stored_bits: int = 32) -> int:
    """The largest rank whose factors take strictly fewer bytes than the matrix, and no more than
    min(vocab, hidden), the matrix's own rank (0 if none saves)."""
    _shape(vocab, hidden)
    _bits(source_bits, stored_bits)
    extra = (hidden if bias else 0) + (vocab if norms else 0)
    # stored * (k * (V + d) + extra) < source * V * d  <=>  k < (source*V*d - stored*extra) / (stored*(V + d))
    room = source_bits * vocab * hidden - stored_bits * extra
    k = (room - 1) // (stored_bits * (vocab + hidden)) if room > 0 else 0
    return max(min(k, vocab, hidden), 0)


def check_rank(rank: int, vocab: int, hidden: int, *, bias: bool = False, norms: bool = False, source_bits: int = 32,
               stored_bits: int = 32) -> int:
    """Return `rank` if it compresses a `vocab` x `hidden` matrix, else raise RankError."""
    _rank(rank)
    bits = dict(source_bits=source_bits, stored_bits=stored_bits)
    largest = max_useful_rank(vocab, hidden, bias=bias, norms=norms, **bits)
    if rank <= largest:
        return rank
    if rank > min(vocab, hidden) and compression_ratio(vocab, hidden, rank, bias=bias, norms=norms, **bits) > 1:
        raise RankError(f"rank {rank} is more than a {vocab} x {hidden} embedding has (its rank is at most "
                        f"{min(vocab, hidden)}); the largest useful rank is {largest}")
    numbers = factored_params(vocab, hidden, rank, bias=bias, norms=norms)
    raise RankError(
        f"rank {rank} saves nothing for a {vocab} x {hidden} embedding (factors would take "
        f"{numbers * stored_bits // 8:,} bytes, the matrix {vocab * hidden * source_bits // 8:,}); "
        f"the largest useful rank is {largest}"
    )


def rank_for_ratio(ratio: float, vocab: int, hidden: int, *, bias: bool = False, norms: bool = False,
                   source_bits: int = 32, stored_bits: int = 32) -> int:
    """The largest useful rank whose compression ratio (bytes, see compression_ratio) is at least `ratio`."""
    if isinstance(ratio, bool) or not isinstance(ratio, Real):
        raise RankError(f"ratio must be a number, got {ratio!r}")
    if not ratio > 1.0:
        raise RankError(f"ratio (--ratio) must be greater than 1, got {ratio}")
    bits = dict(source_bits=source_bits, stored_bits=stored_bits)
    extra = (hidden if bias else 0) + (vocab if norms else 0)
    numbers = vocab * hidden * source_bits / (ratio * stored_bits)  # the most the factors may hold
    k = min(int(max((numbers - extra) // (vocab + hidden), 0)), max_useful_rank(vocab, hidden, bias=bias, norms=norms,
                                                                                  **bits))
    while k >= 1 and compression_ratio(vocab, hidden, k, bias=bias, norms=norms, **bits) < ratio:
        k -= 1
    if k < 1:
        raise RankError(
            f"no rank reaches a compression ratio of {ratio} for a {vocab} x {hidden} embedding; "
            f"rank 1 gives {compression_ratio(vocab, hidden, 1, bias=bias, norms=norms, **bits):.1f}"
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
