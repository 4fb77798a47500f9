"""What a method is: a name, the storage kind it makes, how its size is given, and one function.

A method module (one file per method in this package) defines a `Method` and registers it.
`make(inputs, size, recipe)` returns the compressed embedding (float tensors in float32 or
already at their stored dtype) and a dict of details to record. `Inputs` hands every method the
embedding and, computed once and cached, the data-aware pieces: the weights text, token counts,
row weights, the hidden-state metric of a tied head and an encoder's sentence-vector metric
(sensitivity.py); for causal LMs that a method runs anyway, the model's own samples join the text in
the counts and the hidden-state metric (selfsample.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..errors import ModelError, RankError
from ..options import flagged

RANK, BITS, FIXED = "rank", "bits", "fixed"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # storage kind (compressed.py): lowrank, quant, codebook
    sized_by: str  # RANK (--rank/--ratio/--bits pick a rank), BITS (--bits/--ratio), FIXED (one size)
    summary: str  # one line for --help
    make: Callable[..., tuple[Any, dict[str, Any]]]
    uses_text: bool = False  # reads the weights text (token counts)
    needs_forward: bool = False  # runs the model (hidden-state metric); else the matrix alone suffices
    encoder_metric: bool = False  # codes an encoder's rows in its sentence-vector metric (Inputs.encoder_sensitivity)
    draws: bool = False  # draws random numbers on every model (--seed picks them); else only to sample or heal
    options: tuple[str, ...] = ()  # names of `embzip fit` options that belong to this method
    fixed_bits: Callable[..., float] | None = None  # FIXED: (vocab, hidden, dtype, recipe) -> bits per weight stored
    default_bits: float | None = None  # BITS: the size when none is given
    check_bits: Callable[..., float] | None = None  # BITS: (bits, vocab, hidden, dtype, recipe) -> bits, or RankError
    file_label: Callable[[Any], str] | None = None  # (recipe) -> the name in default file names, when not `name` alone


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def samples(recipe, opened) -> bool:
    """Whether a fit of `recipe` samples `opened`: a causal LM with a tied head, a method that runs the model, and
    sampling not turned off. A tied head scores every row at every position, so its rows are weighted by what the
    model itself writes, in every language it writes. An untied model's rows are read only where their tokens
    are input: its fit reads the embedding alone, never the whole model (docs/scale.md: a 70B model's
    embedding, not its layers)."""
    return bool(recipe.spec.needs_forward and recipe.sample.tokens > 0 and samples_itself(opened))


def samples_itself(opened) -> bool:
    """Whether `opened` is a model whose own samples weight its rows: a causal LM with a tied head."""
    from ..models import CAUSAL_LM

    return opened.kind == CAUSAL_LM and opened.tied


def has_sentence_metric(opened) -> bool:
    """Whether `opened` is a model whose rows are measured by its sentence vectors: an encoder without an LM head."""
    from ..models import ENCODER

    return opened.kind == ENCODER and not opened.tied


class Inputs:
    """The embedding and, on first use, the data-aware pieces (cached in `cache` across calls)."""

    def __init__(self, opened, recipe, *, device: str = "cpu", progress: bool = False, cache: dict | None = None):
        self.opened, self.recipe, self.device, self.progress = opened, recipe, device, progress
        self.cache = {} if cache is None else cache
        self.embedding = opened.embedding.detach()
        self.details: dict[str, Any] = {}

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def _text_key(self) -> tuple:
        return (self.recipe.weights_text, self.recipe.weights_dataset)

    def text(self):
        from ..texts import load_text

        return self._cached(("text",) + self._text_key, lambda: load_text(
            self.recipe.weights_text, self.recipe.weights_dataset, sample="weights"))

    def unreachable_rows(self) -> torch.Tensor:
        """Sorted rows of the tokens the tokenizer never produces (reach.py; none without a tokenizer), found once
        per model: `embzip bench` fits the codebook at several sizes from one cache."""
        from .. import reach

        if self.opened.tokenizer is None:
            return torch.zeros(0, dtype=torch.long)
        return self._cached(("unreachable",), lambda: reach.unreachable_rows(self.opened.tokenizer,
                                                                             self.embedding.shape[0]))

    def weights(self, default_power: float = 1.0, prior_share: float = 0.0) -> torch.Tensor:
        """Row weights (mean 1) from token counts on the weights text (and the model's samples, where they join),
        with the recipe's power or, where it gives none, `default_power` (the method's choice for this model and
        size); the tokenizer's vocabulary prior (where it has one) joins at `prior_share` of the text's total."""
        from ..selfsample import combine_counts
        from ..weights import coverage, row_weights, token_counts, vocabulary_prior

        if self.opened.tokenizer is None:
            raise ModelError(f"{self.opened.source} has no tokenizer, and method {self.recipe.name} needs one to "
                             "count tokens; use a method that reads the matrix alone (svd, int8, int4)")
        text = self.text()
        counts = self._cached(("counts",) + self._text_key,
                              lambda: token_counts(self.opened.tokenizer, text, self.opened.vocab_size))
        self.details["weights_coverage"] = coverage(counts)
        prior = None
        if prior_share > 0:
            prior = self._cached(("prior",) + self._text_key, lambda: vocabulary_prior(
                self.opened.tokenizer, self.opened.vocab_size, counts=counts, exclude=self.unreachable_rows()))
            self.details["vocab_prior"] = prior_share if prior is not None else 0.0
        sampled = self.sampled()
        counts = combine_counts(counts, None if sampled is None else sampled[0], prior, prior_share)
        config = self.recipe.weights
        if config.power is None:
            config = replace(config, power=default_power)
        self.details["weight_power"] = config.power
        return row_weights(counts, config)

    def samples_model(self) -> bool:
        """Whether the model's own samples join the text (`samples`)."""
        return samples(self.recipe, self.opened)

    def sampled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(expected token counts, head-input second moment) from the model's own samples, or None."""
        if not self.samples_model():
            return None
        from ..selfsample import cached_statistics

        config = self.recipe.sample
        if self.opened.max_length:  # a sample never runs past the positions the model has
            config = replace(config, length=min(config.length, self.opened.max_length))
        key = ("sampled", *config.settings().values())  # every setting, so a new one can never be left out
        out = self._cached(key, lambda: cached_statistics(self.opened.model, self.opened.tokenizer, config,
                                                          progress=self.progress))
        self.details["self_sample"] = config.settings()
        return out

    def metric(self, gamma: float, tokens: int) -> torch.Tensor | None:
        """M = I + gamma S / mean eig(S) for a tied head (None when untied or gamma is 0)."""
        from ..aware import hidden_second_moment, normalised_metric

        if not self.opened.tied or gamma <= 0:
            return None
        opened, text = self.opened, self.text()
        moment = self._cached(("moment", tokens) + self._text_key, lambda: hidden_second_moment(
            opened.model, opened.tokenizer, text.lines, tokens, seq_len=min(256, opened.max_length or 256)))
        sampled = self.sampled()
        if sampled is not None:
            from ..selfsample import combine_moments

            moment = combine_moments(moment, sampled[1])
        return normalised_metric(moment, gamma, self.embedding.shape[1])

    def encoder_sensitivity(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For an encoder without an output head (sensitivity.py): the metric M = I + gamma G / mean eig(G) (gamma:
        the codebook's input_metric) and the factor of each row's weight (sensitivity.row_scale), measured on the
        weights text's sentences; None where it does not apply."""
        from ..aware import normalised_metric
        from ..sensitivity import row_scale, sentence_sensitivity

        if not uses_encoder_metric(self.recipe, self.opened):
            return None
        opened = self.opened
        measured = self._cached(("sentence_sensitivity",) + self._text_key, lambda: sentence_sensitivity(
            opened.model, opened.tokenizer, self.text(), progress=self.progress))
        gamma = self.recipe.codebook.input_metric
        self.details["input_metric"] = gamma
        return normalised_metric(measured.moment, gamma, self.embedding.shape[1]), row_scale(measured)


def refuse_unused(recipe, opened) -> None:
    """Options given for a kind of model that `opened` is not are an error, not settings recorded in the file as
    if they had acted: the model's own samples (a causal LM with a tied head) and an encoder's metric (an encoder
    without an LM head). Checked once the model is open, before any work."""
    from ..errors import OptionError
    from ..models import ENCODER

    what = f"{opened.source} is {'an' if opened.kind == ENCODER else 'a'} {opened.kind}" + (
        " with a tied head" if opened.tied else " without a tied head")
    sampling = [flagged(n) for n in ("self_tokens", "sample_languages") if n in recipe.given
                and (n != "self_tokens" or recipe.sample.tokens > 0)]  # --self-tokens 0 says what is so anyway
    if sampling and not samples_itself(opened):
        raise OptionError(f"{' and '.join(sampling)} set the model's own samples, which only a causal LM with a "
                          f"tied head gives; {what}: leave {'them' if len(sampling) > 1 else 'it'} out")
    if "sample_languages" in recipe.given and recipe.sample.tokens == 0:
        raise OptionError(f"{flagged('sample_languages')} shares out the sampled tokens, and "
                          f"{flagged('self_tokens')} 0 samples none")
    if "seed" in recipe.given and not (recipe.spec.draws or samples(recipe, opened) or recipe.heal is not None):
        when = " here" if recipe.spec.needs_forward else ""
        raise OptionError(f"{flagged('seed')} picks random draws, and {recipe.name} draws none{when} (the same model "
                          "always gives the same file): leave it out")
    if "input_metric" in recipe.given and not has_sentence_metric(opened):
        raise OptionError(f"{flagged('input_metric')} weights an encoder's rows by its sentence vectors; {what}: "
                          f"leave it out (a tied head's rows are measured by {flagged('output_metric')})")


def uses_encoder_metric(recipe, opened) -> bool:
    """Whether a fit of `recipe` measures `opened`'s sentence-vector metric (sensitivity.py): an encoder without
    an output head, a method that reads it, and its weight not 0."""
    return bool(recipe.spec.encoder_metric and has_sentence_metric(opened) and recipe.codebook.input_metric > 0)


def check_size(method: Method, *, rank: int | None, ratio: float | None, bits: float | None) -> None:
    """Refuse a size option the method cannot take, naming what it takes."""
    given = [flagged(name) for name, value in (("rank", rank), ("ratio", ratio), ("bits", bits)) if value is not None]
    if len(given) > 1:
        raise RankError(f"give exactly one of rank (--rank), ratio (--ratio) and bits (--bits), not "
                        f"{' and '.join(given)}")
    if method.sized_by != RANK and rank is not None:
        raise RankError(f"method {method.name} is not low-rank and takes no --rank; give --bits (bits per weight)"
                        + (" or nothing" if method.sized_by == FIXED else ""))
