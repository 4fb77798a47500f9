"""Codebook compression: rows of the embedding coded as small integer indices into learned codebooks.

Each row e (1 x d) is first moved into a space where plain squared error is the error that matters:

    y = e A,   A = M^(1/2) R

with M a metric: aware.py's for a tied head (the hidden states entering it), sensitivity.py's for an
encoder without a head (how far its sentence vectors turn), I otherwise; and R the principal
directions of the weighted rows e M^(1/2) (largest variance first). Then
||(e - e_hat) M^(1/2)||^2 = ||y - y_hat||^2, so k-means in y space minimises the metric error.

y may first be coded whole by a coarse stage: one piece as wide as the row, K centroids (vector
quantization of whole rows: it captures how rows cluster as whole vectors, which pieces coded
one at a time cannot see; see CodebookConfig.coarse_stages for when). What it leaves is coded by
stages of product quantization (residual PQ): stage s cuts the d coordinates into
m_s contiguous pieces and gives each piece a codebook of K <= 256 centroids; each row stores one
uint8 index per piece; each stage codes what the earlier stages left. Piece sizes
follow reverse water-filling on the weighted variance of each coordinate (more bits, i.e. smaller
pieces, where the variance is large) or are equal. Optionally each row keeps a gain g (16 bits),
the least-squares scale of its reconstruction. Decoding:

    e_hat = g * (sum_s y_hat_s) A^(-1)

Bits by need: every row gets the same stages, but a few rows carry most of the objective (a
token's weight is its count; the common tokens' rows are scored at nearly every position). So
`focus` (10%) of the budget goes to one last stage over only the rows with the largest weighted
residual w_i ||y_i - y_hat_i||^2 after the other stages (about 4% of Gemma's rows, holding 74% of
the weight, at 2 bpw); their row numbers are stored (32 bits each). On Gemma-3-270M's validation
texts it lowered the perplexity ratio at 1 and 2 bpw on English (x1.94 -> x1.52, x1.19 -> x1.11)
and on six other languages (x4.68 -> x4.46, x1.70 -> x1.64); see docs/method.md, also for where it
is left out (split).

Centroids are trained by weighted k-means (Lloyd) on a sample of rows drawn with probability
proportional to the row weights (token counts), then every row is assigned once, and one last
weighted centroid update runs on all rows. Distances ||x||^2 - 2 x.c + ||c||^2 are batched
matmuls over pieces of equal size, in row chunks.

The coarse stage is stored as stage 0 with a single piece (sizes [d]): the file format is the one
residual PQ already had. Stored: `transform` (A^(-1), d x d, int8 with `transform.scale`, a 16-bit
scale per row), per stage `stage{s}.codes` (V x m_s, uint8), `stage{s}.codebook` (K x d, int8: piece j
owns its columns) with `stage{s}.codebook.scale` (a 16-bit scale per column) and `stage{s}.sizes`
(int32, m_s), for the focus stage `stage{s}.rows` (int32, n, increasing; its codes are n x m_s), and
`gain` (V, float16) if used. `stored_bits` counts all of it; the budget bits * V * d is never
exceeded. The tables in int8 take half the bits of 16-bit floats (which files of format 3 hold, and
which still decode) and cost no measurable accuracy; the bits they free go to indices (on
all-MiniLM-L6-v2 the tables were a sixth of a 2 bpw budget).

Rows that are never read (`absent`: the tokens a WordPiece tokenizer cannot produce, reach.py, on a
model without a tied head) are not coded: their row numbers and one fill row (their mean) are stored,
and the other rows are fitted as a matrix of their own with the bits left (all-MiniLM-L6-v2: 1331 of
30522 rows, 4.4% more bits for the others). Decoding an absent row gives the fill row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch

from .models import fast_product, sixteen_bit

_STORE = torch.float16
_BUFFER = 2**20  # distance entries per assignment chunk on the CPU (4 MiB; 1 GiB on a GPU)
_BLOCK = 8192  # rows of the matrix at a time where fit_codebook reads or reduces all of them
_ROWS = 2**22  # numbers in a block of residual rows while a stage assigns every row (16 MiB of float32)
_LOOKUP_LIMIT = 24000  # a tied head uses lookup_logits while hidden states x row_pieces stay at most this, else
# stage_logits. On Gemma-3-270M (this 2-core CPU) they cost the same beyond 512, near 140 and near 50 states at 1, 2
# and 4 bpw (row_pieces 74, 154, 314): over 38000, 21500, 15700 (90 states, 28000, at 4 bpw with two stages of
# pieces; one is now the default there). Above the crossing the tables cost at most 10% more at 4 bpw.
_FOCUS_PIECE_DIM = 4.0  # a focus stage has at most d / 4 pieces, whatever the other stages have (docs/method.md)
PRIOR_SHARE_TEXT_ONLY = 0.5  # CodebookConfig.prior_share where no sample joins the counts (an encoder, a masked LM)
_STEP_STATES = 16  # float32 states a tied head takes as a generation step: tables in bfloat16 (_table_dtype)
_STAGE_BLOCK = 2**22  # entries (rows x (d + states)) of a block of rows in stage_logits on a CPU (16 MiB of float32)


@dataclass
class CodebookConfig:
    """Settings of codebook compression."""

    bits: float = 2.0  # budget in bits per weight of the V x d matrix, everything stored counted
    min_piece_dim: float | None = None  # a stage every row has holds at most d / min_piece_dim pieces; more pieces ->
    # more stages. None: piece_dim(tied), 2 for a tied head, else 4. (A focus stage has at most d / 4.)
    allocation: str = "variance"  # piece sizes: "variance" (reverse water-filling) or "equal"
    gain: bool = True  # store a per-row 16-bit gain
    coarse: int | None = None  # first stages of one full-width piece each; None: 1 below 3 bits per weight, else 0
    focus: float = 0.1  # share of the budget for a last stage over only the rows of largest weighted error (0: none)
    unreachable: bool = False  # also code the rows of tokens the tokenizer never produces (reach.py); by default an
    # untied model's are left out and their bits go to the other rows (a tied head scores every row: kept)
    vocab_prior: float | None = None  # the tokenizer's vocabulary prior joins the counts at this share of the text's
    # total (weights.vocabulary_prior; 0: none); None: prior_share's default
    input_metric: float = 4.0  # gamma of an encoder's sentence-vector metric (sensitivity.py), M = I + gamma G / mean
    # eig G, for a model without an output head; 0: plain squared error there
    centroids: int = 256  # K per piece: 16 (4-bit indices, packed two per byte) or up to 256 (uint8)
    sample: int = 32768  # rows drawn (by weight) to train the centroids
    iterations: int = 8  # Lloyd steps on the sample
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name, value, allowed):  # the command line gives bits, min_piece_dim, focus, vocab_prior, input_metric
            given = ("bits", "min_piece_dim", "focus", "vocab_prior", "input_metric")
            label = flagged(name) if name in given else name
            raise OptionError(f"codebook {label} must be {allowed}, got {value!r}")
        if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and 0 < self.bits <= 16):
            bad("bits", self.bits, "a finite number in (0, 16] (16: a bfloat16 matrix)")
        if self.min_piece_dim is not None and (isinstance(self.min_piece_dim, bool)
                                               or not isinstance(self.min_piece_dim, (int, float))
                                               or not math.isfinite(self.min_piece_dim) or self.min_piece_dim < 1):
            bad("min_piece_dim", self.min_piece_dim, "a number >= 1")
        if self.allocation not in ("variance", "equal"):
            bad("allocation", self.allocation, "'variance' or 'equal'")
        if not 2 <= self.centroids <= 256:
            bad("centroids", self.centroids, "between 2 and 256")
        if self.sample < 1:
            bad("sample", self.sample, "positive")
        if self.iterations < 0:
            bad("iterations", self.iterations, ">= 0")
        if not (isinstance(self.focus, (int, float)) and 0 <= self.focus < 1):
            bad("focus", self.focus, "a share of the budget in [0, 1)")
        if self.vocab_prior is not None and not (isinstance(self.vocab_prior, (int, float))
                                                 and math.isfinite(self.vocab_prior) and self.vocab_prior >= 0):
            bad("vocab_prior", self.vocab_prior, "a finite share >= 0")
        if not (isinstance(self.input_metric, (int, float)) and not isinstance(self.input_metric, bool)
                and math.isfinite(self.input_metric) and self.input_metric >= 0):
            bad("input_metric", self.input_metric, "a finite weight >= 0")
        if self.coarse is not None and (isinstance(self.coarse, bool) or not isinstance(self.coarse, int)
                                        or self.coarse < 0):
            bad("coarse", self.coarse, "None or a whole number >= 0")

    def coarse_stages(self, vocab: int, hidden: int, centroids: int) -> int:
        """Coarse stages asked for. By default one when it costs at most 3% of the budget, below 3 bits per
        weight. Measured on validation texts (docs/method.md): on Gemma-3-270M (1.0-2.0% of the budget at
        1-2 bpw) it lowered the perplexity cost at 1 and 2 bpw and raised it at 4; on all-MiniLM-L6-v2
        (a 30522-row vocabulary: 4.4-8.8%) it bought no more than the bits it took."""
        if self.coarse is not None:
            return self.coarse
        share = (8 * vocab + _book_bits(centroids, hidden)) / (self.bits * vocab * hidden)
        return 1 if self.bits < 3 and share <= 0.03 else 0

    def weight_power(self, tied: bool) -> float:
        """The power of the token-count row weights when the recipe gives none (weights.py): for a tied head 0.5
        below 3 bits per weight and 0.75 from there, else 1. A tied head scores every row at every position, so rows
        the weights text rarely shows matter there too, and power 1 left them too coarse. Measured on validation
        texts (docs/method.md), Gemma-3-270M, two seeds each: at 2 bpw power 0.5 lowered the perplexity cost on
        English and on six other languages, at 1 bpw on the other languages (English equal); at 4 bpw 0.5 cost
        English 1-2% and 0.75 lowered both."""
        if not tied:
            return 1.0
        return 0.5 if self.bits < 3 else 0.75

    def prior_share(self, sampled: bool) -> float:
        """`vocab_prior`, or when that is None: 1 where the model's own samples join the counts (a causal LM with a
        tied head), else PRIOR_SHARE_TEXT_ONLY. Measured on validation texts (docs/method.md): on Gemma-3-270M with
        its samples, share 1 against none lowered the other languages' perplexity cost at every size without
        costing English. On all-MiniLM-L6-v2 (the text's counts alone; English en_val / multilingual ml_val
        fidelity, four seeds at 2 bpw) shares 0.1, 0.3, 0.5 and 1 all beat none on every seed; 0.5 had the best
        English mean (0.99149 against 0.98986 without) and 1 the best other languages (0.9637; 0.5: 0.9587; none:
        0.9426)."""
        if self.vocab_prior is not None:
            return float(self.vocab_prior)
        return 1.0 if sampled else PRIOR_SHARE_TEXT_ONLY

    def piece_dim(self, tied: bool) -> float:
        """`min_piece_dim`, or when that is None: 2 for a tied head, 4 otherwise (fit_codebook, which cannot tell,
        takes 4). A tied head multiplies the hidden states with every stage of pieces, so at 4 bpw one stage of
        d / 2 pieces instead of two of d / 4 took Gemma-3-270M's forward pass on 4 x 64 tokens from 1.69x to
        1.23x the original's, for a perplexity cost 0.25% higher on English and 0.6% on six other languages
        (validation texts, three seeds; on all-MiniLM-L6-v2, no head, one stage cost fidelity on both seeds
        measured), docs/method.md. Below about 3.5 bpw one stage holds the budget either way."""
        if self.min_piece_dim is not None:
            return float(self.min_piece_dim)
        return 2.0 if tied else 4.0

    def settings(self) -> dict:
        return asdict(self)


def _bits_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def stored_bits(tensors: dict[str, torch.Tensor], vocab: int | None = None, hidden: int | None = None) -> int:
    """Bits of everything stored (vocab/hidden are accepted for a uniform interface)."""
    return sum(_bits_of(t) for t in tensors.values())


def _book_bits(rows: int, hidden: int) -> int:
    """Bits of a stored rows x d table (a codebook, or the d x d transform): int8 entries and a 16-bit scale per
    column of a codebook (per row of the transform: both are d scales)."""
    return 8 * rows * hidden + 16 * hidden


def round8(t: torch.Tensor, dim: int, store: torch.dtype = _STORE) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 levels -127..127, 16-bit absmax scale in `store`) of t, one scale per slice along `dim` (the scale
    keeps that dim, size 1). Levels * scale.float() is what decoding will use."""
    amax = t.abs().amax(dim, keepdim=True)
    scale = (amax / 127).to(store)
    # never below amax / 127 once rounded to 16 bits (else the largest values would clip), nor 0 (tiny columns)
    scale = torch.where(scale.to(amax.dtype) * 127 < amax, torch.nextafter(scale, torch.full_like(scale, math.inf)),
                        scale).clamp_min(2**-24 if store == torch.float16 else torch.finfo(store).tiny)
    return (t / scale.to(t.dtype)).round_().clamp_(-127, 127).to(torch.int8), scale


def dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A stored table (`transform`, `stage{s}.codebook`) in float32: int8 levels times their scales (`NAME.scale`:
    one per column of a codebook, per row of the transform), or the 16-bit floats of format 3 files."""
    t = tensors[name]
    if not t.is_floating_point():
        scale = tensors[name + ".scale"].float()
        return t.float() * (scale.unsqueeze(1) if name == "transform" else scale)
    return t.float()


def _index_bits(centroids: int) -> int:
    return 4 if centroids <= 16 else 8


def pack(codes: torch.Tensor, centroids: int) -> torch.Tensor:
    """uint8 indices (n x m); two per byte (low nibble first) when centroids <= 16."""
    if _index_bits(centroids) == 8:
        return codes
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], 1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(packed: torch.Tensor, centroids: int, pieces: int) -> torch.Tensor:
    if _index_bits(centroids) == 8:
        return packed
    return torch.stack([packed & 15, packed >> 4], 2).reshape(packed.shape[0], 2 * packed.shape[1])[:, :pieces]


def _per_byte(centroids: int) -> int:
    """Pieces whose indices share one byte of a row: 2 with 4-bit indices, else 1."""
    return 8 // _index_bits(centroids)


def _stage_pieces(hidden: int, piece_dim: float, centroids: int) -> int:
    """The most pieces one PQ stage has (d / piece_dim, in whole bytes of indices per row)."""
    unit = _per_byte(centroids)
    return max(unit, int(hidden // piece_dim) // unit * unit)


def focus_rows(free: float, hidden: int, config: CodebookConfig, centroids: int) -> int:
    """Rows a focus stage can code in `free` bits: its K x d codebook, sizes, then per row its index bytes and
    a 32-bit row number. 0 when that is fewer rows than centroids (too few to train them)."""
    pieces = _stage_pieces(hidden, _FOCUS_PIECE_DIM, centroids)
    per_row = 8 * math.ceil(pieces * _index_bits(centroids) / 8) + 32
    rows = int((free - _book_bits(centroids, hidden) - 32 * pieces) // per_row)
    return rows if rows >= centroids else 0


def split(vocab: int, hidden: int, config: CodebookConfig, centroids: int) -> tuple[CodebookConfig, bool]:
    """(the settings of the stages every row has, whether a focus stage follows).

    The focus stage takes `config.focus` of the budget when that share pays for its codebook and at least K
    rows, and what is left still holds the other stages; else all of the budget goes to the stages every
    row has. (With 16-bit codebooks it was left out where the codebook cost more than a quarter of the
    share, because there, on all-MiniLM-L6-v2, it did not pay; with int8 codebooks it pays there too:
    docs/method.md.)"""
    share = config.focus * config.bits * vocab * hidden
    if config.focus > 0 and focus_rows(share, hidden, config, centroids):
        base = replace(config, bits=config.bits * (1 - config.focus))
        try:
            _pq_plan(vocab, hidden, base, centroids, 0)
            return base, True
        except ValueError:
            pass
    return config, False


class Plan(NamedTuple):
    """How a budget is spent: coarse stages (one full-width piece each), pieces per PQ stage, and whether a
    focus stage follows them."""

    coarse: int
    pieces: list[int]
    focus: bool


def plan(vocab: int, hidden: int, config: CodebookConfig, centroids: int) -> Plan:
    """The stages that fill the budget as fully as possible without exceeding it.

    With 4-bit indices PQ pieces come in pairs (one byte per row per pair). Coarse stages the budget
    cannot hold next to one PQ piece per row are left out (small matrices, where a K x d codebook is
    a large part of the budget). A focus stage (split) gets its share first; this plans the rest."""
    config, focus = split(vocab, hidden, config, centroids)
    for coarse in range(config.coarse_stages(vocab, hidden, centroids), -1, -1):
        try:
            return Plan(coarse, _pq_plan(vocab, hidden, config, centroids, coarse), focus)
        except ValueError:
            if coarse == 0:
                raise


def _pq_plan(vocab: int, hidden: int, config: CodebookConfig, centroids: int, coarse: int) -> list[int]:
    budget = config.bits * vocab * hidden
    fixed = _book_bits(hidden, hidden) + (16 * vocab if config.gain else 0)  # the transform: a d x d table too
    # each coarse stage: one uint8 index (a padded byte with 4-bit indices) per row and a K x d codebook
    fixed += coarse * (8 * vocab + _book_bits(centroids, hidden))
    unit = _per_byte(centroids)
    per_stage_max = _stage_pieces(hidden, config.piece_dim(tied=False), centroids)
    stages = 1
    while True:
        free = budget - fixed - stages * _book_bits(centroids, hidden)
        total = int(free // (8 * vocab + 32 * unit)) * unit
        if total < stages * unit:
            advice = "give more bits" if stages == 1 else (
                f"each stage holds at most {per_stage_max} pieces and brings its own codebook: give a smaller "
                f"min_piece_dim (now {config.piece_dim(tied=False):g})")
            raise ValueError(f"{config.bits} bits per weight cannot hold one piece per row in each of {stages} "
                             f"stage(s) for a {vocab} x {hidden} matrix with {centroids} centroids; {advice}")
        need = math.ceil(total / per_stage_max)
        if need <= stages:
            break
        stages = need
    units, extra = divmod(total // unit, stages)
    return [(units + (1 if s < extra else 0)) * unit for s in range(stages)]


def _sizes(variance: torch.Tensor, pieces: int, allocation: str) -> list[int]:
    """Contiguous piece sizes over the d coordinates (each >= 1, summing to d)."""
    d = len(variance)
    pieces = min(pieces, d)
    if allocation == "equal":
        base, extra = divmod(d, pieces)
        return [base + (1 if j >= pieces - extra else 0) for j in range(pieces)]
    lam = variance.double().clamp_min(1e-30)
    lo, hi = math.log(lam.min().item()) - 60, math.log(lam.max().item())
    rate = 8.0 * pieces
    for _ in range(100):  # reverse water-filling: bits_j = max(0, log2(lam_j / theta) / 2), sum = rate
        mid = (lo + hi) / 2
        if (0.5 * (lam.log() - mid) / math.log(2)).clamp_min(0).sum() > rate:
            lo = mid
        else:
            hi = mid
    bits = (0.5 * (lam.log() - hi) / math.log(2)).clamp_min(0) + 1e-9
    cum = torch.cumsum(bits, 0) / bits.sum() * pieces
    sizes, start = [], 0
    for j in range(1, pieces):
        end = int(torch.searchsorted(cum, torch.tensor(float(j), dtype=cum.dtype)).item()) + 1
        end = min(max(end, start + 1), d - (pieces - j))
        sizes.append(end - start)
        start = end
    sizes.append(d - start)
    return sizes


def _groups(sizes: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each piece size: (piece numbers, their coordinate columns as (m_g, size))."""
    offsets = [0] + list(torch.cumsum(torch.tensor(sizes), 0).tolist())
    out = {}
    for size in sorted(set(sizes)):
        idx = [j for j, s in enumerate(sizes) if s == size]
        cols = torch.tensor([list(range(offsets[j], offsets[j] + size)) for j in idx])
        out[size] = (torch.tensor(idx), cols)
    return out


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (m, n, k), c (m, K, k), float32, K <= 256 -> nearest centroid per piece and row (m, n).

    Squared distances come from one batched product of augmented vectors, [-2x, 1, |x|^2] . [c, |c|^2, 1].
    Each distance's float32 bit pattern, read as an int32, orders like the distance (distances are >= 0;
    rounding can make one of about 0 negative, which then still wins). Its low 8 bits are replaced by the
    centroid's number, so one integer minimum gives the nearest centroid: half the time of `argmin` on a
    CPU, where the reduction, not the product, is the cost. Distances equal in their top 16 of 24 mantissa
    bits (relative 2^-15) count as ties and go to the lower number."""
    m, n, _ = x.shape
    K = c.shape[1]
    ca = torch.cat([c, c.pow(2).sum(-1, keepdim=True), torch.ones_like(c[..., :1])], -1).transpose(1, 2).contiguous()
    number = torch.arange(K, dtype=torch.int32, device=x.device)
    out = torch.empty(m, n, dtype=torch.long, device=x.device)
    rows, block = _assign_chunks(m, K, x.device)
    for j in range(0, n, block):  # augmented rows a block at a time (bounded extra memory)
        xj = x[:, j:j + block]
        xa = torch.cat([-2 * xj, torch.ones_like(xj[..., :1]), xj.pow(2).sum(-1, keepdim=True)], -1)
        for i in range(0, xa.shape[1], rows):  # a distance buffer that stays in cache
            key = torch.bmm(xa[:, i:i + rows], ca).view(torch.int32)
            key.bitwise_and_(-256).bitwise_or_(number)
            out[:, j + i:j + i + key.shape[1]] = key.amin(-1).bitwise_and_(255)
    return out


def _assign_chunks(m: int, K: int, device: torch.device) -> tuple[int, int]:
    """_assign's (rows per distance buffer, rows per block of augmented vectors) for m pieces and K centroids.
    _stage feeds _assign whole multiples of the block, so its products, and the codes, are the ones a single call
    over every row gives."""
    rows = max(16, (_BUFFER if device.type == "cpu" else 2**28) // (m * K))
    return rows, max(rows, 8192)


def _accumulate(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, sums: torch.Tensor,
                mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds each row's weighted piece (x (m, n, k), weights w (n), codes (m, n)) into its centroid's sums
    (m K, k) and its weight into mass (m K), in row order: blocks of rows added one after another give the same
    sums as all rows at once."""
    m, n, k = x.shape
    K = sums.shape[0] // m
    flat = (codes + torch.arange(m, device=x.device).unsqueeze(1) * K).reshape(-1)
    sums.index_add_(0, flat, (x * w[:, None]).reshape(-1, k))
    mass.index_add_(0, flat, w.repeat(m))
    return sums, mass


