"""`paper`: the linear autoencoder of "Direction is what you need" (arXiv 2106.08181), its exact recipe."""

from ..autoencoder import fit_autoencoder
from .base import RANK, Method, register


def make(inputs, rank, recipe):
    weights = inputs.weights() if recipe.weighted_paper else None
    factors, history = fit_autoencoder(inputs.embedding, rank, recipe.fit, device=inputs.device,
                                       progress=inputs.progress, weights=weights)
    return factors, {"history": history}


METHOD = register(Method(
    "paper", "lowrank", RANK, "the paper's linear autoencoder (cosine first, annealed L1), its exact recipe", make,
    draws=True, options=("epochs", "anneal_epochs", "batch_size", "lr", "lr_step", "lr_gamma", "cos_weight",
                         "l1_weight", "alpha_start", "alpha_end", "init", "weighted")))
