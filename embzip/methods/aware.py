"""`aware`: weighted SVD in the metric of the hidden states entering a tied head (aware.py)."""

from ..aware import aware_factors
from .base import RANK, Method, register


def make(inputs, rank, recipe):
    config = recipe.aware
    weights = inputs.weights() if config.row_weights else None
    metric = inputs.metric(config.output_metric, config.metric_tokens)
    return aware_factors(inputs.embedding, rank, weights=weights, metric=metric, keep_norms=config.keep_norms,
                         device=inputs.device, measure=False), {}


METHOD = register(Method(
    "aware", "lowrank", RANK, "data-aware SVD: token-count row weights, hidden-state metric for tied heads", make,
    uses_text=True, needs_forward=True,
    options=("output_metric", "metric_tokens", "self_tokens", "sample_languages", "keep_norms", "weight_power", "weight_floor")))
