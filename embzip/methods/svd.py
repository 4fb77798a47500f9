"""`svd`: truncated SVD of the embedding, codes = U_k S_k, decoder = Vh_k (the baseline)."""

from ..svd import svd_factors
from .base import RANK, Method, register


def make(inputs, rank, recipe):
    return svd_factors(inputs.embedding, rank, device=inputs.device, measure=False), {}  # measured once, after


METHOD = register(Method("svd", "lowrank", RANK, "truncated SVD (the baseline)", make))
