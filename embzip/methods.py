"""Recipes: everything that decides how factors are made, and the one function that makes them.

- `svd`: plain truncated SVD (the baseline).
- `paper`: the paper's linear autoencoder with its exact recipe (optionally with row weights).
- `wsvd`: SVD weighted by token counts on a corpus.
- `aware`: weighted SVD in the metric of the hidden states entering a tied output head
  (aware.py); the default of `embzip fit`.
Any of them can be followed by healing (heal.py): a short distillation against the original
model. Data-aware parts read a weights text: by default a public-domain English sample
shipped with embzip (embzip/data/weights.txt), distinct from the perplexity sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from .aware import AwareConfig
from .errors import ModelError
from .autoencoder import FitConfig
from .heal import HealConfig
from .weights import WeightConfig

METHODS = ("svd", "paper", "wsvd", "aware")
DEFAULT_FIT_METHOD = "aware"


@dataclass
class Recipe:
    """How to make factors: the method, its settings, and the text that data-aware parts read."""

    method: str = DEFAULT_FIT_METHOD
    fit: FitConfig = field(default_factory=FitConfig)  # method "paper"
    weights: WeightConfig = field(default_factory=WeightConfig)  # token-count row weights
    aware: AwareConfig = field(default_factory=AwareConfig)  # method "aware" (and keep_norms for wsvd)
    heal: HealConfig | None = None  # healing after the method; None: none
    weighted_paper: bool = False  # method "paper": weight each row's loss by its token weight
    weights_text: str | None = None  # a text file for token counts, the metric and healing
    weights_dataset: str | None = None  # or a dataset NAME[:CONFIG[:SPLIT]]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")

    @property
    def bias(self) -> bool:
        return self.method == "paper"

    @property
    def norms(self) -> bool:
        return self.method in ("wsvd", "aware") and self.aware.keep_norms

    @property
    def uses_text(self) -> bool:
        return self.method in ("wsvd", "aware") or self.weighted_paper or self.heal is not None

    @property
    def name(self) -> str:
        return self.method + ("+heal" if self.heal is not None else "")

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.method == "paper":
            out["fit"] = self.fit.settings()
            out["weighted_paper"] = self.weighted_paper
        if self.method in ("wsvd", "aware") or self.weighted_paper:
            out["weights"] = self.weights.settings()
        if self.method == "aware":
            out["aware"] = self.aware.settings()
        if self.method == "wsvd":
            out["keep_norms"] = self.aware.keep_norms
        if self.heal is not None:
            out["heal"] = self.heal.settings()
        if self.uses_text:
            out["weights_text"] = self.weights_text or self.weights_dataset or "embzip sample weights.txt"
        return out


def recipe(name: str, **overrides) -> Recipe:
    """A recipe from a bench method name: svd, paper, wsvd, aware, fit (the default), each with an
    optional '+heal' suffix (e.g. aware+heal)."""
    base, _, extra = name.partition("+")
    if extra not in ("", "heal"):
        raise ValueError(f"unknown method suffix {'+' + extra!r} in {name!r}; only +heal exists")
    method = DEFAULT_FIT_METHOD if base == "fit" else base
    r = Recipe(method=method, **overrides)
    if extra == "heal" and r.heal is None:
        r.heal = HealConfig()
    return r


def _text(recipe: Recipe):
    from .texts import load_text

    return load_text(recipe.weights_text, recipe.weights_dataset, sample="weights")


def make_factors(opened, rank: int, recipe: Recipe, *, device: str = "cpu", progress: bool = False,
                 cache: dict | None = None) -> tuple[Any, dict[str, Any]]:
    """Factors of `opened`'s embedding by `recipe`; returns them and the details to record.

    `cache` (a dict) keeps token counts and hidden-state statistics between calls on one model.
    """
    from .aware import aware_factors, hidden_second_moment, normalised_metric
    from .autoencoder import fit_autoencoder
    from .svd import svd_factors
    from .weights import coverage, row_weights, token_counts

    cache = {} if cache is None else cache
    embedding = opened.embedding.detach()
    details: dict[str, Any] = {"settings": recipe.settings()}
    text = weights = None
    if recipe.uses_text:
        key = ("text", recipe.weights_text, recipe.weights_dataset)
        if key not in cache:
            cache[key] = _text(recipe)
        text = cache[key]
        if opened.tokenizer is None:
            raise ModelError(f"{opened.source} has no tokenizer, and method {recipe.name} needs one to count "
                             "tokens; use --method paper or embzip svd")
        counts_key = ("counts",) + key[1:]
        if counts_key not in cache:
            cache[counts_key] = token_counts(opened.tokenizer, text, opened.vocab_size)
        counts = cache[counts_key]
        details["weights_coverage"] = coverage(counts)
        weights = row_weights(counts, recipe.weights)
    if recipe.method == "svd":
        factors = svd_factors(embedding, rank, device=device)
    elif recipe.method == "paper":
        factors, history = fit_autoencoder(embedding, rank, recipe.fit, device=device, progress=progress,
                                           weights=weights if recipe.weighted_paper else None)
        details["history"] = history
    elif recipe.method == "wsvd":
        factors = aware_factors(embedding, rank, weights=weights, keep_norms=recipe.aware.keep_norms, device=device)
    else:
        metric = None
        if opened.tied and recipe.aware.output_metric > 0:
            m_key = ("moment", recipe.aware.metric_tokens) + key[1:]
            if m_key not in cache:
                cache[m_key] = hidden_second_moment(opened.model, opened.tokenizer, text.lines,
                                                    recipe.aware.metric_tokens,
                                                    seq_len=min(256, opened.max_length or 256))
            metric = normalised_metric(cache[m_key], recipe.aware.output_metric, embedding.shape[1])
        factors = aware_factors(embedding, rank, weights=weights if recipe.aware.row_weights else None,
                                metric=metric, keep_norms=recipe.aware.keep_norms, device=device)
    if recipe.heal is not None:
        from .heal import heal

        from dataclasses import replace

        config = replace(recipe.heal, seq_len=min(recipe.heal.seq_len, opened.max_length or recipe.heal.seq_len))
        factors, history = heal(opened, factors.to(dtype=embedding.dtype), text.lines, config, progress=progress)
        details["heal"] = {"val_loss": history["val_loss"], "best_step": history["best_step"],
                           "train_loss_first": history["train_loss"][0], "train_loss_last": history["train_loss"][-1]}
    return factors, details