def _centroids(sums: torch.Tensor, mass: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Weighted means from _accumulate's sums; a centroid with no rows keeps its place (c, (m, K, k))."""
    m, K, k = c.shape
    new = sums / mass.clamp_min(1e-30).unsqueeze(1)
    return torch.where(mass.unsqueeze(1) > 0, new, c.reshape(m * K, k)).view(m, K, k)


def _update(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Weighted means of each centroid's rows; a centroid with no rows keeps its place."""
    m, K, k = c.shape
    zeros = torch.zeros(m * K, k, dtype=x.dtype, device=x.device)
    return _centroids(*_accumulate(x, w, codes, zeros, zeros[:, 0].clone()), c)


def _stage(residual: Callable[[int, int], torch.Tensor], n: int, w: torch.Tensor, ys: torch.Tensor,
           sample_w: torch.Tensor, sizes: list[int], K: int, iterations: int,
           gen: torch.Generator, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PQ stage on n rows (residual(i, j): rows i..j-1, float32; ys: the training rows): (codes n x m uint8,
    codebook K x d int8, its scales d in `store`). Centroids are trained on ys, then the rows are assigned and their
    weighted sums gathered a block at a time (no copy of all rows), and the centroids rounded to int8 with a scale
    per column after that last update; each row keeps the centroid it was nearest to before the rounding (which
    moves a centroid by at most half a level, 1/254 of its column's largest)."""
    d, device = ys.shape[1], ys.device
    codes = torch.empty(n, len(sizes), dtype=torch.uint8)
    book = torch.empty(K, d, dtype=torch.int8)
    scales = torch.empty(d, dtype=store)
    start = torch.randperm(len(ys), generator=gen)[:K].to(device)
    groups = []
    for size, (idx, cols) in _groups(sizes).items():
        cols = cols.to(device)
        xs = ys[:, cols].permute(1, 0, 2).contiguous()  # (m_g, rows drawn, size)
        c = xs[:, start].clone()
        for _ in range(iterations):
            c = _update(xs, sample_w, _assign(xs, c), c)
        sums = torch.zeros(len(idx) * K, size, device=device)
        groups.append((idx, cols, c, sums, sums[:, 0].clone()))
    step = math.lcm(*(_assign_chunks(len(idx), K, device)[1] for idx, *_ in groups))
    block = max(step, _ROWS // d // step * step)
    for i in range(0, n, block):  # every row assigned once and added to its centroid's sums
        r = residual(i, min(n, i + block))
        for idx, cols, c, sums, mass in groups:
            xa = r[:, cols].permute(1, 0, 2).contiguous()
            assigned = _assign(xa, c)
            _accumulate(xa, w[i:i + len(r)], assigned, sums, mass)
            codes[i:i + len(r), idx] = assigned.T.to(torch.uint8).cpu()
    for idx, cols, c, sums, mass in groups:
        levels, scale = round8(_centroids(sums, mass, c), 1, store)  # the weighted update on all rows, then int8
        flat = cols.reshape(-1).cpu()
        book[:, flat] = levels.permute(1, 0, 2).reshape(K, -1).cpu()
        scales[flat] = scale.reshape(-1).cpu()
    return codes, book, scales


def _span(index: torch.Tensor) -> slice | torch.Tensor:
    """A slice for indices that run one after another, else the indices."""
    first = int(index[0])
    return slice(first, first + len(index)) if torch.equal(index, torch.arange(first, first + len(index))) else index


def _decode_plan(book: torch.Tensor, sizes: torch.Tensor, device: torch.device) -> tuple:
    """What reading one stage needs besides its codes: per piece size (pieces, index offsets, table, the
    coordinates the group covers side by side), and the column order to restore (None when the groups already
    sit in order). Built once per stage and re-used for every block of rows, by decoding and by stage_logits."""
    K = book.shape[0]
    book = book.to(device).float()
    groups, order = [], []
    for size, (idx, cols) in _groups(sizes.tolist()).items():
        flat = cols.reshape(-1)
        table = book[:, flat.to(device)].view(K, len(idx), size).transpose(0, 1).reshape(-1, size)
        offsets = torch.arange(len(idx), dtype=torch.int32, device=device) * K
        pieces = _span(idx)
        groups.append((pieces if isinstance(pieces, slice) else pieces.to(device), offsets, table, flat.to(device)))
        order.append(flat)
    order = torch.cat(order)
    inverse = None if torch.equal(order, torch.arange(len(order))) else torch.argsort(order).to(device)
    return groups, inverse, len(order)


def _stage_decode(codes: torch.Tensor, plan: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
    """One stage's rows (added into `out` when given): for each piece size, a row gather from a
    (pieces x K, size) table.

    Looking up whole pieces (F.embedding) touches n x pieces indices, not n x d as a per-coordinate
    gather would. (A tied head does not decode its rows: stage_logits.) On a CPU it runs a block
    of rows at a time (int32 indices, a block that stays in cache). Each group of equal pieces is
    written side by side into the block, and one column gather puts the coordinates back in order:
    water-filled sizes interleave (3, 4, 3, 4 where the bits fall slowly), and writing each group
    through its column index took twice as long (a PQ stage on Gemma: 0.33-0.43 s against 1.0 s).
    Sorting the sizes would avoid the gather but cost about 1% of perplexity on the validation
    texts (docs/method.md), so they stay as water-filling gives them."""
    groups, inverse, d = plan
    n, device = codes.shape[0], codes.device
    add = out is not None
    if out is None:
        out = torch.empty(n, d, device=device)
    block = max(64, 2 * _BUFFER // d) if device.type == "cpu" else max(1024, 2**26 // d)  # 8 MiB; 256 MiB
    for i in range(0, n, block):
        dest = out[i:i + block]
        rows = dest.shape[0]
        grouped = torch.empty(rows, d, device=device) if (add or inverse is not None) else dest
        start = 0
        for pieces, offsets, table, columns in groups:
            width = len(columns)
            looked = torch.nn.functional.embedding(codes[i:i + block, pieces].int() + offsets, table)
            grouped[:, start:start + width] = looked.view(rows, width)
            start += width
        if inverse is not None:
            grouped = grouped.index_select(1, inverse)
        if add:
            dest += grouped
        elif grouped is not dest:
            dest.copy_(grouped)
    return out


def _stages(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """(codes as stored, codebook, sizes, rows) of each stage, in order; rows is None for a stage every row has,
    else the sorted row numbers a focus stage codes (its codes are in that order)."""
    out, s = [], 0
    while f"stage{s}.codes" in tensors:
        out.append((tensors[f"stage{s}.codes"], dequantized(tensors, f"stage{s}.codebook"), tensors[f"stage{s}.sizes"],
                    tensors.get(f"stage{s}.rows")))
        s += 1
    return out


def _members(rows: torch.Tensor, index: torch.Tensor | slice, vocab: int) -> tuple[torch.Tensor, torch.Tensor | slice]:
    """For a focus stage's sorted `rows` and the rows `index` being decoded: (where in the output those of
    `index` that the stage codes sit, where their codes sit among the stage's)."""
    if isinstance(index, slice):
        start, stop, step = index.indices(vocab)
        if step == 1:
            a, b = torch.searchsorted(rows, torch.tensor([start, max(start, stop)], dtype=rows.dtype,
                                                         device=rows.device)).tolist()
            return (rows[a:b] - start).long(), slice(a, b)
        index = torch.arange(start, stop, step)
    index = index.to(rows.device)
    if len(rows) == 0 or index.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=rows.device), slice(0, 0)
    at = torch.searchsorted(rows, index.to(rows.dtype)).clamp_max(len(rows) - 1)
    hit = rows[at] == index
    return hit.nonzero().squeeze(1), at[hit]


def _training_rows(w: torch.Tensor, sample: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows drawn by weight to train centroids on, and how often each was drawn (its weight in k-means).
    With fewer distinct rows than centroids (tiny matrices) every row, weighted by w."""
    V = len(w)
    n = min(sample, 64 * V)
    drawn = torch.multinomial(w.float() if V < 2**24 else w.float().sqrt(), n, replacement=True, generator=gen)
    rows, counts = torch.unique(drawn, return_counts=True)
    if len(rows) < K:
        return torch.arange(V), w.float() * (n / V)
    return rows, counts.float()


def _root(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(metric.double())
    evals = evals.clamp_min(evals.max() * 1e-10)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T


def fit_codebook(embedding: torch.Tensor, *, weights: torch.Tensor | None = None,
                 metric: torch.Tensor | None = None, config: CodebookConfig | None = None, device: str = "cpu",
                 progress: bool = False, absent: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Codebook tensors for `embedding` (V x d) minimising sum_i w_i ||(e_i - e_hat_i) M^(1/2)||^2.

    `absent`: sorted row numbers that are never read (tokens the tokenizer cannot produce, reach.py). They are
    not coded: their row numbers (32 bits each) and one fill row (their mean, 16 bits a number) are stored, and
    the rest of the budget goes to the other rows, which are fitted as a matrix of their own."""
    config = config or CodebookConfig()
    V, d = embedding.shape
    if absent is not None and len(absent):
        return _fit_present(embedding, absent, weights=weights, metric=metric, config=config, device=device,
                            progress=progress)
    from .progress import bar

    gen = torch.Generator().manual_seed(config.seed)
    w = torch.ones(V, dtype=torch.float64) if weights is None else weights.double().clamp_min(0)
    w = w / w.mean()
    root, inv_root = _root(metric) if metric is not None else (torch.eye(d, dtype=torch.float64),) * 2
    x = _rows_times(embedding, root.float().to(device))
    # the tables' 16-bit dtype: float16 unless it would lose them (compressed.storage_dtype): rows of the size
    # whose 127th part sets the scales (an embedding of values near 1e-8 or 1e6)
    store = storage_dtype(torch.float32, torch.cat([x[i:i + _BLOCK].norm(dim=1) for i in range(0, V, _BLOCK)]) / 127)
    wd = w.to(device=device, dtype=torch.float32)
    mean = (wd @ x) / V
    z = x.sub_(mean).mul_(wd.sqrt().unsqueeze(1))  # in place: x is not needed again (V x d floats each copy)
    del x
    cov = z.T @ z  # float32 products (relative error ~1e-6 on Gemma; float64 took 4x as long)
    del z
    evals, evecs = torch.linalg.eigh(cov.double().cpu())
    rot = evecs.flip(1)
    rot = rot * torch.sign(rot.gather(0, rot.abs().argmax(0, keepdim=True)))
    # The transform A^(-1) is stored in int8 (a scale per row); y comes from the inverse of what is stored, so
    # decoding y gives e back exactly and rounding the transform only tilts the metric a little (relative
    # ~1/254), instead of adding its own error to every row.
    levels, scale = round8(rot.T @ inv_root, 1, store)
    y = _rows_times(embedding, torch.linalg.inv(levels.double() * scale.double()).float().to(device))
    K = min(config.centroids, V)
    coarse, pq, focused = plan(V, d, config, K)
    pieces = [1] * coarse + pq  # coarse stages: one piece of width d
    sample, sample_w = _training_rows(w, config.sample, K, gen)
    tensors = {"transform": levels.contiguous(), "transform.scale": scale.squeeze(1).contiguous()}
    recon = torch.zeros_like(y)

    def add_stage(s, rows, m):
        """Fit stage s on the residual of `rows` (None: all rows) with m pieces; store it, update recon. The
        residual of all rows is never made whole: its columns a slice at a time for the variance, its rows a
        block at a time for the assignment (the same numbers as from the whole, to the last bit)."""
        at = None if rows is None else rows.to(device)
        if at is None:
            ws, n = wd, V
            residual = lambda i, j: y[i:j] - recon[i:j]  # noqa: E731
            var = _column_variance(ws, y, recon)
            drawn, drawn_w = sample.to(device), sample_w
            ys = y[drawn] - recon[drawn]
        else:
            ws, n, part = wd[at], len(at), y[at].sub_(recon[at])
            residual = lambda i, j: part[i:j]  # noqa: E731
            var = _weighted_variance(ws, part.clone())
            drawn, drawn_w = _training_rows(w[rows], config.sample, K, gen)
            ys = part[drawn.to(device)]
        sizes = _sizes(var.cpu(), m, config.allocation)
        codes, book, scales = _stage(residual, n, ws, ys, drawn_w.to(device), sizes, K, config.iterations, gen,
                                     store)
        size_t = torch.tensor(sizes, dtype=torch.int32)
        plan_ = _decode_plan(book.float() * scales.float(), size_t, recon.device)
        if rows is None:
            _stage_decode(codes.to(recon.device), plan_, out=recon)  # added a block at a time: no V x d copy
        else:
            recon.index_add_(0, at, _stage_decode(codes.to(recon.device), plan_))
            tensors[f"stage{s}.rows"] = rows.to(torch.int32).contiguous()
        tensors[f"stage{s}.codes"] = pack(codes, K).contiguous()
        tensors[f"stage{s}.codebook"] = book.contiguous()
        tensors[f"stage{s}.codebook.scale"] = scales
        tensors[f"stage{s}.sizes"] = size_t

    with bar("codebook stages", len(pieces) + focused, enabled=progress) as b:
        for s, m in enumerate(pieces):
            add_stage(s, None, m)
            b.advance()
        if focused:  # the rows whose weighted error is largest get one more stage (see CodebookConfig.focus)
            free = config.bits * V * d - stored_bits(tensors) - (16 * V if config.gain else 0)
            n = min(focus_rows(free, d, config, K), V)
            score = torch.cat([wd[i:i + _BLOCK] * (y[i:i + _BLOCK] - recon[i:i + _BLOCK]).pow_(2).sum(1)
                               for i in range(0, V, _BLOCK)])  # each row's share of the objective
            add_stage(len(pieces), torch.topk(score, n).indices.sort().values.cpu(),
                      _stage_pieces(d, _FOCUS_PIECE_DIM, K))
            b.advance()
    if config.gain:
        gain = torch.cat([(recon[i:i + _BLOCK] * y[i:i + _BLOCK]).sum(1) / recon[i:i + _BLOCK].pow(2).sum(1)
                          .clamp_min(1e-30) for i in range(0, V, _BLOCK)])
        tensors["gain"] = gain.to(store).cpu().contiguous()
    return tensors


def _rows_times(embedding: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """embedding @ a in float32 on a's device, a block of rows at a time: no float32 copy of a 16-bit (or
    memory-mapped) matrix is made, and the product is the one a single matmul gives (checked in the tests)."""
    out = torch.empty(embedding.shape[0], a.shape[1], device=a.device)
    for i in range(0, embedding.shape[0], _BLOCK):
        torch.matmul(embedding[i:i + _BLOCK].to(device=a.device, dtype=torch.float32), a, out=out[i:i + _BLOCK])
    return out


def _weighted_variance(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each column's variance over the rows of x under weights w (mean 1). x is overwritten (squared in place)."""
    mean = (w @ x) / len(w)
    return (w @ x.pow_(2)) / len(w) - mean.pow(2)


def _column_variance(w: torch.Tensor, y: torch.Tensor, recon: torch.Tensor, width: int = 64) -> torch.Tensor:
    """_weighted_variance of y - recon, `width` columns at a time through one buffer (a buffer made anew for each
    slice left memory behind that the allocator did not give back: 2.5 GB for Llama-3-8B's 128256 x 4096)."""
    V, d = y.shape
    buffer = torch.empty(V * min(width, d), device=y.device)
    parts = []
    for c in range(0, d, width):
        part = buffer[:V * min(width, d - c)].view(V, -1)  # contiguous: the products of a slice made anew
        parts.append(_weighted_variance(w, torch.sub(y[:, c:c + width], recon[:, c:c + width], out=part)))
    return torch.cat(parts)


def _fit_present(embedding: torch.Tensor, absent: torch.Tensor, *, weights: torch.Tensor | None, config: CodebookConfig,
                 **kw) -> dict[str, torch.Tensor]:
    """fit_codebook of the rows not in `absent` at the budget they leave, plus `absent` and `absent.fill`."""
    V, d = embedding.shape
    absent = absent.long()
    if not _increasing_within(absent, V):
        raise ValueError("absent rows must be increasing row numbers within the matrix")
    coded = torch.ones(V, dtype=torch.bool)
    coded[absent] = False
    n = int(coded.sum())
    if n == 0:
        raise ValueError("every row is absent: nothing to code")
    bits = (config.bits * V * d - 32 * len(absent) - 16 * d) / (n * d)  # what the others may take
    tensors = fit_codebook(embedding[coded], weights=None if weights is None else weights[coded],
                           config=replace(config, bits=min(bits, 16.0)), **kw)
    tensors["absent"] = absent.to(torch.int32).contiguous()
    tensors["absent.fill"] = embedding[absent].float().mean(0).to(tensors["transform.scale"].dtype).contiguous()
    return tensors


def _increasing_within(rows: torch.Tensor, n: int) -> bool:
    """Whether `rows` are strictly increasing row numbers in [0, n) (a focus stage's rows, absent rows)."""
    return not len(rows) or (int(rows[0]) >= 0 and int(rows[-1]) < n and bool((rows[1:] > rows[:-1]).all()))


def _vocab(tensors: dict[str, torch.Tensor]) -> int:
    """Rows of the whole matrix: the coded ones and the absent ones."""
    absent = tensors.get("absent")
    return tensors["stage0.codes"].shape[0] + (0 if absent is None else len(absent))


def _placed(absent: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For row numbers of the whole matrix: (each one's position among the coded rows, whether it is absent)."""
    absent = absent.to(rows.device).long()
    before = torch.searchsorted(absent, rows)  # absent rows before each row, or the row itself
    hit = absent[before.clamp_max(len(absent) - 1)] == rows if len(absent) else torch.zeros_like(rows, dtype=torch.bool)
    return rows - before, hit


def _fill_absent(tensors: dict[str, torch.Tensor], coded: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(..., V) from the coded rows' values (..., coded) and the absent rows' one value (...)."""
    absent = tensors["absent"].to(coded.device).long()
    out = fill.unsqueeze(-1).expand(*fill.shape, _vocab(tensors)).clone()
    present = torch.ones(out.shape[-1], dtype=torch.bool, device=coded.device)
    present[absent] = False
    out[..., present] = coded
    return out


def row_pieces(tensors: dict[str, torch.Tensor]) -> float:
    """Pieces a row has on average: every piece of the stages all rows have, a focus stage's in proportion to
    the rows it codes. lookup_logits costs hidden states x this many table sums per row. (Read from the stored
    sizes and rows: nothing is dequantized.)"""
    V, total, s = tensors["stage0.codes"].shape[0], 0.0, 0
    while f"stage{s}.sizes" in tensors:
        rows = tensors.get(f"stage{s}.rows")
        total += len(tensors[f"stage{s}.sizes"]) * (1 if rows is None else len(rows) / V)
        s += 1
    return total


def coarse_stages(tensors: dict[str, torch.Tensor]) -> int:
    """The coarse stages a fit made: its first stages of one full-width piece for every row."""
    count = 0
    for _, _, sizes, rows in _stages(tensors):
        if len(sizes) != 1 or rows is not None:
            break
        count += 1
    return count


def lookup_logits(tensors: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor | None:
    """hidden @ decode_rows(tensors)^T without decoding a row, or None where stage_logits is cheaper.

    With h' = h A^T (A the stored transform), a row's logit is g_v * sum over stages and pieces of
    h'[piece] . codebook[code, piece]. Those products take one small table per piece (K values per
    hidden state: pieces x K x N in all, 160 KB for one state on Gemma at 2 bpw), and each row's logit
    is then a sum of table entries at its codes (embedding_bag: V x pieces additions of N values).
    Decoding costs V x d writes whatever N is, so the tables win for few hidden states, as in a
    generation step (Gemma, one state: 0.018 / 0.034 / 0.068 s at 1 / 2 / 4 bpw against about 1 s to
    decode the rows, and 0.046 s for the float32 original's own matrix product); they are used while
    states x row_pieces <= _LOOKUP_LIMIT. The tables are rounded to bfloat16 or a 16-bit model's dtype where that
    is fast (_table_dtype)."""
    d = tensors["transform"].shape[0]
    flat = hidden.reshape(-1, d)
    if flat.shape[0] * row_pieces(tensors) > _LOOKUP_LIMIT:
        return None
    stages = _stages(tensors)
    V = stages[0][0].shape[0]
    if flat.shape[0] == 0:
        return torch.zeros(*hidden.shape[:-1], V, device=hidden.device)
    device = flat.device
    h = flat.float() @ dequantized(tensors, "transform").to(device).T  # (N, d)
    full = [stage for stage in stages if stage[3] is None]
    dtype = _product_dtype(tensors, hidden)
    table = _table_dtype(tensors, hidden, dtype)
    out = _lookup(full, h, V, table).to(dtype)
    for codes, book, sizes, rows in stages:  # focus stages add to their rows only
        if rows is not None:
            looked = _lookup([(codes, book, sizes, None)], h, len(rows), table)
            out.index_add_(0, rows.to(device).long(), looked.to(dtype))
    if "gain" in tensors:
        out *= tensors["gain"].to(device).to(dtype).unsqueeze(1)
    return out.T.reshape(*hidden.shape[:-1], V)


def _lookup(stages: list[tuple], h: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, N): for stages whose codes have n rows, each row's sum over pieces of h's piece . its centroid, from
    tables of products rounded to `dtype` (bfloat16 halves what each sum reads: 1.3-1.6x faster sums)."""
    device = h.device
    tables, offsets, start = [], [], 0
    for _, book, sizes, _ in stages:
        K = book.shape[0]
        table = torch.empty(len(sizes), K, h.shape[0], device=device)
        book = book.to(device).float()
        for size, (idx, cols) in _groups(sizes.tolist()).items():
            cols = cols.to(device)
            table[idx.to(device)] = torch.einsum("nms,kms->mkn", h[:, cols], book[:, cols])
        tables.append(table.view(len(sizes) * K, h.shape[0]))
        offsets.append(start + torch.arange(len(sizes), dtype=torch.int32, device=device) * K)
        start += len(sizes) * K
    table = torch.cat(tables).to(dtype)  # (pieces x K, N): row p * K + k is piece p's centroid k
    offsets = torch.cat(offsets)
    pieces = len(offsets)
    out = torch.empty(n, h.shape[0], device=device, dtype=dtype)
    # 8 MiB of int32 index per block on a CPU (1 MiB blocks took 1.4x as long on Gemma at 4 bpw), 256 MiB on a GPU
    block = max(64, 2 * _BUFFER // pieces) if device.type == "cpu" else max(1024, 2**26 // pieces)
    # one index buffer for every block, unless a backward pass will need each block's indices (training
    # through the head: healing, fine-tuning)
    reuse = not may_train(table)
    index = torch.empty(min(block, n), pieces, dtype=torch.int32, device=device)
    for i in range(0, n, block):
        if not reuse and i:
            index = torch.empty(min(block, n - i), pieces, dtype=torch.int32, device=device)
        part, at = index[:min(block, n - i)], 0
        for codes, book, sizes, _ in stages:
            part[:, at:at + len(sizes)].copy_(unpack(codes[i:i + block], book.shape[0], len(sizes)))
            at += len(sizes)
        out[i:i + len(part)] = torch.nn.functional.embedding_bag(part.add_(offsets), table, mode="sum")
    return out


def head_logits(tensors: dict[str, torch.Tensor], hidden: torch.Tensor, derived: dict | None = None) -> torch.Tensor:
    """hidden @ decode_rows(tensors)^T (hidden.shape[:-1] + (V,); float32, or the hidden states' 16-bit dtype
    where the head computes in it, _product_dtype): per-piece tables for few hidden states (lookup_logits), else
    stage by stage without building a row (stage_logits); absent rows score the fill row."""
    looked = lookup_logits(tensors, hidden)
    coded = looked if looked is not None else stage_logits(tensors, hidden, derived)
    if "absent" not in tensors:
        return coded
    return _fill_absent(tensors, coded, hidden.float() @ tensors["absent.fill"].float().to(hidden.device))


def stage_logits(tensors: dict[str, torch.Tensor], hidden: torch.Tensor, derived: dict | None = None) -> torch.Tensor:
    """hidden @ decode_rows(tensors)^T for many hidden states, one stage's share at a time.

    The logits are linear in the stages, so with h' = h A^T each stage adds h' . y_hat_s to every row it
    codes, and no row is ever assembled. A stage of pieces gathers, a block of rows at a time, each group
    of equal pieces into its own contiguous buffer (one index_select) and multiplies it with the matching
    columns of h'. Decoding rows instead wrote every piece into the row, restored the column order with a
    gather (water-filled sizes interleave) and added the stages together: Gemma-3-270M's forward pass on
    4 x 64 tokens took 1.8x the original's that way at 2 bpw, and about 1.1x this way (docs/method.md).
    A whole-row stage (the coarse one) is a table of K logits per state, gathered at each row's code; a
    focus stage's rows in the block are looked up the same way and their products added to their rows of the
    block; the gains scale the finished rows. Every stage of pieces costs a product as large as the dense
    head's, which is why a tied head's stages hold up to d / 2 pieces (CodebookConfig.piece_dim): at 4 bpw two
    stages of d / 4 made the forward pass 1.7x the original's, one stage of d / 2 1.2x. A block's logits are
    made rows first (the fast form of its products) and copied into the output while they are in cache. (A focus stage
    used to be decoded whole and its logits added column by column to the finished output: a fifth of
    the head's time at 2 bpw.) A 16-bit model's states are multiplied, added up and returned in their own
    dtype, as its dense head would (_product_dtype); h' itself is made in float32."""
    d = tensors["transform"].shape[0]
    flat = hidden.reshape(-1, d)
    stages = _stages(tensors)
    V, device, N = stages[0][0].shape[0], flat.device, flat.shape[0]
    h = flat.float() @ dequantized(tensors, "transform").to(device).T  # (N, d)
    dtype = _product_dtype(tensors, hidden)
    full, focus = [], []
    plans = _derived(derived, ("plans", device), lambda: [_decode_plan(book, sizes, device)
                                                           for _, book, sizes, _ in stages])
    tables = [[table for _, _, table, _ in plan[0]] for plan in plans]  # each group's centroids, in that dtype
    if dtype != torch.float32:
        tables = _derived(derived, ("tables", device, dtype), lambda: [[t.to(dtype) for t in ts] for ts in tables])
    for (codes, book, sizes, rows), plan, cast in zip(stages, plans, tables):
        groups = plan[0]
        if len(sizes) == 1 and rows is None:  # a whole-row stage: K logits per hidden state
            groups = [(None, None, (groups[0][2] @ h[:, groups[0][3]].T).to(dtype), None)]
        else:  # per group of equal pieces, its centroids and the columns of h' they meet
            groups = [(at, offsets, table, h[:, columns].T.to(dtype).contiguous())
                      for (at, offsets, _, columns), table in zip(groups, cast)]
        if rows is None:
            full.append((codes, book.shape[0], len(sizes), groups))
        elif len(rows):
            focus.append((codes, book.shape[0], len(sizes), groups, rows.to(device).long()))
    gain = tensors["gain"].to(device).float() if "gain" in tensors else None
    out = torch.empty(N, V, device=device, dtype=dtype)
    block = max(16, _STAGE_BLOCK // (d + N)) if device.type == "cpu" else max(1024, 2**26 // (d + N))
    starts = torch.arange(0, V + block, block, device=device)
    focus = [(*stage, torch.searchsorted(stage[4], starts).tolist()) for stage in focus]  # each block's share
    for j, i in enumerate(range(0, V, block)):
        acc = None
        for codes, K, pieces, groups in full:
            acc = _stage_products(unpack(codes[i:i + block].to(device), K, pieces), groups, acc)
        for codes, K, pieces, groups, rows, bounds in focus:  # the stage's rows in this block, added to their rows
            a, b = bounds[j], bounds[j + 1]
            if b > a:
                acc.index_add_(0, rows[a:b] - i, _stage_products(unpack(codes[a:b].to(device), K, pieces), groups))
        if gain is not None:
            acc *= gain[i:i + block].unsqueeze(1).to(dtype)
        out[:, i:i + len(acc)] = acc.T
    return out.view(*hidden.shape[:-1], V)


def _product_dtype(tensors: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.dtype:
    """What a tied head's products, sums and logits are in (stage_logits; lookup_logits' tables): 16-bit hidden
    states (a bfloat16 or float16 model) in their own dtype, as the model's dense head does, where the hardware
    multiplies it fast (a GPU; a CPU with bfloat16 units, for bfloat16) and no backward pass may run through the
    head (healing, fine-tuning); else float32. On this
    project's CPU with bfloat16 units the 16-bit products took Gemma-3-270M's head on 256 bfloat16 states from
    0.68 s to 0.37 s (the dense bfloat16 head: 0.13 s; docs/method.md); a float16 product there took 150 times
    as long as a float32 one, and a CPU without bfloat16 units is as slow in bfloat16."""
    if not sixteen_bit(hidden.dtype) or not fast_product(hidden.dtype, hidden.device) \
            or may_train(hidden, *tensors.values()):
        return torch.float32
    return hidden.dtype


def _table_dtype(tensors: dict[str, torch.Tensor], hidden: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """What lookup_logits' per-piece tables are rounded to: the products' dtype (`dtype`, from _product_dtype), or
    bfloat16 for up to _STEP_STATES float32 states (a generation step) on a CPU with bfloat16 units, outside
    training. Their sums read half the bytes, and embedding_bag adds bfloat16 entries up in float32: Gemma-3-270M's
    generation step went 1.08x -> 0.96x the original's at 4 bpw and 0.86x -> 0.79x at 2 bpw, for a next-token KL of
    4.5e-4 nats to the exact product (the 4 bpw codebook's own KL to the original, 0.0103, became 0.0108), as
    torch's int8 and int4 kernels trade (docs/method.md). More states, and a measurement of any number of them
    (compressed.exact_heads: every perplexity figure), keep float32 tables."""
    states = hidden.numel() // max(1, hidden.shape[-1])
    if dtype == torch.float32 and states <= _STEP_STATES and hidden.device.type == "cpu" and step_shortcuts() \
            and fast_product(torch.bfloat16, hidden.device) and not may_train(hidden, *tensors.values()):
        return torch.bfloat16
    return dtype


def _stage_products(index: torch.Tensor, groups: list[tuple], acc: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, N): one stage's share of the logits for the rows of `index` (their codes, unpacked), added
    into `acc` when given. A group of equal pieces gathers its centroids side by side and multiplies them
    with the matching columns of h'; a whole-row stage gathers each row's entry of its K logits per state."""
    for at, offsets, table, columns in groups:
        if offsets is None:
            part = table.index_select(0, index[:, 0].long())
            acc = part if acc is None else acc.add_(part)
        else:
            looked = table.index_select(0, (index[:, at].int() + offsets).view(-1)).view(len(index), -1)
            acc = looked @ columns if acc is None else acc.addmm_(looked, columns)
    return acc


def _derived(derived: dict | None, key: tuple, make):
    """derived[key], made once (`make()`); made at every call where no dict is kept. Building the decoding tables
    of every stage took 1.0 of the 2.4 ms that decoding 256 rows of all-MiniLM-L6-v2 at 2 bpw takes. What is kept
    is made outside inference mode and without gradients, so a table made during `torch.inference_mode()` (a
    bench, a generation) also serves a later pass that autograd records (fine-tuning the layers around it)."""
    if derived is None:
        return make()
    if key not in derived:
        with torch.inference_mode(False), torch.no_grad():
            derived[key] = make()
    return derived[key]


def decode_rows(tensors: dict[str, torch.Tensor], index: torch.Tensor | slice = slice(None),
                derived: dict | None = None) -> torch.Tensor:
    """Rows `index` of the reconstructed embedding, float32; an absent row is the stored fill row. `derived`: a
    dict kept while `tensors` stay the same, where the decoding tables and the transform are kept (_derived)."""
    transform = _derived(derived, ("transform",), lambda: dequantized(tensors, "transform"))
    absent = tensors.get("absent")
    if absent is None:
        return decode_transformed(tensors, index, derived) @ transform
    device = tensors["stage0.codes"].device
    rows = torch.arange(_vocab(tensors), device=device)[index] if isinstance(index, slice) else index.to(device).long()
    at, hit = _placed(absent, rows)
    out = tensors["absent.fill"].float().to(device).expand(len(rows), -1).clone()
    if not bool(hit.all()):
        out[~hit] = decode_transformed(tensors, at[~hit], derived) @ transform
    return out


def decode_transformed(tensors: dict[str, torch.Tensor], index: torch.Tensor | slice = slice(None),
                       derived: dict | None = None) -> torch.Tensor:
    """Coded rows `index` before the transform (gain included): decode_rows = decode_transformed @ transform where
    no row is absent (with absent rows, `index` counts the coded rows only)."""
    stages = _stages(tensors)
    device = stages[0][0].device
    plans = _derived(derived, ("plans", device), lambda: [_decode_plan(book, sizes, device)
                                                           for _, book, sizes, _ in stages])
    y = None
    for (codes, book, sizes, rows), plan in zip(stages, plans):
        if rows is None:
            y = _stage_decode(unpack(codes[index], book.shape[0], len(sizes)), plan, y)
        else:  # stage 0 always codes every row, so y exists
            at, among = _members(rows, index, stages[0][0].shape[0])
            if len(at):
                y.index_add_(0, at.to(y.device), _stage_decode(unpack(codes[among], book.shape[0], len(sizes)), plan))
    if "gain" in tensors:
        y *= tensors["gain"][index].float().unsqueeze(1)
    return y


# -- the storage kind ------------------------------------------------------------------------------
from .compressed import TensorSet, may_train, register, step_shortcuts, storage_dtype  # noqa: E402
from .errors import FactorsError, OptionError  # noqa: E402
from .options import flagged  # noqa: E402
from .quant import below_int8_grid  # noqa: E402


def _table_ok(tensors: dict[str, torch.Tensor], name: str, hidden: int) -> bool:
    """A stored table is n x d: int8 with `NAME.scale` (d floats), or floats (format 3) without one."""
    t, scale = tensors.get(name), tensors.get(name + ".scale")
    if t is None or t.ndim != 2 or t.shape[1] != hidden:
        return False
    if t.is_floating_point():
        return scale is None
    return (t.dtype == torch.int8 and scale is not None and scale.is_floating_point()
            and tuple(scale.shape) == (hidden,))


def _check_levels(tensors: dict[str, torch.Tensor], name: str, what: str) -> None:
    """An int8 table's levels run -127..127 (symmetric about 0, as round8 writes them): -128 is refused by name."""
    if below_int8_grid(tensors[name]):
        raise FactorsError(f"codebook {what} holds the level -128; int8 tables use -127..127 (docs/format.md)")


def check_tensors(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(V, d) of a codebook tensor set, or a one-line FactorsError naming what is inconsistent."""
    transform = tensors.get("transform")
    if transform is None or transform.ndim != 2 or not _table_ok(tensors, "transform", transform.shape[0]):
        raise FactorsError("codebook tensors need a square 'transform': int8 with 'transform.scale' (one float per "
                           "row), or floats")
    _check_levels(tensors, "transform", "transform")
    hidden, vocab, s = transform.shape[0], None, 0
    while f"stage{s}.codes" in tensors:
        codes, book, sizes, rows = (tensors.get(f"stage{s}.{n}") for n in ("codes", "codebook", "sizes", "rows"))
        if book is None or sizes is None or codes.dtype != torch.uint8 or codes.ndim != 2 \
                or not _table_ok(tensors, f"stage{s}.codebook", hidden) \
                or sizes.dtype != torch.int32 or int(sizes.sum()) != hidden or (sizes < 1).any() \
                or codes.shape[1] * _per_byte(book.shape[0]) < len(sizes):
            raise FactorsError(f"codebook stage {s} is inconsistent (codes uint8 V x m, codebook K x {hidden} "
                               f"int8 with {hidden} float scales or floats, sizes int32 summing to {hidden})")
        _check_levels(tensors, f"stage{s}.codebook", f"stage {s}'s codebook")
        top = int(unpack(codes, book.shape[0], len(sizes)).max()) if codes.numel() and len(book) < 256 else -1
        if top >= len(book):  # (uint8 indices cannot pass 255)
            raise FactorsError(f"codebook stage {s} has indices up to {top} but its codebook holds {len(book)} entries")
        if rows is None:
            if vocab is not None and codes.shape[0] != vocab:
                raise FactorsError(f"codebook stage {s} codes {codes.shape[0]} rows, stage 0 {vocab}")
            vocab = codes.shape[0]
        elif vocab is None or rows.dtype != torch.int32 or tuple(rows.shape) != (codes.shape[0],) \
                or not _increasing_within(rows, vocab):
            raise FactorsError(f"codebook focus stage {s} needs int32 'rows', one per code row, increasing, "
                               "within the vocabulary, after a stage that codes every row")
        s += 1
    if vocab is None or vocab < 1:
        raise FactorsError("codebook tensors hold no stage")
    known = {"transform", "transform.scale", "gain", "absent", "absent.fill"} | {
        f"stage{i}.{name}" for i in range(s) for name in ("codes", "codebook", "codebook.scale", "sizes", "rows")}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise FactorsError(f"codebook tensors hold {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}, "
                           "which the format does not define (stage numbers run from 0 without a gap; docs/format.md)")
    gain = tensors.get("gain")
    if gain is not None and (tuple(gain.shape) != (vocab,) or not gain.is_floating_point()):
        raise FactorsError(f"codebook gain must be {vocab} floats")
    absent, fill = tensors.get("absent"), tensors.get("absent.fill")
    if absent is None and fill is None:
        return vocab, hidden
    whole = vocab + (0 if absent is None else len(absent))
    if absent is None or fill is None or absent.dtype != torch.int32 or absent.ndim != 1 \
            or tuple(fill.shape) != (hidden,) or not fill.is_floating_point() or not _increasing_within(absent, whole):
        raise FactorsError(f"codebook 'absent' needs int32 row numbers, increasing, within the {whole} rows, and "
                           f"'absent.fill': {hidden} floats")
    return whole, hidden


@register
class Codebook(TensorSet):
    """Rows as uint8 indices into learned codebooks (residual product quantization, see above)."""

    kind = "codebook"
    exportable = False  # its piece sizes and stages, read from stored tensors, shape the decoding
    check = staticmethod(check_tensors)

    @classmethod
    def decode(cls, tensors: dict[str, torch.Tensor], index: torch.Tensor | slice,
               derived: dict | None = None) -> torch.Tensor:
        return decode_rows(tensors, index, derived)

    @classmethod
    def head_logits(cls, tensors: dict[str, torch.Tensor], hidden: torch.Tensor,
                    derived: dict | None = None) -> torch.Tensor | None:
        return head_logits(tensors, hidden, derived)
