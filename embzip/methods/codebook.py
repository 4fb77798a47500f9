"""`codebook`: rows as small integer indices into learned codebooks (codebook.py), sized by --bits."""

from dataclasses import replace

from ..codebook import Codebook, fit_codebook
from .base import BITS, Method, register


def make(inputs, bits, recipe):
    config = replace(recipe.codebook, bits=bits)
    weights = inputs.weights()
    metric = inputs.metric(recipe.aware.output_metric, recipe.aware.metric_tokens)
    tensors = fit_codebook(inputs.embedding, weights=weights, metric=metric, config=config, device=inputs.device,
                           progress=inputs.progress)
    return Codebook(tensors), {}


METHOD = register(Method(
    "codebook", "codebook", BITS, "indices into learned codebooks, token-weighted, in the tied head's metric",
    make, uses_text=True, needs_forward=True, default_bits=2.0,
    options=("output_metric", "metric_tokens", "weight_power", "weight_floor")))
