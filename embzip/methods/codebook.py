"""`codebook`: rows as small integer indices into learned codebooks (codebook.py), sized by --bits."""

import logging
import math
from dataclasses import replace

import torch

from ..codebook import Codebook, CodebookConfig, coarse_stages, fit_codebook, plan
from ..errors import RankError
from .base import BITS, Method, register

log = logging.getLogger("embzip")
WORKING_COPIES = 3.0  # float32 V x d matrices a fit holds at its peak, blocks of rows included (measured over the
# baseline: 2.6-3.1 for 262144 x 640, float32 and bfloat16, 1-4 bpw, 3.0 for 128256 x 4096; 5.3-5.4 before the
# residual was read in blocks; docs/scale.md)


def warn_if_short_of_memory(vocab: int, hidden: int, device: str) -> None:
    """Say before the fit, not after minutes of it, when the machine looks too small for its working copies."""
    from ..checkpoint import available_memory

    need = WORKING_COPIES * vocab * hidden * 4
    try:
        free = sum(available_memory(device).values())
    except (ImportError, RuntimeError):  # psutil missing, or a device that cannot tell: no warning
        return
    if need > free:
        log.warning("the codebook fit holds about %.1f GB of working copies of the %d x %d matrix, and %.1f GB of "
                    "memory is free: it may swap or stop with 'not enough memory'", need / 1e9, vocab, hidden,
                    free / 1e9)


def fitting_config(bits: float, vocab: int, hidden: int, recipe, tied: bool = False) -> CodebookConfig:
    """The recipe's codebook settings at `bits` for a model with or without a tied head (CodebookConfig.piece_dim),
    with fewer centroids (256, 128, ..., 4) when the codebooks of a small vocabulary would not leave room for the
    indices; a RankError when no setting fits."""
    config, error = _planned(bits, vocab, hidden, recipe, tied)
    if config is not None:
        return config
    if not str(error).endswith("give more bits"):
        raise RankError(f"codebook: {error}")
    least = _least_bits(bits, vocab, hidden, recipe, tied)
    if least is None:  # more bits would not help: the tables alone outgrow the matrix
        raise RankError(f"codebook: a {vocab} x {hidden} matrix is too small for codebooks at any budget up to 16 "
                        "bits per weight (their tables would take more than its rows); use int8, int4 or svd")
    raise RankError(f"codebook: {error}: the least it holds here is {least[0]:g}, with {least[1]} centroids")


def _planned(bits: float, vocab: int, hidden: int, recipe,
             tied: bool) -> tuple[CodebookConfig | None, Exception | None]:
    """(the settings at `bits` with the most centroids that plan, None) or (None, the error with the most)."""
    config = replace(recipe.codebook, bits=bits, min_piece_dim=recipe.codebook.piece_dim(tied))
    error = None
    for centroids in (c for c in (256, 128, 64, 32, 16, 8, 4) if c <= config.centroids):
        try:
            plan(vocab, hidden, replace(config, centroids=centroids), min(centroids, vocab))
            return replace(config, centroids=centroids), None
        except ValueError as exc:
            error = error or exc
    return None, error


def _least_bits(bits: float, vocab: int, hidden: int, recipe, tied: bool) -> tuple[float, int] | None:
    """The smallest budget above `bits` that plans, rounded up to three significant digits, and its centroids; None
    when none up to 16 does. Budgets grow by a quarter until one plans (more bits can need more stages, which a
    large min_piece_dim may not hold: the budgets that plan need not reach 16), then bisection between the last
    that did not and the first that did (the plan is arithmetic: this takes milliseconds)."""
    def planned(b):
        return _planned(b, vocab, hidden, recipe, tied)[0]

    low, high = bits, bits * 1.25
    while planned(min(high, 16.0)) is None:
        if high >= 16.0:
            return None
        low, high = high, high * 1.25
    high = min(high, 16.0)
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if planned(middle) is not None else (middle, high)
    step = 10 ** (math.floor(math.log10(high)) - 2)
    least = float(f"{math.ceil(high / step) * step:.3g}")
    config = planned(least)
    if config is None:  # rounding up crossed a budget that needs one more stage
        least, config = high, planned(high)
    return least, config.centroids


def check_bits(bits, vocab, hidden, dtype, recipe):
    """Refuse a budget the codebooks cannot hold before any work is done. It plans as for a model without a tied
    head (stages of d / 4 pieces unless the recipe says otherwise): a tied head's stages of d / 2 need no more
    stages, so they fit wherever these do."""
    fitting_config(bits, vocab, hidden, recipe)
    return bits


def make(inputs, bits, recipe):
    vocab, hidden = inputs.embedding.shape
    config = fitting_config(bits, vocab, hidden, recipe, inputs.opened.tied)
    warn_if_short_of_memory(vocab, hidden, inputs.device)
    weights = inputs.weights(config.weight_power(inputs.opened.tied),
                             prior_share=config.prior_share(inputs.samples_model()))
    metric = inputs.metric(recipe.aware.output_metric, recipe.aware.metric_tokens)
    sensitivity = inputs.encoder_sensitivity()  # an encoder's: its sentence vectors' metric, what a row's reading costs
    if sensitivity is not None:
        metric, scale = sensitivity
        weights = weights * scale.to(weights.dtype)
    absent = left_out(inputs, config)
    tensors = fit_codebook(inputs.embedding, weights=weights, metric=metric, config=config, device=inputs.device,
                           progress=inputs.progress, absent=absent)
    return Codebook(tensors), {"unreachable_rows": len(absent), "min_piece_dim": config.min_piece_dim,
                               "coarse_stages": coarse_stages(tensors),
                               "vocab_prior": inputs.details.get("vocab_prior", 0.0)}  # 0 where none joined


def left_out(inputs, config: CodebookConfig) -> torch.Tensor:
    """Rows to leave uncoded: those of tokens the tokenizer never produces (reach.py), on a model without a tied
    head (a tied head scores every row), unless `config.unreachable` asks for every row. Never more than half
    the rows: a tokenizer that seems to reach fewer is not one this test understands, and nothing is left out."""
    if config.unreachable or inputs.opened.tied:
        return torch.zeros(0, dtype=torch.long)
    rows = inputs.unreachable_rows()
    return rows if 2 * len(rows) < inputs.embedding.shape[0] else torch.zeros(0, dtype=torch.long)


METHOD = register(Method(
    "codebook", "codebook", BITS,
    "indices into learned codebooks, token-weighted, in the tied head's or the encoder's metric",
    make, uses_text=True, needs_forward=True, encoder_metric=True, default_bits=2.0, check_bits=check_bits, draws=True,
    options=("output_metric", "metric_tokens", "input_metric", "self_tokens", "sample_languages", "weight_power",
             "weight_floor", "focus", "vocab_prior", "code_unreachable", "min_piece_dim")))
