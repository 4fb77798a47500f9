"""`wsvd`: SVD with rows weighted by token counts on a corpus (weights.py)."""

from ..aware import aware_factors
from .base import RANK, Method, register


def make(inputs, rank, recipe):
    return aware_factors(inputs.embedding, rank, weights=inputs.weights(), keep_norms=recipe.aware.keep_norms,
                         device=inputs.device, measure=False), {}


METHOD = register(Method("wsvd", "lowrank", RANK, "SVD weighted by token counts", make, uses_text=True,
                         options=("keep_norms", "weight_power", "weight_floor")))
